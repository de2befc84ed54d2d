"""``intervene demo``: the whole flow on the built-in model organism."""

from __future__ import annotations

import argparse

from ..products.demo import run_demo
from .common import add_server_options, add_verb, server_options

SUMMARY = "build the model organism if absent, measure, analyze, and evaluate live"
DESCRIPTION = """Runs the main job on the built-in example model: builds (once, cached) a safety-fine-tuned SmolLM2-135M
that refuses harmful requests, measures its refusal direction on the train prompts, analyzes the layers,
and shows refusals before and after projecting the direction out live (eval prompts, greedy). Writes
measurements, plot, config and report to --out."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "demo", run, summary=SUMMARY, description=DESCRIPTION,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="intervene-demo", help="output directory (default: ./intervene-demo)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generated tokens per prompt (default: 48)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: 16)")
    p.add_argument("--limit", type=int, default=None, help="use at most N prompts per set (quick look)")
    add_server_options(p, "the evaluation's greedy answers (a server serving the organism)")
    return p


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                      server=server_options(args))
    r = result.report
    print()
    print(f"{'':24s}{'baseline':>12s}{'intervened':>12s}")
    for name, base, new in (("harmful", r.baseline.harmful, r.harmful), ("harmless", r.baseline.harmless, r.harmless)):
        print(f"{name + ' refused':24s}{base.refusals:>8}/{new.total:<3d}{new.refusals:>8}/{new.total:<3d}")
        print(f"{name + ' degenerate':24s}{base.degenerate:>8}/{new.total:<3d}{new.degenerate:>8}/{new.total:<3d}")
    print(f"first-token KL on harmless prompts: {r.kl_divergence:.4f}")
    if r.kl_divergence_answer is not None:
        print(f"full-answer KL on harmless prompts: {r.kl_divergence_answer:.4f} nats/token")
    for s in r.samples[:3]:
        print(f"\n> {s.prompt}\n  baseline:   {s.baseline[:160]!r}\n  intervened: {s.intervened[:160]!r}")
    print(f"\nwrote {result.out_dir}/ (measurements.safetensors, analysis.png, config.yaml, report.json) "
          f"in {result.seconds / 60:.1f} min; next: intervene bake {result.config_path} --output baked")
    return 0
