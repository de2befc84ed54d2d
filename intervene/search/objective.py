"""What a search scores: the :class:`Objective` protocol (a sequence of metrics, one value each
every trial -- by default the refusal proxy and the first-token KL -- a generation refusal count for
promising trials, a description whose hash identifies it), :class:`PromptObjective`, the default one on
prompt sets (first-token scores and greedy generation through :mod:`intervene.live.generate` and
:mod:`intervene.live.metrics`, unedited layers skipped with a
:class:`~intervene.hooks.residual_cache.ResidualCache`), and :class:`StreamedObjective`, its cheap
proxy one decoder layer at a time for a model that does not fit (``search --stream-layers``). A
metric of a trial (:class:`SearchMetric`) reads a :class:`TrialPass`; more objectives are more metrics
(e.g. ``PromptObjective(..., metrics=(*DEFAULT_METRICS, TextPerplexity(tokenizer, text)))``). Two
optional capabilities are typed protocols the study checks with ``isinstance``: :class:`StartsAtLayer`
and :class:`ScoresEdits`. A test can inject its own objective."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

import torch

from ..config.resolve import Bound
from ..config.schema import InterventionConfig
from ..errors import InputError
from ..hooks.residual_cache import ResidualCache
from ..io.files import sha256_lines, sha256_text
from ..io.models import batches, encode, model_device
from ..live.generate import Intervention, PromptFormat, TransformersBackend, next_token_logprobs
from ..live.metrics import (AnswerKL, Direction, FirstTokenKL, Metric, Perplexity, RefusalMass, Refusals,
                             refusal_token_ids)
from ..live.server import ServerBackend, ServerClient, ServerOptions, served_config


class TrialPass:
    """What a trial's metrics read: the model as it is now (the trial's edits installed; a meta
    skeleton when streamed), the baseline's harmless first-token log-probs, the refusal-opening token
    ids, and the trial's first-token log-probs (harmful, harmless), computed on first use, once."""

    def __init__(self, model: Any, first_token: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                 base_harmless: torch.Tensor, refusal_ids: Sequence[int]):
        self.model = model
        self.base_harmless = base_harmless
        self.refusal_ids = tuple(refusal_ids)
        self._compute = first_token
        self._first_token: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def first_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._first_token is None:
            self._first_token = self._compute()
        return self._first_token


class SearchMetric(Metric, Protocol):
    """One objective of a search: a :class:`~intervene.live.metrics.Metric` scored on a trial."""

    def score(self, trial: TrialPass) -> float:
        """This metric of the trial."""

    def describe(self) -> dict[str, Any]:
        """JSON-able; part of the objective's identity."""


class RefusalProxy:
    """Probability mass on refusal-opening first tokens, harmful prompts (:class:`~intervene.live.metrics.RefusalMass`)."""

    name: ClassVar[str] = "refusal_proxy"
    direction: ClassVar[Direction] = "minimize"

    def score(self, trial: TrialPass) -> float:
        return RefusalMass(trial.refusal_ids).compute(trial.first_token[0])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class HarmlessKL:
    """First-token KL(baseline ‖ trial), harmless prompts (:class:`~intervene.live.metrics.FirstTokenKL`)."""

    name: ClassVar[str] = "kl"
    direction: ClassVar[Direction] = "minimize"

    def score(self, trial: TrialPass) -> float:
        return float(FirstTokenKL().compute(trial.base_harmless, trial.first_token[1]))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class TextPerplexity:
    """Perplexity of ``text`` under the trial's model (:class:`~intervene.live.metrics.Perplexity`): a
    capability objective. Needs the whole model in memory (not a streamed skeleton)."""

    name: ClassVar[str] = "perplexity"
    direction: ClassVar[Direction] = "minimize"

    def __init__(self, tokenizer: Any, text: str, window: int = 256, label: str = "text"):
        self.tokenizer, self.text, self.label = tokenizer, text, label
        self.metric = Perplexity(window)

    def score(self, trial: TrialPass) -> float:
        return self.metric.compute(TransformersBackend(trial.model, self.tokenizer, progress=False), self.text)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "text": self.label, "sha256": sha256_text(self.text), "window": self.metric.window}


