"""``intervene eval MODEL [--config CFG]``: refusal rates, first-token KL and samples, baseline vs intervened."""

from __future__ import annotations

import argparse

from .common import (add_generation_options, add_model_argument, add_run_options, add_verb,
                     check_generation_options, write_report)

SUMMARY = "refusal rates and first-token KL of a model, optionally with a config applied live"
DESCRIPTION = """Greedy generation on harmful and harmless prompts (batched, left padded); a refusal is an output
containing a refusal marker or an empty one. Also a first-token refusal score (no generation) and the
first-token KL(base || intervened) on harmless prompts. With --config the intervened model is MODEL with
the config applied live (hooks); without it, MODEL is scored against itself (KL = 0)."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "eval", run, summary=SUMMARY, description=DESCRIPTION)
    add_model_argument(p)
    p.add_argument("--config", default=None, metavar="CFG", help="intervention config (YAML) applied live")
    p.add_argument("--measurements", default=None, help="override the config's 'measurements' file")
    add_generation_options(p, json_help="write the full report (JSON)")
    add_run_options(p, "eval")
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..io.models import load_model
    from ..io.prompts import load_prompts
    from ..live.evaluate import evaluate, format_report
    from ..live.tryout import EvalRunReport, PromptSources

    check_generation_options(args)
    cfg = None
    if args.config:
        from ..config.reference import load_any_config

        cfg = load_any_config(args.config, model=args.model)  # native, or reference-schema translated
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
    print(f"{model_spec}{f' with {args.config} (live)' if cfg else ' (no intervention: scored against itself)'}")
    print(format_report(report, n_samples=args.samples))
    if args.json:
        write_report(args.json, EvalRunReport(report, model_spec, args.config,
                                              PromptSources(args.harmful, args.harmless, args.field, args.limit)))
    return 0
