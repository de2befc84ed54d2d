"""The intervention config (YAML): parse, validate against a model, resolve to per-layer edits.

Live hooks (``intervene.apply``) and the bake consume the SAME resolved list of
:class:`LayerEdit`, so the directions, scales and orders they use are identical.

Schema (jim-plus compatible, extended)::

    model: path/to/model            # HF dir or GGUF file
    measurements: measurements.safetensors
    output: path/for/bake           # used by bake
    method: project                 # project | norm_preserving
    biprojection: true              # orthogonalise r against the TARGET layer's harmless mean
    whiten: 1.5                     # optional: use (M + whiten·tr(M)/H·I)^-1 r instead of r, M = the
                                    # harmless second moment at the SOURCE layer (measurements'
                                    # harmless_moment.*); keeps refusal, moves harmless outputs less
    targets: [attention, mlp]       # write side: attention, mlp, experts, shared_experts;
                                    # read side: router, expert_inputs
    experts: all                    # or [ids] (every MoE layer) or {layer: [ids]}
    ablate:
      - layer: 18                   # decoder layer whose modules are edited
        measurement: 18             # direction source: a layer index, a float (interpolated) or "embed"
        scale: 1.0                  # or per target: {attention: 1.0, mlp: 0.5}
        sparsity: 0.0
        targets: [attention]        # optional, overrides the top-level list for this entry
      - layers: "10:26"             # python-style range, end exclusive; or a list [10, 12]
        measurement: 18
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import maths
from ..arch import ALL_TARGETS, ArchSpec
from ..errors import ConfigError, InputError
from ..io.measurements import Measurements

METHODS = ("project", "norm_preserving")
TOP_KEYS = ("model", "measurements", "output", "method", "biprojection", "whiten", "targets", "experts", "ablate",
            "dtype", "device_map", "system_prompt", "chat_template", "name", "notes")
ENTRY_KEYS = ("layer", "layers", "measurement", "scale", "sparsity", "targets")
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto")  # as intervene.io.models.DTYPES


@dataclass
class AblateEntry:
    layers: list[int]
    measurement: int | float | str
    scale: float | dict[str, float] = 1.0
    sparsity: float = 0.0
    targets: list[str] | None = None

    def scale_for(self, target: str) -> float | None:
        if isinstance(self.scale, dict):
            return self.scale.get(target)
        return self.scale


@dataclass
class InterventionConfig:
    ablate: list[AblateEntry]
    model: str | None = None
    measurements: str | None = None
    output: str | None = None
    method: str = "project"
    biprojection: bool = False
    whiten: float | None = None  # None: the raw direction; > 0: harmless-whitened (maths.whiten)
    targets: list[str] | None = None  # None: every write-side target the architecture has
    experts: str | list[int] | dict[int, list[int]] = "all"
    dtype: str | None = None
    device_map: str | None = None
    system_prompt: str | None = None
    chat_template: bool = True
    name: str | None = None
    notes: str | None = None
    source: str | None = field(default=None, compare=False)  # path it was read from

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source", None)
        d["ablate"] = [_entry_to_dict(e) for e in self.ablate]
        return {k: v for k, v in d.items() if v is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())

    def experts_for(self, layer: int) -> tuple[int, ...] | None:
        """None means all experts."""
        if self.experts == "all":
            return None
        if isinstance(self.experts, dict):
            ids = self.experts.get(layer)
            return None if ids is None else tuple(ids)
        return tuple(self.experts)

    def targets_for(self, entry: AblateEntry, spec: ArchSpec) -> list[str]:
        if entry.targets is not None:
            return list(entry.targets)
        if self.targets is not None:
            return list(self.targets)
        return [t for t in ("attention", "mlp", "experts", "shared_experts") if spec.has_target(t)]


def _entry_to_dict(e: AblateEntry) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if len(e.layers) == 1:
        d["layer"] = e.layers[0]
    else:
        d["layers"] = list(e.layers)
    d["measurement"] = e.measurement
    d["scale"] = e.scale
    d["sparsity"] = e.sparsity
    if e.targets is not None:
        d["targets"] = list(e.targets)
    return d


# ---- parsing ------------------------------------------------------------------------------

def load_config(path: str | os.PathLike) -> InterventionConfig:
    path = Path(path)
    if not path.exists():
        raise InputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    cfg = parse_config(data, where=str(path))
    cfg.source = str(path)
    base = path.parent
    # model/measurements given relative to the config file are found there; otherwise the
    # path is taken as given (relative to the working directory), like 'output'
    for attr in ("model", "measurements"):
        value = getattr(cfg, attr)
        if value and not os.path.isabs(value) and (base / value).exists():
            setattr(cfg, attr, str(base / value))
    return cfg


def parse_config(data: Any, where: str = "config") -> InterventionConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping with an 'ablate' list")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(TOP_KEYS)}")
    method = data.get("method", "project")
    if method not in METHODS:
        raise ConfigError(f"{where}: method '{method}' unknown; valid: {', '.join(METHODS)}")
    targets = data.get("targets")
    if targets is not None:
        targets = _targets(targets, where, "targets")
    experts = _experts(data.get("experts", "all"), where)
    raw_entries = data.get("ablate")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise ConfigError(f"{where}: 'ablate' must be a non-empty list of {{layer, measurement, scale, sparsity}}")
    entries = [_entry(e, i, where) for i, e in enumerate(raw_entries)]
    biprojection = data.get("biprojection", False)
    if not isinstance(biprojection, bool):
        raise ConfigError(f"{where}: biprojection must be true or false, got {biprojection!r}")
    whiten = data.get("whiten")
    if whiten is not None:
        whiten = _number(whiten, where, "whiten")
        if not (math.isfinite(whiten) and whiten > 0):
            raise ConfigError(f"{where}: whiten must be a finite number > 0 (leave it out for the raw direction), "
                              f"got {data.get('whiten')!r}")
    chat_template = data.get("chat_template", True)
    if not isinstance(chat_template, bool):
        raise ConfigError(f"{where}: chat_template must be true or false, got {chat_template!r}")
    for key in ("model", "measurements", "output", "dtype", "device_map", "system_prompt", "name", "notes"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {data[key]!r}")
    if data.get("dtype") is not None and data["dtype"] not in DTYPE_NAMES:
        raise ConfigError(f"{where}: dtype '{data['dtype']}' unknown; valid: {', '.join(DTYPE_NAMES)}")
    return InterventionConfig(
        ablate=entries, model=data.get("model"), measurements=data.get("measurements"), output=data.get("output"),
        method=method, biprojection=biprojection, whiten=whiten, targets=targets, experts=experts, dtype=data.get("dtype"),
        device_map=data.get("device_map"), system_prompt=data.get("system_prompt"), chat_template=chat_template,
        name=data.get("name"), notes=data.get("notes"),
    )


def _targets(value: Any, where: str, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: '{what}' must be a non-empty list of targets ({', '.join(ALL_TARGETS)})")
    bad = [t for t in value if t not in ALL_TARGETS]
    if bad:
        raise ConfigError(f"{where}: unknown target(s) {', '.join(map(repr, bad))} in '{what}'; valid: {', '.join(ALL_TARGETS)}")
    return list(dict.fromkeys(value))


def _experts(value: Any, where: str) -> str | list[int] | dict[int, list[int]]:
    if value == "all":
        return "all"
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value) and value:
        return sorted(set(value))
    if isinstance(value, dict) and value:
        out: dict[int, list[int]] = {}
        for k, v in value.items():
            if not (isinstance(k, int) or (isinstance(k, str) and k.isdigit())):
                raise ConfigError(f"{where}: 'experts' keys must be layer numbers, got {k!r}")
            if not (isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)):
                raise ConfigError(f"{where}: 'experts' for layer {k} must be a non-empty list of expert ids")
            out[int(k)] = sorted(set(v))
        return out
    raise ConfigError(f"{where}: 'experts' must be 'all', a list of expert ids, or a mapping layer -> ids; got {value!r}")


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {what} must be a number, got {value!r}")
    return float(value)


def _scale(value: Any, where: str) -> float:
    s = _number(value, where, "scale")
    if math.isnan(s) or math.isinf(s) or s <= 0:
        raise ConfigError(f"{where}: scale must be a finite number > 0, got {value!r}")
    return s


def parse_layers(value: Any, where: str) -> list[int]:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: layers must be ints, a list, or a range 'a:b', got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    if isinstance(value, str) and ":" in value:
        a, _, b = value.partition(":")
        try:
            lo, hi = int(a), int(b)
        except ValueError:
            raise ConfigError(f"{where}: layer range {value!r} must look like 'start:end' (end exclusive)") from None
        if hi <= lo:
            raise ConfigError(f"{where}: layer range {value!r} is empty (end is exclusive)")
        return list(range(lo, hi))
    raise ConfigError(f"{where}: layers must be an int, a list of ints, or a range 'a:b', got {value!r}")


def _entry(raw: Any, index: int, where: str) -> AblateEntry:
    here = f"{where}: ablate[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{here} must be a mapping with layer/layers, measurement, scale, sparsity")
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"{here}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(ENTRY_KEYS)}")
    if ("layer" in raw) == ("layers" in raw):
        raise ConfigError(f"{here}: give exactly one of 'layer' or 'layers'")
    layers = parse_layers(raw.get("layer", raw.get("layers")), here)
    if "measurement" not in raw:
        raise ConfigError(f"{here}: missing 'measurement' (the layer whose direction is used)")
    meas = raw["measurement"]
    if isinstance(meas, bool) or not (isinstance(meas, (int, float)) or meas == "embed"):
        raise ConfigError(f"{here}: measurement must be a layer index, a fractional index, or 'embed'; got {meas!r}")
    if not isinstance(meas, str) and (math.isnan(meas) or math.isinf(meas) or meas < 0):
        raise ConfigError(f"{here}: measurement must be a finite layer index >= 0, got {meas!r}")
    if isinstance(meas, float) and meas.is_integer():
        meas = int(meas)
    scale_raw = raw.get("scale", 1.0)
    if isinstance(scale_raw, dict):
        bad = [t for t in scale_raw if t not in ALL_TARGETS]
        if bad:
            raise ConfigError(f"{here}: unknown target(s) {', '.join(map(repr, bad))} in scale; valid: {', '.join(ALL_TARGETS)}")
        scale: float | dict[str, float] = {t: _scale(v, f"{here} scale.{t}") for t, v in scale_raw.items()}
    else:
        scale = _scale(scale_raw, here)
    sparsity = _number(raw.get("sparsity", 0.0), here, "sparsity")
    if math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"{here}: sparsity must be in [0, 1), got {raw.get('sparsity')!r}")
    targets = _targets(raw["targets"], here, "targets") if "targets" in raw else None
    return AblateEntry(layers=layers, measurement=meas, scale=scale, sparsity=sparsity, targets=targets)


# ---- validation against a model and resolution ----------------------------------------------

@dataclass(frozen=True)
class LayerEdit:
    """One resolved edit: project unit ``direction`` (float32, [H]) out of ``target`` at ``layer``."""

    layer: int
    target: str
    direction: torch.Tensor
    scale: float
    method: str
    experts: tuple[int, ...] | None  # routed-expert subset (experts / expert_inputs); None = all


def validate(cfg: InterventionConfig, spec: ArchSpec, model_config: Any, measurements: Measurements) -> None:
    """Named errors for anything the model or the measurements file cannot satisfy."""
    num_layers = int(model_config.num_hidden_layers)
    hidden = int(model_config.hidden_size)
    measurements.check_model(hidden, None)
    where = cfg.source or "config"
    lacking = [t for t in (cfg.targets or []) if not spec.has_target(t)]
    for i, e in enumerate(cfg.ablate):
        lacking += [t for t in (e.targets or []) if not spec.has_target(t)]
        if isinstance(e.scale, dict):
            lacking += [t for t in e.scale if not spec.has_target(t)]
    if lacking:
        raise ConfigError(
            f"{where}: target(s) {', '.join(sorted(set(lacking)))} not present in architecture '{spec.name}'; "
            f"valid: {', '.join(spec.targets)}"
        )
    for i, e in enumerate(cfg.ablate):
        if isinstance(e.scale, dict):
            unused = [t for t in e.scale if t not in cfg.targets_for(e, spec)]
            if unused:
                raise ConfigError(
                    f"{where}: ablate[{i}] scale names {', '.join(unused)} but the entry's targets are "
                    f"{', '.join(cfg.targets_for(e, spec))}; add it to 'targets'"
                )
    available = measurements.layers
    for i, e in enumerate(cfg.ablate):
        bad = [layer for layer in e.layers if not 0 <= layer < num_layers]
        if bad:
            raise ConfigError(f"{where}: ablate[{i}] layer {bad[0]} out of range; the model has layers 0..{num_layers - 1}")
        m = e.measurement
        needed = ["embed"] if m == "embed" else ([int(m)] if float(m).is_integer() else [int(m), int(m) + 1])
        for n in needed:
            key = f"direction.{n}"
            if key not in measurements.tensors:
                raise ConfigError(
                    f"{where}: ablate[{i}] measurement {m} needs '{key}', not in {measurements.path or 'the measurements'}; "
                    f"measured layers: {available[0] if available else 'none'}..{available[-1] if available else ''}"
                )
            if cfg.whiten is not None and not measurements.has_moment(n):
                raise ConfigError(
                    f"{where}: whiten needs 'harmless_moment.{{eigvals,eigvecs,trace}}.{n}' (ablate[{i}] measurement "
                    f"{m}), not in {measurements.path or 'the measurements'}; re-measure with `intervene measure` "
                    "(--whiten-rank > 0) or drop 'whiten'"
                )
        if cfg.biprojection:
            for layer in e.layers:
                if f"harmless_mean.{layer}" not in measurements.tensors:
                    raise ConfigError(f"{where}: biprojection needs 'harmless_mean.{layer}' (target layer), not in the measurements")
    if cfg.experts != "all":
        n_exp = spec.num_experts(model_config)
        ids = cfg.experts if isinstance(cfg.experts, list) else [i for v in cfg.experts.values() for i in v]
        if not spec.is_moe:
            raise ConfigError(f"{where}: 'experts' subset given but architecture '{spec.name}' has no experts")
        if not any(t in ("experts", "expert_inputs") for e in cfg.ablate for t in cfg.targets_for(e, spec)):
            raise ConfigError(f"{where}: 'experts' subset given but no entry targets experts or expert_inputs")
        bad_ids = [i for i in ids if i >= n_exp]
        if bad_ids:
            raise ConfigError(f"{where}: expert id {bad_ids[0]} out of range; the model has experts 0..{n_exp - 1}")
        if isinstance(cfg.experts, dict):
            bad_layers = [layer for layer in cfg.experts if not spec.is_moe_layer(model_config, layer)]
            if bad_layers:
                raise ConfigError(f"{where}: 'experts' names layer {bad_layers[0]}, which is not a MoE layer")


def entry_direction(cfg: InterventionConfig, entry: AblateEntry, layer: int, measurements: Measurements) -> torch.Tensor:
    """The unit direction an entry uses at target ``layer``: source (each source layer's direction
    whitened against its own harmless second moment when ``whiten`` is set, then interpolated),
    biprojection against the TARGET layer's harmless mean, sparsity, normalisation — in that order."""
    def source(name: int | str) -> torch.Tensor:
        if cfg.whiten is not None:
            return measurements.whitened_direction(name, cfg.whiten)
        return measurements.direction(name).to(torch.float32)

    m = entry.measurement
    if m == "embed":
        r = source("embed")
    else:
        lo = int(float(m) // 1)
        needed = {lo: source(lo)}
        if not float(m).is_integer():
            needed[lo + 1] = source(lo + 1)
        r = maths.interpolate(needed, float(m))
    if cfg.biprojection:
        r = maths.biproject(r, measurements.harmless_mean(layer))
    r = maths.sparsify(r, entry.sparsity)
    return maths.unit(r, f"direction for layer {layer} (measurement {m})")


def resolve(cfg: InterventionConfig, spec: ArchSpec, model_config: Any, measurements: Measurements) -> list[LayerEdit]:
    """Validate, then expand the config into the ordered list of edits that hooks and bake apply."""
    validate(cfg, spec, model_config, measurements)
    edits: list[LayerEdit] = []
    for entry in cfg.ablate:
        targets = cfg.targets_for(entry, spec)
        for layer in entry.layers:
            r_hat = entry_direction(cfg, entry, layer, measurements)
            for target in targets:
                scale = entry.scale_for(target)
                if scale is None:
                    continue
                experts = cfg.experts_for(layer) if target in ("experts", "expert_inputs") else None
                edits.append(LayerEdit(layer, target, r_hat, float(scale), cfg.method, experts))
    return edits
