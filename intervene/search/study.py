"""``intervene search``: multi-objective Optuna search over LIVE interventions.

The model is loaded once; each trial builds an :class:`InterventionConfig` from the sampled
parameters (:mod:`intervene.search.space`), re-parses it from its own YAML text, resolves it and
installs it with :func:`intervene.hooks.apply.apply_edits` -- no reload, no weight reset -- so
the YAML written for a trial bakes to exactly what that trial scored.

Objectives (both minimised, what Optuna sees):
    1. refusal proxy: first-token probability mass on refusal-opening tokens, averaged over the
       harmful prompts (one forward pass, no generation)
    2. KL(baseline || intervened) of the first-token distribution on harmless prompts
       (one forward pass; the baseline log-probs are computed once per run)

Strategy for the expensive, generation-based refusal count (documented in the README):
    * during the search, a trial whose (proxy, KL) is not dominated by any earlier trial -- it
      enters the running Pareto front -- whose KL is under ``generation_kl_cap`` (1.0) and whose
      proxy is at most ``generation_proxy_fraction`` (0.5) of the baseline's gets a
      greedy-generation refusal count on the search's harmful prompts (user attribute
      ``refusals``; ``search_new_tokens``, 24 by default: enough to rank, the eval uses more).
      Every member of the final proxy front inside those caps got one (a point non-dominated at
      the end was non-dominated when it finished), plus earlier front members the proxy later
      superseded -- the proxy ranks trials, generation judges them.
    * at the end, the Pareto front of those trials in (generation refusals, KL) is re-evaluated
      on the held-out eval prompts (``full_eval_top`` of them at most, spread along the front):
      generation refusals on eval harmful, first-token KL on eval harmless. The front reported,
      written as YAML and plotted is the Pareto front of that evaluation.

Outputs in the study directory: ``study.db`` (Optuna RDB storage: resumable, trial numbering
continues), ``front/trial_XXXX.yaml`` (ready to bake), ``front.json``, ``front.png``,
``eval_cache.json``. Each carries the versions and the search settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import yaml

from ..config.schema import InterventionConfig, parse_config, resolve
from ..errors import InputError
from ..io.measurements import Measurements
from .space import SearchSpace

STUDY_NAME = "intervene-search"
SAMPLERS = ("tpe", "nsga2")


# ---- objectives ------------------------------------------------------------------------------

class Objective(Protocol):
    """What a search scores. ``cheap`` runs every trial; ``refusals`` only for promising ones."""

    def cheap(self, model: Any) -> tuple[float, float]:
        """(refusal proxy, KL) of the model as it is now (intervention installed); lower is better."""

    def refusals(self, model: Any) -> tuple[int, int] | None:
        """(refused, total) by generation, or None when this objective cannot generate."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description; its hash decides whether cached results can be reused."""


