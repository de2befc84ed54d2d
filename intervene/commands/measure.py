"""``intervene measure``: harmful vs harmless residual means -> measurements.safetensors."""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..io.measurements import load_refuse
from ..io.models import PromptFormat, versions
from ..measure.run import measure_model
from ..runner import RunOptions
from .common import (
    add_model_argument,
    add_quantization_options,
    add_run_options,
    add_stream_options,
    add_verb,
    check_at_least,
)

SUMMARY = "measure harmful vs harmless residual means (the refusal direction) per layer"
DESCRIPTION = """One forward pass per batch over both prompt sets (chat template, left padding); stores the
float64-accumulated mean residual at the last prompt token after every decoder layer and the embedding,
their difference (the direction), and on MoE layers the router's expert frequencies and mean logits, and
the top eigenpairs of the harmless second moment (for 'whiten' in configs and searches). The weights
load in the checkpoint's own dtype (--dtype auto). For a model larger than memory, --stream-layers holds
one decoder layer at a time. With --from-refuse, converts a jim-plus .refuse file instead."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "measure", run, summary=SUMMARY, description=DESCRIPTION)
    add_model_argument(p, config_default=False)
    p.add_argument("-o", "--output", required=True, help="output measurements file (.safetensors)")
    p.add_argument("--from-refuse", default=None, metavar="FILE",
                   help="convert a jim-plus .refuse file (loaded with weights_only=True) instead of measuring")
    p.add_argument("--whiten-rank", type=int, default=64, metavar="K",
                   help="eigenpairs of the harmless second moment stored per layer (K*H floats each; the harmless "
                        "last-token rows are held in CPU memory until the end); 0: none, and no 'whiten' "
                        "(default: 64)")
    p.add_argument("--no-attribution", action="store_true",
                   help="do not store each component's write at the last prompt token (attribution.*: attention, "
                        "dense MLP, shared experts, every routed expert's gated output and routing; E*H floats per "
                        "MoE layer and set), which 'analyze' turns into where the refusal direction grows")
    g = p.add_argument_group("models larger than memory")
    add_stream_options(g, "build the model on the meta device and run all prompts through one decoder layer at a "
                          "time, read from the safetensors shards and freed after (peak: one layer + embeddings + "
                          "the prompts' hidden states); same measurements as without it",
                       "with --stream-layers: where the prompts' hidden states wait between layers; 'cpu' for "
                       "prompt sets that do not fit next to one layer on the device (default: device)")
    add_run_options(p, "train")
    add_quantization_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    if args.from_refuse:
        if args.model:
            raise InputError("give either MODEL (to measure) or --from-refuse FILE (to convert), not both")
        return _convert(args)
    if not args.model:
        raise InputError("MODEL is required (or --from-refuse FILE to convert a .refuse file)")

    check_at_least(args.whiten_rank, 0, "--whiten-rank")
    run_options = RunOptions(dtype=args.dtype, device_map=args.device_map, quantization=args.quantization,
                             stream_layers=args.stream_layers, device=args.device, hidden_on=args.hidden_on,
                             batch_size=args.batch_size, progress=not args.no_progress)
    m = measure_model(args.model, args.harmful, args.harmless, field=args.field, limit=args.limit, run=run_options,
                      prompt_format=PromptFormat(args.system_prompt, not args.no_chat_template),
                      whiten_rank=args.whiten_rank, attribution=not args.no_attribution)
    m.save(args.output)
    moe = m.meta.get("moe_layers") or []
    print(f"measured {len(m.layers)} layers + embedding on {m.meta['n_harmful']} harmful / "
          f"{m.meta['n_harmless']} harmless prompts{f', router stats on {len(moe)} MoE layers' if moe else ''} -> {args.output}")
    print(f"next: intervene analyze {args.output} --plot analysis.png --config-out config.yaml")
    return 0


def _convert(args: argparse.Namespace) -> int:
    m = load_refuse(args.from_refuse)
    vers = versions()
    m.meta.update({"kind": "measurements", "intervene_version": vers["intervene"], "versions": vers,
                   "hidden_size": m.hidden_size})
    m.save(args.output)
    print(f"converted {args.from_refuse}: {len(m.layers)} layers"
          f"{' + embedding' if 'direction.embed' in m.tensors else ''}, hidden size {m.hidden_size} -> {args.output}")
    return 0

