"""What a search scores: the :class:`Objective` protocol (a cheap (refusal proxy, KL) pair every
trial, a generation refusal count for promising ones, a description whose hash identifies it) and
:class:`PromptObjective`, the default one on prompt sets (first-token scores and greedy generation
from :mod:`intervene.live.evaluate`, unedited layers skipped with a
:class:`~intervene.hooks.residual_cache.ResidualCache`), and :class:`StreamedObjective`, its cheap
proxy one decoder layer at a time for a model that does not fit (``search --stream-layers``). A test
can inject its own objective."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, Sequence

import torch

from ..errors import InputError
from ..hooks.residual_cache import ResidualCache
from ..io.files import sha256_lines
from ..io.models import batches, encode, format_prompts, model_device
from ..live import evaluate as ev


class Objective(Protocol):
    """What a search scores. ``cheap`` runs every trial; ``refusals`` only for promising ones."""

    def cheap(self, model: Any) -> tuple[float, float]:
        """(refusal proxy, KL) of the model as it is now (intervention installed); lower is better."""

    def refusals(self, model: Any) -> tuple[int, ...] | None:
        """(not complied, total) by generation -- refused OR degenerate answers, so that breaking
        the model is never a success -- optionally followed by the degenerate count; or None when
        this objective cannot generate."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description; its hash decides whether cached results can be reused."""

    # optional: ``cheap_edits(model, edits) -> (proxy, KL)`` scores resolved edits itself (installing
    # them where it runs the layers, :class:`StreamedObjective`); the study then calls it instead of
    # installing the edits on ``model`` and calling ``cheap``


class _PromptSets:
    """The prompts an objective scores, tokenised once: both sets joined and sorted by length (one
    forward over both per trial, less padding), the refusal-opening tokens, the description."""

    def __init__(self, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], device: Any, *,
                 batch_size: int, max_new_tokens: int, system_prompt: str | None, chat_template: bool, label: str,
                 sources: dict[str, str] | None):
        if not harmful or not harmless:
            raise InputError(f"{label} prompts: need at least one harmful and one harmless prompt")
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
        joined = self.harmful + self.harmless
        self._order = sorted(range(len(joined)), key=lambda i: len(joined[i]))
        texts = format_prompts(tokenizer, [joined[i] for i in self._order], system_prompt, chat_template)
        self._batches = [encode(tokenizer, chunk, device) for chunk in batches(texts, batch_size)]

    def _score(self, harmful_lp: torch.Tensor) -> float:
        # mean probability mass on refusal openings: ~ the expected fraction of refusals, each
        # prompt counting at most 1 (a mean log-mass would reward pushing non-refusals further)
        return float(ev.refusal_score(harmful_lp, self.refusal_ids).exp().mean())

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
            "max_new_tokens": self.max_new_tokens, "system_prompt": self.system_prompt, "classes": "three",
            "chat_template": self.chat_template, "batch_size": self.batch_size,
        }


class PromptObjective(_PromptSets):
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
        super().__init__(tokenizer, harmful, harmless, model_device(model), batch_size=batch_size,
                         max_new_tokens=max_new_tokens, system_prompt=system_prompt, chat_template=chat_template,
                         label=label, sources=sources)
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
                    rows.append(ev.next_token_logprobs(model, enc["input_ids"], enc.get("attention_mask")))
        return self._restore_order(torch.cat(rows))

    def cheap(self, model: Any) -> tuple[float, float]:
        return self.cheap_from(model, 0)

    def cheap_from(self, model: Any, start_layer: int) -> tuple[float, float]:
        """:meth:`cheap` for a model edited at layers >= ``start_layer`` only."""
        harmful_lp, harmless_lp = self._first_token(model, start_layer)
        return self._score(harmful_lp), float(ev.kl_divergence(self.base_harmless, harmless_lp))

    def refusals(self, model: Any) -> tuple[int, int, int]:
        """(refused + degenerate, total, degenerate) on the harmful prompts: a degenerate answer
        (empty or repetitive, :mod:`intervene.live.answers`) counts against the trial like a refusal."""
        texts = ev.generate(model, self.tokenizer, self.harmful, max_new_tokens=self.max_new_tokens,
                            batch_size=self.batch_size, system_prompt=self.system_prompt,
                            chat_template=self.chat_template, progress=False)
        classes = ev.classify(texts)
        return len(texts) - classes.count("complied"), len(texts), classes.count("degenerate")

    def answer_kl(self, model: Any, intervention: ev.Intervention) -> float:
        """Full-answer KL on the harmless prompts: this objective's baseline greedy answers
        (generated once, from ``model`` as it is when first called: call it unedited) teacher-forced
        with and without ``intervention``."""
        if self._base_answers is None:
            self._base_answers = ev.generate_ids(model, self.tokenizer, self.harmless, self.max_new_tokens,
                                                 self.batch_size, self.system_prompt, self.chat_template,
                                                 progress=False)
        return ev.answer_kl(model, model, self.tokenizer, self.harmless, self._base_answers, new_context=intervention,
                            batch_size=min(self.batch_size, 8), system_prompt=self.system_prompt,
                            chat_template=self.chat_template, progress=False)



class StreamedObjective(_PromptSets):
    """The cheap proxy of :class:`PromptObjective` for a model that does not fit: first-token scores one
    decoder layer in memory at a time (:class:`intervene.live.stream_eval.LayerStream`). The baseline
    is streamed once, here; every trial then streams the edited model only, with the trial's edits
    installed layer by layer (:meth:`cheap_edits`, which the study calls instead of installing the
    edits on the model itself: the model is a meta-device skeleton). No generation: :meth:`refusals`
    is None, so a search on it ranks by the proxy; count refusals by generation afterwards on the
    front's configs with a whole (offloaded) model, ``intervene eval MODEL --config CFG --device-map auto``."""

    def __init__(self, stream: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *,
                 batch_size: int = 16, max_new_tokens: int = 48, system_prompt: str | None = None,
                 chat_template: bool = True, label: str = "search", sources: dict[str, str] | None = None,
                 progress: bool = False):
        super().__init__(tokenizer, harmful, harmless, stream.device, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, system_prompt=system_prompt, chat_template=chat_template,
                         label=label, sources=sources)
        self.stream = stream
        self.progress = progress
        base, _ = stream.logprobs(self._batches, None, progress=progress, desc=f"{label} baseline (streamed)")
        harmful_lp, self.base_harmless = self._restore_order(torch.cat(base))
        self.base_score = self._score(harmful_lp)

    def cheap(self, model: Any) -> tuple[float, float]:
        """The unedited model's (a skeleton holds no edit): the baseline streamed at start-up."""
        return self.base_score, 0.0

    def cheap_edits(self, model: Any, edits: Sequence[Any]) -> tuple[float, float]:
        """(refusal proxy, KL) of the model under ``edits`` (resolved), streamed."""
        _, rows = self.stream.logprobs(self._batches, edits, baseline=False, progress=self.progress,
                                       desc=f"{self.label} trial (streamed)")
        harmful_lp, harmless_lp = self._restore_order(torch.cat(rows))
        return self._score(harmful_lp), float(ev.kl_divergence(self.base_harmless, harmless_lp))

    def refusals(self, model: Any) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"stream_layers": True, "generates": False}


__all__ = ["Objective", "PromptObjective", "StreamedObjective"]
