"""``intervene route CONFIG``: what the intervention does to expert routing, layer by layer."""

from __future__ import annotations

import argparse

from ..live.route import format_report, plot, route_config
from .common import add_config_options, add_verb, write_report

SUMMARY = "router study: expert selection on harmful/harmless prompts, baseline vs intervened"
DESCRIPTION = """Forward passes only. For every MoE layer: expert selection frequency over all non-pad prompt tokens on
harmful and harmless prompts, without and with the config applied live; the fraction of tokens whose
top-k set changed; Jensen-Shannon divergences (baseline vs intervened, harmful vs harmless); the experts
that gain and lose most. --plot draws layers x experts heat maps."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "route", run, summary=SUMMARY, description=DESCRIPTION)
    add_config_options(p)
    p.add_argument("--plot", default=None, metavar="PNG", help="heat maps layers x experts")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the full report (JSON; keys: intervene.live.route.RouteReport)")
    p.add_argument("--top", type=int, default=5, help="experts listed as gaining/losing most per layer (default: 5)")
    return p


def run(args: argparse.Namespace) -> int:
    report = route_config(
        args.config, harmful=args.harmful, harmless=args.harmless, field=args.field, limit=args.limit,
        model_spec=args.model, measurements=args.measurements, dtype=args.dtype, device_map=args.device_map,
        batch_size=args.batch_size, system_prompt=args.system_prompt,
        chat_template=False if args.no_chat_template else None, top=args.top, progress=not args.no_progress,
    )
    print(format_report(report))
    if args.plot:
        plot(report, args.plot, title=f"{report.model} · {args.config}")
        print(f"plot -> {args.plot}")
    if args.json:
        write_report(args.json, report)
    return 0