class PromptObjective:
    """The default objective: prompts, first-token scores, greedy generation (intervene.live.evaluate).

    The search prompts are tokenised once. With ``skip_unedited=True`` the residual entering
    every decoder layer is cached from the unedited model, and a trial whose first edited layer
    is ``k`` runs layers ``k..L-1`` only (:meth:`cheap_from`): the layers before ``k`` compute
    exactly what they computed for the baseline. A self-check at start-up compares a skipped
    forward with a full one and turns skipping off for a model where they differ."""

    def __init__(self, model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *,
                 batch_size: int = 16, max_new_tokens: int = 48, system_prompt: str | None = None,
                 chat_template: bool = True, label: str = "search",
                 sources: dict[str, str] | None = None, skip_unedited: bool = True):
        from ..live import evaluate as ev
        from ..io.models import batches, encode, format_prompts, model_device

        if not harmful or not harmless:
            raise InputError(f"{label} prompts: need at least one harmful and one harmless prompt")
        self.ev = ev
        self.tokenizer = tokenizer
        self.harmful = list(harmful)
        self.harmless = list(harmless)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.label = label
        self.sources = dict(sources or {})
        self.refusal_ids = ev.refusal_token_ids(tokenizer)
        # one forward over both sets per trial, prompts sorted by length (less padding)
        joined = self.harmful + self.harmless
        self._order = sorted(range(len(joined)), key=lambda i: len(joined[i]))
        texts = format_prompts(tokenizer, [joined[i] for i in self._order], system_prompt, chat_template)
        device = model_device(model)
        self._batches = [encode(tokenizer, chunk, device) for chunk in batches(texts, batch_size)]
        self.cache: ResidualCache | None = ResidualCache(model, self._batches) if skip_unedited else None
        # the cache's own forward already gave the baseline's first-token log-probs
        harmful_lp, self.base_harmless = (self._restore_order(torch.cat(self.cache.logprobs)) if self.cache
                                          else self._first_token(model))
        self.base_score = self._score(harmful_lp)
        if self.cache is not None and not self.cache.self_check(model, self._batches[0]):
            self.cache = None

    def _score(self, harmful_lp: torch.Tensor) -> float:
        # mean probability mass on refusal openings: ~ the expected fraction of refusals, each
        # prompt counting at most 1 (a mean log-mass would reward pushing non-refusals further)
        return float(self.ev.refusal_score(harmful_lp, self.refusal_ids).exp().mean())

    def _first_token(self, model: Any, start_layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        with torch.no_grad():
            for i, enc in enumerate(self._batches):
                if start_layer > 0 and self.cache is not None:
                    with self.cache.starting_at(model, i, start_layer):
                        rows.append(self.ev.next_token_logprobs(model, enc["input_ids"], enc.get("attention_mask")))
                else:
                    rows.append(self.ev.next_token_logprobs(model, enc["input_ids"], enc.get("attention_mask")))
        return self._restore_order(torch.cat(rows))

    def _restore_order(self, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        restored = torch.empty_like(lp)
        restored[torch.tensor(self._order)] = lp
        n = len(self.harmful)
        return restored[:n], restored[n:]

    def cheap(self, model: Any) -> tuple[float, float]:
        return self.cheap_from(model, 0)

    def cheap_from(self, model: Any, start_layer: int) -> tuple[float, float]:
        """:meth:`cheap` for a model edited at layers >= ``start_layer`` only."""
        harmful_lp, harmless_lp = self._first_token(model, start_layer)
        return self._score(harmful_lp), float(self.ev.kl_divergence(self.base_harmless, harmless_lp))

    def refusals(self, model: Any) -> tuple[int, int]:
        texts = self.ev.generate(model, self.tokenizer, self.harmful, max_new_tokens=self.max_new_tokens,
                                 batch_size=self.batch_size, system_prompt=self.system_prompt,
                                 chat_template=self.chat_template, progress=False)
        return sum(bool(self.ev.is_refusal(t)) for t in texts), len(texts)

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label, "sources": self.sources,
            "harmful": {"n": len(self.harmful), "sha256": _sha(self.harmful)},
            "harmless": {"n": len(self.harmless), "sha256": _sha(self.harmless)},
            "max_new_tokens": self.max_new_tokens, "system_prompt": self.system_prompt,
            "chat_template": self.chat_template, "batch_size": self.batch_size,
        }


class _Passthrough(torch.nn.Module):
    """Stands in for a decoder layer that would recompute the cached baseline: returns its input."""

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if hidden_states is not None else kwargs["hidden_states"]


class ResidualCache:
    """The residual entering every decoder layer, per batch, from the UNEDITED model: a forward
    that starts at layer k replaces layers 0..k-1 by passthroughs and feeds the cached residual
    into layer k (a forward pre-hook), so it costs (L - k) / L of a full one."""

    def __init__(self, model: Any, encoded: Sequence[dict[str, torch.Tensor]]):
        from ..arch import decoder_layers

        layers = decoder_layers(model)
        self.entries: list[list[torch.Tensor]] = []
        self.logprobs: list[torch.Tensor] = []  # the unedited model's last-position log-softmax, per batch
        for enc in encoded:
            seen: list[torch.Tensor | None] = [None] * len(layers)

            def keep(index: int) -> Callable:
                def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
                    seen[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
                return pre_hook

            handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
            try:
                with torch.no_grad():
                    logits = model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"),
                                   logits_to_keep=1).logits
            finally:
                for h in handles:
                    h.remove()
            self.logprobs.append(torch.log_softmax(logits[:, -1, :].float(), dim=-1).cpu())
            self.entries.append([t for t in seen])  # type: ignore[misc]

    def starting_at(self, model: Any, batch: int, start: int) -> Any:
        import contextlib

        from ..arch import decoder_layers

        @contextlib.contextmanager
        def ctx():
            layers = decoder_layers(model)
            cached = self.entries[batch][start]
            originals = [layers[i] for i in range(start)]

            def feed(module: Any, args: tuple, kwargs: dict) -> Any:
                if args:
                    return (cached,) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": cached}

            handle = layers[start].register_forward_pre_hook(feed, with_kwargs=True)
            try:
                for i in range(start):
                    layers[i] = _Passthrough()
                yield
            finally:
                for i, original in enumerate(originals):
                    layers[i] = original
                handle.remove()

        return ctx()

    def self_check(self, model: Any, enc: dict[str, torch.Tensor]) -> bool:
        """A forward started half-way must give the full forward's logits (else: no skipping)."""
        from ..arch import decoder_layers

        start = len(decoder_layers(model)) // 2
        if start == 0:
            return False
        try:
            with torch.no_grad():
                full = model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"),
                             logits_to_keep=1).logits
                with self.starting_at(model, 0, start):
                    skipped = model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"),
                                    logits_to_keep=1).logits
        except Exception:  # a model whose layers do not pass one tensor along
            return False
        return bool(torch.allclose(full, skipped, atol=1e-5, rtol=1e-5))


