"""What several verbs share, so that flags mean the same everywhere: the verb's parser, argument
groups (model loading, prompts, a config and its overrides, generation), their checks, and writing
a report."""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from ..bake.lora import write_adapter
from ..config import load_config
from ..errors import InputError
from ..io.files import write_json
from ..live.server import DEFAULT_TIMEOUT, ServerOptions

MODEL_HELP = "model directory, .gguf file, 'smollm2', 'organism', 'organism-moe', 'organism-moe-experts' or hub id"


def add_verb(sub: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], int], *,
             summary: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    """The verb's parser: ``summary`` is its line in ``intervene --help``, ``description`` (prose; its
    line breaks are not kept) heads its own ``--help``; ``run(args)`` is what the verb does."""
    p = sub.add_parser(name, help=summary, description=" ".join(description.split()), **kwargs)
    p.set_defaults(func=run)
    return p


def add_model_argument(p: argparse.ArgumentParser, config_default: bool = True) -> None:
    """The optional positional MODEL (with ``config_default``: it defaults to the config's model)."""
    p.add_argument("model", nargs="?", default=None,
                   help=MODEL_HELP + (" (default: the config's model)" if config_default else ""))


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model loading")
    g.add_argument("--dtype", default="auto",
                   help="weights dtype: auto (the checkpoint's own), float32, bfloat16 or float16; means, moments "
                        "and KL are accumulated in float32/float64 whatever it is (default: auto)")
    g.add_argument("--device-map", default=None,
                   help="transformers device_map, e.g. 'auto' or 'cuda:0' (default: CPU)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: 16)")
    g.add_argument("--system-prompt", default=None, help="system message added before each prompt")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed raw prompt text (for models without a chat template)")


def add_stream_options(g: argparse._ArgumentGroup, stream_help: str, hidden_on_help: str | None = None) -> None:
    """``--stream-layers`` (what it does for this verb: ``stream_help``), ``--device`` and, with
    ``hidden_on_help``, ``--hidden-on``: one decoder layer in memory at a time."""
    g.add_argument("--stream-layers", action="store_true", help=stream_help)
    g.add_argument("--device", default="cpu",
                   help="with --stream-layers: where each layer runs, e.g. cuda:0 (default: cpu)")
    if hidden_on_help is not None:
        g.add_argument("--hidden-on", choices=("device", "cpu"), default="device", help=hidden_on_help)


def add_quantization_options(p: argparse.ArgumentParser) -> None:
    """``--load-in-4bit`` / ``--load-in-8bit``: bitsandbytes weights while measuring or trying (less memory)."""
    g = p.add_argument_group("quantized loading (bitsandbytes, optional extra: pip install 'intervene[quant]')")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-in-4bit", dest="quantization", action="store_const", const="4bit", default=None,
                   help="load the model with 4-bit NF4 weights (compute in --dtype): a quarter of the memory")
    q.add_argument("--load-in-8bit", dest="quantization", action="store_const", const="8bit",
                   help="load the model with 8-bit weights")


def add_prompt_options(p: argparse.ArgumentParser, split: str) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--harmful", default=f"builtin:harmful:{split}",
                   help=f"harmful prompts: .txt (one per line), .json/.jsonl, .csv/.parquet, hf:NAME[:split], "
                        f"or builtin:harmful:train|eval (default: builtin:harmful:{split})")
    g.add_argument("--harmless", default=f"builtin:harmless:{split}",
                   help=f"harmless prompts, same forms (default: builtin:harmless:{split})")
    g.add_argument("--field", default=None, help="field/column holding the prompt in .json/.jsonl/.csv/.parquet/hf: sets")
    g.add_argument("--limit", type=int, default=None, help="use at most N prompts from each set")


def add_run_options(p: argparse.ArgumentParser, split: str) -> None:
    """``--no-progress``, model loading and the prompt sets: every verb that runs prompts through a model."""
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(p)
    add_prompt_options(p, split)


