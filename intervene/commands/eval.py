"""``intervene eval MODEL [--config CFG] [--reference SOURCE] [--judge DIR] [--capability]``: refused /
complied / degenerate counts, first-token and full-answer KL and samples, baseline vs intervened."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InputError

from .common import (add_generation_options, add_model_argument, add_run_options, add_stream_options, add_verb,
                     check_generation_options, write_report)

SUMMARY = "refusal / degenerate counts and KL of a model, vs a source model or a live config"
DESCRIPTION = """Greedy generation on harmful and harmless prompts (batched, left padded). Each answer is one of
three classes: degenerate (empty, or repetitive: at least 40 % of its word 4-grams repeat an earlier
one), refused (contains a refusal marker), or complied; a refusal whose first marker comes after the
first 40 characters is also counted as a delayed refusal. --judge DIR lets a local classifier or
causal-LM judge decide refused/complied instead of the markers (degenerate answers stay degenerate).

Also a first-token refusal score (no generation), the first-token KL(base || intervened) on harmless
prompts, and the full-answer KL: the baseline's greedy harmless answers teacher-forced through both
models, KL per answer token, averaged.

What is compared: --reference SOURCE makes SOURCE the baseline and MODEL the intervened model (a baked
checkpoint vs its original: `intervene eval baked/ --reference organism`). --config applies a config to
MODEL live (hooks); with both, MODEL+config is compared with SOURCE. With neither, MODEL is scored
against itself (KL = 0).

--first-token scores only the first response token (no generation): the refusal score per set and the
first-token KL, in memory or, with --stream-layers, one decoder layer in memory at a time (a local
safetensors checkpoint; --device is where each layer runs) for a model that does not fit -- baseline and
--config come out of one pass over the layers. Generation needs the whole model: for a model larger than
memory run the generation-based counts with --device-map auto (transformers/accelerate offload to CPU and disk).

--capability adds perplexity on a held-out text shipped with intervene (base vs edited), and with
lm-eval installed (pip install 'intervene[capability]') --lm-eval-tasks FILE|DIR runs lm-eval on your
own task YAML files."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_verb(sub, "eval", run, summary=SUMMARY, description=DESCRIPTION)
    add_model_argument(p)
    p.add_argument("--config", default=None, metavar="CFG", help="intervention config (YAML) applied live")
    p.add_argument("--measurements", default=None, help="override the config's 'measurements' file")
    p.add_argument("--reference", default=None, metavar="SOURCE",
                   help="the source model to compare against (baseline); e.g. the checkpoint a bake started from")
    p.add_argument("--judge", default=None, metavar="DIR",
                   help="local judge model directory (sequence classifier or causal LM) deciding refused/complied")
    p.add_argument("--no-answer-kl", action="store_true", help="skip the full-answer (teacher-forced) KL")
    f = p.add_argument_group("first token only (no generation), and models larger than memory")
    f.add_argument("--first-token", action="store_true",
                   help="only the first-token refusal scores and KL (no generation): JSON key 'first_token'")
    add_stream_options(f, "with --first-token: build the model on the meta device and run all prompts through one "
                          "decoder layer at a time, read from the safetensors shards and freed after (baseline and "
                          "config in one pass); same numbers as without it",
                       "with --stream-layers: where the prompts' hidden states wait between layers (default: device)")
    g = p.add_argument_group("capability")
    g.add_argument("--capability", action="store_true",
                   help="also report perplexity on the shipped held-out text, base vs edited")
    g.add_argument("--capability-text", default=None, metavar="FILE", help="score this text file instead")
    g.add_argument("--lm-eval-tasks", nargs="+", default=(), metavar="PATH",
                   help="lm-eval task YAML files or folders (needs the 'capability' extra; implies --capability)")
    g.add_argument("--lm-eval-limit", type=int, default=None, help="at most N documents per lm-eval task")
    add_generation_options(p, json_help="write the full report (JSON)")
    add_run_options(p, "eval")
    return p


