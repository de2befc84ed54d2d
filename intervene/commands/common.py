"""What several verbs share, so that flags mean the same everywhere: the verb's parser, argument
groups (model loading, prompts, a config and its overrides, generation), their checks, and writing
a report."""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

MODEL_HELP = "model directory, .gguf file, 'smollm2', 'organism', 'organism-moe' or hub id"


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
    g.add_argument("--dtype", default="float32",
                   help="weights dtype: float32, bfloat16, float16 or auto (default: float32)")
    g.add_argument("--device-map", default=None,
                   help="transformers device_map, e.g. 'auto' or 'cuda:0' (default: CPU)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: 16)")
    g.add_argument("--system-prompt", default=None, help="system message added before each prompt")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed raw prompt text (for models without a chat template)")


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
    the config's dtype, else float32."""
    p.add_argument("config", help="intervention config (YAML), see configs/")
    p.add_argument("--model", default=None, help="override the config's 'model' (directory, .gguf, 'smollm2', 'organism', 'organism-moe')")
    p.add_argument("--measurements", default=None, help="override the config's 'measurements' file")
    add_run_options(p, "eval")
    p.set_defaults(dtype=None)


def add_generation_options(p: argparse.ArgumentParser, json_help: str) -> None:
    """``--json``, ``--max-new-tokens`` and ``--samples`` of the verbs that generate and report (eval, try)."""
    p.add_argument("--json", default=None, metavar="OUT", help=json_help)
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per answer (default: 48)")
    p.add_argument("--samples", type=int, default=4, help="side-by-side samples per prompt set (default: 4)")


def check_at_least(value: int, least: int, flag: str) -> None:
    from ..errors import InputError

    if value < least:
        raise InputError(f"{flag} must be >= {least}, got {value}")


def check_generation_options(args: argparse.Namespace) -> None:
    """Named errors for :func:`add_generation_options`'s numbers, before anything loads."""
    check_at_least(args.max_new_tokens, 1, "--max-new-tokens")
    check_at_least(args.samples, 0, "--samples")


def write_report(path: str | os.PathLike, report: Any) -> None:
    """Write ``report.to_dict()`` as JSON (atomically) and say where."""
    from ..io.files import write_json

    write_json(path, report.to_dict())
    print(f"report -> {path}")
