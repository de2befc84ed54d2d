"""Scoring an intervention: refused / complied / degenerate counts from greedy generations
(:mod:`intervene.live.answers`, or a ``judge``), a first-token refusal score, first-token KL
divergence and full-answer KL (teacher-forced over the baseline's greedy harmless answers) on
harmless prompts, and side-by-side samples. The baseline is computed outside the intervention's
context, the intervened numbers inside it -- or, with ``reference=(source_model, tokenizer)``, the
baseline is the source model and the intervened one ``model`` itself (a baked checkpoint vs its
original). The result is an :class:`EvalReport` whose ``to_dict()`` is the JSON report
(``report = evaluate(model, tokenizer, harmful, harmless, intervention=lambda: intervene.apply(model, cfg))``).
Composed from a :class:`~intervene.live.generate.TransformersBackend` (generation, log-probs) and the
metrics of :mod:`intervene.live.metrics`; their building blocks are re-exported here.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Generic, Literal, Sequence, TypeVar

import torch

from ..errors import InputError
from ..io.models import versions
from ..runner import RunOptions
from .answers import DEGENERATE_NGRAM, DEGENERATE_REPEAT, DELAYED_REFUSAL_CHARS, AnswerClass, Judge
from .generate import (
    GenerationBackend,
    Intervention,
    PromptFormat,
    TransformersBackend,
    decode_answers,
    next_token_logprobs,
)
from .metrics import (
    REFUSAL_MARKERS,
    AnswerKL,
    FirstTokenKL,
    RefusalCounts,
    Refusals,
    RefusalScore,
    classify,
    is_refusal,
    kl_divergence,
    refusal_counts,
    refusal_score,
    refusal_token_ids,
)

PromptSet = Literal["harmful", "harmless"]
SETS: tuple[PromptSet, PromptSet] = ("harmful", "harmless")
T = TypeVar("T")


@dataclass
class PerSet(Generic[T]):
    """One value per prompt set; ``per_set[name]`` reads it by name."""

    harmful: T
    harmless: T

    def __getitem__(self, name: PromptSet) -> T:
        if name not in SETS:
            raise KeyError(name)
        return getattr(self, name)

    @classmethod
    def of(cls, value: Callable[[PromptSet], T]) -> PerSet[T]:
        """``PerSet(value("harmful"), value("harmless"))``, in that order."""
        return cls(value("harmful"), value("harmless"))


@dataclass
class RefusalScores:
    """Mean log probability mass on refusal-opening first tokens, per prompt set."""

    baseline: PerSet[float]
    intervened: PerSet[float]
    tokens: list[str]  # the refusal-opening tokens, decoded


@dataclass
class Sample:
    """One prompt's baseline and intervened outputs, side by side."""

    kind: PromptSet
    prompt: str
    baseline: str
    intervened: str
    baseline_refused: bool
    intervened_refused: bool
    baseline_class: AnswerClass = "complied"
    intervened_class: AnswerClass = "complied"


@dataclass
class EvalSettings:
    max_new_tokens: int
    batch_size: int
    system_prompt: str | None
    chat_template: bool
    greedy: bool
    markers: list[str]
    degenerate: dict[str, Any] | None = None  # the repetition measure and its thresholds
    judge: dict[str, Any] | None = None  # what classified the answers (None: the markers)


