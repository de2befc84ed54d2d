"""The reference tool's config (jim-plus/llm-abliteration ``sharded_ablate.py`` YAML with its GLM-4.5-Air
MoE keys), read with the meaning its documents give it: :func:`detect` recognises one, :func:`translate`
turns it into an equivalent native :class:`~intervene.config.schema.InterventionConfig` (explicit
targets, scales and indices), and every verb then runs the native path on that — so a reference file
and the output of ``intervene import-config`` bake the same bytes. The meaning, from the seeds:
``refuse_M`` (hidden state M: 0 = embeddings) biprojected against ``harmless_{layer}`` (the residual
entering the target layer), ``sparsity > 0`` keeping the top fraction, normalised; norm-preserving
edits; o_proj + shared experts' down_proj + the router (read side, 0.5 × scale) on MoE layers,
o_proj + mlp.down_proj on dense ones; ``ablate_individual_experts`` adds each expert of
``expert_subset`` (all when null): its down_proj and its gate/up projections (read side)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..arch import ArchSpec, Target, arch_for_config, text_config
from ..errors import ConfigError
from ..io.files import atomic_write_text
from ..io.models import versions
from ..io.sources import load_model_config
from .schema import AblateEntry, InterventionConfig, beside, load_config, read_yaml

TOP_KEYS = ("model", "measurements", "output", "ablate", "ablate_individual_experts", "expert_subset")
ONLY_KEYS = ("ablate_individual_experts", "expert_subset")  # keys a native config does not have
ENTRY_KEYS = ("layer", "measurement", "scale", "sparsity")
ROUTER_FACTOR = 0.5  # seed 002: the routing gate at half the order's scale


@dataclass(frozen=True)
class Order:
    """One reference ``ablate`` entry, in the reference's own numbers."""

    layer: int
    measurement: int  # hidden-state index of refuse_M
    scale: float
    sparsity: float  # the fraction of the direction's components KEPT (0 = all)


@dataclass
class ReferenceConfig:
    orders: list[Order]
    model: str | None = None
    measurements: str | None = None
    output: str | None = None
    ablate_individual_experts: bool = False
    expert_subset: list[int] | None = None
    source: str | None = None
    why: str = ""  # how it was recognised


@dataclass
class Translation:
    """The native equivalent, what each reference entry became, and what it cannot say."""

    config: InterventionConfig
    mapping: list[str] = field(default_factory=list)
    not_expressed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = list(self.mapping)
        if self.not_expressed:
            lines.append("not expressed in the native config:")
            lines += [f"  - {n}" for n in self.not_expressed]
        return "\n".join(lines)


def detect(data: Any, where: str = "config") -> str | None:
    """Why ``data`` is a reference-schema config (its MoE keys, or a ``.refuse`` measurements file with
    only the reference's keys), or None for a native one. Mixing the two schemas is an error."""
    if not isinstance(data, dict):
        return None
    entries = data.get("ablate") if isinstance(data.get("ablate"), list) else []
    native = sorted(set(data) - set(TOP_KEYS))
    native += sorted({k for e in entries if isinstance(e, dict) for k in e if k not in ENTRY_KEYS})
    only = [k for k in ONLY_KEYS if k in data]
    if only:
        if native:
            raise ConfigError(f"{where}: mixes the reference schema's {', '.join(only)} with native key(s) "
                              f"{', '.join(map(repr, native))}; use one schema (`intervene import-config` converts)")
        return f"key {', '.join(only)}"
    meas = data.get("measurements")
    if isinstance(meas, str) and meas.endswith(".refuse") and not native:
        return "a .refuse measurements file and only the reference's keys"
    return None