# the default search: (refusal proxy, KL), both minimised; the study reads values[0] and values[1] as these
DEFAULT_METRICS: tuple[SearchMetric, ...] = (RefusalProxy(), HarmlessKL())


class Objective(Protocol):
    """What a search scores. ``cheap`` runs every trial; ``refusals`` only for promising ones.
    ``metrics`` name the values ``cheap`` returns, in order, and their Optuna directions; the first
    two are the refusal proxy and the KL (the study's generation step and front read them)."""

    metrics: Sequence[Metric]

    def cheap(self, model: Any) -> tuple[float, ...]:
        """One value per metric for the model as it is now (intervention installed)."""

    def refusals(self, model: Any) -> tuple[int, ...] | None:
        """(not complied, total) by generation -- refused OR degenerate answers, so that breaking
        the model is never a success -- optionally followed by the degenerate count; or None when
        this objective cannot generate."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description; its hash decides whether cached results can be reused."""


@runtime_checkable
class StartsAtLayer(Protocol):
    """Optional: scores a model edited at layers >= ``start_layer`` only, skipping the others."""

    def cheap_from(self, model: Any, start_layer: int) -> tuple[float, ...]:
        """:meth:`Objective.cheap` for a model edited at layers >= ``start_layer`` only."""


@runtime_checkable
class ScoresEdits(Protocol):
    """Optional: installs resolved edits itself where it runs the layers (streamed); the study calls
    :meth:`cheap_edits` instead of installing the edits on the model and calling ``cheap``."""

    def cheap_edits(self, model: Any, edits: Bound) -> tuple[float, ...]:
        """One value per metric under ``edits``."""


@runtime_checkable
class ScoresAnswers(Protocol):
    """Optional: full-answer KL of an intervention (the study's final evaluation adds ``answer_kl``)."""

    def answer_kl(self, model: Any, intervention: Intervention) -> float:
        """Full-answer KL on the harmless prompts, ``intervention`` toggled around each forward."""


@runtime_checkable
class GeneratesConfigs(Protocol):
    """Optional: generates a trial's answers from its config itself (on a server, as the config's LoRA adapter);
    the study calls :meth:`refusals_config` instead of :meth:`Objective.refusals` for an edited model."""

    def refusals_config(self, model: Any, config: InterventionConfig) -> tuple[int, ...]:
        """:meth:`Objective.refusals` of the model edited by ``config``."""


def _metrics_description(metrics: Sequence[SearchMetric]) -> dict[str, Any]:
    """Nothing for the default metrics (a study made before metrics were listed keeps its identity)."""
    if tuple(type(m) for m in metrics) == tuple(type(m) for m in DEFAULT_METRICS):
        return {}
    return {"metrics": [m.describe() for m in metrics]}


class _PromptSets:
    """The prompts an objective scores, tokenised once: both sets joined and sorted by length (one
    forward over both per trial, less padding), the refusal-opening tokens, the description."""

    def __init__(self, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], device: Any, *,
                 batch_size: int, max_new_tokens: int, prompt_format: PromptFormat | None, label: str,
                 sources: dict[str, str] | None, metrics: Sequence[SearchMetric]):
        if not harmful or not harmless:
            raise InputError(f"{label} prompts: need at least one harmful and one harmless prompt")
        if tuple(type(m) for m in metrics[:2]) != (RefusalProxy, HarmlessKL):
            raise InputError(f"{label} objective: the first two metrics must be the refusal proxy and the KL "
                             f"(got {', '.join(m.name for m in metrics[:2])}); further ones are extra objectives")
        self.metrics = tuple(metrics)
        self.tokenizer = tokenizer
        self.harmful = list(harmful)
        self.harmless = list(harmless)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt_format = prompt_format or PromptFormat()
        self.label = label
        self.sources = dict(sources or {})
        self.refusal_ids = refusal_token_ids(tokenizer)
        joined = self.harmful + self.harmless
        self._order = sorted(range(len(joined)), key=lambda i: len(joined[i]))
        texts = self.prompt_format.render(tokenizer, [joined[i] for i in self._order])
        self._batches = [encode(tokenizer, chunk, device) for chunk in batches(texts, batch_size)]

    def _score(self, harmful_lp: torch.Tensor) -> float:
        return RefusalMass(tuple(self.refusal_ids)).compute(harmful_lp)

    def _values(self, model: Any, first_token: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, ...]:
        trial = TrialPass(model, first_token, self.base_harmless, self.refusal_ids)
        return tuple(m.score(trial) for m in self.metrics)

    def _restore_order(self, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        restored = torch.empty_like(lp)
        restored[torch.tensor(self._order)] = lp
        n = len(self.harmful)
        return restored[:n], restored[n:]

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label, "sources": self.sources,
            "harmful": {"n": len(self.harmful), "sha256": sha256_lines(self.harmful)},
            "harmless": {"n": len(self.harmless), "sha256": sha256_lines(self.harmless)},
            "max_new_tokens": self.max_new_tokens, "system_prompt": self.prompt_format.system_prompt,
            "classes": "three", "chat_template": self.prompt_format.chat_template, "batch_size": self.batch_size,
        } | _metrics_description(self.metrics)