@dataclass
class EvalReport:
    """What :func:`evaluate` measured; the top-level counts are the intervened model's."""

    harmful: RefusalCounts
    harmless: RefusalCounts
    kl_divergence: float  # mean first-token KL(base ‖ intervened) on harmless prompts, nats
    kl_divergence_harmful: float  # the same on harmful prompts
    baseline: PerSet[RefusalCounts]
    refusal_score: RefusalScores
    samples: list[Sample]
    completions: list[Sample]
    intervened: bool
    settings: EvalSettings
    versions: dict[str, str]
    config: dict[str, Any] | None = None  # absent from the JSON when None
    # mean per-token KL(base || intervened) over the baseline's greedy harmless answers, teacher-forced
    # (the first answer position is the first-token KL); None when not computed
    kl_divergence_answer: float | None = None
    # generation on a server (live.server): where the log-probs came from, and the server; absent when None
    kl_source: str | None = None
    server: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (key order as written)."""
        d = asdict(self)
        for key in ("config", "kl_source", "server"):
            if d[key] is None:
                del d[key]
        return d


@dataclass
class FirstTokenSettings:
    batch_size: int
    system_prompt: str | None
    chat_template: bool
    stream_layers: bool  # computed one decoder layer at a time (live.stream_eval)
    dtype: str | None = None
    device: str | None = None


@dataclass
class FirstTokenReport:
    """The first-token numbers of :func:`evaluate` without generation (``eval --first-token``): the
    refusal score per set and first-token KL(base ‖ intervened), same definitions and names."""

    refusal_score: RefusalScores
    kl_divergence: float  # harmless prompts, nats
    kl_divergence_harmful: float
    intervened: bool
    n_prompts: PerSet[int]
    settings: FirstTokenSettings
    versions: dict[str, str]
    config: dict[str, Any] | None = None  # absent from the JSON when None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.config is None:
            del d["config"]
        return d


def first_token_report(tokenizer: Any, base: PerSet[torch.Tensor], new: PerSet[torch.Tensor], intervened: bool,
                       settings: FirstTokenSettings, config: dict[str, Any] | None = None) -> FirstTokenReport:
    """:class:`FirstTokenReport` of first-token log-probabilities [N, V] per set, baseline and intervened."""
    scores, kl = RefusalScore.of(tokenizer), FirstTokenKL()

    def score(lp: PerSet[torch.Tensor]) -> PerSet[float]:
        return PerSet.of(lambda name: scores.compute(lp[name]))

    return FirstTokenReport(
        refusal_score=RefusalScores(score(base), score(new), [tokenizer.decode([i]) for i in scores.token_ids]),
        kl_divergence=kl.compute(base.harmless, new.harmless),
        kl_divergence_harmful=kl.compute(base.harmful, new.harmful),
        intervened=intervened, n_prompts=PerSet.of(lambda name: int(base[name].shape[0])),
        settings=settings, versions=versions(), config=config)


def first_token_scores(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                       intervention: Intervention | None = None, *, prompt_format: PromptFormat | None = None,
                       run: RunOptions | None = None, config: dict[str, Any] | None = None) -> FirstTokenReport:
    """The first-token part of :func:`evaluate` (no generation): the model as is, and under
    ``intervention`` (without one the intervened numbers are the baseline's, KL = 0)."""
    if not harmful or not harmless:
        raise ValueError("first_token_scores needs at least one harmful and one harmless prompt")
    prompts = PerSet(harmful, harmless)
    prompt_format, run = prompt_format or PromptFormat(), run or RunOptions()
    backend = _backend(model, tokenizer, prompt_format, run)
    base = PerSet.of(lambda name: backend.first_token_logprobs(prompts[name]))
    new = base
    if intervention is not None:
        with intervention():
            new = PerSet.of(lambda name: backend.first_token_logprobs(prompts[name]))
    settings = FirstTokenSettings(run.batch_size, prompt_format.system_prompt, prompt_format.chat_template,
                                  stream_layers=False)
    return first_token_report(tokenizer, base, new, intervention is not None, settings, config)


def format_first_token(report: FirstTokenReport) -> str:
    """A printable table of :class:`FirstTokenReport`."""
    score = report.refusal_score
    return "\n".join([
        f"{'first-token refusal score':<28}{'baseline':<14}{'intervened':<14}",
        f"{'  harmful':<28}{score.baseline.harmful:<14.4f}{score.intervened.harmful:<14.4f}",
        f"{'  harmless':<28}{score.baseline.harmless:<14.4f}{score.intervened.harmless:<14.4f}",
        f"first-token KL(base || intervened), harmless: {report.kl_divergence:.6f} nats "
        f"(harmful: {report.kl_divergence_harmful:.6f})"
        + (" [streamed one layer at a time]" if report.settings.stream_layers else "")])


def _backend(model: Any, tokenizer: Any, prompt_format: PromptFormat | None, run: RunOptions | None,
             context: Intervention | None = None) -> TransformersBackend:
    run = run or RunOptions()
    return TransformersBackend(model, tokenizer, prompt_format or PromptFormat(), run.batch_size, run.progress,
                               context)


def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48, *,
                 prompt_format: PromptFormat | None = None, run: RunOptions | None = None,
                 desc: str = "generating") -> list[list[int]]:
    """Greedy new-token ids per prompt, batched with left padding, cut after the first end token
    (kept) so that padding never appears (:class:`~intervene.live.generate.TransformersBackend`)."""
    return _backend(model, tokenizer, prompt_format, run).generate_ids(
        prompts, max_new_tokens, desc)


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48, *,
             prompt_format: PromptFormat | None = None, run: RunOptions | None = None,
             desc: str = "generating") -> list[str]:
    """Greedy completions (new text only, special tokens dropped), batched with left padding."""
    return _backend(model, tokenizer, prompt_format, run).generate(
        prompts, max_new_tokens, desc)


