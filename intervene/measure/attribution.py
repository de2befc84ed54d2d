"""Where refusal lives: the growth of the refusal direction at each layer, split by component.

For layer L with unit direction r̂_L = normalise(harmful_mean.L − harmless_mean.L), each component c
of the layer (its attention, dense MLP, shared experts, and each routed expert's gated output) gets

    value(L, c) = (mean harmful write of c − mean harmless write of c) · r̂_L

from the ``attribution.*`` means ``measure`` stores (last prompt token). Every decoder layer adds its
components' writes to the residual, so the values of a layer add up to the change of the residual's
harmful − harmless mean along r̂_L across the layer ((harmful_mean.L − harmless_mean.L −
(harmful_mean.{L−1} − harmless_mean.{L−1})) · r̂_L): direct attribution, exact.

On MoE layers the routed experts' total is split (:func:`intervene.maths.routing_split`) into
``routing`` (which experts are chosen) and ``compute`` (what the chosen experts compute: the harmful
outputs weighted with the harmless routing, minus the harmless write); the two add up to it.

The regime: with P the sum of the positive values over every row of every layer and X the sum of the
positive values of the routed-expert rows, the experts' share is X / P (0 when P is 0);
``experts`` when the share is ≥ 0.5, ``residual`` when it is ≤ 0.2 (attention, dense MLP and
shared experts carry the direction), else ``mixed``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import maths
from ..errors import InputError, MeasurementError
from ..io.measurements import Measurements, attribution_key
from ..io.models import versions

Component = Literal["attention", "mlp", "shared_experts", "expert"]
Regime = Literal["experts", "mixed", "residual"]
COMPONENTS: tuple[Component, ...] = ("attention", "mlp", "shared_experts", "expert")
EXPERTS_REGIME_SHARE = 0.5  # routed experts' share of the positive attribution at or above which: "experts"
RESIDUAL_REGIME_SHARE = 0.2  # at or below which: "residual"
DEFINITIONS = {
    "attribution": "per layer L and component: (mean harmful write - mean harmless write at the last prompt token) "
                   "projected on the unit direction of layer L; a layer's values add up to the change of the "
                   "harmful - harmless residual mean along it across the layer",
    "attribution_routing": "per MoE layer: the routed experts' total split into routing (which experts are chosen) "
                           "and compute (harmful expert outputs weighted with the harmless routing, minus the "
                           "harmless write); routing + compute = the experts' total",
    "experts_share": "sum of the positive routed-expert values / sum of all positive values, over every layer",
    "regime": f"experts if experts_share >= {EXPERTS_REGIME_SHARE}, residual if <= {RESIDUAL_REGIME_SHARE}, "
              "else mixed",
}


@dataclass
class AttributionRow:
    layer: int
    component: Component
    expert: int | None
    value: float  # (harmful − harmless mean write) · r̂_layer


@dataclass
class RoutingSplit:
    layer: int
    experts: float  # the routed experts' total (= routing + compute)
    routing: float  # which experts are chosen
    compute: float  # what the chosen experts compute


@dataclass
class Attribution:
    rows: list[AttributionRow]
    routing: list[RoutingSplit] = field(default_factory=list)
    experts_share: float = 0.0
    regime: Regime = "residual"

    @property
    def layers(self) -> list[int]:
        return sorted({r.layer for r in self.rows})

    def layer_rows(self, layer: int) -> list[AttributionRow]:
        return [r for r in self.rows if r.layer == layer]

    def total(self, layer: int, component: Component) -> float | None:
        vals = [r.value for r in self.layer_rows(layer) if r.component == component]
        return sum(vals) if vals else None

    def ranked_experts(self, layers: list[int] | None = None) -> list[AttributionRow]:
        """Routed-expert rows (of ``layers``, default all), largest value first (ties: layer, expert)."""
        rows = [r for r in self.rows if r.component == "expert" and (layers is None or r.layer in layers)]
        return sorted(rows, key=lambda r: (-r.value, r.layer, r.expert))

    def regime_line(self) -> str:
        return (f"regime: {self.regime} (routed experts write {self.experts_share:.0%} of the positive refusal-direction "
                f"growth; experts >= {EXPERTS_REGIME_SHARE:.0%}, residual <= {RESIDUAL_REGIME_SHARE:.0%})")

    def to_dict(self) -> dict[str, Any]:
        return {"attribution": [asdict(r) for r in self.rows], "attribution_routing": [asdict(r) for r in self.routing],
                "experts_share": self.experts_share, "regime": self.regime}

    def table(self, layer: int | None = None, top: int = 3) -> str:
        """Per layer: each component's value, the experts' routing / compute split and the top experts;
        with ``layer``: every routed expert of that layer, largest first."""
        if layer is not None:
            if layer not in self.layers:
                raise InputError(f"--attribution-layer {layer}: no attribution at that layer; layers "
                                 f"{self.layers[0]}..{self.layers[-1]}")
            rows = sorted(self.layer_rows(layer), key=lambda r: -r.value)
            lines = [f"attribution at layer {layer} (harmful - harmless mean write along the layer's direction)",
                     f"{'component':>16} {'expert':>7} {'value':>11}"]
            lines += [f"{r.component:>16} {'' if r.expert is None else r.expert:>7} {r.value:11.5f}" for r in rows]
            return "\n".join(lines)
        split = {s.layer: s for s in self.routing}
        lines = ["where the refusal direction grows (harmful - harmless mean write along each layer's direction)",
                 f"{'layer':>6} {'attention':>10} {'mlp':>10} {'shared':>10} {'experts':>10} {'routing':>10} "
                 f"{'compute':>10}  top experts"]

        def cell(v: float | None) -> str:
            return f"{v:10.4f}" if v is not None else f"{'-':>10}"

        for lay in self.layers:
            s = split.get(lay)
            tops = ", ".join(f"{r.expert}({r.value:+.3f})" for r in self.ranked_experts([lay])[:top])
            lines.append(f"{lay:>6} {cell(self.total(lay, 'attention'))} {cell(self.total(lay, 'mlp'))} "
                         f"{cell(self.total(lay, 'shared_experts'))} {cell(self.total(lay, 'expert'))} "
                         f"{cell(s.routing if s else None)} {cell(s.compute if s else None)}  {tops}")
        lines.append(self.regime_line())
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, layer: int | None = None, source: str | None = None) -> Path:
        """PNG: per layer, each component's value (stacked bars: positive up, negative down) and, with
        ``layer``, that layer's routed experts."""
        try:
            import matplotlib
        except ImportError:
            raise InputError("--attribution-plot needs matplotlib (pip install matplotlib)") from None
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        if layer is not None and layer not in self.layers:
            raise InputError(f"--attribution-layer {layer}: no attribution at that layer")
        layers = self.layers
        fig, axes = plt.subplots(2 if layer is not None else 1, 1, figsize=(9, 7 if layer is not None else 4),
                                 squeeze=False)
        ax = axes[0][0]
        up = [0.0] * len(layers)
        down = [0.0] * len(layers)
        for i, comp in enumerate(COMPONENTS):
            vals = [self.total(lay, comp) or 0.0 for lay in layers]
            if not any(vals):
                continue
            pos = [max(v, 0.0) for v in vals]
            neg = [min(v, 0.0) for v in vals]
            ax.bar(layers, pos, bottom=up, color=f"C{i}", label="routed experts" if comp == "expert" else comp)
            ax.bar(layers, neg, bottom=down, color=f"C{i}")
            up = [a + b for a, b in zip(up, pos)]
            down = [a + b for a, b in zip(down, neg)]
        ax.axhline(0, color="k", linewidth=0.5)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("write along r (harmful - harmless)")
        ax.set_title(f"{os.path.basename(source) if source else 'attribution'}: {self.regime_line()}", fontsize=8)
        ax.legend(fontsize=7)
        if layer is not None:
            rows = [r for r in self.layer_rows(layer) if r.component == "expert"]
            axes[1][0].bar([r.expert for r in rows], [r.value for r in rows], color="C3")
            axes[1][0].set_xlabel(f"routed expert (layer {layer})")
            axes[1][0].set_ylabel("write along r")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        vers = versions()
        fig.savefig(path, dpi=110, metadata={"Software": f"intervene {vers['intervene']}",
                                             "Description": json.dumps({"measurements": source, "versions": vers})})
        plt.close(fig)
        return path