class PromptObjective(_PromptSets):
    """The default objective: prompts, first-token scores, greedy generation (intervene.live.evaluate).

    The search prompts are tokenised once. With ``skip_unedited=True`` the residual entering
    every decoder layer is cached from the unedited model, and a trial whose first edited layer
    is ``k`` runs layers ``k..L-1`` only (:meth:`cheap_from`): the layers before ``k`` compute
    exactly what they computed for the baseline. A self-check at start-up compares a skipped
    forward with a full one and turns skipping off for a model where they differ."""

    def __init__(self, model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *,
                 batch_size: int = 16, max_new_tokens: int = 48, prompt_format: PromptFormat | None = None,
                 label: str = "search", sources: dict[str, str] | None = None, skip_unedited: bool = True,
                 metrics: Sequence[SearchMetric] = DEFAULT_METRICS):
        super().__init__(tokenizer, harmful, harmless, model_device(model), batch_size=batch_size,
                         max_new_tokens=max_new_tokens, prompt_format=prompt_format,
                         label=label, sources=sources, metrics=metrics)
        self._base_answers: list[list[int]] | None = None
        self.cache: ResidualCache | None = ResidualCache(model, self._batches) if skip_unedited else None
        # the cache's own forward already gave the baseline's first-token log-probs
        harmful_lp, self.base_harmless = (self._restore_order(torch.cat(self.cache.logprobs)) if self.cache
                                          else self._first_token(model))
        self.base_score = self._score(harmful_lp)
        if self.cache is not None and not self.cache.self_check(model, self._batches[0]):
            self.cache = None

    def _first_token(self, model: Any, start_layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        with torch.no_grad():
            for i, enc in enumerate(self._batches):
                skip = start_layer > 0 and self.cache is not None
                with self.cache.starting_at(model, i, start_layer) if skip else contextlib.nullcontext():
                    rows.append(next_token_logprobs(model, enc["input_ids"], enc.get("attention_mask")))
        return self._restore_order(torch.cat(rows))

    def cheap(self, model: Any) -> tuple[float, ...]:
        return self.cheap_from(model, 0)

    def cheap_from(self, model: Any, start_layer: int) -> tuple[float, ...]:
        """:meth:`cheap` for a model edited at layers >= ``start_layer`` only."""
        return self._values(model, lambda: self._first_token(model, start_layer))

    def _backend(self, model: Any, context: Intervention | None = None) -> TransformersBackend:
        return TransformersBackend(model, self.tokenizer, self.prompt_format,
                                   self.batch_size, progress=False, context=context)

    def refusals(self, model: Any) -> tuple[int, int, int]:
        """(refused + degenerate, total, degenerate) on the harmful prompts: a degenerate answer
        (empty or repetitive, :mod:`intervene.live.answers`) counts against the trial like a refusal."""
        texts = self._backend(model).generate(self.harmful, self.max_new_tokens)
        classes = Refusals().classify(texts)
        return len(texts) - classes.count("complied"), len(texts), classes.count("degenerate")

    def answer_kl(self, model: Any, intervention: Intervention) -> float:
        """Full-answer KL on the harmless prompts: this objective's baseline greedy answers
        (generated once, from ``model`` as it is when first called: call it unedited) teacher-forced
        with and without ``intervention``."""
        if self._base_answers is None:
            self._base_answers = self._backend(model).generate_ids(self.harmless, self.max_new_tokens)
        size = min(self.batch_size, 8)
        return AnswerKL().compute(replace(self._backend(model), answer_batch_size=size),
                                  replace(self._backend(model, intervention), answer_batch_size=size),
                                  self.harmless, self._base_answers)


class ServedObjective(PromptObjective):
    """:class:`PromptObjective` whose greedy answers come from a server (``search --server``): the unedited model
    as served, and each trial's config as its exact rank-1 LoRA adapter (written, loaded through the runtime LoRA
    API, unloaded; :func:`intervene.live.server.served_config`). The first-token proxy and KL stay in process."""

    def __init__(self, model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *,
                 server: ServerOptions, model_spec: str, measurements: Any = None, **kwargs: Any):
        self.server, self.model_spec, self.measurements = server, model_spec, measurements
        self.served_model = ServerClient(server.url, server.timeout).model_name(server.model)  # named errors first
        super().__init__(model, tokenizer, harmful, harmless, **kwargs)

    def _served(self, name: str) -> ServerBackend:
        return ServerBackend(self.server.url, name, self.tokenizer, self.prompt_format,
                             batch_size=self.batch_size, timeout=self.server.timeout)

    def _count(self, backend: ServerBackend) -> tuple[int, int, int]:
        texts = backend.generate(self.harmful, self.max_new_tokens)
        classes = Refusals().classify(texts)
        return len(texts) - classes.count("complied"), len(texts), classes.count("degenerate")

    def refusals(self, model: Any) -> tuple[int, int, int]:
        """The unedited model's, as served."""
        return self._count(self._served(self.served_model))

    def refusals_config(self, model: Any, config: InterventionConfig) -> tuple[int, int, int]:
        with served_config(self.server, config, self.model_spec, self.measurements) as adapter:
            return self._count(self._served(adapter))

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"generation": "server"}