def run(args: argparse.Namespace) -> int:
    from ..io.models import load_model
    from ..io.prompts import load_prompts
    from ..live.evaluate import evaluate, format_report
    from ..live.tryout import EvalRunReport, PromptSources

    check_generation_options(args)
    if args.stream_layers:
        from ..runner import check_stream_layers

        check_stream_layers(generates=not args.first_token, device_map=args.device_map)
    if args.first_token:
        bad = [flag for flag, given in (("--reference", args.reference), ("--judge", args.judge),
                                        ("--capability", args.capability or args.capability_text or args.lm_eval_tasks),
                                        ("--no-answer-kl", args.no_answer_kl)) if given]
        if bad:
            raise InputError(f"--first-token scores the first token only; {bad[0]} needs the full eval (drop one)")
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

    if args.first_token:
        return _first_token(args, model_spec, cfg, harmful, harmless, system_prompt, chat_template)

    judge = None
    if args.judge:
        from ..live.judge import load_judge

        judge = load_judge(args.judge)
    capability_text = None
    if args.capability_text:
        from pathlib import Path

        if not Path(args.capability_text).is_file():
            raise InputError(f"--capability-text {args.capability_text}: no such file")
        capability_text = Path(args.capability_text).read_text(encoding="utf-8")
    model, tokenizer = load_model(model_spec, dtype=args.dtype, device_map=args.device_map)
    reference = None
    if args.reference:
        reference = load_model(args.reference, dtype=args.dtype, device_map=args.device_map)
    intervention = None
    if cfg is not None:
        from ..hooks.apply import apply  # lazy: only --config needs the hooks

        measurements = _config_measurements(args, cfg)
        with apply(model, cfg, measurements):  # config errors surface now, not after the baseline
            pass
        intervention = lambda: apply(model, cfg, measurements)  # noqa: E731

    report = evaluate(model, tokenizer, harmful, harmless, intervention=intervention,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, n_samples=args.samples,
                      system_prompt=system_prompt, chat_template=chat_template,
                      config=cfg.to_dict() if cfg else None, progress=not args.no_progress,
                      reference=reference, judge=judge, full_answer_kl=not args.no_answer_kl)
    capability_report = None
    if args.capability or args.capability_text or args.lm_eval_tasks:
        from ..live.capability import capability, format_capability

        capability_report = capability(model, tokenizer, intervention=intervention, reference=reference,
                                       text=capability_text, text_name=args.capability_text,
                                       lm_eval_tasks=args.lm_eval_tasks, lm_eval_limit=args.lm_eval_limit)
    against = (f" vs {args.reference} (reference)" if args.reference
               else "" if cfg else " (no intervention: scored against itself)")
    print(f"{model_spec}{f' with {args.config} (live)' if cfg else ''}{against}")
    print(format_report(report, n_samples=args.samples))
    if capability_report is not None:
        print(format_capability(capability_report))
    if args.json:
        write_report(args.json, EvalRunReport(report, model_spec, args.config,
                                              PromptSources(args.harmful, args.harmless, args.field, args.limit),
                                              reference=args.reference, capability=capability_report))
    return 0


def _config_measurements(args: argparse.Namespace, cfg: Any) -> Any:
    """The measurements of ``--config``: ``--measurements`` or the config's own file."""
    from ..io.measurements import measurements_for

    return measurements_for(args.measurements, cfg.measurements, args.config)


def _first_token(args: argparse.Namespace, model_spec: str, cfg: Any, harmful: list[str], harmless: list[str],
                 system_prompt: str | None, chat_template: bool) -> int:
    """``--first-token``: the first-token scores, in memory or streamed one layer at a time."""
    from ..io.models import load_tokenizer
    from ..live.evaluate import format_first_token
    from ..live.tryout import FirstTokenRunReport, PromptSources

    measurements = _config_measurements(args, cfg) if cfg is not None else None
    common = dict(batch_size=args.batch_size, system_prompt=system_prompt, chat_template=chat_template,
                  progress=not args.no_progress)
    if args.stream_layers:
        from ..live.stream_eval import first_token_streamed

        report = first_token_streamed(model_spec, load_tokenizer(model_spec), harmful, harmless, cfg, measurements,
                                      dtype=args.dtype, device=args.device, hidden_on=args.hidden_on, **common)
    else:
        from ..hooks.apply import apply
        from ..io.models import load_model
        from ..live.evaluate import first_token_scores

        model, tokenizer = load_model(model_spec, dtype=args.dtype, device_map=args.device_map)
        intervention = None
        if cfg is not None:
            with apply(model, cfg, measurements):  # config errors surface now, not after the baseline
                pass
            intervention = lambda: apply(model, cfg, measurements)  # noqa: E731
        report = first_token_scores(model, tokenizer, harmful, harmless, intervention=intervention,
                                    config=cfg.to_dict() if cfg else None, **common)
    print(f"{model_spec}{f' with {args.config} (live)' if cfg else ' (no intervention: scored against itself)'}")
    print(format_first_token(report))
    if args.json:
        write_report(args.json, FirstTokenRunReport(report, model_spec, args.config,
                                                    PromptSources(args.harmful, args.harmless, args.field, args.limit)))
    return 0
