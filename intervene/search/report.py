"""What a search returns and how it is shown: :class:`TrialRecord` (one trial's scores and YAML),
:class:`SearchResult`, the front as a table (:func:`format_front`), the study directory's outputs
(``front/trial_XXXX.yaml`` ready to bake, ``front.json``; :func:`write_outputs`) and the front plot
(``front.png``; :func:`plot_front`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..config.schema import InterventionConfig, parse_config
from ..io.files import atomic_write, atomic_write_text, write_json


@dataclass
class TrialRecord:
    """One completed trial: its sampled parameters, scores and the YAML it was applied from."""

    number: int
    params: dict[str, Any]
    proxy: float  # objective 1 (search prompts)
    kl: float  # objective 2 (search prompts)
    config_yaml: str
    refusals: int | None = None  # generation on the search's harmful prompts
    total: int | None = None
    # {"refusals" (refused + degenerate), "total", "degenerate", "kl", "answer_kl", "proxy"} on the eval prompts
    eval: dict[str, Any] | None = None
    seconds: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # further objectives (search prompts), by metric name

    @property
    def refusal_rate(self) -> float | None:
        return None if self.refusals is None or not self.total else self.refusals / self.total

    def config(self) -> InterventionConfig:
        return parse_config(yaml.safe_load(self.config_yaml), where=f"trial {self.number}")

    def summary(self) -> dict[str, Any]:
        return {"trial": self.number, "refusal_proxy": self.proxy, "kl": self.kl, "refusals": self.refusals,
                "total": self.total, "eval": self.eval, "params": self.params, "seconds": self.seconds} \
            | ({"objectives": self.extra} if self.extra else {})


@dataclass
class SearchResult:
    """What :func:`~intervene.search.study.run_search` returns."""

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


def format_front(front: Sequence[TrialRecord], basis: str, baseline: dict[str, Any]) -> str:
    """The front as a text table, the baseline first."""
    def rate(refusals: Any, total: Any) -> str:
        return "-" if refusals is None else f"{refusals}/{total} ({100.0 * refusals / max(total, 1):.0f}%)"

    # "refused" columns count refused + degenerate answers (neither is a success); "degen" the latter alone
    head = f"{'trial':>6}  {'eval refused':>14}  {'degen':>5}  {'eval KL':>8}  {'answer KL':>9}  " \
           f"{'search refused':>14}  {'search KL':>9}  {'proxy':>8}  {'dir':>6}  {'window':>11}  {'method':>15}"
    lines = [f"Pareto front ({basis}), {len(front)} member(s):", head]
    be = baseline.get("eval") or {}
    def degen(scores: dict[str, Any]) -> str:
        return str(scores["degenerate"]) if "degenerate" in scores else "-"

    lines.append(f"{'base':>6}  {rate(be.get('refusals'), be.get('total')):>14}  {degen(be):>5}  {'0':>8}  {'0':>9}  "
                 f"{rate(baseline.get('refusals'), baseline.get('total')):>14}  {'0':>9}  "
                 f"{baseline.get('proxy', float('nan')):>8.3g}")
    for r in front:
        ev = r.eval or {}
        p = r.params
        win = f"{p['center']:.1f}±{p['width']:.1f}"
        method = p["method"] + ("+router" if p.get("router") else "")
        kl = f"{ev['kl']:.4f}" if "kl" in ev else "-"
        answer_kl = f"{ev['answer_kl']:.4f}" if "answer_kl" in ev else "-"
        lines.append(f"{r.number:>6}  {rate(ev.get('refusals'), ev.get('total')):>14}  {degen(ev):>5}  {kl:>8}  "
                     f"{answer_kl:>9}  "
                     f"{rate(r.refusals, r.total):>14}  {r.kl:>9.4f}  {r.proxy:>8.3g}  {p['direction']:>6.2f}  "
                     f"{win:>11}  {method:>15}")
    return "\n".join(lines)


def write_outputs(result: SearchResult, settings_out: dict[str, Any], model_spec: str | None,
                  measurements_path: str | None) -> None:
    """The front's YAML configs, ``front.json`` and ``front.png`` in ``result.out_dir``; fills
    ``result``'s paths."""
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
        atomic_write_text(path, f"{header}# trial {r.number}: {cfg.notes}\n{cfg.to_yaml()}")
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
    write_json(result.json_path, doc)
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
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


__all__ = ["TrialRecord", "SearchResult", "format_front", "write_outputs", "plot_front"]
