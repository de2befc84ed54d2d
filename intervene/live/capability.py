"""Capability beyond KL (``intervene eval --capability``): perplexity on a held-out text shipped with
the package (``intervene/data/capability_heldout.txt``, plain prose written for this project, never
used to measure or search), base vs edited side by side; and, where ``lm-eval`` is installed (extra
``capability``), an lm-eval run on task YAML files the user points to.

Perplexity (:class:`~intervene.live.metrics.Perplexity`): the text's paragraphs are tokenised without
special tokens and joined into one token stream, cut into consecutive windows of ``window`` tokens;
``exp`` of the mean next-token negative log-likelihood over every predicted token (each window's
first token is context only).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import InputError
from .generate import Intervention, TransformersBackend
from .metrics import Perplexity

HELDOUT_FILE = "capability_heldout.txt"


class LmEvalMissing(InputError):
    """``--lm-eval-tasks`` without lm-eval installed (``pip install 'intervene[capability]'``)."""


def heldout_text() -> str:
    """The shipped held-out text."""
    return resources.files("intervene").joinpath("data", HELDOUT_FILE).read_text(encoding="utf-8")


def perplexity(model: Any, tokenizer: Any, text: str, window: int = 256,
               context: Intervention | None = None) -> tuple[float, int]:
    """(perplexity, predicted tokens) of ``text`` under ``model`` (inside ``context`` if given):
    :class:`~intervene.live.metrics.Perplexity` over a :class:`~intervene.live.generate.TransformersBackend`."""
    metric = Perplexity(window)
    return metric.measure(TransformersBackend(model, tokenizer, context=context), text)


@dataclass
class CapabilityReport:
    """Base vs edited: held-out perplexity and, when run, lm-eval results."""

    text: str  # what was scored (the shipped file's name, or a path)
    tokens: int
    window: int
    perplexity_base: float
    perplexity_edited: float
    lm_eval: dict[str, Any] | None = None  # {"tasks": [...], "base": {...}, "edited": {...}}
    notes: list[str] = field(default_factory=list)

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_edited / self.perplexity_base

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"perplexity_ratio": self.perplexity_ratio}


def capability(model: Any, tokenizer: Any, *, intervention: Intervention | None = None,
               reference: tuple[Any, Any] | None = None, text: str | None = None, text_name: str | None = None,
               window: int = 256, lm_eval_tasks: Sequence[str | os.PathLike] = (), lm_eval_limit: int | None = None,
               batch_size: int = 8) -> CapabilityReport:
    """Base vs edited capability. Base: ``reference``'s model if given, else ``model`` as is;
    edited: ``model`` under ``intervention`` (or as is, with a reference)."""
    base_model = reference[0] if reference is not None else model
    body = text if text is not None else heldout_text()
    ppl_base, tokens = perplexity(base_model, tokenizer, body, window)
    ppl_edited, _ = perplexity(model, tokenizer, body, window, context=intervention)
    report = CapabilityReport(text_name or (HELDOUT_FILE if text is None else "text"), tokens, window,
                              ppl_base, ppl_edited)
    if lm_eval_tasks:
        report.lm_eval = {
            "tasks": [str(t) for t in lm_eval_tasks],
            "base": run_lm_eval(base_model, tokenizer, lm_eval_tasks, limit=lm_eval_limit, batch_size=batch_size),
            "edited": run_lm_eval(model, tokenizer, lm_eval_tasks, limit=lm_eval_limit, batch_size=batch_size,
                                  context=intervention),
        }
    return report


def run_lm_eval(model: Any, tokenizer: Any, task_files: Sequence[str | os.PathLike], limit: int | None = None,
                batch_size: int = 8, context: Intervention | None = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the tasks in ``task_files`` (YAML files or folders of them,
    loaded with lm-eval's TaskManager ``include_path``) with the loaded model wrapped as lm-eval's
    ``HFLM``; returns ``results`` (metric values per task)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise LmEvalMissing("--lm-eval-tasks needs lm-eval: pip install 'intervene[capability]' "
                            f"(import failed: {exc})") from None
    names, folders = [], []
    for t in task_files:
        path = Path(t)
        if not path.exists():
            raise InputError(f"--lm-eval-tasks {t}: no such file or folder")
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        folders.append(str(path if path.is_dir() else path.parent))
        for f in files:
            task = (yaml.safe_load(f.read_text()) or {}).get("task")
            if not task:
                raise InputError(f"{f}: an lm-eval task file needs a 'task' name")
            names.append(task)
    manager = TaskManager(include_path=sorted(set(folders)))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with context() if context is not None else contextlib.nullcontext():
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      log_samples=False)
    return {k: {m: v for m, v in r.items() if isinstance(v, (int, float, str))} for k, r in out["results"].items()}


def format_capability(report: CapabilityReport) -> str:
    lines = [f"capability: perplexity on {report.text} ({report.tokens} tokens, window {report.window})",
             f"  base {report.perplexity_base:.3f}   edited {report.perplexity_edited:.3f}   "
             f"ratio {report.perplexity_ratio:.4f}"]
    if report.lm_eval:
        for task, base in report.lm_eval["base"].items():
            edited = report.lm_eval["edited"].get(task, {})
            for metric, value in base.items():
                if isinstance(value, (int, float)) and not metric.endswith("stderr,none"):
                    lines.append(f"  lm-eval {task} {metric}: base {value:.4f}   edited {edited.get(metric, float('nan')):.4f}")
    return "\n".join(lines)


__all__ = ["HELDOUT_FILE", "LmEvalMissing", "heldout_text", "perplexity", "CapabilityReport", "capability",
           "run_lm_eval", "format_capability"]