def add_config_options(p: argparse.ArgumentParser) -> None:
    """The config and overrides of its model and measurements (try, route); ``--dtype`` unset means
    the config's dtype, else auto (the checkpoint's)."""
    p.add_argument("config", help="intervention config (YAML), see configs/")
    p.add_argument("--model", default=None, help="override the config's 'model' (directory, .gguf, 'smollm2', 'organism', 'organism-moe', 'organism-moe-experts')")
    p.add_argument("--measurements", default=None, help="override the config's 'measurements' file")
    add_run_options(p, "eval")
    p.set_defaults(dtype=None)


def add_reference_options(p: argparse.ArgumentParser) -> None:
    """The reference tool's MoE flags (sharded_ablate.py), for reference-schema configs; they override its YAML."""
    g = p.add_argument_group("reference-schema configs (llm-abliteration sharded_ablate.py)")
    g.add_argument("--ablate-individual-experts", action="store_true",
                   help="also edit each routed expert of --expert-subset (all by default): its down_proj and its "
                        "gate/up projections (overrides the YAML's ablate_individual_experts)")
    g.add_argument("--expert-subset", default=None, metavar="IDS",
                   help='comma-separated expert ids, e.g. "0,1,2,3" (overrides the YAML\'s expert_subset; implies '
                        "--ablate-individual-experts)")


def load_cli_config(args: argparse.Namespace) -> Any:
    """The verb's config: native, or reference-schema translated (one line says so), with the reference
    flags of :func:`add_reference_options` applied."""
    return load_config(args.config, model=args.model, ablate_individual_experts=args.ablate_individual_experts,
                           expert_subset=args.expert_subset)


def reference_flags(args: argparse.Namespace) -> str:
    """The reference flags given, as they would be typed again (for a 'next:' line)."""
    flags = " --ablate-individual-experts" if args.ablate_individual_experts else ""
    return flags + (f' --expert-subset "{args.expert_subset}"' if args.expert_subset is not None else "")


def add_generation_options(p: argparse.ArgumentParser, json_help: str) -> None:
    """``--json``, ``--max-new-tokens`` and ``--samples`` of the verbs that generate and report (eval, try)."""
    p.add_argument("--json", default=None, metavar="OUT", help=json_help)
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per answer (default: 48)")
    p.add_argument("--samples", type=int, default=4, help="side-by-side samples per prompt set (default: 4)")


def check_at_least(value: int, least: int, flag: str) -> None:
    if value < least:
        raise InputError(f"{flag} must be >= {least}, got {value}")


def check_generation_options(args: argparse.Namespace) -> None:
    """Named errors for :func:`add_generation_options`'s numbers, before anything loads."""
    check_at_least(args.max_new_tokens, 1, "--max-new-tokens")
    check_at_least(args.samples, 0, "--samples")


def write_report(path: str | os.PathLike, report: Any) -> None:
    """Write ``report.to_dict()`` as JSON (atomically) and say where."""
    write_json(path, report.to_dict())
    print(f"report -> {path}")


def add_server_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--server URL`` / ``--server-model NAME`` / ``--server-timeout S``: ``what`` runs on a serving engine."""
    g = p.add_argument_group("generation on a server (vLLM or any OpenAI-compatible server; docs/server.md)")
    g.add_argument("--server", default=None, metavar="URL",
                   help=f"{what} on this server, e.g. http://127.0.0.1:8000 (a config runs there as its LoRA "
                        "adapter: the server needs --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)")
    g.add_argument("--server-model", default=None, metavar="NAME",
                   help="the served model's name (default: the first of the server's /v1/models)")
    g.add_argument("--server-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds one request may take (default: {DEFAULT_TIMEOUT:g})")


def server_options(args: argparse.Namespace) -> ServerOptions | None:
    """The :class:`~intervene.live.server.ServerOptions` of :func:`add_server_options`, None without ``--server``."""
    if args.server is None:
        if args.server_model is not None:
            raise InputError("--server-model needs --server URL")
        return None
    if not args.server_timeout > 0:
        raise InputError(f"--server-timeout must be > 0, got {args.server_timeout:g}")
    return ServerOptions(args.server, args.server_model, args.server_timeout, write_adapter=write_adapter)