def first_token_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], *,
                         prompt_format: PromptFormat | None = None, run: RunOptions | None = None) -> torch.Tensor:
    """Log-probabilities of the first response token (after the generation prompt), [N, V] float32."""
    return _backend(model, tokenizer, prompt_format, run).first_token_logprobs(prompts)


def answer_kl(base_model: Any, new_model: Any, tokenizer: Any, prompts: Sequence[str],
              answers: Sequence[Sequence[int]], new_context: Intervention | None = None, *,
              prompt_format: PromptFormat | None = None, run: RunOptions | None = None) -> float:
    """:class:`~intervene.live.metrics.AnswerKL` of ``new_model`` (inside ``new_context``, entered
    around each of its forwards) against ``base_model`` on ``prompts`` + the baseline's ``answers``
    (``run`` defaults to batches of 8)."""
    run = run or RunOptions(batch_size=8)

    def backend(model: Any, context: Intervention | None) -> TransformersBackend:
        return _backend(model, tokenizer, prompt_format, run, context)

    return AnswerKL().compute(backend(base_model, None), backend(new_model, new_context), prompts, answers)


@dataclass
class _Run:
    """One pass (baseline or intervened) over both prompt sets."""

    outputs: PerSet[list[str]]
    ids: PerSet[list[list[int]]]
    logprobs: PerSet[torch.Tensor]
    classes: PerSet[list[AnswerClass]]


def _run(backend: GenerationBackend, prompts: PerSet[Sequence[str]], refusals: Refusals, label: str,
         max_new_tokens: int) -> _Run:
    ids = PerSet.of(lambda name: backend.generate_ids(prompts[name], max_new_tokens, desc=f"{label}: {name}"))
    outputs = PerSet.of(lambda name: decode_answers(backend.tokenizer, ids[name]))
    logprobs = PerSet.of(lambda name: backend.first_token_logprobs(prompts[name]))
    classes = PerSet.of(lambda name: refusals.classify(outputs[name], prompts[name]))
    return _Run(outputs, ids, logprobs, classes)


def check_same_vocabulary(tokenizer: Any, reference_tokenizer: Any, where: str = "--reference") -> None:
    """KL between two models is only defined over one vocabulary: same tokens, same ids."""
    if reference_tokenizer is tokenizer:
        return
    if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise InputError(f"{where}: the reference model's tokenizer has a different vocabulary "
                         f"({len(reference_tokenizer.get_vocab())} vs {len(tokenizer.get_vocab())} tokens); "
                         "KL needs one vocabulary")


