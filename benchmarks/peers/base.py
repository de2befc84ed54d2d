"""The one interface every opponent plugs in through, and what the child-process opponents share.

An :class:`Opponent` has a ``name``, says whether it can run here (``unavailable``: None, or why not),
its ``version``, and ``run(setup) -> OpponentRun``: its own search on the train prompts with the
common budget and seed, its front judged by ``setup.judge``, the tensors each member changed read
from its saved checkpoint. A failure is raised as :class:`OpponentFailure` with how far it got; the
script turns that into a ``failed`` run, never a crash."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .judge import EvalJudge
from .records import Member, OpponentRun, Progress, summarize_names
from .tensors import diff_checkpoints

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}


@dataclass
class Setup:
    """What every opponent gets: the same model, prompt files, budget, seed and judge."""

    model_dir: Path
    files: dict[str, Path]  # harmful_train, harmless_train, harmful_eval, harmless_eval: one prompt a line
    work: Path  # this run's work directory; each opponent takes work / its name
    trials: int
    startup_trials: int
    seed: int
    search_new_tokens: int  # tokens per answer while a tool searches (the same for every tool)
    batch_size: int
    threads: int
    timeout_s: float
    judge: EvalJudge
    progress: bool = False

    def prompts(self, key: str) -> list[str]:
        return read_lines(self.files[key])

    def fresh_dir(self, name: str) -> Path:
        out = self.work / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        return out

    def child_env(self, **extra: str) -> dict[str, str]:
        """The environment of a child-process tool: offline, unbuffered, ``threads`` torch threads."""
        n = str(self.threads)
        return {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, **extra}


class OpponentFailure(Exception):
    """An opponent that did not finish: its error and how far it got."""

    def __init__(self, error: str, progress: Progress | None = None):
        super().__init__(error)
        self.error, self.progress = error, progress


class Opponent(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """None when it can run here, else why not (its venv is missing, ...)."""

    def version(self) -> str: ...

    def run(self, setup: Setup) -> OpponentRun:
        """Its search, front judged; raises :class:`OpponentFailure`."""


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def package_version(python: Path, distribution: str) -> str:
    """A distribution's version in another venv, asked of that venv's python."""
    ask = f"from importlib.metadata import version; print(version({distribution!r}))"
    out = subprocess.run([str(python), "-c", ask], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def venv_missing(python: Path, setup_hint: str) -> str | None:
    return None if Path(python).exists() else f"not installed ({python} missing): {setup_hint}"


def judge_checkpoint(setup: Setup, member: Member, path: Path, keep: bool = False) -> None:
    """Judges the checkpoint a tool saved for ``member``, records the tensors it changed against the
    organism, then deletes it (0.5 GB each) unless ``keep``."""
    from intervene.io.models import load_model

    if not (path / "config.json").exists():
        member.detail = (member.detail + "; " if member.detail else "") + f"no checkpoint saved at {path}"
        return
    diff = diff_checkpoints(setup.model_dir, path)
    member.edited_tensors = diff.changed_names
    notes = [f"{len(diff.retyped)} tensors saved in another dtype" if diff.retyped else "",
             f"added {', '.join(summarize_names(diff.added))}" if diff.added else "",
             f"dropped {', '.join(summarize_names(diff.missing))}" if diff.missing else ""]
    member.detail = "; ".join(n for n in [member.detail, *notes] if n)
    model, _ = load_model(str(path), tokenizer="none")
    member.eval = setup.judge.score(model)
    del model
    if not keep:
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["OFFLINE_ENV", "Setup", "OpponentFailure", "Opponent", "read_lines", "package_version", "venv_missing",
           "judge_checkpoint"]
