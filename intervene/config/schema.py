"""The intervention config (YAML): its schema, parsed and checked on its own (no model needed) into
:class:`InterventionConfig`; unknown keys and bad values are a :class:`~intervene.errors.ConfigError`
naming the key and what is valid. Checking against a model and expanding to edits is
:mod:`intervene.config.resolve`; the annotated schema is in the README ("Config (YAML)")."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from ..arch import ALL_TARGETS, WRITE_TARGETS, ArchSpec, Target
from ..errors import ConfigError, InputError
from ..io.models import DTYPES

Method = Literal["project", "norm_preserving"]
METHODS: tuple[str, ...] = get_args(Method)
Measurement = int | float | Literal["embed"]  # a layer index, a fractional one (interpolated), or the embedding
Experts = Literal["all"] | list[int] | dict[int, list[int]]  # every MoE layer's experts, these ids, or per layer
# what a 'measurement' / 'biprojection_mean' number names: the output of decoder layer M (intervene's
# measurements), or hidden state M (the reference tool's refuse_M / harmless_M: 0 = embeddings, M = output
# of decoder layer M - 1). None: layer_output, except against measurements converted from a .refuse file,
# which need it said (config.resolve refuses to guess)
Indexing = Literal["layer_output", "hidden_state"]
INDEXINGS: tuple[str, ...] = get_args(Indexing)
TOP_KEYS = ("model", "measurements", "output", "method", "biprojection", "whiten", "targets", "experts", "ablate",
            "dtype", "device_map", "system_prompt", "chat_template", "name", "notes", "indexing")
ENTRY_KEYS = ("layer", "layers", "measurement", "scale", "sparsity", "targets", "keep", "biprojection_mean")
DTYPE_NAMES = tuple(DTYPES)


@dataclass
class AblateEntry:
    layers: list[int]
    measurement: Measurement
    scale: float | dict[Target, float] = 1.0
    sparsity: float = 0.0
    targets: list[Target] | None = None
    keep: int | None = None  # keep the `keep` largest-magnitude components (the reference's sparsity), else sparsity
    biprojection_mean: int | Literal["embed"] | None = None  # orthogonalise against harmless_mean.{this}

    def scale_for(self, target: Target) -> float | None:
        if isinstance(self.scale, dict):
            return self.scale.get(target)
        return self.scale


@dataclass
class InterventionConfig:
    ablate: list[AblateEntry]
    model: str | None = None
    measurements: str | None = None
    output: str | None = None
    method: Method = "project"
    biprojection: bool = False
    whiten: float | None = None  # None: the raw direction; > 0: harmless-whitened (maths.whiten)
    targets: list[Target] | None = None  # None: every write-side target the architecture has
    experts: Experts = "all"
    dtype: str | None = None
    device_map: str | None = None
    system_prompt: str | None = None
    chat_template: bool = True
    name: str | None = None
    notes: str | None = None
    indexing: Indexing | None = None
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

    def targets_for(self, entry: AblateEntry, spec: ArchSpec) -> list[Target]:
        if entry.targets is not None:
            return list(entry.targets)
        if self.targets is not None:
            return list(self.targets)
        return [t for t in WRITE_TARGETS if spec.has_target(t)]


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
    if e.keep is not None:
        d["keep"] = e.keep
    if e.biprojection_mean is not None:
        d["biprojection_mean"] = e.biprojection_mean
    return d


# ---- parsing ------------------------------------------------------------------------------

def load_config(path: str | os.PathLike) -> InterventionConfig:
    path = Path(path)
    cfg = parse_config(read_yaml(path), where=str(path))
    cfg.source = str(path)
    cfg.model, cfg.measurements = beside(path, cfg.model), beside(path, cfg.measurements)
    return cfg


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path`` (named errors for a missing, non-YAML or non-UTF-8 file)."""
    if not path.exists():
        raise InputError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def beside(config_path: Path, value: str | None) -> str | None:
    """A model/measurements path given relative to the config file is found there; otherwise the
    path is taken as given (relative to the working directory), like 'output'."""
    if value and not os.path.isabs(value) and (config_path.parent / value).exists():
        return str(config_path.parent / value)
    return value


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
    indexing = data.get("indexing")
    if indexing is not None and indexing not in INDEXINGS:
        raise ConfigError(f"{where}: indexing '{indexing}' unknown; valid: {', '.join(INDEXINGS)}")
    if indexing == "hidden_state":
        for i, e in enumerate(entries):
            for value, key in ((e.measurement, "measurement"), (e.biprojection_mean, "biprojection_mean")):
                if value is not None and value != "embed" and float(value) < 1 and value != 0:
                    raise ConfigError(f"{where}: ablate[{i}] {key} {value}: with indexing: hidden_state a fractional "
                                      "index must be >= 1 (0 is the embeddings)")
    if data.get("dtype") is not None and data["dtype"] not in DTYPE_NAMES:
        raise ConfigError(f"{where}: dtype '{data['dtype']}' unknown; valid: {', '.join(DTYPE_NAMES)}")
    return InterventionConfig(
        ablate=entries, model=data.get("model"), measurements=data.get("measurements"), output=data.get("output"),
        method=method, biprojection=biprojection, whiten=whiten, targets=targets, experts=experts, dtype=data.get("dtype"),
        device_map=data.get("device_map"), system_prompt=data.get("system_prompt"), chat_template=chat_template,
        name=data.get("name"), notes=data.get("notes"), indexing=indexing,
    )


def _targets(value: Any, where: str, what: str) -> list[Target]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: '{what}' must be a non-empty list of targets ({', '.join(ALL_TARGETS)})")
    bad = [t for t in value if t not in ALL_TARGETS]
    if bad:
        raise ConfigError(f"{where}: unknown target(s) {', '.join(map(repr, bad))} in '{what}'; valid: {', '.join(ALL_TARGETS)}")
    return list(dict.fromkeys(value))


def _experts(value: Any, where: str) -> Experts:
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
        scale: float | dict[Target, float] = {t: _scale(v, f"{here} scale.{t}") for t, v in scale_raw.items()}
    else:
        scale = _scale(scale_raw, here)
    sparsity = _number(raw.get("sparsity", 0.0), here, "sparsity")
    if math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"{here}: sparsity must be in [0, 1), got {raw.get('sparsity')!r}")
    targets = _targets(raw["targets"], here, "targets") if "targets" in raw else None
    keep = raw.get("keep")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"{here}: keep must be a whole number of components >= 1, got {keep!r}")
        if sparsity > 0:
            raise ConfigError(f"{here}: give 'keep' (components kept) or 'sparsity' (fraction zeroed), not both")
    bmean = raw.get("biprojection_mean")
    if bmean is not None and (isinstance(bmean, bool) or not (bmean == "embed" or (isinstance(bmean, int) and bmean >= 0))):
        raise ConfigError(f"{here}: biprojection_mean must be a measured layer index or 'embed', got {bmean!r}")
    return AblateEntry(layers=layers, measurement=meas, scale=scale, sparsity=sparsity, targets=targets, keep=keep,
                       biprojection_mean=bmean)
