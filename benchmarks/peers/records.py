"""What a vs-peers run records, as dataclasses, and what they become: the JSON document, the text
report and the Markdown table for the README. Pure: no model, no torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

from intervene.search.pareto import pareto_front

Status = Literal["ok", "failed", "skipped"]


@dataclass
class EvalScore:
    """One model on the eval split, by the one judge: harmful answers by class (greedy, ``max_new_tokens``),
    first-token and full-answer KL(organism || model) on the harmless prompts, perplexity of the held-out text."""

    refused: int
    degenerate: int
    complied: int
    total: int
    first_token_kl: float
    answer_kl: float
    perplexity: float
    perplexity_ratio: float  # model / organism

    @property
    def not_complied(self) -> int:
        """Refused or degenerate: a degenerate answer is never a success."""
        return self.refused + self.degenerate


@dataclass
class Member:
    """One member of an opponent's own search front: its search-time numbers (its own judge, train
    prompts) and, once judged, the eval numbers and the tensors its checkpoint changed."""

    trial: int
    search_refusals: int | None = None
    search_total: int | None = None
    search_kl: float | None = None
    eval: EvalScore | None = None
    on_eval_front: bool = False
    edited_tensors: list[str] | None = None  # None: not read (no checkpoint)
    detail: str = ""


@dataclass
class Progress:
    """How far a child-process opponent got, read from its log."""

    stage: str = ""  # the last stage header it printed ("Loading model ...", "Running trial 3 of 16 ...")
    trials_started: int = 0
    trials_finished: int = 0
    components: list[str] = field(default_factory=list)  # what it says it edits ("attn.o_proj (30)")
    log: str = ""


@dataclass
class OpponentRun:
    """One opponent's result; a failure is a result too (``status``, ``error``, ``progress``)."""

    name: str
    version: str
    status: Status
    trials: int
    wall_s: float | None = None  # start (model load, directions) to the end of its trials
    trial_loop_s: float | None = None  # first trial start to the end of its trials
    members: list[Member] = field(default_factory=list)
    error: str = ""
    progress: Progress | None = None
    note: str = ""

    @property
    def trials_per_hour(self) -> float | None:
        return 3600.0 * self.trials / self.wall_s if self.wall_s else None

    @property
    def trial_loop_per_hour(self) -> float | None:
        return 3600.0 * self.trials / self.trial_loop_s if self.trial_loop_s else None

    @property
    def edited_tensors(self) -> list[str]:
        """Every tensor some member's checkpoint changed (sorted)."""
        return sorted({name for m in self.members for name in (m.edited_tensors or [])})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trials_per_hour"] = self.trials_per_hour
        out["trial_loop_per_hour"] = self.trial_loop_per_hour
        out["edited_tensors"] = self.edited_tensors
        out["edited_summary"] = summarize_names(self.edited_tensors)
        for member, raw in zip(self.members, out["members"]):
            if member.eval is not None:
                raw["eval"]["not_complied"] = member.eval.not_complied
        return out


# ---- the front ----------------------------------------------------------------------------------

def mark_front(members: Sequence[Member]) -> None:
    """Marks the eval Pareto front over (refused + degenerate, first-token KL) among judged members."""
    front = pareto_front([m for m in members if m.eval is not None],
                         lambda m: (m.eval.not_complied, m.eval.first_token_kl))
    for m in members:
        m.on_eval_front = any(m is f for f in front)


# ---- tensor names -------------------------------------------------------------------------------

