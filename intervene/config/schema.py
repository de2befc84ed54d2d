"""The intervention config (YAML): its schema, parsed and checked on its own (no model needed) into
:class:`InterventionConfig`; unknown keys and bad values are a :class:`~intervene.errors.ConfigError`
naming the key and what is valid. Checking against a model and expanding to edits is
:mod:`intervene.config.resolve`; the annotated schema is in docs/config.md."""

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
            "router_bias", "dtype", "device_map", "system_prompt", "chat_template", "name", "notes", "indexing")
ENTRY_KEYS = ("layer", "layers", "measurement", "scale", "sparsity", "targets", "keep", "biprojection_mean")
DTYPE_NAMES = tuple(DTYPES)
RouterTokens = Literal["last", "user", "all"]  # which router statistics rank 'top:N' (intervene.io.measurements)
ROUTER_TOKENS: tuple[str, ...] = get_args(RouterTokens)
ROUTER_BIAS_KEYS = ("layer", "layers", "experts", "bias", "tokens")


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
class RouterBiasEntry:
    """``router_bias`` entry: add ``bias`` to the selection score of ``experts`` (ids) or of the
    ``top`` experts per layer most over-selected on harmful prompts (risk difference
    p_harmful − p_harmless of the measurements' router statistics over ``tokens``), at ``layers``.
    ``-inf``: never chosen. Where the architecture adds it: :attr:`intervene.arch.ArchSpec.selection_bias`."""

    layers: list[int]
    bias: float
    experts: list[int] | None = None  # explicit ids, or None with ``top``
    top: int | None = None  # "top:N"
    tokens: RouterTokens = "last"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layers": list(self.layers),
                             "experts": f"top:{self.top}" if self.top is not None else list(self.experts or []),
                             "bias": _bias_text(self.bias)}
        if self.top is not None:
            d["tokens"] = self.tokens
        return d


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
    router_bias: list[RouterBiasEntry] = field(default_factory=list)  # MoE only; see RouterBiasEntry

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source", None)
        d["ablate"] = [_entry_to_dict(e) for e in self.ablate]
        d["router_bias"] = [e.to_dict() for e in self.router_bias] or None  # absent when unused
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
    raw_bias = data.get("router_bias")
    if raw_bias is not None and (not isinstance(raw_bias, list) or not raw_bias):
        raise ConfigError(f"{where}: 'router_bias' must be a non-empty list of {{layers, experts, bias}}")
    router_bias = [_router_bias_entry(e, i, where) for i, e in enumerate(raw_bias or [])]
    raw_entries = data.get("ablate", [] if router_bias else None)
    if raw_entries is None and router_bias:
        raw_entries = []
    if not isinstance(raw_entries, list) or (not raw_entries and not router_bias):
        raise ConfigError(f"{where}: 'ablate' must be a non-empty list of {{layer, measurement, scale, sparsity}} "
                          "(it may be empty when 'router_bias' is given)")
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
        name=data.get("name"), notes=data.get("notes"), indexing=indexing, router_bias=router_bias,
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


def _entry_layers(raw: Any, here: str, keys: tuple[str, ...], what: str) -> list[int]:
    """A list entry's shape (a mapping of known keys) and its 'layer'/'layers'."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{here} must be a mapping with {what}")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ConfigError(f"{here}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(keys)}")
    if ("layer" in raw) == ("layers" in raw):
        raise ConfigError(f"{here}: give exactly one of 'layer' or 'layers'")
    return parse_layers(raw.get("layer", raw.get("layers")), here)


def _entry(raw: Any, index: int, where: str) -> AblateEntry:
    here = f"{where}: ablate[{index}]"
    layers = _entry_layers(raw, here, ENTRY_KEYS, "layer/layers, measurement, scale, sparsity")
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


def _bias_text(bias: float) -> float | str:
    """YAML/JSON spelling of a bias: infinities as the strings '-inf'/'inf' (JSON has no infinity)."""
    return ("-inf" if bias < 0 else "inf") if math.isinf(bias) else bias


def _bias(value: Any, here: str) -> float:
    spelled = {"-inf": -math.inf, "-.inf": -math.inf, "-infinity": -math.inf, "inf": math.inf, "+inf": math.inf,
               ".inf": math.inf, "infinity": math.inf, "nan": math.nan, ".nan": math.nan}
    if isinstance(value, str) and value.strip().lower() in spelled:
        value = spelled[value.strip().lower()]
    b = _number(value, here, "bias")
    if math.isnan(b):
        raise ConfigError(f"{here}: bias is NaN; give a number or -inf (never chosen)")
    if b == math.inf:
        raise ConfigError(f"{here}: bias +inf is not allowed (softmax routers turn it into NaN); force an expert with "
                          "a large finite bias, e.g. 1e4")
    return b


def _router_bias_entry(raw: Any, index: int, where: str) -> RouterBiasEntry:
    here = f"{where}: router_bias[{index}]"
    layers = _entry_layers(raw, here, ROUTER_BIAS_KEYS, "layers, experts, bias")
    if "bias" not in raw:
        raise ConfigError(f"{here}: missing 'bias' (added to the experts' selection score; -inf = never chosen)")
    bias = _bias(raw["bias"], here)
    experts = raw.get("experts")
    ids: list[int] | None = None
    top: int | None = None
    if isinstance(experts, str) and experts.startswith("top:") and experts[4:].isdigit() and int(experts[4:]) > 0:
        top = int(experts[4:])
    elif isinstance(experts, int) and not isinstance(experts, bool) and experts >= 0:
        ids = [experts]
    elif isinstance(experts, list) and experts and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in experts):
        ids = sorted(set(experts))
    else:
        raise ConfigError(f"{here}: experts must be a non-empty list of expert ids or 'top:N' (N >= 1), got {experts!r}")
    tokens = raw.get("tokens", "last")
    if "tokens" in raw and top is None:
        raise ConfigError(f"{here}: 'tokens' only applies to experts: 'top:N'")
    if tokens not in ROUTER_TOKENS:
        raise ConfigError(f"{here}: tokens '{tokens}' unknown; valid: {', '.join(ROUTER_TOKENS)}")
    return RouterBiasEntry(layers=layers, bias=bias, experts=ids, top=top, tokens=tokens)
