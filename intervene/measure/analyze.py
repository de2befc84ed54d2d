"""Which layers carry the direction: per-layer statistics, routing divergence, a recommended config.

Per layer L, with h = harmful_mean.L, m = harmless_mean.L and r = h − m (float64):

* ``cos``      cos(h, m): how alike the two means are (1 = indistinguishable)
* ``snr``      ‖r‖ / mean(‖h‖, ‖m‖): the gap relative to the typical residual size
* ``quality``  (1 − cos) · snr: large when the means point apart AND the gap is large

MoE layers (when the file has router statistics), with p = harmful and q = harmless expert
frequencies (each sums to 1 over experts):

* ``router_js``    Jensen–Shannon divergence JS(p, q) = ½ KL(p‖M) + ½ KL(q‖M), M = (p + q)/2,
                   in NATS (natural log), so 0 ≤ JS ≤ ln 2 ≈ 0.693
* ``top_experts``  experts with p > q, sorted by the difference p − q (largest first), with
                   the ratio p / q: the experts over-selected on harmful prompts
  (both over all prompt tokens, chat template included, which dilutes them), and, where the file
  has them, the same at the last prompt token and over the user's own tokens:
* ``router_js_last``, ``router_js_user``  JS(p, q) on those statistics
* ``expert_ranking``  EVERY expert ranked by risk difference p − q (``maths.risk_difference_ranking``)
                   on ``ranking_tokens`` (the first of last, user, all the file has): what
                   ``router_bias: experts: "top:N"`` takes the first N of

``router_bias_suggestions``: ``router_bias`` entries ``{layers, experts: "top:N", bias: -inf, tokens}``
over the MoE layers in the depth band, for N = 1, 2, 4 (at most E − top_k), to paste into a config,
try and search (``--router-bias-top N`` writes one into the recommended config).

Recommendation rule (:func:`recommend`), kept simple on purpose:

1. the direction source S is the layer with the highest signal quality among the layers whose
   depth (L + 1) / num_layers lies in the band [0.30, 0.85] (all layers if none does): early
   layers have not formed the concept yet, the last layers mostly format the output;
2. the edited layers are the contiguous window [S − before, S + after] clipped to the model,
   by default before = ⌊num_layers / 4⌋ and after = "up to the last layer": the direction is
   removed where it is being formed and everywhere downstream, where later layers could
   otherwise write it back;
3. one ``ablate`` entry: method ``project``, biprojection on, scale 1.0, sparsity 0.0, every
   write-side target the architecture has;
4. on MoE files with an attribution (``intervene.measure.attribution``), its regime decides the routed
   experts (:func:`follow_regime`): ``residual`` leaves the ``experts`` target out, ``mixed`` keeps it,
   ``experts`` keeps it and adds ``router_bias`` -inf on the experts that carry the direction.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arch import WRITE_TARGETS, get_arch
from ..config.schema import AblateEntry, InterventionConfig, RouterBiasEntry, parse_layers
from ..errors import MeasurementError
from ..io.measurements import Measurements, router_key
from ..io.models import versions
from ..maths import js_divergence, risk_difference_ranking
from ..version import __version__
from .attribution import DEFINITIONS as ATTRIBUTION_DEFINITIONS
from .attribution import Attribution, carrying_experts
from .attribution import attribution as attribute

DEFAULT_BAND = (0.30, 0.85)
RANKING_TOKENS = ("last", "user", "all")  # preference order of the router statistics experts are ranked on
SUGGESTED_TOP = (1, 2, 4)


@dataclass
class ExpertShift:
    expert: int
    harmful_freq: float
    harmless_freq: float
    difference: float  # harmful − harmless
    ratio: float  # harmful / harmless (inf when never chosen on harmless prompts)


@dataclass
class LayerRow:
    layer: int | str  # decoder layer index, or "embed"
    depth: float | None  # (layer + 1) / num_layers; None for the embedding
    cos: float
    harmful_norm: float
    harmless_norm: float
    direction_norm: float
    snr: float
    quality: float
    router_js: float | None = None
    top_experts: list[ExpertShift] = field(default_factory=list)
    router_js_last: float | None = None  # JS at the last prompt token
    router_js_user: float | None = None  # JS over the user's own tokens
    ranking_tokens: str | None = None  # which statistics expert_ranking uses
    expert_ranking: list[ExpertShift] = field(default_factory=list)  # every expert, risk difference first


@dataclass
class AnalysisReport:
    rows: list[LayerRow]
    num_layers: int
    band: tuple[float, float]
    best_layer: int | None  # highest quality within the band (the recommended direction source)
    source: str | None = None  # measurements file
    meta: dict[str, Any] = field(default_factory=dict)  # the measurements' metadata
    router_bias_suggestions: list[dict[str, Any]] = field(default_factory=list)  # router_bias entries (top:N)
    attribution: Attribution | None = None  # where the direction grows, by component (files with attribution.*)

    @property
    def layer_rows(self) -> list[LayerRow]:
        return [r for r in self.rows if isinstance(r.layer, int)]

    def row(self, layer: int | str) -> LayerRow:
        for r in self.rows:
            if r.layer == layer:
                return r
        raise KeyError(f"no row for layer {layer}")

    @property
    def has_router(self) -> bool:
        return any(r.router_js is not None for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["band"] = list(self.band)
        d.update(self.attribution.to_dict() if self.attribution else
                 {"attribution": [], "attribution_routing": [], "experts_share": None, "regime": None})
        d["definitions"] = {
            "cos": "cos(harmful_mean, harmless_mean)",
            "snr": "|harmful_mean - harmless_mean| / mean(|harmful_mean|, |harmless_mean|)",
            "quality": "(1 - cos) * snr",
            "router_js": "Jensen-Shannon divergence of expert frequencies harmful vs harmless, natural log (nats), "
                         "over all prompt tokens",
            "router_js_last": "the same at the last prompt token",
            "router_js_user": "the same over the user's own tokens (chat template excluded)",
            "expert_ranking": "every expert by risk difference p_harmful - p_harmless on ranking_tokens; "
                              "router_bias 'top:N' takes the first N",
            **ATTRIBUTION_DEFINITIONS,
        }
        d["versions"] = versions()
        return _finite(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        head = (f"{'layer':>6} {'depth':>6} {'cos':>8} {'|harmful|':>10} {'|harmless|':>10} {'|r|':>9} "
                f"{'SNR':>8} {'quality':>8}")
        ranked = any(r.ranking_tokens for r in self.rows)
        if self.has_router:
            head += f" {'JS(nats)':>9}  top harmful experts (p/q)"
            if ranked:
                head += f"  {'JS last':>8} {'JS user':>8}  top risk difference p-q"
        lines = [head]
        for r in self.rows:
            mark = "*" if r.layer == self.best_layer else " "
            depth = f"{r.depth:6.2f}" if r.depth is not None else f"{'':>6}"
            line = (f"{str(r.layer):>5}{mark} {depth} {r.cos:8.4f} {r.harmful_norm:10.3f} {r.harmless_norm:10.3f} "
                    f"{r.direction_norm:9.3f} {r.snr:8.4f} {r.quality:8.5f}")
            if r.router_js is not None:
                tops = ", ".join(f"{e.expert}({_ratio(e.ratio)})" for e in r.top_experts[:3])
                line += f" {r.router_js:9.5f}  {tops}"
                if ranked:
                    line = line.ljust(len(line) + max(0, 28 - len(tops)))
                    js = [f"{v:8.5f}" if v is not None else f"{'-':>8}" for v in (r.router_js_last, r.router_js_user)]
                    rd = ", ".join(f"{e.expert}({e.difference:+.3f})" for e in r.expert_ranking[:3])
                    line += f"  {js[0]} {js[1]}  {rd} [{r.ranking_tokens}]"
            lines.append(line)
        if self.best_layer is not None:
            lo, hi = self.band
            lines.append(f"* best signal quality within {lo:.0%}-{hi:.0%} depth: layer {self.best_layer} "
                         f"(quality {self.row(self.best_layer).quality:.5f})")
        for suggestion in self.router_bias_suggestions:
            lines.append(f"router_bias suggestion: layers {suggestion['layers']}, experts {suggestion['experts']}, "
                         f"bias {suggestion['bias']}, tokens {suggestion['tokens']}")
        if self.attribution is not None:
            lines += ["", self.attribution.table()]
        return "\n".join(lines)

    def plot_experts(self, path: str | os.PathLike) -> Path:
        """Heat map layers × experts of the risk difference p_harmful − p_harmless on each layer's
        ``ranking_tokens`` (as ``route``'s harmful − harmless panel)."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        rows = [r for r in self.layer_rows if r.expert_ranking]
        if not rows:
            raise MeasurementError(f"{self.source or 'measurements'}: no router statistics to plot")
        n_exp = len(rows[0].expert_ranking)
        data = np.zeros((len(rows), n_exp))
        for i, r in enumerate(rows):
            for e in r.expert_ranking:
                data[i, e.expert] = e.difference
        bound = float(np.abs(data).max()) or 1e-12
        fig, ax = plt.subplots(figsize=(min(28.0, 4.0 + 0.25 * n_exp), min(30.0, 2.5 + 0.3 * len(rows))))
        im = ax.imshow(data, aspect="auto", cmap="PuOr_r", vmin=-bound, vmax=bound, interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        step = max(1, len(rows) // 24)
        ax.set_yticks(range(0, len(rows), step))
        ax.set_yticklabels([str(r.layer) for r in rows[::step]])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="p_harmful - p_harmless")
        ax.set_title(f"risk difference per expert ({rows[0].ranking_tokens} tokens)")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        vers = versions()
        fig.savefig(path, dpi=110, metadata={"Software": f"intervene {vers['intervene']}",
                                             "Description": json.dumps({"measurements": self.source, "versions": vers})})
        plt.close(fig)
        return path

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG of cos, SNR, signal quality (and router JS on MoE) per layer."""
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        rows = self.layer_rows
        xs = [r.layer for r in rows]
        panels = [("cos(harmful, harmless)", [r.cos for r in rows]),
                  ("SNR  |r| / mean(|h|, |m|)", [r.snr for r in rows]),
                  ("signal quality  (1 - cos) * SNR", [r.quality for r in rows])]
        if self.has_router:
            panels.append(("router JS divergence (nats)",
                           [r.router_js if r.router_js is not None else float("nan") for r in rows]))
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True)
        lo, hi = self.band
        for ax, (title, ys) in zip(axes, panels):
            ax.plot(xs, ys, marker="o", markersize=3)
            ax.set_ylabel(title, fontsize=8)
            ax.axvspan(lo * self.num_layers - 1, hi * self.num_layers - 1, color="0.9", zorder=0)
            if self.best_layer is not None:
                ax.axvline(self.best_layer, color="C3", linestyle="--", linewidth=1)
            ax.grid(True, linewidth=0.3)
        axes[-1].set_xlabel("decoder layer (output residual)")
        name = os.path.basename(self.source) if self.source else "measurements"
        axes[0].set_title(f"{name}: {self.meta.get('model', '')}  (best in band: layer {self.best_layer})", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        vers = versions()
        fig.savefig(path, dpi=110, metadata={
            "Software": f"intervene {vers['intervene']}",
            "Description": json.dumps({"measurements": self.source, "best_layer": self.best_layer,
                                       "band": list(self.band), "versions": vers}),
        })
        plt.close(fig)
        return path


# ---- statistics (pure functions on tensors) -----------------------------------------------------

def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    denom = float(a.norm() * b.norm())
    # rounding can put |cos| a hair above 1; clamp so 1 - cos is never negative
    return max(-1.0, min(1.0, float(a @ b) / denom)) if denom > 0 else float("nan")


def expert_shifts(harmful_freq: torch.Tensor, harmless_freq: torch.Tensor, top: int = 5) -> list[ExpertShift]:
    """Experts chosen more often on harmful prompts, largest frequency difference first."""
    p, q = harmful_freq.to(torch.float64), harmless_freq.to(torch.float64)
    diff = p - q
    order = torch.argsort(diff, descending=True, stable=True).tolist()
    out = []
    for e in order:
        if float(diff[e]) <= 0 or len(out) >= top:
            break
        ratio = float(p[e] / q[e]) if float(q[e]) > 0 else float("inf")
        out.append(ExpertShift(int(e), float(p[e]), float(q[e]), float(diff[e]), ratio))
    return out


def layer_row(meas: Measurements, layer: int | str, num_layers: int, top: int = 5) -> LayerRow:
    h = meas.harmful_mean(layer).to(torch.float64)
    m = meas.harmless_mean(layer).to(torch.float64)
    r = h - m
    hn, mn, rn = float(h.norm()), float(m.norm()), float(r.norm())
    mean_norm = (hn + mn) / 2
    cos = cosine(h, m)
    snr = rn / mean_norm if mean_norm > 0 else float("nan")
    row = LayerRow(layer=layer, depth=(layer + 1) / num_layers if isinstance(layer, int) else None, cos=cos,
                   harmful_norm=hn, harmless_norm=mn, direction_norm=rn, snr=snr, quality=(1 - cos) * snr)
    p_key, q_key = f"router.harmful_freq.{layer}", f"router.harmless_freq.{layer}"
    if p_key in meas.tensors and q_key in meas.tensors:
        row.router_js = js_divergence(meas.tensors[p_key], meas.tensors[q_key])
        row.top_experts = expert_shifts(meas.tensors[p_key], meas.tensors[q_key], top)
    if not isinstance(layer, int):
        return row
    js: dict[str, float] = {}
    for tokens in RANKING_TOKENS:
        pk, qk = router_key("harmful", "freq", tokens, layer), router_key("harmless", "freq", tokens, layer)
        if pk in meas.tensors and qk in meas.tensors:
            js[tokens] = js_divergence(meas.tensors[pk], meas.tensors[qk])
            if row.ranking_tokens is None:
                row.ranking_tokens = tokens
                row.expert_ranking = expert_ranking(meas.tensors[pk], meas.tensors[qk])
    row.router_js_last, row.router_js_user = js.get("last"), js.get("user")
    return row


def expert_ranking(harmful_freq: torch.Tensor, harmless_freq: torch.Tensor) -> list[ExpertShift]:
    """Every expert, ordered by risk difference p − q (``maths.risk_difference_ranking``)."""
    p, q = harmful_freq.to(torch.float64), harmless_freq.to(torch.float64)
    return [ExpertShift(e, float(p[e]), float(q[e]), float(p[e] - q[e]),
                        float(p[e] / q[e]) if float(q[e]) > 0 else float("inf"))
            for e in risk_difference_ranking(p, q)]


def router_bias_suggestions(rows: list[LayerRow], num_layers: int, band: tuple[float, float],
                            top_k: int) -> list[dict[str, Any]]:
    """``router_bias`` entries (top:N, -inf) over the ranked MoE layers in the depth band (all ranked
    layers if none is), N in :data:`SUGGESTED_TOP` up to E − top_k."""
    ranked = [r for r in rows if isinstance(r.layer, int) and r.expert_ranking]
    if not ranked:
        return []
    in_band = [r for r in ranked if band[0] <= r.depth <= band[1]] or ranked
    layers = [r.layer for r in in_band]
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    where: str | list[int] = f"{layers[0]}:{layers[-1] + 1}" if contiguous else layers
    n_exp = len(ranked[0].expert_ranking)
    return [{"layers": where, "experts": f"top:{n}", "bias": "-inf", "tokens": in_band[0].ranking_tokens}
            for n in SUGGESTED_TOP if n <= n_exp - max(top_k, 1)]


def analyze(meas: Measurements, band: tuple[float, float] = DEFAULT_BAND, top_experts: int = 5) -> AnalysisReport:
    """Per-layer statistics of a measurements file and the best layer in the depth band."""
    layers = meas.layers
    if not layers:
        raise MeasurementError(f"{meas.path or 'measurements'} has no per-layer directions")
    missing = [layer for layer in layers if f"harmful_mean.{layer}" not in meas.tensors
               or f"harmless_mean.{layer}" not in meas.tensors]
    if missing:
        raise MeasurementError(f"{meas.path or 'measurements'} lacks harmful_mean/harmless_mean for layer "
                               f"{missing[0]}; analyze needs both means (the direction alone carries no cos/SNR)")
    num_layers = int(meas.meta.get("num_layers") or (max(layers) + 1))
    rows = []
    if "harmful_mean.embed" in meas.tensors and "harmless_mean.embed" in meas.tensors:
        rows.append(layer_row(meas, "embed", num_layers, top_experts))
    rows += [layer_row(meas, layer, num_layers, top_experts) for layer in layers]
    return AnalysisReport(rows=rows, num_layers=num_layers, band=tuple(band),
                          best_layer=best_layer(rows, num_layers, band), source=meas.path, meta=dict(meas.meta),
                          router_bias_suggestions=router_bias_suggestions(rows, num_layers, band,
                                                                          int(meas.meta.get("top_k") or 1)),
                          attribution=attribute(meas))


def best_layer(rows: list[LayerRow], num_layers: int, band: tuple[float, float] = DEFAULT_BAND) -> int | None:
    """Highest signal quality among layers with depth in ``band`` (all layers if none is)."""
    candidates = [r for r in rows if isinstance(r.layer, int) and not math.isnan(r.quality)]
    in_band = [r for r in candidates if band[0] <= r.depth <= band[1]]
    pool = in_band or candidates
    return max(pool, key=lambda r: r.quality).layer if pool else None


def recommend(meas: Measurements, model: str | None = None, measurements: str | None = None,
              band: tuple[float, float] = DEFAULT_BAND, before: int | None = None, after: int | None = None,
              report: AnalysisReport | None = None, router_bias_top: int | None = None) -> Any:
    """A starting :class:`~intervene.config.schema.InterventionConfig` (rule in the module docstring).

    ``model`` / ``measurements`` default to the model recorded in the file and the file's path.
    ``router_bias_top=N`` adds a ``router_bias`` entry (``experts: "top:N"``, -inf) over the MoE
    layers of :func:`router_bias_suggestions`.
    """
    report = report or analyze(meas, band)
    source = report.best_layer
    if source is None:
        raise MeasurementError(f"{meas.path or 'measurements'}: no layer with a finite signal quality to recommend")
    n = report.num_layers
    before = n // 4 if before is None else before
    last = n - 1 if after is None else min(n - 1, source + after)
    first = max(0, source - before)
    targets = None
    model_type = meas.meta.get("model_type")
    if model_type:
        spec = get_arch(model_type)
        targets = [t for t in WRITE_TARGETS if spec.has_target(t)]
    router_bias = []
    if router_bias_top is not None:
        ranked = [r for r in report.layer_rows if r.expert_ranking]
        if not ranked:
            raise MeasurementError(f"{meas.path or 'measurements'}: no router statistics to rank experts on "
                                   "(--router-bias-top needs a MoE measurements file)")
        n_exp = len(ranked[0].expert_ranking)
        if not 1 <= router_bias_top <= n_exp - max(1, int(meas.meta.get("top_k") or 1)):
            raise MeasurementError(f"--router-bias-top {router_bias_top}: must be 1..E - top_k with {n_exp} experts")
        where = (report.router_bias_suggestions[0]["layers"] if report.router_bias_suggestions
                 else router_bias_suggestions(report.rows, n, band, 0)[0]["layers"])
        router_bias = [RouterBiasEntry(layers=parse_layers(where, "router_bias"), bias=float("-inf"), top=router_bias_top,
                                       tokens=ranked[0].ranking_tokens)]
    regime_note = ""
    attrib = report.attribution
    if attrib is not None and targets is not None and "experts" in targets:
        targets, expert_bias = follow_regime(attrib, targets, meas, steerable=spec.selection_bias is not None)
        router_bias = expert_bias + router_bias
        regime_note = {"residual": "; routed experts left out (regime residual)",
                       "mixed": "; routed experts projected (regime mixed)",
                       "experts": "; routed experts projected and the carrying experts switched off by router_bias "
                                  "(regime experts)"}[attrib.regime]
    row = report.row(source)
    notes = (f"recommended by intervene {__version__} analyze: direction from layer {source} (signal quality "
             f"{row.quality:.4g}, cos {row.cos:.4f}, depth {row.depth:.0%}; best within {band[0]:.0%}-{band[1]:.0%} "
             f"depth), edited layers {first}..{last}{regime_note}")
    return InterventionConfig(
        ablate=[AblateEntry(layers=list(range(first, last + 1)), measurement=source, scale=1.0, sparsity=0.0)],
        model=model if model is not None else meas.meta.get("model"),
        measurements=measurements if measurements is not None else meas.path,
        method="project", biprojection=True, targets=targets,
        system_prompt=meas.meta.get("system_prompt"), chat_template=bool(meas.meta.get("chat_template", True)),
        notes=notes, router_bias=router_bias,
        # numbers here index decoder-layer outputs; said explicitly for files converted from .refuse
        indexing="layer_output" if meas.meta.get("source_indexing") == "hidden_state" else None,
    )


def follow_regime(attrib: Attribution, targets: list[str], meas: Measurements,
                  steerable: bool = True) -> tuple[list[str], list[Any]]:
    """The write targets and the extra ``router_bias`` entries the attribution's regime calls for: ``residual``
    drops the ``experts`` target; ``mixed`` keeps it; ``experts`` keeps it and, where the architecture takes a
    ``router_bias`` (``steerable``), switches off (bias -inf) the experts that carry the direction
    (:func:`intervene.measure.attribution.carrying_experts`, at most E - top_k per layer)."""
    if attrib.regime == "residual":
        return [t for t in targets if t != "experts"], []
    if attrib.regime == "mixed" or not steerable:
        return list(targets), []
    n_exp = int(meas.meta.get("num_experts") or 0) or 1 + max(
        (r.expert for r in attrib.rows if r.expert is not None), default=0)
    per_layer = max(1, n_exp - max(1, int(meas.meta.get("top_k") or 1)))
    entries = [RouterBiasEntry(layers=[layer], bias=float("-inf"), experts=ids)
               for layer, ids in carrying_experts(attrib, per_layer).items()]
    return list(targets), entries


# ---- helpers -----------------------------------------------------------------------------------

def _ratio(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as strings."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
