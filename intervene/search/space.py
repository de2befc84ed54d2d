"""The search space of ``intervene search``: Optuna parameters -> an :class:`InterventionConfig`.

One trial's parameters describe::

    direction     fractional measured layer whose (interpolated) direction is used everywhere
    center, width the edited window: every layer l with |l - center| <= width
    <target>.max  scale at the window centre, per write target (attention, mlp, experts,
                  shared_experts -- only those the architecture has)
    <target>.min  scale at the window edge, as a fraction of <target>.max; the kernel is linear
                  in between: s(l) = max + (min - max)·|l - center| / width
    router        (MoE only) on/off, and a flat scale over the window's MoE layers
    method        project | norm_preserving
    whiten        (when the measurements hold the harmless second moment) the whitening strength
                  lambda of ``maths.whiten``, log-uniform; the same lambda for the whole config
    router_bias   (MoE, opt-in) expert steering on/off; when on: ``router_bias.top`` N (int) and a
                  layer window ``router_bias.center``/``router_bias.width``: one config entry
                  ``router_bias: {layers: <the window's MoE layers>, experts: "top:N", bias: -inf,
                  tokens}`` (N experts per layer most over-selected on harmful prompts)
    projection    (with ``projection_optional``) on/off: off leaves ``ablate`` empty, so one front
                  holds expert steering alone, projection alone and both

The config emitted has ONE ablate entry per edited layer with a per-target ``scale`` dict, so
the YAML written for a trial bakes to exactly what that trial scored. Pure: no model needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..arch import ArchSpec
from ..config.schema import METHODS, AblateEntry, InterventionConfig, RouterBiasEntry
from ..errors import InputError
from ..io.measurements import Measurements, router_key

WRITE_TARGETS = ("attention", "mlp", "experts", "shared_experts")
MIN_SCALE = 1e-3  # scales below this are left out of the config (the schema needs scale > 0)
WHITEN_RANGE = (0.75, 4.0)  # lambda of maths.whiten: below ~0.5 refusal comes back, above ~8 it is the raw direction
DECIMALS = 4  # rounding of emitted scales/positions: the rounded config is what gets scored


@dataclass(frozen=True)
class Range:
    """A float parameter; ``low == high`` fixes it (not suggested to the sampler); ``log``
    samples it log-uniformly (needs ``low > 0``)."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high < self.low:
            raise InputError(f"search range [{self.low}, {self.high}] is empty or not finite")
        if self.log and self.low <= 0:
            raise InputError(f"log-scale search range [{self.low}, {self.high}] must be > 0")

    def suggest(self, trial: Any, name: str) -> float:
        if self.low == self.high:
            return float(self.low)
        return float(trial.suggest_float(name, self.low, self.high, log=self.log))


