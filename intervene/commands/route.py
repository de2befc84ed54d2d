"""``intervene route CONFIG``: what the intervention does to expert routing, layer by layer."""

from __future__ import annotations

import argparse

from .common import add_prompt_options
from .try_ import add_config_options


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "route", help="router study: expert selection on harmful/harmless prompts, baseline vs intervened",
        description="Forward passes only. For every MoE layer: expert selection frequency over all non-pad prompt "
                    "tokens on harmful and harmless prompts, without and with the config applied live; the fraction "
                    "of tokens whose top-k set changed; Jensen-Shannon divergences (baseline vs intervened, harmful "
                    "vs harmless); the experts that gain and lose most. --plot draws layers x experts heat maps.")
    add_config_options(p)
    add_prompt_options(p, "eval")
    p.add_argument("--plot", default=None, metavar="PNG", help="heat maps layers x experts")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report (keys: intervene.live.route docs)")
    p.add_argument("--top", type=int, default=5, help="experts listed as gaining/losing most per layer (default: 5)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..io.prompts import load_prompts
    from ..live.route import format_report, plot, route_study
    from ..live.tryout import prepare, write_json

    harmful = load_prompts(args.harmful, field=args.field, limit=args.limit)
    harmless = load_prompts(args.harmless, field=args.field, limit=args.limit)
    p = prepare(args.config, model_spec=args.model, measurements=args.measurements, dtype=args.dtype,
                device_map=args.device_map)
    report = route_study(
        p.model, p.tokenizer, harmful, harmless, intervention=p.intervention(), batch_size=args.batch_size,
        system_prompt=args.system_prompt if args.system_prompt is not None else p.system_prompt,
        chat_template=p.chat_template and not args.no_chat_template, top=args.top,
        progress=not args.no_progress, config=p.config.to_dict(), model_name=p.model_spec,
    )
    report["measurements"] = p.measurements.path
    report["sites"] = p.sites()
    report["prompt_sources"] = {"harmful": args.harmful, "harmless": args.harmless, "field": args.field,
                                "limit": args.limit}
    print(format_report(report))
    if args.plot:
        plot(report, args.plot, title=f"{p.model_spec} · {args.config}")
        print(f"plot -> {args.plot}")
    if args.json:
        write_json(args.json, report)
        print(f"report -> {args.json}")
    return 0
