"""The Optuna study behind ``intervene search``: the model is loaded once; each trial builds an
:class:`~intervene.config.schema.InterventionConfig` from the sampled parameters
(:mod:`~intervene.search.space`), re-parses it from its own YAML, binds it and installs it with
:func:`~intervene.hooks.apply.apply` (no reload, no weight reset), so a trial's YAML bakes to
exactly what it scored; the study lives in ``OUT/study.db`` (resumable), belongs to one model,
measurements file, space and objective (:func:`run_search` checks), and its final front is
re-evaluated on the eval prompts (cached in ``OUT/eval_cache.json``) and written by
:mod:`~intervene.search.report`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml
from tqdm.auto import tqdm

from ..arch import arch_for_config, text_config
from ..config.resolve import bind
from ..config.schema import parse_config
from ..errors import InputError
from ..hooks.apply import apply
from ..io.files import atomic_write_text, sha256_text
from ..io.measurements import Measurements, load_measurements
from ..io.models import load_model, load_tokenizer, versions
from ..io.prompts import load_prompts
from ..io.sources import model_reference
from ..live.generate import PromptFormat
from ..live.stream_eval import LayerStream
from ..measure.analyze import analyze, recommend
from ..runner import RunOptions, check_stream_layers
from ..live.server import ServerOptions
from .objective import (GeneratesConfigs, Objective, PromptObjective, ScoresAnswers, ScoresEdits, ServedObjective,
                        StartsAtLayer, StreamedObjective)
from .pareto import best_so_far, dominates, pareto_front, spread
from .report import SearchResult, TrialRecord, write_outputs
from .space import SearchSpace, seed_params

STUDY_NAME = "intervene-search"
SAMPLERS = ("tpe", "nsga2")


@dataclass
class SearchSettings:
    """How a search runs (every field is recorded in its outputs)."""

    trials: int = 40
    seed: int = 0
    sampler: str = "tpe"  # tpe | nsga2
    startup_trials: int = 10  # random trials before TPE models the space
    full_eval_top: int = 8  # at most this many front trials re-evaluated on the eval prompts
    generate_front: bool = True  # generation refusal count for trials entering the proxy front
    generation_kl_cap: float | None = 1.0  # ... unless their KL is above this (model broken anyway)
    generation_proxy_fraction: float = 0.5  # ... or their refusal proxy is above this x the baseline's
    target_refusal_rate: float = 0.05  # "best so far": lowest KL with at most this refusal rate
    seed_from_diagnosis: bool = True  # search(): a new study's first trial is analyze's recommended config

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise InputError(f"--trials must be >= 0, got {self.trials}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler '{self.sampler}'; valid: {', '.join(SAMPLERS)}")
        if self.full_eval_top < 0:
            raise InputError(f"--full-eval-top must be >= 0, got {self.full_eval_top}")


def run_search(model: Any, measurements: Measurements, space: SearchSpace, objective: Objective,
               out_dir: str | Path, settings: SearchSettings | None = None, *,
               final: Objective | None = None, model_spec: str | None = None,
               measurements_path: str | None = None, progress: bool = True,
               say: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
               seeds: Sequence[dict[str, Any]] = ()) -> SearchResult:
    """Run ``settings.trials`` new trials (resuming ``out_dir/study.db`` if it exists), then
    evaluate the front on ``final`` (the eval prompts) and write the outputs.

    Both objectives are minimised: the refusal proxy (first-token probability mass on
    refusal-opening tokens, harmful prompts) and KL(baseline || intervened) of the first-token
    distribution (harmless prompts), one forward pass each, no generation. A trial that enters the
    running Pareto front, with KL under ``generation_kl_cap`` and a proxy at most
    ``generation_proxy_fraction`` of the baseline's, also gets a greedy-generation refusal count on
    the search prompts (``refusals``): every final front member inside those caps got one, plus
    earlier members the proxy later superseded -- the proxy ranks trials, generation judges them.
    At the end the (generation refusals, KL) front is re-evaluated on ``final`` (at most
    ``full_eval_top`` trials, spread along it) and the front reported, written and plotted is the
    Pareto front of that evaluation.

    ``objective``/``final`` are injectable (see :class:`~intervene.search.objective.Objective`): a
    test can score a tiny model with a logit proxy, no tokenizer or generation. ``seeds``: parameter
    sets (:func:`~intervene.search.space.seed_params`) a new study tries first, before its sampler."""
    import optuna
    settings = settings or SearchSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = arch_for_config(model.config)
    model_config = text_config(model.config)
    if measurements_path is None and measurements.path:
        measurements_path = str(Path(measurements.path).resolve())

    identity = {
        "model": model_spec, "model_type": getattr(model_config, "model_type", None),
        "num_layers": int(model_config.num_hidden_layers), "hidden_size": int(model_config.hidden_size),
        "measurements_sha256": measurements_fingerprint(measurements), "space": space.to_dict(),
        "objective": objective.describe(),
    }
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    existing = _existing_trials(optuna, storage)
    sampler = _make_sampler(optuna, settings, existing)
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, sampler=sampler,
                                directions=[m.direction for m in objective.metrics], load_if_exists=True)
    _check_identity(study, identity, out)
    if existing == 0:
        for params in seeds:
            study.enqueue_trial(dict(params))

    records = _records(study, [m.name for m in objective.metrics])
    baseline = _baseline(study, model, objective)
    bar = tqdm(total=settings.trials, desc="search", unit="trial", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    start = time.time()
    try:
        for _ in range(settings.trials):
            record = _run_trial(study, model, spec, model_config, measurements, space, objective, settings,
                                records, model_spec, measurements_path, baseline)
            if record is not None:
                records.append(record)
            bar.update(1)
            bar.set_postfix_str(_postfix(records, settings), refresh=False)
    finally:
        bar.close()
    seconds = time.time() - start

    front, basis = _final_front(records, settings, final, model, spec, model_config, measurements, out,
                                baseline, say)
    settings_out = {"search": asdict(settings), "identity": identity, "versions": versions(),
                    "final": final.describe() if final is not None else None,
                    "trials_total": len(records), "new_trials": settings.trials, "seconds": round(seconds, 2)}
    result = SearchResult(out, records, front, basis, baseline, settings.trials, seconds)
    write_outputs(result, settings_out, model_spec, measurements_path)
    return result


@dataclass(frozen=True)
class SearchPrompts:
    """The prompt sets a search scores on (prompt specs, ``field`` of a dataset), how many of each
    (``limit``: the search sets, evenly spaced, default 64, every trial runs one forward pass over them, so it
    sets the trial rate; ``eval_limit``: the final evaluation sets, default all) and the answer lengths (the
    final evaluation's ``max_new_tokens``, the search's generation refusal count's ``search_new_tokens``)."""

    harmful: str = "builtin:harmful:train"
    harmless: str = "builtin:harmless:train"
    eval_harmful: str = "builtin:harmful:eval"
    eval_harmless: str = "builtin:harmless:eval"
    field: str | None = None
    limit: int | None = 64
    eval_limit: int | None = None
    max_new_tokens: int = 48
    search_new_tokens: int = 24


@dataclass(frozen=True)
class SpaceOptions:
    """What the default search space spans (:meth:`~intervene.search.space.SearchSpace.default`): ``targets``
    and ``router`` (None: the architecture's and the attribution's choice), the edit ``methods``, ``whiten`` (a
    (low, high) range for the whitening lambda, None for the raw direction only, "auto": the default range when
    the measurements hold the harmless second moment), expert steering (``router_bias``, its ``router_bias_top``
    range) and ``projection_optional`` (projection on/off too, so the front mixes both)."""

    targets: list[str] | None = None
    router: bool | None = None
    methods: tuple[str, ...] = ("project", "norm_preserving")
    whiten: tuple[float, float] | str | None = "auto"
    router_bias: bool = False
    router_bias_top: tuple[int, int] = (1, 4)
    projection_optional: bool = False


def search(model: str, measurements: str, out: str | Path, *, space: SpaceOptions | None = None,
           settings: SearchSettings | None = None, prompts: SearchPrompts | None = None,
           prompt_format: PromptFormat | None = None, run: RunOptions | None = None,
           server: ServerOptions | None = None,
           say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> SearchResult:
    """``intervene search`` as a function: load the model once (``run``: dtype, device map, quantization,
    batch size, progress), build the default search space (``space``) and the prompt objectives
    (``prompts``, rendered with ``prompt_format``), run :func:`run_search` with ``settings``.
    ``run.stream_layers``: the model is never loaded whole; every trial's first-token proxy runs one decoder
    layer at a time on ``run.device`` (:class:`~intervene.search.objective.StreamedObjective`), no generation:
    the front is the (proxy, KL) one, its configs then counted by generation with a whole, offloaded model
    (``intervene eval MODEL --config CFG --device-map auto``). ``server``: the greedy answers (the generation
    refusal counts) come from a serving engine, each trial served as its exact rank-1 LoRA adapter
    (:class:`~intervene.search.objective.ServedObjective`); what an adapter cannot carry is refused first."""
    space_options, settings = space or SpaceOptions(), settings or SearchSettings()
    prompts, prompt_format, run = prompts or SearchPrompts(), prompt_format or PromptFormat(), run or RunOptions()
    if server is not None:
        _check_served_space(space_options, run)
    p, full_eval_top = prompts, settings.full_eval_top
    meas = load_measurements(measurements)
    prompt_sets = {name: evenly(load_prompts(spec, field=p.field), lim) for name, spec, lim in (
        ("harmful", p.harmful, p.limit), ("harmless", p.harmless, p.limit),
        ("eval_harmful", p.eval_harmful, p.eval_limit), ("eval_harmless", p.eval_harmless, p.eval_limit))
        if full_eval_top > 0 or not name.startswith("eval")}
    stream = None
    if run.stream_layers:
        check_stream_layers(model, device_map=run.device_map, quantization=run.quantization)
        say(f"opening {model} for streamed passes (one decoder layer at a time on {run.device}) ...")
        stream = LayerStream(model, dtype=run.dtype, device=run.device)
        loaded, tokenizer = stream.model, load_tokenizer(model)
    else:
        say(f"loading {model} ...")
        loaded, tokenizer = load_model(model, dtype=run.dtype, device_map=run.device_map, quantization=run.quantization)
    config = text_config(loaded.config)
    meas.check_model(int(config.hidden_size), int(config.num_hidden_layers))
    report = analyze(meas)
    regime = report.attribution.regime if report.attribution is not None else None
    o = space_options
    space = SearchSpace.default(arch_for_config(loaded.config), config, meas, targets=o.targets, router=o.router,
                                methods=o.methods, whiten_range=o.whiten, router_bias=o.router_bias,
                                router_bias_top=o.router_bias_top, projection_optional=o.projection_optional,
                                regime=regime)
    seeded = settings.seed_from_diagnosis and report.best_layer is not None
    seeds = [seed_params(space, recommend(meas, report=report))] if seeded else []
    if regime is not None and space.moe_layers:
        say(f"attribution: {report.attribution.regime_line()}; routed experts "
            f"{'searched' if 'experts' in space.targets else 'left out'}"
            + ("; the first trial is analyze's recommendation" if seeded else "; no seeded first trial"))
    say("direction: " + (f"harmless-whitened, lambda searched in [{space.whiten.low}, {space.whiten.high}]"
                         if space.whiten else
                         "raw difference of means (no harmless second moment in the measurements, or --whiten off)"))
    common = dict(batch_size=run.batch_size, prompt_format=prompt_format)
    say(f"baseline first-token scores on {len(prompt_sets['harmful'])} harmful / "
        f"{len(prompt_sets['harmless'])} harmless search prompts ...")

    def make(harmful_set: list[str], harmless_set: list[str], **kw: Any) -> Objective:
        if stream is not None:
            return StreamedObjective(stream, tokenizer, harmful_set, harmless_set, progress=run.progress, **kw)
        if server is not None:
            return ServedObjective(loaded, tokenizer, harmful_set, harmless_set, server=server,
                                   model_spec=model_reference(model), measurements=meas, **kw)
        return PromptObjective(loaded, tokenizer, harmful_set, harmless_set, **kw)

    objective = make(prompt_sets["harmful"], prompt_sets["harmless"], label="search",
                     sources={"harmful": p.harmful, "harmless": p.harmless, "limit": str(p.limit)},
                     max_new_tokens=p.search_new_tokens, **common)
    final = None
    if full_eval_top > 0:
        final = make(prompt_sets["eval_harmful"], prompt_sets["eval_harmless"], label="eval",
                     sources={"harmful": p.eval_harmful, "harmless": p.eval_harmless, "limit": str(p.eval_limit)},
                     max_new_tokens=p.max_new_tokens, **common)
    return run_search(loaded, meas, space, objective, out, settings, final=final, model_spec=model_reference(model),
                      measurements_path=str(Path(measurements).resolve()), progress=run.progress, say=say, seeds=seeds)


def _check_served_space(space: SpaceOptions, run: RunOptions) -> None:
    """``search --server``: each trial is served as a LoRA adapter; what one cannot carry is refused by name."""
    if run.stream_layers:
        raise InputError("--server generates on the server; --stream-layers never generates (drop one)")
    if "norm_preserving" in space.methods:
        raise InputError("--server serves each trial as a LoRA adapter, and method 'norm_preserving' is not low rank "
                         "(every weight column is rescaled): search --methods project")
    if space.router_bias:
        raise InputError("--server serves each trial as a LoRA adapter, which cannot carry a router's selection bias: "
                         "drop --router-bias")


def evenly(prompts: Sequence[str], limit: int | None) -> list[str]:
    """At most ``limit`` prompts, evenly spaced through the set (so every category of a sorted
    built-in set is represented, unlike the first N)."""
    prompts = list(prompts)
    if limit is None or limit >= len(prompts):
        return prompts
    if limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    return [prompts[(i * len(prompts)) // limit] for i in range(limit)]


def measurements_fingerprint(measurements: Measurements) -> str:
    """The hash of what a search's configs resolve against: the direction, harmless-mean and
    harmless-moment tensors (float32 bytes, by key), not the file's other contents."""
    h = hashlib.sha256()
    kinds = ("direction.", "harmless_mean.", "harmless_moment.")
    for key in sorted(k for k in measurements.tensors if k.startswith(kinds)):
        t = measurements.tensors[key].detach().to(torch.float32).contiguous().cpu()
        h.update(key.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _existing_trials(optuna: Any, storage: str) -> int:
    try:
        summaries = optuna.study.get_all_study_summaries(storage)
    except Exception:  # no database yet
        return 0
    return sum(s.n_trials for s in summaries if s.study_name == STUDY_NAME)


def _make_sampler(optuna: Any, settings: SearchSettings, existing: int) -> Any:
    # a resumed study re-seeds with seed + trials so far: its random start-up draws do not replay
    seed = settings.seed + existing
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, settings.trials // 4 or 4)))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials)


def _check_identity(study: Any, identity: dict[str, Any], out: Path) -> None:
    """A study directory belongs to one model, measurements file, search space and prompt set."""
    old = study.user_attrs.get("identity")
    if old is None:
        study.set_user_attr("identity", json.loads(json.dumps(identity, default=str)))
        return
    new = json.loads(json.dumps(identity, default=str))
    for key in ("model_type", "num_layers", "hidden_size", "measurements_sha256", "space", "objective"):
        if old.get(key) != new.get(key):
            raise InputError(
                f"{out} holds a study made with a different {key.replace('_sha256', '')} "
                f"({_short(old.get(key))} vs now {_short(new.get(key))}); use another --out to start a new study"
            )


def _short(value: Any) -> str:
    s = json.dumps(value, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def _records(study: Any, names: Sequence[str]) -> list[TrialRecord]:
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = t.user_attrs
        out.append(TrialRecord(number=t.number, params=dict(attrs.get("params", t.params)), proxy=float(t.values[0]),
                               kl=float(t.values[1]), config_yaml=attrs.get("config", ""),
                               refusals=attrs.get("refusals"), total=attrs.get("total"),
                               seconds=attrs.get("seconds"),
                               extra={n: float(v) for n, v in zip(names[2:], t.values[2:])}))
    return sorted(out, key=lambda r: r.number)


def _scores(objective: Objective, model: Any, edits: list[Any] | None = None, config: Any = None) -> dict[str, Any]:
    """``{"proxy", "kl"}`` (and any further metric by name) of the model as it is now -- or, for an
    objective that scores edits itself (:class:`ScoresEdits`: streamed), under ``edits`` -- with
    ``"refusals"``/``"total"`` when the objective generates (from ``config``, for one that generates
    configs itself: :class:`GeneratesConfigs`, on a server)."""
    values = objective.cheap_edits(model, edits) if isinstance(objective, ScoresEdits) and edits is not None \
        else objective.cheap(model)
    counted = _refusals(objective, model, config)
    out: dict[str, Any] = {"proxy": values[0], "kl": values[1]}
    out |= {m.name: v for m, v in zip(objective.metrics[2:], values[2:])}
    if counted:
        out |= {"refusals": int(counted[0]), "total": int(counted[1])}
        if len(counted) > 2:
            out["degenerate"] = int(counted[2])  # included in "refusals": a degenerate answer is no success
    return out


def _refusals(objective: Objective, model: Any, config: Any) -> tuple[int, ...] | None:
    """The objective's generation count of the model as it is now, or of ``config`` where it generates configs."""
    if config is not None and isinstance(objective, GeneratesConfigs):
        return objective.refusals_config(model, config)
    return objective.refusals(model)


def _baseline(study: Any, model: Any, objective: Objective) -> dict[str, Any]:
    cached = study.user_attrs.get("baseline")
    if cached is not None:
        return cached
    base = _scores(objective, model)
    study.set_user_attr("baseline", base)
    return base


def _run_trial(study: Any, model: Any, spec: Any, model_config: Any, measurements: Measurements,
               space: SearchSpace, objective: Objective, settings: SearchSettings,
               records: list[TrialRecord], model_spec: str | None, measurements_path: str | None,
               baseline: dict[str, Any]) -> TrialRecord | None:
    import optuna

    trial = study.ask()
    started = time.time()
    try:
        params = space.suggest(trial)
        cfg = space.to_config(params, model=model_spec, measurements=measurements_path,
                              name=f"search-trial-{trial.number:04d}")
        if measurements.meta.get("source_indexing") == "hidden_state":  # converted .refuse: say the numbering
            cfg.indexing = "layer_output"
        config_yaml = cfg.to_yaml()
        cfg = parse_config(yaml.safe_load(config_yaml), where=f"trial {trial.number}")  # what a YAML gives
        edits = bind(cfg, measurements, model.config)
        refusals = None
        scores_edits = isinstance(objective, ScoresEdits)  # installs the edits itself (streamed)
        start_layer = min(edits.layers)
        with torch.no_grad(), contextlib.nullcontext() if scores_edits else apply(model, edits):
            if isinstance(objective, ScoresEdits):
                values = objective.cheap_edits(model, edits)
            elif isinstance(objective, StartsAtLayer):
                values = objective.cheap_from(model, start_layer)
            else:
                values = objective.cheap(model)
            proxy, kl = values[0], values[1]
            if not all(math.isfinite(v) for v in values):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return None
            promising = (settings.generate_front
                         and not any(dominates((r.proxy, r.kl), (proxy, kl)) for r in records)
                         and (settings.generation_kl_cap is None or kl <= settings.generation_kl_cap)
                         and proxy <= settings.generation_proxy_fraction * float(baseline["proxy"]))
            if promising:
                refusals = _refusals(objective, model, cfg)
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    seconds = time.time() - started
    stored = {k: (v if not isinstance(v, float) else round(v, 6)) for k, v in params.items()}
    trial.set_user_attr("params", stored)
    trial.set_user_attr("config", config_yaml)
    trial.set_user_attr("seconds", round(seconds, 3))
    record = TrialRecord(trial.number, stored, proxy, kl, config_yaml, seconds=round(seconds, 3),
                         extra={m.name: float(v) for m, v in zip(objective.metrics[2:], values[2:])})
    if refusals is not None:
        record.refusals, record.total = int(refusals[0]), int(refusals[1])
        trial.set_user_attr("refusals", record.refusals)
        trial.set_user_attr("total", record.total)
    study.tell(trial, list(values))
    return record


def _postfix(records: Sequence[TrialRecord], settings: SearchSettings) -> str:
    front = pareto_front(records, lambda r: (r.proxy, r.kl))
    best = best_so_far(records, settings.target_refusal_rate)
    if best is None:
        return f"front {len(front)}"
    if best.refusals is not None:
        return f"front {len(front)} | best #{best.number}: {best.refusals}/{best.total} refused, KL {best.kl:.3f}"
    return f"front {len(front)} | best #{best.number}: proxy {best.proxy:.3g}, KL {best.kl:.3f}"


def _final_front(records: list[TrialRecord], settings: SearchSettings, final: Objective | None, model: Any,
                 spec: Any, model_config: Any, measurements: Measurements, out: Path, baseline: dict[str, Any],
                 say: Callable[[str], None]) -> tuple[list[TrialRecord], str]:
    """The front reported and its basis: the (generation refusals, KL) front of the search -- the
    (proxy, KL) one without generation -- re-evaluated on ``final`` when there is one."""
    if not records:
        return [], "proxy"
    generated = [r for r in records if r.refusals is not None]
    if generated:
        candidates = pareto_front(generated, lambda r: (r.refusals, r.kl))
        basis = "search-generation"
    else:
        candidates = pareto_front(records, lambda r: (r.proxy, r.kl))
        basis = "proxy"
    candidates = sorted(candidates, key=lambda r: (r.refusals if r.refusals is not None else r.proxy, r.kl))
    if final is None or settings.full_eval_top == 0:
        return candidates, basis

    chosen = spread(candidates, settings.full_eval_top)
    key = sha256_text(json.dumps(final.describe(), sort_keys=True, default=str))[:16]
    cache_path = out / "eval_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    entries = cache.setdefault(key, {"objective": final.describe(), "trials": {}})
    if "baseline" not in entries:
        say("evaluating the baseline on the eval prompts ...")
        entries["baseline"] = _scores(final, model)
    baseline["eval"] = entries["baseline"]
    todo = [r for r in chosen if str(r.number) not in entries["trials"]]
    if todo:
        say(f"evaluating {len(todo)} front trial(s) on the eval prompts ...")
    for r in chosen:
        if str(r.number) not in entries["trials"]:
            edits = bind(r.config(), measurements, model.config)
            if isinstance(final, ScoresEdits):  # streamed: installs the edits itself
                entries["trials"][str(r.number)] = _scores(final, model, edits)
            else:
                with torch.no_grad(), apply(model, edits):
                    entries["trials"][str(r.number)] = _scores(final, model, config=r.config())
            if isinstance(final, ScoresAnswers):  # full-answer KL, toggling the edit around each forward
                entries["trials"][str(r.number)]["answer_kl"] = final.answer_kl(
                    model, lambda edits=edits: apply(model, edits))
            atomic_write_text(cache_path, json.dumps(cache, indent=1, default=str))
        r.eval = entries["trials"][str(r.number)]
    atomic_write_text(cache_path, json.dumps(cache, indent=1, default=str))
    if all("refusals" in r.eval for r in chosen):
        front = pareto_front(chosen, lambda r: (r.eval["refusals"], r.eval["kl"]))
        front = sorted(front, key=lambda r: (r.eval["refusals"], r.eval["kl"]))
    else:
        front = pareto_front(chosen, lambda r: (r.eval["proxy"], r.eval["kl"]))
        front = sorted(front, key=lambda r: (r.eval["proxy"], r.eval["kl"]))
    return front, "eval"


__all__ = ["SearchSettings", "run_search", "search", "evenly", "measurements_fingerprint", "STUDY_NAME",
           "SAMPLERS"]
