"""A tool run as a child process and driven through its menus (heretic, abliterix): run it, save its
front, judge each saved checkpoint, read what it changed; or say how far it got and what it died of."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import OpponentFailure, Setup, judge_checkpoint
from .menu import MenuError, drive, last_error, read_progress
from .records import Member, OpponentRun, mark_front


def run_driven(setup: Setup, name: str, version: str, cmd: Sequence[str], out: Path, env: dict[str, str],
               note: str = "") -> OpponentRun:
    """Runs ``cmd`` in ``out`` (its config already written there) and judges its front."""
    log = out / f"{name}.log"
    try:
        result = drive(cmd, out, env, log, setup.timeout_s, save_root=out)
    except MenuError as e:
        raise OpponentFailure(str(e), read_progress(log.read_text(errors="replace"), str(log))) from None
    text = log.read_text(errors="replace")
    if result.finished_s is None or not result.saved:
        error = last_error(text) or "no exception in its log"
        where = "no front saved" if result.finished_s is not None else "search not finished"
        raise OpponentFailure(f"exit status {result.returncode}, {where}: {error}", read_progress(text, str(log)))
    loop = result.finished_s - result.first_trial_s if result.first_trial_s is not None else None
    run = OpponentRun(name, version, "ok", setup.trials, wall_s=result.finished_s, trial_loop_s=loop,
                      progress=read_progress(text, str(log)), note=note)
    if result.returncode not in (0, None):
        run.note = "; ".join(n for n in (run.note, f"exited with status {result.returncode} after saving its front: "
                                                  f"{last_error(text)}") if n)
    for saved in result.saved:
        member = Member(saved.trial, saved.refusals, saved.total, saved.kl)
        judge_checkpoint(setup, member, Path(saved.dir))
        run.members.append(member)
    mark_front(run.members)
    return run


__all__ = ["run_driven"]