def carrying_experts(attrib: Attribution, max_per_layer: int, mass: float = 0.5) -> dict[int, list[int]]:
    """The routed experts that carry the direction: the positive expert rows, largest first, taken until
    they hold ``mass`` of the routed experts' positive total (at least one), at most ``max_per_layer`` per
    layer; layer -> sorted expert ids."""
    ranked = [r for r in attrib.ranked_experts() if r.value > 0]
    goal = mass * sum(r.value for r in ranked)
    chosen: dict[int, list[int]] = {}
    held = 0.0
    for r in ranked:
        if held >= goal and chosen:
            break
        if len(chosen.get(r.layer, [])) >= max_per_layer:
            continue
        chosen.setdefault(r.layer, []).append(int(r.expert))
        held += r.value
    return {layer: sorted(ids) for layer, ids in sorted(chosen.items())}


def has_attribution(meas: Measurements) -> bool:
    return any(k.startswith("attribution.") for k in meas.tensors)


def attribution(meas: Measurements) -> Attribution | None:
    """The attribution of a measurements file (module docstring); None when it has no ``attribution.*``."""
    if not has_attribution(meas):
        return None
    rows: list[AttributionRow] = []
    splits: list[RoutingSplit] = []
    for layer in meas.layers:
        if not any(attribution_key("harmful", p, layer) in meas.tensors for p in ("attention", "mlp", "experts")):
            continue
        r_hat = maths.unit(meas.direction(layer), f"direction.{layer}").to(torch.float64)

        def diff(part: str) -> torch.Tensor | None:
            h, m = (meas.tensors.get(attribution_key(s, part, layer)) for s in ("harmful", "harmless"))
            if h is None or m is None:
                if h is not None or m is not None:
                    raise MeasurementError(f"{meas.path or 'measurements'}: attribution '{part}' of layer {layer} "
                                           "is stored for one prompt set only")
                return None
            return h.to(torch.float64) - m.to(torch.float64)

        for part in ("attention", "mlp", "shared_experts"):
            d = diff(part)
            if d is not None:
                rows.append(AttributionRow(layer, part, None, float(d @ r_hat)))
        d = diff("experts")
        if d is None:
            continue
        values = d @ r_hat  # [E]
        rows += [AttributionRow(layer, "expert", e, float(v)) for e, v in enumerate(values.tolist())]
        keys = [attribution_key(s, p, layer) for s in ("harmful", "harmless") for p in ("experts", "routing")]
        missing = [k for k in keys if k not in meas.tensors]
        if missing:
            raise MeasurementError(f"{meas.path or 'measurements'} lacks '{missing[0]}' (re-measure)")
        g_h, rho_h, g_m, rho_m = (meas.tensors[k].to(torch.float64) for k in keys)
        routing, compute = maths.routing_split(g_h @ r_hat, g_m @ r_hat, rho_h, rho_m)
        splits.append(RoutingSplit(layer, float(values.sum()), float(routing.sum()), float(compute.sum())))
    if not rows:
        return None
    share = experts_share(rows)
    return Attribution(rows=rows, routing=splits, experts_share=share, regime=regime(share))


def experts_share(rows: list[AttributionRow]) -> float:
    """Sum of the routed-expert rows' positive values over the sum of every row's positive values (0 if none)."""
    positive = sum(max(r.value, 0.0) for r in rows)
    experts = sum(max(r.value, 0.0) for r in rows if r.component == "expert")
    return experts / positive if positive > 0 else 0.0


def regime(share: float) -> Regime:
    if share >= EXPERTS_REGIME_SHARE:
        return "experts"
    if share <= RESIDUAL_REGIME_SHARE:
        return "residual"
    return "mixed"


__all__ = ["Attribution", "AttributionRow", "RoutingSplit", "attribution", "carrying_experts", "experts_share", "regime",
           "has_attribution", "DEFINITIONS", "EXPERTS_REGIME_SHARE", "RESIDUAL_REGIME_SHARE"]
