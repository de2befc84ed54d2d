"""heretic and abliterix (a derivative of heretic) end with the same interactive menus; in notebook mode
(``COLAB_GPU=1``) they print numbered choices and read ``input()``, so a child process can be driven
through stdin. :class:`MenuDriver` is the pure state machine (the log so far in, the next answer out):
it saves every trial of the tool's own Pareto front (its "Which trial do you want to use?" menu) as a
merged checkpoint, then exits. :func:`drive` runs the process around it; :func:`read_progress` reads
how far a tool got from its log (both print "Running trial N of M..." and "Elapsed time" per trial)."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .records import Progress

PICK_TRIAL = "Which trial do you want to use?"
WHAT_NEXT = "What do you want to do with the decensored model?"
PROCEED = "How would you like to proceed?"  # an existing checkpoint (never in a fresh work directory)
ENTER_NUMBER = "Enter number: "
FINISHED = "Optimization finished"

MENU_LINE = re.compile(r"^\[(\d+)\] (.*)$")
TRIAL_LINE = re.compile(r"\[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.eE+-]+)")
FOLDER_PROMPT = re.compile(r"Path to the folder:+\s*$")
PROMPT = re.compile(r"Enter number: |Path to the folder:+ ?")
TRIAL_START = re.compile(r"^Running trial (\d+) of (\d+)", re.M)
TRIAL_END = re.compile(r"^Elapsed time:", re.M)
COMPONENT_LINE = re.compile(r"^\s*\*\s+([\w.]+): (\d+) modules (total|per layer)", re.M)
MOE_LINE = re.compile(r"^\*\s+MoE model detected: (.*)$", re.M)  # abliterix: "? fused experts, 2 router layers"
STAGE_LINE = re.compile(r"^([A-Z][^\n*]*?)\.\.\.\s*$", re.M)
ERROR_LINE = re.compile(r"^\s*(\w+(?:Error|Exception|Exit)\b:?.*)$", re.M)


class MenuError(RuntimeError):
    """The tool asked something the driver does not know how to answer, or ran past its time."""


@dataclass
class SavedTrial:
    """A front trial as the tool's menu lists it, and where the driver had it saved."""

    choice: int  # its number in the menu
    trial: int
    refusals: int
    total: int
    kl: float
    dir: str | None = None


def last_menu(buffer: str, title: str) -> list[tuple[int, str]]:
    """(number, title) of each choice of the last menu called ``title`` in ``buffer``."""
    block = buffer[buffer.rfind(title):]
    out = []
    for line in block.splitlines()[1:]:
        m = MENU_LINE.match(line.strip())
        if m:
            out.append((int(m.group(1)), m.group(2)))
        elif out and line.strip():
            break  # the menu's lines are consecutive
    return out


def front_trials(menu: Sequence[tuple[int, str]]) -> list[SavedTrial]:
    """The trial choices of a "Which trial" menu."""
    out = []
    for number, title in menu:
        m = TRIAL_LINE.search(title)
        if m:
            out.append(SavedTrial(number, int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4))))
    return out


def choice_containing(menu: Sequence[tuple[int, str]], *words: str) -> str:
    for number, title in menu:
        if any(w.lower() in title.lower() for w in words):
            return str(number)
    raise MenuError(f"no choice containing {' or '.join(map(repr, words))} in {[t for _, t in menu]}")