def parse_reference(data: dict[str, Any], where: str, why: str = "") -> ReferenceConfig:
    for key in ("model", "measurements", "output"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {data[key]!r}")
    raw = data.get("ablate")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'ablate' must be a non-empty list of {{layer, measurement, scale, sparsity}}")
    orders = []
    for i, e in enumerate(raw):
        here = f"{where}: ablate[{i}]"
        missing = [k for k in ENTRY_KEYS if not isinstance(e, dict) or k not in e]
        if missing:  # the reference reads all four with item[...]
            raise ConfigError(f"{here}: the reference schema needs {', '.join(ENTRY_KEYS)}; missing {', '.join(missing)}")
        whole = []
        for key in ("layer", "measurement"):  # the reference reads both with int()
            v = e[key]
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{here}: {key} must be a whole number >= 0 in the reference schema, got {v!r}")
            whole.append(v)
        layer, meas = whole
        values = []
        for key in ("scale", "sparsity"):
            v = e[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{here}: {key} must be a finite number, got {v!r}")
            values.append(float(v))
        scale, sparsity = values
        if scale <= 0:
            raise ConfigError(f"{here}: scale {scale:g}: intervene edits with a scale > 0 only")
        if sparsity < 0:
            raise ConfigError(f"{here}: sparsity must be >= 0 (the fraction of components kept; 0 = all), got {sparsity:g}")
        orders.append(Order(layer, meas, scale, sparsity))
    individual = data.get("ablate_individual_experts", False)
    if individual is None:
        individual = False
    if not isinstance(individual, bool):
        raise ConfigError(f"{where}: ablate_individual_experts must be true or false, got {individual!r}")
    subset = data.get("expert_subset")
    if subset is not None:
        subset = parse_subset(subset, f"{where}: expert_subset")
    return ReferenceConfig(orders=orders, model=data.get("model"), measurements=data.get("measurements"),
                           output=data.get("output"), ablate_individual_experts=individual, expert_subset=subset,
                           source=where, why=why)


def parse_subset(value: Any, where: str) -> list[int]:
    """``[0, 1, 2, 3]`` (YAML) or ``"0,1,2,3"`` (the CLI flag) -> sorted unique expert ids."""
    if isinstance(value, str):
        try:
            value = [int(x.strip()) for x in value.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{where} must be comma-separated expert ids like \"0,1,2,3\", got {value!r}") from None
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ConfigError(f"{where} must be a non-empty list of expert ids >= 0, got {value!r}")
    return sorted(set(value))


def override(ref: ReferenceConfig, ablate_individual_experts: bool = False,
             expert_subset: str | list[int] | None = None) -> ReferenceConfig:
    """The CLI flags over the YAML: ``--ablate-individual-experts`` switches it on; ``--expert-subset``
    names the experts and, as the guide's "Target Specific Experts" example shows, switches it on too."""
    if ablate_individual_experts:
        ref.ablate_individual_experts = True
    if expert_subset is not None:
        ref.expert_subset = parse_subset(expert_subset, "--expert-subset")
        ref.ablate_individual_experts = True
    return ref


def _hidden_index(m: int) -> int | str:
    """Hidden state m (0 = embeddings) as a measurements-file index: the output of decoder layer m - 1."""
    return "embed" if m == 0 else m - 1


def translate(ref: ReferenceConfig, spec: ArchSpec, model_config: Any) -> Translation:
    """The native config that means what ``ref`` means on this architecture."""
    hidden = int(model_config.hidden_size)
    moe_model = spec.is_moe
    individual = ref.ablate_individual_experts and moe_model
    entries: list[AblateEntry] = []
    mapping = [f"{ref.source}: reference schema ({ref.why}) -> native config; per entry:"]
    not_expressed = [
        "the reference code rounds the refined direction to the checkpoint dtype before sparsifying and "
        "normalising; intervene keeps it in float32 (a difference at the dtype's rounding level)",
        "the reference's sparsity keeps every component tied with the k-th largest magnitude; 'keep' keeps "
        "exactly k (equal unless magnitudes tie)",
    ]
    if ref.ablate_individual_experts and not moe_model:
        mapping.append(f"  ablate_individual_experts: {spec.name} has no experts; nothing added (as in the reference)")
    for i, o in enumerate(ref.orders):
        moe_layer = spec.is_moe_layer(model_config, o.layer)
        targets: list[Target] = ["attention"]
        if not moe_layer and spec.has_target("mlp"):
            targets.append("mlp")
        if moe_layer:
            if spec.shared_expert:
                targets.append("shared_experts")
            targets.append("router")
            if individual:
                targets += ["experts", "routed_expert_inputs"]
        scale = {t: (o.scale * ROUTER_FACTOR if t == "router" else o.scale) for t in targets}
        keep = None
        if 0 < o.sparsity < 1:
            keep = int(hidden * o.sparsity)
            if keep < 1:
                raise ConfigError(f"{ref.source}: ablate[{i}] sparsity {o.sparsity:g} keeps int({hidden} x "
                                  f"{o.sparsity:g}) = 0 components: the direction would be zero")
        measurement, harmless = _hidden_index(o.measurement), _hidden_index(o.layer)
        entries.append(AblateEntry(layers=[o.layer], measurement=measurement, scale=scale, sparsity=0.0,
                                   targets=targets, keep=keep, biprojection_mean=harmless))
        what = "dense" if not moe_layer else "MoE"
        mapping.append(
            f"  ablate[{i}] layer {o.layer} ({what}), measurement {o.measurement}, scale {o.scale:g}, sparsity "
            f"{o.sparsity:g} ->\n"
            f"      measurement {measurement} (refuse_{o.measurement} = hidden state {o.measurement}"
            f"{' = the embeddings' if o.measurement == 0 else f' = output of decoder layer {o.measurement - 1}'}); "
            f"biprojection_mean {harmless} (harmless_{o.layer}, the residual entering layer {o.layer}); "
            + (f"keep {keep} (top {o.sparsity:g} of {hidden} components, int({hidden * o.sparsity:g}))" if keep
               else "all components kept")
            + "\n      targets " + ", ".join(f"{t} x{scale[t]:g}" for t in targets)
            + (" (router: 0.5 x scale, read side)" if "router" in targets else "")
            + (f"; experts {ref.expert_subset if ref.expert_subset is not None else 'all'}" if individual and moe_layer else ""))
    if individual and any(not spec.is_moe_layer(model_config, o.layer) for o in ref.orders):
        mapping.append("  ablate_individual_experts: dense layers have no experts; only MoE layers get them")
    cfg = InterventionConfig(
        ablate=entries, model=ref.model, measurements=ref.measurements, output=ref.output, method="norm_preserving",
        biprojection=False,
        experts=(ref.expert_subset if individual and ref.expert_subset is not None
                 and any(spec.is_moe_layer(model_config, o.layer) for o in ref.orders) else "all"),
        indexing="layer_output",
        notes=f"translated by intervene from the reference-schema config {ref.source}",
    )
    cfg.source = ref.source
    mapping.append("  all entries: method norm_preserving (write side: each column keeps its norm; read side: "
                   "each row), indexing layer_output")
    return Translation(config=cfg, mapping=mapping, not_expressed=not_expressed)


def read_reference(path: str | os.PathLike) -> ReferenceConfig | None:
    """The reference config in ``path`` (its model/measurements paths made absolute where they exist,
    so the translation means the same from any directory), or None when it is a native config."""
    path = Path(path)
    data = read_yaml(path)
    why = detect(data, str(path))
    if why is None:
        return None
    ref = parse_reference(data, str(path), why)
    for attr in ("model", "measurements"):
        value = beside(path, getattr(ref, attr))
        setattr(ref, attr, os.path.abspath(value) if value and os.path.exists(value) else value)
    return ref


def translate_file(ref: ReferenceConfig, model: str | os.PathLike | None = None,
                   model_config: Any = None) -> Translation:
    """:func:`translate` against the architecture of ``model_config``, else of ``model``'s config.json
    (default: the config's model)."""
    if model_config is None:
        spec_name = model if model is not None else ref.model
        if spec_name is None:
            raise ConfigError(f"{ref.source}: no 'model' to read the architecture from (set it or pass --model)")
        model_config = load_model_config(str(spec_name))
    return translate(ref, arch_for_config(model_config), text_config(model_config))


def load_any_config(path: str | os.PathLike, *, model: str | os.PathLike | None = None, model_config: Any = None,
                    ablate_individual_experts: bool = False, expert_subset: str | list[int] | None = None,
                    announce: Callable[[str], None] | None = print) -> InterventionConfig:
    """A native config, or a reference one translated (``announce`` gets one line saying so). The
    reference CLI flags (``--ablate-individual-experts``, ``--expert-subset``) override its YAML and are
    an error on a native config, which names experts with ``targets`` and ``experts``."""
    ref = read_reference(path)
    if ref is None:
        if ablate_individual_experts or expert_subset is not None:
            raise ConfigError(f"{path}: --ablate-individual-experts/--expert-subset apply to reference-schema configs; "
                              "this is a native config: add 'experts' and 'routed_expert_inputs' to 'targets' and "
                              "list the ids in 'experts'")
        return load_config(path)
    override(ref, ablate_individual_experts, expert_subset)
    translation = translate_file(ref, model, model_config)
    if announce is not None:
        announce(f"{path}: read as the reference (llm-abliteration sharded_ablate.py) schema ({ref.why}); "
                 f"`intervene import-config {path}` shows the native config it means")
    return translation.config


def import_config(path: str | os.PathLike, output: str | os.PathLike | None = None, *,
                  model: str | os.PathLike | None = None, ablate_individual_experts: bool = False,
                  expert_subset: str | list[int] | None = None) -> Translation:
    """``intervene import-config``: the native config a reference-schema file means, written to
    ``output`` (atomically, with the intervene/transformers/torch versions in its header) when given."""
    ref = read_reference(path)
    if ref is None:
        raise ConfigError(f"{path} is a native intervene config already (no reference-schema keys, no .refuse "
                          "measurements with only the reference's keys): nothing to import")
    override(ref, ablate_individual_experts, expert_subset)
    translation = translate_file(ref, model)
    if output is not None:
        vers = versions()
        header = "".join(f"# {line}\n" for line in [
            f"native intervene config imported from the reference-schema file {os.path.abspath(path)}",
            "by intervene " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items())),
            *translation.describe().splitlines()])
        atomic_write_text(output, header + translation.config.to_yaml())
    return translation


__all__ = ["import_config", "ReferenceConfig", "Order", "Translation", "detect", "parse_reference", "parse_subset", "override",
           "translate", "read_reference", "translate_file", "load_any_config"]