def _ranges(numbers: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def summarize_names(names: Sequence[str]) -> list[str]:
    """Tensor names grouped by their shape with the layer (and expert) numbers folded:
    ``model.layers.{3-29}.self_attn.o_proj.weight`` (numbers listed as ranges), in first-seen order."""
    groups: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for name in names:
        parts = name.split(".")
        numbers = tuple(int(p) for p in parts if p.isdigit())
        pattern = tuple("#" if p.isdigit() else p for p in parts)
        groups.setdefault(pattern, []).append(numbers)
    out = []
    for pattern, numbers in groups.items():
        columns = list(zip(*numbers)) if numbers and numbers[0] else []
        it = iter(columns)
        out.append(".".join("{" + _ranges(next(it)) + "}" if p == "#" else p for p in pattern))
    return out


# ---- reports ------------------------------------------------------------------------------------

def fmt_rate(count: int | None, total: int | None) -> str:
    return "-" if count is None else f"{count}/{total}"


def fmt_float(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def front_members(run: OpponentRun) -> list[Member]:
    """The run's eval-front members, fewest not-complied first."""
    return sorted((m for m in run.members if m.on_eval_front and m.eval is not None),
                  key=lambda m: (m.eval.not_complied, m.eval.first_token_kl))


def member_cell(m: Member) -> str:
    e = m.eval
    return (f"{e.not_complied}/{e.total}" + (f" ({e.degenerate} degen.)" if e.degenerate else "")
            + f" @ KL {e.first_token_kl:.3f} / answer {fmt_float(e.answer_kl)}, ppl ×{e.perplexity_ratio:.3f}")


def text_report(runs: Sequence[OpponentRun], settings: dict[str, Any], baseline: EvalScore | None) -> str:
    lines = [f"model: {settings.get('model_dir')} | trials per opponent: {settings.get('trials')} (start-up "
             f"{settings.get('startup_trials')}), seed {settings.get('seed')} | train: {settings.get('n_train')} | "
             f"eval: {settings.get('n_eval')} | {settings.get('search_new_tokens')} new tokens searching, "
             f"{settings.get('max_new_tokens')} judging, greedy | torch threads {settings.get('threads')}"]
    if baseline is not None:
        lines.append(f"organism on eval: {baseline.refused} refused, {baseline.degenerate} degenerate, "
                     f"{baseline.complied} complied of {baseline.total}; perplexity {baseline.perplexity:.3f}")
    lines += ["", f"{'opponent':<12}{'version':<10}{'status':<8}{'trials':>7}{'wall s':>9}{'trials/h':>10}"
                  f"{'loop/h':>8}  edits"]
    for r in runs:
        lines.append(f"{r.name:<12}{r.version:<10}{r.status:<8}{r.trials:>7}{fmt_float(r.wall_s, 0):>9}"
                     f"{fmt_float(r.trials_per_hour, 0):>10}{fmt_float(r.trial_loop_per_hour, 0):>8}  "
                     + ("; ".join(summarize_names(r.edited_tensors)) or "-"))
    for r in runs:
        lines += ["", f"{r.name}: " + (f"FAILED: {r.error}" if r.status == "failed" else
                                       f"skipped: {r.error}" if r.status == "skipped" else
                                       f"its search front ({len(r.members)} members), judged on eval "
                                       "(* = on the eval Pareto front)") + (f"; {r.note}" if r.note else "")]
        if r.progress is not None and r.status == "failed":
            p = r.progress
            lines.append(f"  got to: {p.stage or '-'}; trials started {p.trials_started}, finished "
                         f"{p.trials_finished}; it lists {', '.join(p.components) or 'no components'} (log: {p.log})")
        if r.members:
            lines.append(f"  {'trial':>6}  {'search':>9}  {'s. KL':>7}  {'refused':>7}  {'degen':>5}  {'complied':>8}  "
                         f"{'KL':>7}  {'ans KL':>7}  {'ppl x':>6}")
        for m in sorted(r.members, key=lambda m: (m.eval.not_complied, m.eval.first_token_kl) if m.eval else (1e9, 0)):
            e = m.eval
            cells = (f"{e.refused:>7}  {e.degenerate:>5}  {e.complied:>8}  {e.first_token_kl:>7.4f}  "
                     f"{fmt_float(e.answer_kl, 4):>7}  {e.perplexity_ratio:>6.3f}") if e else "not judged"
            lines.append(f"{'*' if m.on_eval_front else ' '} {m.trial:>6}  "
                         f"{fmt_rate(m.search_refusals, m.search_total):>9}  {fmt_float(m.search_kl, 4):>7}  {cells}"
                         + (f"  {m.detail}" if m.detail else ""))
    return "\n".join(lines)


def markdown_table(runs: Sequence[OpponentRun], header: dict[str, Any]) -> str:
    """The README table: one row per opponent, with the run's date, machine and load."""
    load = header.get("load_average") or {}
    lines = [f"`{header.get('command', '')}` — {header.get('date', '')}, {header.get('machine', '')}; "
             f"load average {fmt_float((load.get('start') or [None])[0], 2)} at the start, "
             f"{fmt_float((load.get('end') or [None])[0], 2)} at the end; "
             f"{header.get('n_eval', '')} eval prompts, {header.get('max_new_tokens', '')} tokens",
             "",
             "| opponent | version | trials | wall | trials/h | eval front: refused+degenerate @ first-token KL / "
             "answer KL, perplexity ratio | edits |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        if r.status == "ok":
            front = "<br>".join(member_cell(m) for m in front_members(r)) or "no member judged"
        else:
            got = r.progress
            front = f"**{r.status}**: {r.error}" + (
                f" (got to: {got.stage or '-'}; {got.trials_finished} trials finished)" if got else "")
        edits = "<br>".join(f"`{s}`" for s in summarize_names(r.edited_tensors)) or "-"
        wall = f"{r.wall_s:.0f} s" if r.wall_s is not None else "-"
        lines.append(f"| {r.name} | {r.version} | {r.trials} | {wall} | "
                     f"{fmt_float(r.trials_per_hour, 0)} | {front} | {edits} |")
    return "\n".join(lines) + "\n"


def results_doc(runs: Sequence[OpponentRun], settings: dict[str, Any], baseline: EvalScore | None,
                header: dict[str, Any], text: str) -> dict[str, Any]:
    """The JSON document of a run."""
    return {**header, "settings": settings, "baseline": asdict(baseline) if baseline is not None else None,
            "opponents": [r.to_dict() for r in runs], "table": text}


__all__ = ["Status", "EvalScore", "Member", "Progress", "OpponentRun", "mark_front", "summarize_names",
           "fmt_rate", "fmt_float", "front_members", "member_cell", "text_report", "markdown_table", "results_doc"]
