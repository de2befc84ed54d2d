"""senbonzakura, from its own venv (``pip install 'senbonzakura[abliterate]'``), by its unattended CLI on a
hand-built track: bad_ds = train harmful, good_ds = train harmless, bad_eval_ds = train harmful (it searches
on the train prompts like the others). It ships ONE model (the knee of its NSGA-II front), which is what
gets judged. Ported from ``vs_heretic.py`` (its 2026-11-23 run); not in the default opponents."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .base import OpponentFailure, Setup, judge_checkpoint, package_version, venv_missing
from .menu import last_error, read_progress
from .records import Member, OpponentRun, mark_front

DEFAULT_PYTHON = Path("~/.cache/intervene/venv-senbonzakura/bin/python").expanduser()
WRITE_TRACK = ("import sys\nfrom senbonzakura.trackio import write_text_column\n"
               "for name, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
               "    write_text_column(name, [l.strip() for l in open(path) if l.strip()])\n")


@dataclass
class Senbonzakura:
    python: Path = DEFAULT_PYTHON
    name: str = "senbonzakura"

    def unavailable(self) -> str | None:
        return venv_missing(self.python, "python -m venv DIR && DIR/bin/pip install 'senbonzakura[abliterate]'")

    def version(self) -> str:
        return package_version(self.python, "senbonzakura")

    def run(self, setup: Setup) -> OpponentRun:
        out = setup.fresh_dir(self.name)
        track = out / "track"
        track.mkdir()
        subprocess.run([str(self.python), "-c", WRITE_TRACK, str(track / "bad_ds"), str(setup.files["harmful_train"]),
                        str(track / "good_ds"), str(setup.files["harmless_train"]),
                        str(track / "bad_eval_ds"), str(setup.files["harmful_train"])],
                       check=True, env=setup.child_env())
        n_harmful, n_harmless = len(setup.prompts("harmful_train")), len(setup.prompts("harmless_train"))
        cmd = [str(self.python.parent / "senbonzakura"), "--model", str(setup.model_dir), "--device", "cpu",
               "--track", str(track), "--trials", str(setup.trials), "--out", str(out / "model"),
               "--seed", str(setup.seed), "--gen-tokens", str(setup.search_new_tokens), "--short-budget-ok",
               "--capability-n", "0", "--eval-refusal-final", "0", "--low-refusal-ok",
               "--dir-prompts", str(min(n_harmful, n_harmless)), "--eval-refusal", str(n_harmful),
               "--eval-kl", str(n_harmless), "--gen-batch", str(setup.batch_size)]
        log_path = out / "senbonzakura.log"
        start = time.time()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(cmd, cwd=out, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=setup.child_env(), timeout=setup.timeout_s)
            except subprocess.TimeoutExpired:
                raise OpponentFailure(f"still running after {setup.timeout_s:.0f} s",
                                      read_progress(log_path.read_text(errors="replace"), str(log_path))) from None
        raw = log_path.read_text(errors="replace")
        if proc.returncode != 0 or not (out / "model" / "config.json").exists():
            raise OpponentFailure(f"exit status {proc.returncode}: {last_error(raw) or raw.strip()[-200:]}",
                                  read_progress(raw, str(log_path)))
        ended = re.search(r"\[\s*([0-9.]+)s\] BEST:", raw)  # its clock: search over, bake and save next
        run = OpponentRun(self.name, self.version(), "ok", setup.trials,
                          wall_s=float(ended.group(1)) if ended else time.time() - start,
                          note="ships one model (its knee)"
                          + ("" if ended else "; wall time includes its bake and save"))
        member = Member(-1, detail="shipped model (its knee)")
        best = re.search(r"BEST: .*? refusals=([0-9.]+)% .*?KL=([0-9.]+)", " ".join(raw.split()))
        if best:  # its own search-time numbers, on the train prompts
            member.search_refusals = round(float(best.group(1)) * n_harmful / 100.0)
            member.search_total, member.search_kl = n_harmful, float(best.group(2))
        judge_checkpoint(setup, member, out / "model")
        run.members.append(member)
        mark_front(run.members)
        return run


__all__ = ["DEFAULT_PYTHON", "Senbonzakura"]