@dataclass(frozen=True)
class SearchSpace:
    num_layers: int
    direction: Range  # fractional measured-layer index
    center: Range
    width: Range  # half-width: distance from the centre at which the kernel reaches min
    max_scale: dict[str, Range]  # per write target present in the architecture
    min_fraction: dict[str, Range]
    moe_layers: tuple[int, ...] = ()  # decoder layers holding experts/router
    router: bool = False  # search router on/off (MoE only)
    router_scale: Range = field(default_factory=lambda: Range(0.0, 1.0))
    methods: tuple[str, ...] = ("project", "norm_preserving")
    whiten: Range | None = None  # None: the raw direction
    router_bias: bool = False  # search expert steering (router_bias top:N, -inf) on/off
    router_bias_top: tuple[int, int] = (1, 4)  # N per layer, inclusive
    router_bias_center: Range = field(default_factory=lambda: Range(0.0, 0.0))
    router_bias_width: Range = field(default_factory=lambda: Range(0.5, 0.5))
    router_bias_tokens: str = "last"
    projection_optional: bool = False  # with router_bias: also search projection on/off

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InputError(f"search methods {list(self.methods)} invalid; valid: {', '.join(METHODS)}")
        if not self.max_scale:
            raise InputError("search space has no target to edit")
        if self.router and not self.moe_layers:
            raise InputError("router search needs a MoE model")
        if self.router_bias and not self.moe_layers:
            raise InputError("router_bias search needs a MoE model")
        if not 1 <= self.router_bias_top[0] <= self.router_bias_top[1]:
            raise InputError(f"router_bias top range {list(self.router_bias_top)} must satisfy 1 <= LO <= HI")
        if self.projection_optional and not self.router_bias:
            raise InputError("projection on/off is only searched together with router_bias")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.max_scale)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def default(cls, spec: ArchSpec, model_config: Any, measurements: Measurements,
                targets: list[str] | None = None, router: bool | None = None,
                methods: tuple[str, ...] = ("project", "norm_preserving"),
                direction_range: tuple[float, float] = (0.3, 0.9),
                center_range: tuple[float, float] = (0.3, 1.0),
                width_range: tuple[float, float] = (0.05, 0.6),
                max_scale: tuple[float, float] = (0.6, 1.5),
                min_fraction: tuple[float, float] = (0.0, 1.0),
                whiten_range: tuple[float, float] | str | None = None,
                router_bias: bool = False, router_bias_top: tuple[int, int] = (1, 4),
                router_bias_tokens: str = "last", projection_optional: bool = False,
                regime: str | None = None) -> "SearchSpace":
        """Ranges given as fractions of the last layer index (``direction_range``,
        ``center_range``, ``width_range``) or absolute (scales, ``whiten_range``). ``direction_range``
        is clipped to the measured layers. ``whiten_range`` is searched (log-uniform) when the
        measurements hold the harmless second moment of every measured layer; ``None`` searches the
        raw direction only; ``"auto"``: :data:`WHITEN_RANGE` when the measurements hold the moment,
        else the raw direction. ``router_bias``: also search expert steering (N in ``router_bias_top``,
        clipped to E − top_k; its window over the MoE layers), ranked on the measurements' router
        statistics over ``router_bias_tokens``; ``projection_optional``: also search without projection.
        ``regime`` (``analyze``'s attribution): ``residual`` leaves the routed experts' dimensions out of the
        default targets (they carry little of the direction), any other keeps them."""
        num_layers = int(model_config.num_hidden_layers)
        last = max(num_layers - 1, 1)
        measured = measurements.layers
        if not measured:
            raise InputError(f"measurements {measurements.path or ''} hold no per-layer direction")
        lo = max(float(measured[0]), direction_range[0] * last)
        hi = min(float(measured[-1]), direction_range[1] * last)
        if hi < lo:  # measured layers outside the preferred band: use all of them
            lo, hi = float(measured[0]), float(measured[-1])
        if any(b - a != 1 for a, b in zip(measured, measured[1:])):
            # gaps: interpolation needs both neighbours, so only whole measured layers are safe
            hi = lo = float(min(measured, key=lambda m: abs(m - (direction_range[0] + direction_range[1]) / 2 * last)))
        moe_layers = tuple(layer for layer in range(num_layers) if spec.is_moe_layer(model_config, layer))
        present = [t for t in WRITE_TARGETS if spec.has_target(t) and _at_some_layer(t, moe_layers, num_layers)]
        if targets is None and regime == "residual":
            present = [t for t in present if t != "experts"]
        wanted = list(targets) if targets is not None else present
        bad = [t for t in wanted if t not in WRITE_TARGETS]
        if bad:
            raise InputError(f"search target(s) {', '.join(bad)} not searchable; valid: {', '.join(WRITE_TARGETS)} "
                             "(the router is searched with --router)")
        lacking = [t for t in wanted if t not in present]
        if lacking:
            raise InputError(f"target(s) {', '.join(lacking)} not present in this '{spec.name}' model; "
                             f"valid: {', '.join(present)}")
        has_moment = all(measurements.has_moment(layer) for layer in measured)
        if whiten_range == "auto":
            whiten_range = WHITEN_RANGE if has_moment else None
        elif isinstance(whiten_range, str):
            raise InputError(f"whiten range must be 'auto', None or (low, high), got {whiten_range!r}")
        whiten = None
        if whiten_range is not None:
            if not has_moment:
                raise InputError(
                    f"measurements {measurements.path or ''} have no harmless second moment "
                    "('harmless_moment.*', stored by `intervene measure` with --whiten-rank > 0): re-measure, "
                    "or search the raw direction (--whiten off)")
            whiten = Range(float(whiten_range[0]), float(whiten_range[1]), log=True)
        rb: dict[str, Any] = {}
        if router_bias:
            if not moe_layers:
                raise InputError(f"router_bias search needs a MoE model; '{spec.name}' has no experts")
            lacking = [layer for layer in moe_layers
                       if router_key("harmful", "freq", router_bias_tokens, layer) not in measurements.tensors]
            if lacking:
                raise InputError(f"router_bias search ranks experts on "
                                 f"'{router_key('harmful', 'freq', router_bias_tokens, lacking[0])}', not in "
                                 f"{measurements.path or 'the measurements'}: re-measure with `intervene measure`")
            most = max(1, spec.num_experts(model_config) - max(1, spec.top_k(model_config)))
            lo_n, hi_n = min(router_bias_top[0], most), min(router_bias_top[1], most)
            rb = dict(router_bias=True, router_bias_top=(lo_n, hi_n), router_bias_tokens=router_bias_tokens,
                      router_bias_center=Range(float(moe_layers[0]), float(moe_layers[-1])),
                      router_bias_width=Range(0.5, max(0.5, round(width_range[1] * last, 3))),
                      projection_optional=projection_optional)
        return cls(
            num_layers=num_layers,
            direction=Range(round(lo, 3), round(hi, 3)),
            center=Range(round(center_range[0] * last, 3), round(center_range[1] * last, 3)),
            width=Range(round(max(0.5, width_range[0] * last), 3), round(max(0.5, width_range[1] * last), 3)),
            max_scale={t: Range(*max_scale) for t in wanted},
            min_fraction={t: Range(*min_fraction) for t in wanted},
            moe_layers=moe_layers,
            router=bool(moe_layers) if router is None else router,
            methods=tuple(methods),
            whiten=whiten,
            **rb,
        )

    # ---- sampling ----------------------------------------------------------------------
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw one point; the returned dict is what :meth:`to_config` needs (fixed values included)."""
        params: dict[str, Any] = {
            "direction": self.direction.suggest(trial, "direction"),
            "center": self.center.suggest(trial, "center"),
            "width": self.width.suggest(trial, "width"),
        }
        for target in self.targets:
            params[f"{target}.max"] = self.max_scale[target].suggest(trial, f"{target}.max")
            params[f"{target}.min"] = self.min_fraction[target].suggest(trial, f"{target}.min")
        if self.router:
            params["router"] = bool(trial.suggest_categorical("router", [False, True]))
            if params["router"]:
                params["router.scale"] = self.router_scale.suggest(trial, "router.scale")
        params["method"] = (self.methods[0] if len(self.methods) == 1
                            else str(trial.suggest_categorical("method", list(self.methods))))
        if self.whiten is not None:
            params["whiten"] = self.whiten.suggest(trial, "whiten")
        if self.router_bias:
            params["router_bias"] = bool(trial.suggest_categorical("router_bias", [False, True]))
            if params["router_bias"]:
                lo, hi = self.router_bias_top
                params["router_bias.top"] = lo if lo == hi else int(trial.suggest_int("router_bias.top", lo, hi))
                params["router_bias.center"] = self.router_bias_center.suggest(trial, "router_bias.center")
                params["router_bias.width"] = self.router_bias_width.suggest(trial, "router_bias.width")
                if self.projection_optional:
                    params["projection"] = bool(trial.suggest_categorical("projection", [True, False]))
        return params

    def router_bias_layers(self, params: dict[str, Any]) -> list[int]:
        """The MoE layers of the router_bias window (the MoE layer nearest the centre if it holds none)."""
        center, width = float(params["router_bias.center"]), float(params["router_bias.width"])
        layers = [layer for layer in window(center, width, self.num_layers) if layer in self.moe_layers]
        return layers or [min(self.moe_layers, key=lambda layer: (abs(layer - center), layer))]

    # ---- params -> config --------------------------------------------------------------
    def layer_scales(self, params: dict[str, Any]) -> dict[int, dict[str, float]]:
        """Per edited layer, the scale of each target (those below MIN_SCALE left out)."""
        center, width = float(params["center"]), float(params["width"])
        out: dict[int, dict[str, float]] = {}
        for layer in window(center, width, self.num_layers):
            moe = layer in self.moe_layers
            scales: dict[str, float] = {}
            for target in self.targets:
                if (target == "mlp" and moe) or (target in ("experts", "shared_experts") and not moe):
                    continue  # absent at this layer
                top = float(params[f"{target}.max"])
                s = kernel(layer, center, width, top, top * float(params[f"{target}.min"]))
                s = round(s, DECIMALS)
                if s >= MIN_SCALE:
                    scales[target] = s
            if moe and params.get("router"):
                s = round(float(params["router.scale"]), DECIMALS)
                if s >= MIN_SCALE:
                    scales["router"] = s
            if scales:
                out[layer] = scales
        return out

    def to_config(self, params: dict[str, Any], model: str | None = None, measurements: str | None = None,
                  name: str | None = None, notes: str | None = None) -> InterventionConfig:
        measurement: int | float = round(float(params["direction"]), DECIMALS - 1)
        if float(measurement).is_integer():
            measurement = int(measurement)
        per_layer = self.layer_scales(params)
        if not per_layer:  # a window with every scale under MIN_SCALE: edit the centre layer minimally
            layer = min(max(int(round(float(params["center"]))), 0), self.num_layers - 1)
            per_layer = {layer: {self.targets[0]: MIN_SCALE}}
        used = [t for t in (*WRITE_TARGETS, "router") if any(t in s for s in per_layer.values())]
        entries = [AblateEntry(layers=[layer], measurement=measurement, scale=dict(scales))
                   for layer, scales in sorted(per_layer.items())]
        whiten = round(float(params["whiten"]), DECIMALS) if params.get("whiten") is not None else None
        router_bias = []
        if params.get("router_bias"):
            router_bias = [RouterBiasEntry(layers=self.router_bias_layers(params), bias=float("-inf"),
                                           top=int(params["router_bias.top"]), tokens=self.router_bias_tokens)]
            if params.get("projection") is False:
                entries, used, whiten = [], None, None
        return InterventionConfig(ablate=entries, model=model, measurements=measurements,
                                  method=str(params["method"]), whiten=whiten, targets=used, name=name, notes=notes,
                                  router_bias=router_bias)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = list(self.methods)
        d["moe_layers"] = list(self.moe_layers)
        if self.whiten is None:  # absent, not null: spaces saved before whitening existed compare equal
            d.pop("whiten")
        if not self.router_bias:  # likewise for spaces saved before router_bias existed
            for key in ("router_bias", "router_bias_top", "router_bias_center", "router_bias_width",
                        "router_bias_tokens", "projection_optional"):
                d.pop(key)
        else:
            d["router_bias_top"] = list(self.router_bias_top)
        return d


def seed_params(space: SearchSpace, config: InterventionConfig) -> dict[str, Any]:
    """The parameters of ``space`` closest to a recommended ``config`` (one ``ablate`` entry over a window,
    one direction, flat scale), for :func:`intervene.search.study.run_search` to try first: only the
    parameters the space searches (fixed ones are not suggested), each clipped to its range."""
    entry = config.ablate[0]
    layers = entry.layers
    scale = float(entry.scale) if not isinstance(entry.scale, dict) else 1.0
    center, width = (layers[0] + layers[-1]) / 2, max((layers[-1] - layers[0]) / 2, 0.5)
    wanted: dict[str, tuple[Range, Any]] = {
        "direction": (space.direction, float(entry.measurement)),
        "center": (space.center, center), "width": (space.width, width)}
    for target in space.targets:
        on = config.targets is None or target in config.targets
        wanted[f"{target}.max"] = (space.max_scale[target], scale if on else space.max_scale[target].low)
        wanted[f"{target}.min"] = (space.min_fraction[target], 1.0 if on else space.min_fraction[target].low)
    if space.whiten is not None:
        wanted["whiten"] = (space.whiten, math.sqrt(space.whiten.low * space.whiten.high))
    params: dict[str, Any] = {name: round(min(max(value, rng.low), rng.high), DECIMALS)
                              for name, (rng, value) in wanted.items() if rng.low != rng.high}
    if space.router:
        params["router"] = False
    if len(space.methods) > 1:
        params["method"] = config.method if config.method in space.methods else space.methods[0]
    if space.router_bias:
        params["router_bias"] = False
    return params


def _at_some_layer(target: str, moe_layers: tuple[int, ...], num_layers: int) -> bool:
    if target == "mlp":
        return len(moe_layers) < num_layers
    if target in ("experts", "shared_experts"):
        return bool(moe_layers)
    return True


def window(center: float, width: float, num_layers: int) -> list[int]:
    """Layers within ``width`` of ``center`` (inclusive), clipped to the model."""
    lo = max(0, math.ceil(center - width - 1e-9))
    hi = min(num_layers - 1, math.floor(center + width + 1e-9))
    return list(range(lo, hi + 1))


def kernel(layer: int, center: float, width: float, max_scale: float, min_scale: float) -> float:
    """Linear taper: ``max_scale`` at the centre, ``min_scale`` at distance ``width``."""
    if width <= 0:
        return max_scale if abs(layer - center) < 1e-9 else 0.0
    distance = min(abs(layer - center) / width, 1.0)
    return max_scale + (min_scale - max_scale) * distance


__all__ = ["Range", "SearchSpace", "seed_params", "window", "kernel", "WRITE_TARGETS", "MIN_SCALE"]
