"""``intervene try CONFIG``: baseline vs live-intervened model — refusals, KL, side-by-side samples."""

from __future__ import annotations

import argparse

from ..live.evaluate import format_report
from ..live.tryout import try_config
from .common import (
    add_config_options,
    add_generation_options,
    add_quantization_options,
    add_reference_options,
    add_server_options,
    add_verb,
    check_generation_options,
    load_cli_config,
    server_options,
    write_report,
)

SUMMARY = "score a config live: refusals and KL, baseline vs hooked model (nothing written)"
DESCRIPTION = """Loads the model once, generates greedily on the harmful and harmless prompts without
and with the config applied live (hooks; in-memory weight swaps for norm_preserving and expert
subsets), and prints refusal counts, the first-token KL divergence on harmless prompts and a few
side-by-side generations."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "try", run, summary=SUMMARY, description=DESCRIPTION)
    add_config_options(p)
    add_generation_options(p, json_help="write the full report (config, versions, all outputs)")
    add_quantization_options(p)
    add_reference_options(p)
    add_server_options(p, "greedy answers")
    return p


def run(args: argparse.Namespace) -> int:
    check_generation_options(args)
    report = try_config(
        load_cli_config(args), harmful=args.harmful, harmless=args.harmless, field=args.field, limit=args.limit,
        model_spec=args.model, measurements=args.measurements, dtype=args.dtype, device_map=args.device_map,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, samples=args.samples,
        system_prompt=args.system_prompt, chat_template=False if args.no_chat_template else None,
        progress=not args.no_progress, quantization=args.quantization, server=server_options(args),
    )
    print(f"config {args.config} on {report.model}: {len(report.sites)} hook sites "
          f"({', '.join(sorted({s['mechanism'] for s in report.sites}))})")
    print(format_report(report.evaluation, n_samples=args.samples))
    if args.json:
        write_report(args.json, report)
    return 0
