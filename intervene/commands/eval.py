"""``intervene eval MODEL [--config CFG]``: refusal rates, first-token KL and samples, baseline vs intervened."""

from __future__ import annotations

import argparse

from .common import add_model_options, add_prompt_options


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="refusal rates and first-token KL of a model, optionally with a config applied live",
        description="Greedy generation on harmful and harmless prompts (batched, left padded); a refusal is an "
                    "output containing a refusal marker or an empty one. Also a first-token refusal score (no "
                    "generation) and the first-token KL(base || intervened) on harmless prompts. With --config the "
                    "intervened model is MODEL with the config applied live (hooks); without it, MODEL is scored "
                    "against itself (KL = 0).")
    p.add_argument("model", nargs="?", default=None,
                   help="model directory, .gguf file, 'smollm2', 'organism' or hub id (default: the config's model)")
    p.add_argument("--config", default=None, metavar="CFG", help="intervention config (YAML) applied live")
    p.add_argument("--measurements", default=None, help="override the config's 'measurements' file")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report (JSON)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per answer (default: 48)")
    p.add_argument("--samples", type=int, default=4, help="side-by-side samples per prompt set (default: 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(p)
    add_prompt_options(p, "eval")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..live.evaluate import evaluate, format_report
    from ..io.models import load_model
    from ..io.prompts import load_prompts

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.samples < 0:
        raise InputError(f"--samples must be >= 0, got {args.samples}")
    cfg = None
    if args.config:
        from ..config.schema import load_config

        cfg = load_config(args.config)
    model_spec = args.model or (cfg.model if cfg else None)
    if not model_spec:
        raise InputError("MODEL is required (or a --config whose 'model' names it)")
    if args.measurements and cfg is None:
        raise InputError("--measurements needs --config")
    harmful = load_prompts(args.harmful, field=args.field, limit=args.limit)
    harmless = load_prompts(args.harmless, field=args.field, limit=args.limit)
    system_prompt = args.system_prompt if args.system_prompt is not None else (cfg.system_prompt if cfg else None)
    chat_template = False if args.no_chat_template else (cfg.chat_template if cfg else True)

    model, tokenizer = load_model(model_spec, dtype=args.dtype, device_map=args.device_map)
    intervention = None
    if cfg is not None:
        from ..hooks.apply import apply  # lazy: only --config needs the hooks
        from ..io.measurements import load_measurements

        meas_path = args.measurements or cfg.measurements
        if not meas_path:
            raise InputError(f"{args.config} names no 'measurements' file; pass --measurements")
        measurements = load_measurements(meas_path)
        with apply(model, cfg, measurements):  # config errors surface now, not after the baseline
            pass
        intervention = lambda: apply(model, cfg, measurements)  # noqa: E731

    report = evaluate(model, tokenizer, harmful, harmless, intervention=intervention,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, n_samples=args.samples,
                      system_prompt=system_prompt, chat_template=chat_template,
                      config=cfg.to_dict() if cfg else None, progress=not args.no_progress)
    report.update({"kind": "eval", "model": model_spec, "config_path": args.config,
                   "prompt_sources": {"harmful": args.harmful, "harmless": args.harmless, "field": args.field,
                                      "limit": args.limit}})
    print(f"{model_spec}{f' with {args.config} (live)' if cfg else ' (no intervention: scored against itself)'}")
    print(format_report(report, n_samples=args.samples))
    if args.json:
        from ..live.tryout import write_json

        write_json(args.json, report)
        print(f"report -> {args.json}")
    return 0