@dataclass
class MenuDriver:
    """Answers the menus: every front trial in turn -> "Save the model to a local folder" -> a folder
    under ``save_root`` -> back to the trial menu; then "Exit program"."""

    save_root: Path
    pending: list[SavedTrial] | None = None
    current: SavedTrial | None = None
    saved: list[SavedTrial] = field(default_factory=list)
    handled: int = 0  # length of the log already answered

    def answer(self, buffer: str) -> str | None:
        """The next line to send, given the whole log so far; None: wait for more output."""
        tail = buffer[self.handled:]
        reply = self._reply(buffer, tail)
        if reply is not None:
            self.handled = len(buffer)
        return reply

    def _reply(self, buffer: str, tail: str) -> str | None:
        if FOLDER_PROMPT.search(tail):
            if self.current is None or self.current.dir is not None:
                raise MenuError(f"asked for a folder with no trial to save: {tail[-200:]!r}")
            self.current.dir = str(self.save_root / f"trial_{self.current.trial:04d}")
            self.saved.append(self.current)
            return self.current.dir
        if not tail.endswith(ENTER_NUMBER):
            return None
        if PICK_TRIAL in tail:
            menu = last_menu(buffer, PICK_TRIAL)
            if self.pending is None:
                self.pending = front_trials(menu)
            if self.pending:
                self.current = self.pending.pop(0)
                return str(self.current.choice)
            return choice_containing(menu, "Exit program")
        if WHAT_NEXT in tail:
            menu = last_menu(buffer, WHAT_NEXT)
            if self.current is not None and self.current.dir is None:
                return choice_containing(menu, "Save the model")
            return choice_containing(menu, "trial selection menu", "Exit")
        if PROCEED in tail:
            return choice_containing(last_menu(buffer, PROCEED), "start from scratch")
        raise MenuError(f"unexpected menu: {tail[-300:]!r}")


@dataclass
class DriveResult:
    """What :func:`drive` saw: seconds from start to the first trial and to the end of the search,
    the trials saved, the exit status."""

    first_trial_s: float | None
    finished_s: float | None
    saved: list[SavedTrial]
    returncode: int | None
    log: Path


def drive(cmd: Sequence[str], cwd: Path, env: dict[str, str], log_path: Path, timeout_s: float,
          save_root: Path, clock: Callable[[], float] = time.monotonic) -> DriveResult:
    """Runs ``cmd`` with its output logged to ``log_path`` and its menus answered by a
    :class:`MenuDriver`; returns whatever happened (the caller decides what counts as failure). A tool
    still running after ``timeout_s`` is killed and :class:`MenuError` raised."""
    driver = MenuDriver(save_root)
    start = clock()
    first_trial = finished = None
    buffer = ""
    proc = subprocess.Popen(list(cmd), cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    try:
        with open(log_path, "w") as log:
            while True:
                if clock() - start > timeout_s:
                    raise MenuError(f"still running after {timeout_s:.0f} s (log: {log_path})")
                if not select.select([proc.stdout], [], [], 1.0)[0]:
                    continue  # nothing printed this second: look at the clock again
                chunk = os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                buffer += chunk
                if first_trial is None and TRIAL_START.search(buffer):
                    first_trial = clock() - start
                if finished is None and FINISHED in buffer:
                    finished = clock() - start
                reply = driver.answer(buffer)
                if reply is not None:
                    proc.stdin.write((reply + "\n").encode())
                    proc.stdin.flush()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return DriveResult(first_trial, finished, driver.saved, proc.returncode, log_path)


def read_progress(text: str, log: str = "") -> Progress:
    """How far a tool got, from its log."""
    stages = STAGE_LINE.findall(PROMPT.sub("\n", text))  # output after an answered prompt starts a line
    return Progress(stage=stages[-1].strip() + "..." if stages else "",
                    trials_started=len(TRIAL_START.findall(text)), trials_finished=len(TRIAL_END.findall(text)),
                    components=[f"{name} ({count}{'' if kind == 'total' else ' per layer'})"
                                for name, count, kind in COMPONENT_LINE.findall(text)]
                               + [f"MoE: {m.strip()}" for m in MOE_LINE.findall(text)],
                    log=log)


def last_error(text: str) -> str:
    """The last exception line of a log ("AttributeError: ..."), or ""."""
    errors = [e.strip() for e in ERROR_LINE.findall(text) if ":" in e]
    return errors[-1] if errors else ""


__all__ = ["MenuError", "SavedTrial", "last_menu", "front_trials", "choice_containing", "MenuDriver", "DriveResult",
           "drive", "read_progress", "last_error"]