class StreamedObjective(_PromptSets):
    """The cheap proxy of :class:`PromptObjective` for a model that does not fit: first-token scores one
    decoder layer in memory at a time (:class:`intervene.live.stream_eval.LayerStream`). The baseline
    is streamed once, here; every trial then streams the edited model only, with the trial's edits
    installed layer by layer (:meth:`cheap_edits`, which the study calls instead of installing the
    edits on the model itself: the model is a meta-device skeleton). No generation: :meth:`refusals`
    is None, so a search on it ranks by the proxy; count refusals by generation afterwards on the
    front's configs with a whole (offloaded) model, ``intervene eval MODEL --config CFG --device-map auto``."""

    def __init__(self, stream: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *,
                 batch_size: int = 16, max_new_tokens: int = 48, prompt_format: PromptFormat | None = None,
                 label: str = "search", sources: dict[str, str] | None = None,
                 progress: bool = False):
        super().__init__(tokenizer, harmful, harmless, stream.device, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, prompt_format=prompt_format,
                         label=label, sources=sources, metrics=DEFAULT_METRICS)
        self.stream = stream
        self.progress = progress
        base, _ = stream.logprobs(self._batches, None, progress=progress, desc=f"{label} baseline (streamed)")
        harmful_lp, self.base_harmless = self._restore_order(torch.cat(base))
        self.base_score = self._score(harmful_lp)

    def cheap(self, model: Any) -> tuple[float, ...]:
        """The unedited model's (a skeleton holds no edit): the baseline streamed at start-up."""
        return self.base_score, 0.0

    def cheap_edits(self, model: Any, edits: Bound) -> tuple[float, ...]:
        """(refusal proxy, KL) of the model under ``edits`` (resolved), streamed."""
        def first_token() -> tuple[torch.Tensor, torch.Tensor]:
            _, rows = self.stream.logprobs(self._batches, edits, baseline=False, progress=self.progress,
                                           desc=f"{self.label} trial (streamed)")
            return self._restore_order(torch.cat(rows))

        return self._values(model, first_token)

    def refusals(self, model: Any) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"stream_layers": True, "generates": False}


__all__ = ["Objective", "StartsAtLayer", "ScoresEdits", "ScoresAnswers", "GeneratesConfigs", "ServedObjective", "TrialPass", "SearchMetric", "RefusalProxy",
           "HarmlessKL", "TextPerplexity", "DEFAULT_METRICS", "PromptObjective", "StreamedObjective"]