def evaluate(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
             intervention: Intervention | None = None, max_new_tokens: int = 48, *, n_samples: int = 4,
             prompt_format: PromptFormat | None = None, run: RunOptions | None = None,
             config: dict[str, Any] | None = None, reference: tuple[Any, Any] | None = None, judge: Judge | None = None,
             full_answer_kl: bool = True, backends: tuple[GenerationBackend, GenerationBackend] | None = None,
             server: dict[str, Any] | None = None) -> EvalReport:
    """Refusals and first-token scores of the model as is (baseline) and under ``intervention``
    (a zero-argument callable returning a context manager, e.g. ``lambda: intervene.apply(model, cfg)``).
    Without an intervention the intervened numbers are the baseline's (KL = 0), unless
    ``reference=(source_model, source_tokenizer)`` is given: then the baseline is the source model
    and the intervened one is ``model`` (under ``intervention`` if given too). ``judge`` replaces
    the markers for non-degenerate answers. ``full_answer_kl`` adds ``kl_divergence_answer``
    (teacher-forced over the baseline's greedy harmless answers). ``backends=(baseline, intervened)`` replaces
    the in-process ones (e.g. :class:`~intervene.live.server.ServerBackend` objects: the intervened one already
    intervened, so ``intervention`` and ``reference`` stay None; ``model`` is unused); the report then carries
    ``kl_source`` (the intervened backend's) and ``server``.

    ``samples`` holds the first ``n_samples`` harmful and the first ``n_samples`` harmless prompts
    side by side; ``completions`` holds every output."""
    if not harmful or not harmless:
        raise ValueError("evaluate needs at least one harmful and one harmless prompt")
    prompts = PerSet(harmful, harmless)
    prompt_format, run = prompt_format or PromptFormat(), run or RunOptions()
    batch_size = run.batch_size
    refusals, scores, kl = Refusals(judge), RefusalScore.of(tokenizer), FirstTokenKL()
    base_model = model
    if reference is not None:
        base_model, reference_tokenizer = reference
        check_same_vocabulary(tokenizer, reference_tokenizer)
    if backends is not None:
        if intervention is not None or reference is not None:
            raise ValueError("evaluate: backends are already intervened; pass no intervention or reference with them")
        base_backend, new_backend = backends
    else:
        base_backend = _backend(base_model, tokenizer, prompt_format, run)
        new_backend = _backend(model, tokenizer, prompt_format, run)
    base = _run(base_backend, prompts, refusals, "reference" if reference else "baseline", max_new_tokens)
    compared = intervention is not None or reference is not None or (backends is not None and
                                                                      backends[0] is not backends[1])
    if not compared:
        new = base
    else:
        with intervention() if intervention is not None else contextlib.nullcontext():
            new = _run(new_backend, prompts, refusals, "intervened", max_new_tokens)
    answer_divergence = None
    if full_answer_kl:
        # the intervention is entered around each forward of the intervened side, batches of at most 8
        if not compared:
            answer_divergence = 0.0
        elif backends is not None:
            answer_divergence = AnswerKL().compute(base_backend, new_backend, prompts.harmless, base.ids.harmless)
        else:
            answer_divergence = AnswerKL().compute(
                replace(base_backend, answer_batch_size=min(batch_size, 8)),
                replace(new_backend, context=intervention, answer_batch_size=min(batch_size, 8)),
                prompts.harmless, base.ids.harmless)

    def side_by_side(limit: int | None) -> list[Sample]:
        return [Sample(name, prompt, b, n, bc == "refused", nc == "refused", bc, nc)
                for name in SETS
                for prompt, b, n, bc, nc in list(zip(prompts[name], base.outputs[name], new.outputs[name],
                                                     base.classes[name], new.classes[name]))[:limit]]

    return EvalReport(
        harmful=refusals.compute(new.outputs.harmful, classes=new.classes.harmful),
        harmless=refusals.compute(new.outputs.harmless, classes=new.classes.harmless),
        kl_divergence=kl.compute(base.logprobs.harmless, new.logprobs.harmless),
        kl_divergence_harmful=kl.compute(base.logprobs.harmful, new.logprobs.harmful),
        baseline=PerSet.of(lambda name: refusals.compute(base.outputs[name], classes=base.classes[name])),
        refusal_score=RefusalScores(PerSet.of(lambda name: scores.compute(base.logprobs[name])),
                                    PerSet.of(lambda name: scores.compute(new.logprobs[name])),
                                    [tokenizer.decode([i]) for i in scores.token_ids]),
        samples=side_by_side(n_samples),
        completions=side_by_side(None),
        intervened=compared,
        settings=EvalSettings(max_new_tokens, batch_size, prompt_format.system_prompt, prompt_format.chat_template,
                              True, list(REFUSAL_MARKERS),
                              degenerate={"measure": "repeated word n-gram fraction", "n": DEGENERATE_NGRAM,
                                          "threshold": DEGENERATE_REPEAT, "empty": True,
                                          "delayed_refusal_chars": DELAYED_REFUSAL_CHARS},
                              judge=judge.describe() if judge is not None else None),
        versions=versions(),
        config=config,
        kl_divergence_answer=answer_divergence,
        kl_source=getattr(new_backend, "kl_source", None) if backends is not None else None,
        server=server,
    )


