"""``intervene eval MODEL [--config CFG] [--reference SOURCE] [--judge DIR] [--capability]``: refused /
complied / degenerate counts, first-token and full-answer KL and samples, baseline vs intervened."""

from __future__ import annotations

import argparse

from ..live.capability import format_capability
from ..live.eval_run import run_eval
from ..live.evaluate import format_first_token, format_report
from ..live.tryout import FirstTokenRunReport
from ..runner import RunOptions
from .common import (
    add_generation_options,
    add_model_argument,
    add_run_options,
    add_server_options,
    add_stream_options,
    add_verb,
    check_generation_options,
    server_options,
    write_report,
)

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
    add_server_options(p, "greedy answers")
    return p


def run(args: argparse.Namespace) -> int:
    check_generation_options(args)
    run_options = RunOptions(dtype=args.dtype, device_map=args.device_map, stream_layers=args.stream_layers,
                             device=args.device, hidden_on=args.hidden_on, batch_size=args.batch_size,
                             progress=not args.no_progress)
    result = run_eval(args.model, args.harmful, args.harmless, field=args.field, limit=args.limit,
                      config=args.config, measurements=args.measurements, reference=args.reference,
                      judge=args.judge, first_token=args.first_token, answer_kl=not args.no_answer_kl,
                      with_capability=args.capability, capability_text=args.capability_text,
                      lm_eval_tasks=args.lm_eval_tasks, lm_eval_limit=args.lm_eval_limit,
                      max_new_tokens=args.max_new_tokens, samples=args.samples, system_prompt=args.system_prompt,
                      chat_template=False if args.no_chat_template else None, run=run_options,
                      server=server_options(args))
    live = f" with {args.config} (live)" if args.config else ""
    if isinstance(result, FirstTokenRunReport):
        print(f"{result.model}{live or ' (no intervention: scored against itself)'}")
        print(format_first_token(result.first_token))
    else:
        against = (f" vs {args.reference} (reference)" if args.reference
                   else "" if args.config else " (no intervention: scored against itself)")
        print(f"{result.model}{live}{against}")
        print(format_report(result.evaluation, n_samples=args.samples))
        if result.capability is not None:
            print(format_capability(result.capability))
    if args.json:
        write_report(args.json, result)
    return 0