# ---- settings and results --------------------------------------------------------------------

@dataclass
class SearchSettings:
    trials: int = 40
    seed: int = 0
    sampler: str = "tpe"  # tpe | nsga2
    startup_trials: int = 10  # random trials before TPE models the space
    full_eval_top: int = 8  # at most this many front trials re-evaluated on the eval prompts
    generate_front: bool = True  # generation refusal count for trials entering the proxy front
    generation_kl_cap: float | None = 1.0  # ... unless their KL is above this (model broken anyway)
    generation_proxy_fraction: float = 0.5  # ... or their refusal proxy is above this x the baseline's
    target_refusal_rate: float = 0.05  # "best so far": lowest KL with at most this refusal rate

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise InputError(f"--trials must be >= 0, got {self.trials}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler '{self.sampler}'; valid: {', '.join(SAMPLERS)}")
        if self.full_eval_top < 0:
            raise InputError(f"--full-eval-top must be >= 0, got {self.full_eval_top}")


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    proxy: float  # objective 1 (search prompts)
    kl: float  # objective 2 (search prompts)
    config_yaml: str
    refusals: int | None = None  # generation on the search's harmful prompts
    total: int | None = None
    eval: dict[str, Any] | None = None  # {"refusals", "total", "kl", "proxy"} on the eval prompts
    seconds: float | None = None

    @property
    def refusal_rate(self) -> float | None:
        return None if self.refusals is None or not self.total else self.refusals / self.total

    def config(self) -> InterventionConfig:
        return parse_config(yaml.safe_load(self.config_yaml), where=f"trial {self.number}")

    def summary(self) -> dict[str, Any]:
        return {"trial": self.number, "refusal_proxy": self.proxy, "kl": self.kl, "refusals": self.refusals,
                "total": self.total, "eval": self.eval, "params": self.params, "seconds": self.seconds}


@dataclass
class SearchResult:
    out_dir: Path
    records: list[TrialRecord]  # every completed trial, by number
    front: list[TrialRecord]  # the reported Pareto front
    basis: str  # what the front is judged on: "eval", "search-generation" or "proxy"
    baseline: dict[str, Any]
    new_trials: int
    seconds: float  # wall time of the new trials
    config_paths: list[Path] = field(default_factory=list)
    json_path: Path | None = None
    png_path: Path | None = None

    @property
    def trials_per_hour(self) -> float:
        return 3600.0 * self.new_trials / self.seconds if self.seconds > 0 else float("nan")

    def table(self) -> str:
        return format_front(self.front, self.basis, self.baseline)


# ---- Pareto helpers (pure) -------------------------------------------------------------------