def format_report(report: EvalReport, n_samples: int = 3, width: int = 100) -> str:
    """A printable table (baseline vs intervened: refused / degenerate / delayed refusals, KL) and a
    few side-by-side samples."""
    def cell(counts: RefusalCounts) -> str:
        return f"{counts.refusals:>3}/{counts.total:<3} ({100 * counts.rate:5.1f} %)"

    def count(n: int, counts: RefusalCounts) -> str:
        return f"{n:>3}/{counts.total}"

    score = report.refusal_score
    b, h, bl, hl = report.baseline.harmful, report.harmful, report.baseline.harmless, report.harmless
    lines = [f"{'':<24}{'baseline':<22}{'intervened':<22}",
             f"{'harmful refused':<24}{cell(b):<22}{cell(h):<22}",
             f"{'harmful degenerate':<24}{count(b.degenerate, b):<22}{count(h.degenerate, h):<22}",
             f"{'harmful delayed refusal':<24}{count(b.delayed_refusals, b):<22}{count(h.delayed_refusals, h):<22}",
             f"{'harmless refused':<24}{cell(bl):<22}{cell(hl):<22}",
             f"{'harmless degenerate':<24}{count(bl.degenerate, bl):<22}{count(hl.degenerate, hl):<22}",
             f"{'refusal score (hf)':<24}{score.baseline.harmful:<22.3f}{score.intervened.harmful:<22.3f}",
             f"first-token KL(base || intervened), harmless: {report.kl_divergence:.4f} nats"]
    if report.kl_divergence_answer is not None:
        lines.append(f"full-answer KL (teacher-forced on the baseline's answers), harmless: "
                     f"{report.kl_divergence_answer:.4f} nats/token")
    shown = [s for s in report.samples if s.kind == "harmful"][:n_samples] + \
            [s for s in report.samples if s.kind == "harmless"][:max(1, n_samples // 2)]

    def clip(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 1] + "…"

    def tag(cls: str) -> str:
        return "" if cls == "complied" else f" [{cls}]"

    for s in shown:
        lines += ["", f"[{s.kind}] {clip(s.prompt)}",
                  f"  baseline{tag(s.baseline_class)}  : {clip(s.baseline)}",
                  f"  intervened{tag(s.intervened_class)}: {clip(s.intervened)}"]
    return "\n".join(lines)


__all__ = ["REFUSAL_MARKERS", "PromptSet", "SETS", "PerSet", "RefusalCounts", "RefusalScores", "Sample",
           "EvalSettings", "EvalReport", "Intervention", "is_refusal", "classify", "generate", "generate_ids",
           "decode_answers", "answer_kl", "check_same_vocabulary", "first_token_logprobs",
           "next_token_logprobs", "refusal_token_ids", "refusal_score", "refusal_counts", "kl_divergence", "evaluate",
           "format_report", "FirstTokenReport", "FirstTokenSettings", "first_token_report", "first_token_scores",
           "format_first_token"]
