"""``intervene try CONFIG``: baseline vs live-intervened model — refusals, KL, side-by-side samples."""

from __future__ import annotations

import argparse

from .common import add_model_options, add_prompt_options


def add_config_options(p: argparse.ArgumentParser) -> None:
    """Flags shared by try/route: the config and overrides of its model and measurements."""
    p.add_argument("config", help="intervention config (YAML), see configs/")
    p.add_argument("--model", default=None, help="override the config's 'model' (directory, .gguf, 'smollm2', 'organism')")
    p.add_argument("--measurements", default=None, help="override the config's 'measurements' file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(p)
    # --dtype unset means: the config's dtype, else float32
    p.set_defaults(dtype=None)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "try", help="score a config live: refusals and KL, baseline vs hooked model (nothing written)",
        description="Loads the model once, generates greedily on the harmful and harmless prompts without and with "
                    "the config applied live (hooks; in-memory weight swaps for norm_preserving and expert subsets), "
                    "and prints refusal counts, the first-token KL divergence on harmless prompts and a few "
                    "side-by-side generations.")
    add_config_options(p)
    add_prompt_options(p, "eval")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report (config, versions, all outputs)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per answer (default: 48)")
    p.add_argument("--samples", type=int, default=4, help="side-by-side samples per prompt set (default: 4)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..live.evaluate import format_report
    from ..live.tryout import try_config, write_json

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.samples < 0:
        raise InputError(f"--samples must be >= 0, got {args.samples}")
    report = try_config(
        args.config, harmful=args.harmful, harmless=args.harmless, field=args.field, limit=args.limit,
        model_spec=args.model, measurements=args.measurements, dtype=args.dtype, device_map=args.device_map,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, samples=args.samples,
        system_prompt=args.system_prompt, chat_template=False if args.no_chat_template else None,
        progress=not args.no_progress,
    )
    print(f"config {args.config} on {report['model']}: {len(report['sites'])} hook sites "
          f"({', '.join(sorted({s['mechanism'] for s in report['sites']}))})")
    print(format_report(report, n_samples=args.samples))
    if args.json:
        write_json(args.json, report)
        print(f"report -> {args.json}")
    return 0
