"""``intervene search``: Optuna multi-objective search (refusals, KL) over live interventions."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from ..live.generate import PromptFormat
from ..runner import RunOptions
from ..search.study import SearchPrompts, SearchSettings, SpaceOptions, search
from .common import (add_model_options, add_prompt_options, add_quantization_options, add_server_options,
                     add_stream_options, server_options)

DEFAULT_METHODS = ["project", "norm_preserving"]  # its identity tells a --methods left out (see _methods)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "search", help="search intervention configs automatically (Optuna: minimise refusals and KL)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Multi-objective Optuna search over live interventions; the model is loaded once and every trial
is applied with hooks (no reload). Searched: the direction's source layer (fractional =
interpolated), the edited window (centre, half-width), per-target max scale at the centre and min
scale at the window edge (linear taper) for attention / mlp / experts / shared_experts, the router
on/off and its scale (MoE), the method (project | norm_preserving) and, when the measurements
hold the harmless second moment (intervene measure stores it), the whitening strength lambda:
the direction used is (M + lambda*tr(M)/H*I)^-1 d, which keeps refusal and moves harmless outputs
less (config key 'whiten').

Each trial scores two cheap objectives on the search prompts: the first-token refusal probability
on harmful prompts (no generation) and the first-token KL on harmless prompts. Trials entering the
running Pareto front also get a greedy-generation refusal count; at the end the front is
re-evaluated on the eval prompts (generation refusals + KL) and written as ready-to-bake YAML
configs (OUT/front/trial_XXXX.yaml), OUT/front.json and OUT/front.png. The study lives in
OUT/study.db: running again with the same --out adds --trials more trials.

A model larger than memory: --stream-layers [--device cuda:0] never loads the model whole; every
trial's first-token proxy and KL run one decoder layer at a time, read from the safetensors shards
(the baseline is streamed once), with the trial's hooks installed on each loaded layer. There is no
generation then: the front is the (proxy, KL) one (re-scored on the eval prompts' first token). Count
refusals by generation afterwards on its configs with the whole model offloaded to CPU and disk:
  intervene eval MODEL --config OUT/front/trial_XXXX.yaml --device-map auto
(or intervene try OUT/front/trial_XXXX.yaml --device-map auto).""")
    p.add_argument("model", help="model directory, .gguf file, 'smollm2', 'organism', 'organism-moe', 'organism-moe-experts' or hub id")
    p.add_argument("--measurements", "-m", required=True, help="measurements file (intervene measure)")
    p.add_argument("--out", "-o", default="search-study", help="study directory (default: search-study)")
    p.add_argument("--trials", type=int, default=40, help="new trials to run (default: 40)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    p.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe", help="Optuna sampler (default: tpe)")
    p.add_argument("--startup-trials", type=int, default=10,
                   help="random trials before TPE starts modelling (default: 10)")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="tokens generated per prompt in the final evaluation (default: 48)")
    p.add_argument("--search-new-tokens", type=int, default=24,
                   help="tokens generated per prompt when counting refusals during the search (default: 24)")
    p.add_argument("--full-eval-top", type=int, default=8, metavar="K",
                   help="re-evaluate at most K front trials on the eval prompts (0: skip; default: 8)")
    p.add_argument("--eval-harmful", default="builtin:harmful:eval",
                   help="harmful prompts for the final evaluation (default: builtin:harmful:eval)")
    p.add_argument("--eval-harmless", default="builtin:harmless:eval",
                   help="harmless prompts for the final evaluation (default: builtin:harmless:eval)")
    p.add_argument("--eval-limit", type=int, default=None, help="use at most N eval prompts from each set")
    p.add_argument("--targets", nargs="+", default=None, metavar="TARGET",
                   help="write targets to search (default: every one the model has: attention mlp experts "
                        "shared_experts)")
    p.add_argument("--no-router", action="store_true", help="MoE: do not search router projection")
    p.add_argument("--router-bias", action="store_true",
                   help="MoE: also search expert steering: router_bias with experts 'top:N' (bias -inf) over a "
                        "searched window of MoE layers (needs measurements with last-token router statistics)")
    p.add_argument("--router-bias-top", default="1:4", metavar="LO:HI",
                   help="with --router-bias: range of N, experts steered per layer (default: 1:4)")
    p.add_argument("--router-bias-alone", action="store_true",
                   help="with --router-bias: also search without projection (empty ablate), so the front holds "
                        "expert steering alone, projection alone and both")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                   choices=("project", "norm_preserving"),
                   help="methods to search (default: both)")
    p.add_argument("--whiten", default="auto", metavar="LO:HI|off",
                   help="range searched for the whitening lambda (log-uniform), or 'off' for the raw "
                        "difference-of-means direction (default: 0.75:4 when the measurements hold the harmless "
                        "second moment, else off)")
    p.add_argument("--kl-cap", type=float, default=1.0,
                   help="no generation for front trials whose KL exceeds this (default: 1.0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("models larger than memory")
    add_stream_options(g, "score every trial's first-token proxy and KL one decoder layer at a time (no generation; "
                          "count the front's refusals afterwards with 'intervene eval MODEL --config CFG "
                          "--device-map auto')")
    add_model_options(p)
    add_quantization_options(p)
    add_prompt_options(p, "train")
    add_server_options(p, "the greedy answers of the generation refusal counts (each trial served as its LoRA "
                          "adapter; the first-token proxy and KL stay in process)")
    # every trial scores all search prompts: cap them (evenly spaced) so a trial stays cheap
    p.set_defaults(func=run, limit=64)
    for action in p._actions:
        if action.dest == "limit":
            action.help = "search prompts: at most N from each set, evenly spaced (default: 64; 0: all)"
    return p


def _methods(args: argparse.Namespace) -> tuple[str, ...]:
    """--methods; with --server and no --methods given, 'project' only (an adapter cannot carry norm_preserving)."""
    if args.server is not None and args.methods is DEFAULT_METHODS:
        print("--server: each trial is served as a LoRA adapter, so method 'project' only (norm_preserving is not "
              "low rank)", file=sys.stderr)
        return ("project",)
    return tuple(args.methods)


def _whiten(value: str) -> tuple[float, float] | str | None:
    if value in ("auto", "off"):
        return None if value == "off" else "auto"
    lo, sep, hi = value.partition(":")
    try:
        rng = (float(lo), float(hi if sep else lo))
    except ValueError:
        raise InputError(f"--whiten must be 'auto', 'off' or LO:HI (e.g. 0.75:4), got {value!r}") from None
    if not (0 < rng[0] <= rng[1] < float("inf")):
        raise InputError(f"--whiten range must satisfy 0 < LO <= HI, got {value!r}")
    return rng


def _top_range(value: str) -> tuple[int, int]:
    lo, sep, hi = value.partition(":")
    try:
        rng = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise InputError(f"--router-bias-top must be LO:HI (e.g. 1:4), got {value!r}") from None
    if not 1 <= rng[0] <= rng[1]:
        raise InputError(f"--router-bias-top must satisfy 1 <= LO <= HI, got {value!r}")
    return rng


def run(args: argparse.Namespace) -> int:
    if args.router_bias_alone and not args.router_bias:
        raise InputError("--router-bias-alone needs --router-bias")

    result = search(
        args.model, args.measurements, args.out,
        space=SpaceOptions(targets=args.targets, router=False if args.no_router else None,
                           methods=_methods(args), whiten=_whiten(args.whiten), router_bias=args.router_bias,
                           router_bias_top=_top_range(args.router_bias_top),
                           projection_optional=args.router_bias_alone),
        settings=SearchSettings(trials=args.trials, seed=args.seed, sampler=args.sampler,
                                startup_trials=args.startup_trials, full_eval_top=args.full_eval_top,
                                generation_kl_cap=args.kl_cap),
        prompts=SearchPrompts(harmful=args.harmful, harmless=args.harmless, eval_harmful=args.eval_harmful,
                              eval_harmless=args.eval_harmless, field=args.field, limit=args.limit or None,
                              eval_limit=args.eval_limit, max_new_tokens=args.max_new_tokens,
                              search_new_tokens=args.search_new_tokens),
        prompt_format=PromptFormat(system_prompt=args.system_prompt, chat_template=not args.no_chat_template),
        run=RunOptions(dtype=args.dtype, device_map=args.device_map, quantization=args.quantization,
                       stream_layers=args.stream_layers, device=args.device, batch_size=args.batch_size,
                       progress=not args.no_progress),
        server=server_options(args))
    print(result.table())
    rate = f", {result.seconds:.0f} s, {result.trials_per_hour:.0f} trials/hour" if result.new_trials else ""
    print(f"\n{len(result.records)} trials in the study ({result.new_trials} new{rate})")
    for path in result.config_paths:
        print(f"  {path}")
    print(f"front: {result.json_path}, plot: {result.png_path}")
    if result.config_paths and args.stream_layers:
        print(f"next (refusals by generation, the model offloaded): intervene eval {args.model} --config "
              f"{result.config_paths[0]} --device-map auto")
    elif result.config_paths:
        print(f"next: intervene try {result.config_paths[0]}  |  intervene bake {result.config_paths[0]} --output DIR")
    return 0