def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(items: Sequence[Any], key: Callable[[Any], Sequence[float]]) -> list[Any]:
    """Non-dominated items (ties both kept), in input order."""
    points = [tuple(key(i)) for i in items]
    return [item for item, p in zip(items, points) if not any(dominates(q, p) for q in points)]


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """At most ``k`` items evenly spaced along ``items`` (both ends kept)."""
    if k <= 0:
        return []
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[0]]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def best_so_far(records: Sequence[TrialRecord], target_rate: float) -> TrialRecord | None:
    """Lowest KL among generation-scored trials at or under the target refusal rate; else fewest
    refusals (then lowest KL); else, with no generation at all, lowest proxy."""
    scored = [r for r in records if r.refusals is not None]
    if scored:
        ok = [r for r in scored if (r.refusal_rate or 0.0) <= target_rate]
        if ok:
            return min(ok, key=lambda r: (r.kl, r.refusals))
        return min(scored, key=lambda r: (r.refusals, r.kl))
    return min(records, key=lambda r: (r.proxy, r.kl)) if records else None


# ---- the search ------------------------------------------------------------------------------

def run_search(model: Any, measurements: Measurements, space: SearchSpace, objective: Objective,
               out_dir: str | Path, settings: SearchSettings | None = None, *,
               final: Objective | None = None, model_spec: str | None = None,
               measurements_path: str | None = None, progress: bool = True,
               say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> SearchResult:
    """Run ``settings.trials`` new trials (resuming ``out_dir/study.db`` if it exists), then
    evaluate the front on ``final`` (the eval prompts) and write the outputs.

    ``objective``/``final`` are injectable (see :class:`Objective`): a test can score a tiny
    model with a logit proxy, no tokenizer or generation."""
    import optuna
    from tqdm.auto import tqdm

    from ..arch import arch_for_config, text_config
    from ..hooks.apply import apply_edits
    from ..io.models import versions

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
                                directions=["minimize", "minimize"], load_if_exists=True)
    _check_identity(study, identity, out)

    records = _records(study)
    baseline = _baseline(study, model, objective, identity)
    bar = tqdm(total=settings.trials, desc="search", unit="trial", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    start = time.time()
    try:
        for _ in range(settings.trials):
            record = _run_trial(study, model, spec, model_config, measurements, space, objective, settings,
                                records, apply_edits, model_spec, measurements_path, baseline)
            if record is not None:
                records.append(record)
            bar.update(1)
            bar.set_postfix_str(_postfix(records, settings), refresh=False)
    finally:
        bar.close()
    seconds = time.time() - start

    front, basis = _final_front(records, settings, final, model, spec, model_config, measurements, out,
                                apply_edits, baseline, study, say)
    settings_out = {"search": asdict(settings), "identity": identity, "versions": versions(),
                    "final": final.describe() if final is not None else None,
                    "trials_total": len(records), "new_trials": settings.trials, "seconds": round(seconds, 2)}
    result = SearchResult(out, records, front, basis, baseline, settings.trials, seconds)
    _write_outputs(result, settings_out, model_spec, measurements_path)
    return result


def search(model: str, measurements: str, out: str | Path, *, trials: int = 40, seed: int = 0,
           harmful: str = "builtin:harmful:train", harmless: str = "builtin:harmless:train",
           eval_harmful: str = "builtin:harmful:eval", eval_harmless: str = "builtin:harmless:eval",
           field: str | None = None, limit: int | None = 64, eval_limit: int | None = None,
           max_new_tokens: int = 48, search_new_tokens: int = 24, full_eval_top: int = 8,
           sampler: str = "tpe", startup_trials: int = 10,
           targets: list[str] | None = None, router: bool | None = None,
           methods: tuple[str, ...] = ("project", "norm_preserving"), generation_kl_cap: float | None = 1.0,
           whiten: tuple[float, float] | str | None = "auto",
           dtype: str = "float32", device_map: str | None = None, batch_size: int = 16,
           system_prompt: str | None = None, chat_template: bool = True, progress: bool = True,
           say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> SearchResult:
    """``intervene search`` as a function: load the model once, build the default search space
    and prompt objectives, run :func:`run_search`. ``limit`` (default 64) caps each SEARCH prompt
    set, evenly spaced: every trial runs one forward pass over them, so it sets the trial rate;
    ``eval_limit`` caps the final evaluation sets (default: all). ``whiten``: a (low, high) range
    for the whitening lambda, ``None`` for the raw direction only, ``"auto"`` (default): the
    default range when the measurements hold the harmless second moment, else the raw direction."""
    from ..arch import arch_for_config, text_config
    from ..io.measurements import load_measurements
    from ..io.models import load_model
    from ..io.prompts import load_prompts

    settings = SearchSettings(trials=trials, seed=seed, sampler=sampler, startup_trials=startup_trials,
                              full_eval_top=full_eval_top, generation_kl_cap=generation_kl_cap)
    meas = load_measurements(measurements)
    prompt_sets = {name: evenly(load_prompts(spec, field=field), lim) for name, spec, lim in (
        ("harmful", harmful, limit), ("harmless", harmless, limit),
        ("eval_harmful", eval_harmful, eval_limit), ("eval_harmless", eval_harmless, eval_limit))
        if full_eval_top > 0 or not name.startswith("eval")}
    say(f"loading {model} ...")
    loaded, tokenizer = load_model(model, dtype=dtype, device_map=device_map)
    config = text_config(loaded.config)
    meas.check_model(int(config.hidden_size), int(config.num_hidden_layers))
    space = SearchSpace.default(arch_for_config(loaded.config), config, meas, targets=targets, router=router,
                                methods=methods, whiten_range=whiten)
    say("direction: " + (f"harmless-whitened, lambda searched in [{space.whiten.low}, {space.whiten.high}]"
                         if space.whiten else
                         "raw difference of means (no harmless second moment in the measurements, or --whiten off)"))
    common = dict(batch_size=batch_size, system_prompt=system_prompt, chat_template=chat_template)
    say(f"baseline first-token scores on {len(prompt_sets['harmful'])} harmful / "
        f"{len(prompt_sets['harmless'])} harmless search prompts ...")
    objective = PromptObjective(loaded, tokenizer, prompt_sets["harmful"], prompt_sets["harmless"], label="search",
                                sources={"harmful": harmful, "harmless": harmless, "limit": str(limit)},
                                max_new_tokens=search_new_tokens, **common)
    final = None
    if full_eval_top > 0:
        final = PromptObjective(loaded, tokenizer, prompt_sets["eval_harmful"], prompt_sets["eval_harmless"],
                                label="eval", sources={"harmful": eval_harmful, "harmless": eval_harmless,
                                                       "limit": str(eval_limit)},
                                max_new_tokens=max_new_tokens, **common)
    return run_search(loaded, meas, space, objective, out, settings, final=final, model_spec=model_reference(model),
                      measurements_path=str(Path(measurements).resolve()), progress=progress, say=say)


def evenly(prompts: Sequence[str], limit: int | None) -> list[str]:
    """At most ``limit`` prompts, evenly spaced through the set (so every category of a sorted
    built-in set is represented, unlike the first N)."""
    prompts = list(prompts)
    if limit is None or limit >= len(prompts):
        return prompts
    if limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    return [prompts[(i * len(prompts)) // limit] for i in range(limit)]


def model_reference(spec: str) -> str:
    """What an output config records as the model: built-in names and hub ids as given, local
    paths made absolute."""
    import os

    from ..io.sources import resolve_model

    if spec in ("smollm2", "organism"):
        return spec
    src = resolve_model(spec)
    return src.display if src.is_hub else os.path.abspath(src.display)


def measurements_fingerprint(measurements: Measurements) -> str:
    h = hashlib.sha256()
    for key in sorted(k for k in measurements.tensors if k.startswith(("direction.", "harmless_mean.", "harmless_moment."))):
        t = measurements.tensors[key].detach().to(torch.float32).contiguous().cpu()
        h.update(key.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _sha(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


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


def _records(study: Any) -> list[TrialRecord]:
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = t.user_attrs
        out.append(TrialRecord(number=t.number, params=dict(attrs.get("params", t.params)), proxy=float(t.values[0]),
                               kl=float(t.values[1]), config_yaml=attrs.get("config", ""),
                               refusals=attrs.get("refusals"), total=attrs.get("total"),
                               seconds=attrs.get("seconds")))
    return sorted(out, key=lambda r: r.number)


def _baseline(study: Any, model: Any, objective: Objective, identity: dict[str, Any]) -> dict[str, Any]:
    cached = study.user_attrs.get("baseline")
    if cached is not None:
        return cached
    proxy, kl = objective.cheap(model)
    base: dict[str, Any] = {"proxy": proxy, "kl": kl}
    counted = objective.refusals(model)
    if counted is not None:
        base["refusals"], base["total"] = counted
    study.set_user_attr("baseline", base)
    return base


def _run_trial(study: Any, model: Any, spec: Any, model_config: Any, measurements: Measurements,
               space: SearchSpace, objective: Objective, settings: SearchSettings,
               records: list[TrialRecord], apply_edits: Callable, model_spec: str | None,
               measurements_path: str | None, baseline: dict[str, Any]) -> TrialRecord | None:
    import optuna

    trial = study.ask()
    started = time.time()
    try:
        params = space.suggest(trial)
        cfg = space.to_config(params, model=model_spec, measurements=measurements_path,
                              name=f"search-trial-{trial.number:04d}")
        config_yaml = cfg.to_yaml()
        cfg = parse_config(yaml.safe_load(config_yaml), where=f"trial {trial.number}")  # what a YAML gives
        edits = resolve(cfg, spec, model_config, measurements)
        refusals = None
        cheap_from = getattr(objective, "cheap_from", None)
        start_layer = min(e.layer for e in edits)
        with torch.no_grad(), apply_edits(model, edits):
            proxy, kl = cheap_from(model, start_layer) if cheap_from else objective.cheap(model)
            if not (math.isfinite(proxy) and math.isfinite(kl)):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return None
            promising = (settings.generate_front
                         and not any(dominates((r.proxy, r.kl), (proxy, kl)) for r in records)
                         and (settings.generation_kl_cap is None or kl <= settings.generation_kl_cap)
                         and proxy <= settings.generation_proxy_fraction * float(baseline["proxy"]))
            if promising:
                refusals = objective.refusals(model)
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    seconds = time.time() - started
    stored = {k: (v if not isinstance(v, float) else round(v, 6)) for k, v in params.items()}
    trial.set_user_attr("params", stored)
    trial.set_user_attr("config", config_yaml)
    trial.set_user_attr("seconds", round(seconds, 3))
    record = TrialRecord(trial.number, stored, proxy, kl, config_yaml, seconds=round(seconds, 3))
    if refusals is not None:
        record.refusals, record.total = int(refusals[0]), int(refusals[1])
        trial.set_user_attr("refusals", record.refusals)
        trial.set_user_attr("total", record.total)
    study.tell(trial, [proxy, kl])
    return record


def _postfix(records: Sequence[TrialRecord], settings: SearchSettings) -> str:
    front = pareto_front(records, lambda r: (r.proxy, r.kl))
    best = best_so_far(records, settings.target_refusal_rate)
    if best is None:
        return f"front {len(front)}"
    if best.refusals is not None:
        return f"front {len(front)} | best #{best.number}: {best.refusals}/{best.total} refused, KL {best.kl:.3f}"
    return f"front {len(front)} | best #{best.number}: proxy {best.proxy:.3g}, KL {best.kl:.3f}"


# ---- the final front -------------------------------------------------------------------------

def _final_front(records: list[TrialRecord], settings: SearchSettings, final: Objective | None, model: Any,
                 spec: Any, model_config: Any, measurements: Measurements, out: Path, apply_edits: Callable,
                 baseline: dict[str, Any], study: Any, say: Callable[[str], None]) -> tuple[list[TrialRecord], str]:
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
    key = hashlib.sha256(json.dumps(final.describe(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache_path = out / "eval_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    entries = cache.setdefault(key, {"objective": final.describe(), "trials": {}})
    if "baseline" not in entries:
        say("evaluating the baseline on the eval prompts ...")
        proxy, kl = final.cheap(model)
        counted = final.refusals(model)
        entries["baseline"] = {"proxy": proxy, "kl": kl,
                               **({"refusals": counted[0], "total": counted[1]} if counted else {})}
    baseline["eval"] = entries["baseline"]
    todo = [r for r in chosen if str(r.number) not in entries["trials"]]
    if todo:
        say(f"evaluating {len(todo)} front trial(s) on the eval prompts ...")
    for r in chosen:
        if str(r.number) not in entries["trials"]:
            edits = resolve(r.config(), spec, model_config, measurements)
            with torch.no_grad(), apply_edits(model, edits):
                proxy, kl = final.cheap(model)
                counted = final.refusals(model)
            entries["trials"][str(r.number)] = {"proxy": proxy, "kl": kl,
                                                **({"refusals": counted[0], "total": counted[1]} if counted else {})}
            _atomic_write(cache_path, json.dumps(cache, indent=1, default=str))
        r.eval = entries["trials"][str(r.number)]
    _atomic_write(cache_path, json.dumps(cache, indent=1, default=str))
    if all("refusals" in r.eval for r in chosen):
        front = pareto_front(chosen, lambda r: (r.eval["refusals"], r.eval["kl"]))
        front = sorted(front, key=lambda r: (r.eval["refusals"], r.eval["kl"]))
    else:
        front = pareto_front(chosen, lambda r: (r.eval["proxy"], r.eval["kl"]))
        front = sorted(front, key=lambda r: (r.eval["proxy"], r.eval["kl"]))
    return front, "eval"


# ---- outputs ---------------------------------------------------------------------------------

def format_front(front: Sequence[TrialRecord], basis: str, baseline: dict[str, Any]) -> str:
    def rate(refusals: Any, total: Any) -> str:
        return "-" if refusals is None else f"{refusals}/{total} ({100.0 * refusals / max(total, 1):.0f}%)"

    head = f"{'trial':>6}  {'eval refused':>14}  {'eval KL':>8}  {'search refused':>14}  {'search KL':>9}  " \
           f"{'proxy':>8}  {'dir':>6}  {'window':>11}  {'method':>15}"
    lines = [f"Pareto front ({basis}), {len(front)} member(s):", head]
    be = baseline.get("eval") or {}
    lines.append(f"{'base':>6}  {rate(be.get('refusals'), be.get('total')):>14}  {'0':>8}  "
                 f"{rate(baseline.get('refusals'), baseline.get('total')):>14}  {'0':>9}  "
                 f"{baseline.get('proxy', float('nan')):>8.3g}")
    for r in front:
        ev = r.eval or {}
        p = r.params
        win = f"{p['center']:.1f}±{p['width']:.1f}"
        method = p["method"] + ("+router" if p.get("router") else "")
        kl = f"{ev['kl']:.4f}" if "kl" in ev else "-"
        lines.append(f"{r.number:>6}  {rate(ev.get('refusals'), ev.get('total')):>14}  {kl:>8}  "
                     f"{rate(r.refusals, r.total):>14}  {r.kl:>9.4f}  {r.proxy:>8.3g}  {p['direction']:>6.2f}  "
                     f"{win:>11}  {method:>15}")
    return "\n".join(lines)


def _write_outputs(result: SearchResult, settings_out: dict[str, Any], model_spec: str | None,
                   measurements_path: str | None) -> None:
    out = result.out_dir
    front_dir = out / "front"
    front_dir.mkdir(exist_ok=True)
    for old in front_dir.glob("trial_*.yaml"):  # a resumed study's front may have changed
        old.unlink()
    header = ("# written by intervene search -- ready to bake: intervene bake THIS.yaml --output DIR\n"
              f"# versions: {json.dumps(settings_out['versions'], sort_keys=True)}\n"
              f"# search: {json.dumps(settings_out['search'], sort_keys=True)}\n"
              f"# space: {json.dumps(settings_out['identity']['space'], sort_keys=True)}\n")
    paths = []
    for r in result.front:
        cfg = r.config()
        cfg.model = model_spec if model_spec is not None else cfg.model
        cfg.measurements = measurements_path if measurements_path is not None else cfg.measurements
        cfg.notes = _notes(r, settings_out)
        path = front_dir / f"trial_{r.number:04d}.yaml"
        scores = f"# trial {r.number}: {_notes(r, settings_out)}\n"
        _atomic_write(path, header + scores + cfg.to_yaml())
        paths.append(path)
    result.config_paths = paths
    doc = {
        "basis": result.basis,
        "baseline": result.baseline,
        "front": [{**r.summary(), "config": str(p.relative_to(out))} for r, p in zip(result.front, paths)],
        "trials": [{"trial": r.number, "refusal_proxy": r.proxy, "kl": r.kl, "refusals": r.refusals,
                    "total": r.total} for r in result.records],
        "trials_per_hour": result.trials_per_hour,
        **settings_out,
    }
    result.json_path = out / "front.json"
    _atomic_write(result.json_path, json.dumps(doc, indent=2, default=str))
    result.png_path = out / "front.png"
    plot_front(result, settings_out, result.png_path)


def _notes(r: TrialRecord, settings_out: dict[str, Any]) -> str:
    parts = [f"intervene search trial {r.number}"]
    if r.eval and "refusals" in r.eval:
        parts.append(f"eval refusals {r.eval['refusals']}/{r.eval['total']}, eval KL {r.eval['kl']:.4f}")
    if r.refusals is not None:
        parts.append(f"search refusals {r.refusals}/{r.total}")
    parts.append(f"search KL {r.kl:.4f}, refusal proxy {r.proxy:.4g}")
    v = settings_out["versions"]
    parts.append(f"seed {settings_out['search']['seed']}, sampler {settings_out['search']['sampler']}, "
                 + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    return "; ".join(parts)


def plot_front(result: SearchResult, settings_out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    scored = [r for r in result.records if r.refusals is not None]
    if scored:
        ax.scatter([max(r.kl, 1e-5) for r in scored], [100.0 * r.refusal_rate for r in scored], s=18, c="0.65",
                   label="trials (search prompts, generation)")
        ylabel = "refusals (%)"
    else:
        ax.scatter([max(r.kl, 1e-5) for r in result.records], [r.proxy for r in result.records], s=18, c="0.65",
                   label="trials (search prompts, proxy)")
        ylabel = "refusal proxy"
    if result.basis == "eval" and result.front and all("refusals" in (r.eval or {}) for r in result.front):
        xs = [max(r.eval["kl"], 1e-5) for r in result.front]
        ys = [100.0 * r.eval["refusals"] / max(r.eval["total"], 1) for r in result.front]
        ylabel = "refusals (%)"
        label = "Pareto front (eval prompts)"
    elif result.front:
        xs = [max(r.kl, 1e-5) for r in result.front]
        ys = [100.0 * r.refusal_rate if r.refusals is not None else r.proxy for r in result.front]
        label = f"Pareto front ({result.basis})"
    else:
        xs, ys, label = [], [], ""
    if xs:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "-o", c="C3", label=label, zorder=3)
        for r, x, y in zip(result.front, xs, ys):
            ax.annotate(f"#{r.number}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    base = result.baseline.get("eval") or result.baseline
    if "refusals" in base:
        ax.axhline(100.0 * base["refusals"] / max(base["total"], 1), c="C0", ls="--", lw=1,
                   label="baseline" + (" (eval prompts)" if "eval" in result.baseline else ""))
    ax.set_xscale("log")  # KL spans decades; a zero KL (nothing edited) is drawn at 1e-5
    shown = [max(r.kl, 1e-5) for r in result.records] + list(xs)
    if shown:
        ax.set_xlim(min(shown) / 2, max(shown) * 2)
    ax.set_xlabel("KL divergence (first token, harmless prompts)")
    ax.set_ylabel(ylabel)
    ident = settings_out["identity"]
    ax.set_title(f"intervene search: {ident.get('model') or ident.get('model_type')}, "
                 f"{settings_out['trials_total']} trials")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    v = settings_out["versions"]
    s = settings_out["search"]
    fig.text(0.01, 0.005, f"seed {s['seed']}, sampler {s['sampler']}, full_eval_top {s['full_eval_top']}; "
             + ", ".join(f"{k} {v[k]}" for k in sorted(v)), fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


__all__ = ["Objective", "PromptObjective", "ResidualCache", "SearchSettings", "SearchResult", "TrialRecord", "search",
           "run_search",
           "pareto_front", "dominates", "spread", "best_so_far", "format_front", "measurements_fingerprint"]
