"""The bound intervention, the contract the live hooks and the bake share: :func:`bind` reads a config
(native or reference schema) and its measurements, checks them against a model's config (named errors
for anything the architecture or the measurements cannot satisfy) and resolves them ONCE into a
:class:`Bound`: one field per kind of edit (``projections``: the ordered :class:`LayerEdit` list;
``router_biases``: per MoE layer the [E] vector added to the selection score), so the directions,
scales and orders tried live and baked are identical and no consumer sorts edits by kind. A new kind
of edit is one entry in ``schema``, one resolver here, one field of :class:`Bound`, and one consumer
each in ``hooks/apply`` (live) and ``bake/plan`` (baked). :func:`resolve` is the same expansion as
one flat list (projections, then :class:`RouterBiasEdit`), for tests and scripts."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from .. import maths
from ..arch import ArchSpec, Target, arch_for_config, text_config
from ..errors import ConfigError
from ..io.measurements import Measurements, measurements_for, router_key
from .reference import load_any_config
from .schema import AblateEntry, InterventionConfig, Measurement, Method, RouterBiasEntry

EXPERT_SUBSET_TARGETS = ("experts", "expert_inputs", "routed_expert_inputs")  # targets an 'experts' subset restricts


@dataclass(frozen=True)
class LayerEdit:
    """One resolved edit: project unit ``direction`` (float32, [H]) out of ``target`` at ``layer``."""

    layer: int
    target: Target
    direction: torch.Tensor
    scale: float
    method: Method
    experts: tuple[int, ...] | None  # routed-expert subset (EXPERT_SUBSET_TARGETS); None = all


@dataclass(frozen=True)
class RouterBiasEdit:
    """One resolved router_bias: add ``bias`` to the selection score of ``experts`` at MoE ``layer``
    (where: ``ArchSpec.selection_bias``). :func:`bind` sums them per layer into ``Bound.router_biases``."""

    layer: int
    experts: tuple[int, ...]
    bias: float

    @property
    def target(self) -> str:
        return "router_bias"


Edit = Union[LayerEdit, RouterBiasEdit]


def router_bias_vectors(edits: Sequence[Any], num_experts: int) -> dict[int, torch.Tensor]:
    """Per MoE layer, the float32 [E] vector a router_bias adds (entries on one layer add up)."""
    out: dict[int, torch.Tensor] = {}
    for e in edits:
        if isinstance(e, RouterBiasEdit):
            vec = out.setdefault(e.layer, torch.zeros(num_experts, dtype=torch.float32))
            vec[list(e.experts)] += e.bias
    return out


def validate_router_bias(cfg: InterventionConfig, spec: ArchSpec, model_config: Any,
                         measurements: Measurements) -> None:
    """Named errors: a dense model, a layer that is not a MoE layer, an expert id out of range,
    'top:N' without the router statistics it ranks on, or -inf on so many experts that fewer than
    top-k stay choosable."""
    if not cfg.router_bias:
        return
    where = cfg.source or "config"
    if not spec.is_moe:
        raise ConfigError(f"{where}: 'router_bias' needs a MoE model; architecture '{spec.name}' has no router")
    if spec.selection_bias is None:
        raise ConfigError(f"{where}: 'router_bias' is not supported on architecture '{spec.name}' yet: the "
                          "architecture table does not describe how its router chooses experts")
    num_layers = int(model_config.num_hidden_layers)
    n_exp = spec.num_experts(model_config)
    for i, entry in enumerate(cfg.router_bias):
        here = f"{where}: router_bias[{i}]"
        if entry.top is not None and entry.top > n_exp:
            raise ConfigError(f"{here}: experts 'top:{entry.top}' but the model has {n_exp} experts")
        for layer in entry.layers:
            if not 0 <= layer < num_layers:
                raise ConfigError(f"{here}: layer {layer} out of range; the model has layers 0..{num_layers - 1}")
            if not spec.is_moe_layer(model_config, layer):
                moe = [x for x in range(num_layers) if spec.is_moe_layer(model_config, x)]
                raise ConfigError(f"{here}: layer {layer} is not a MoE layer (MoE layers: "
                                  f"{moe[0]}..{moe[-1]})" if moe else f"{here}: layer {layer} is not a MoE layer")
            if entry.top is not None:
                for set_name in ("harmful", "harmless"):
                    key = router_key(set_name, "freq", entry.tokens, layer)
                    if key not in measurements.tensors:
                        raise ConfigError(f"{here}: experts 'top:{entry.top}' (tokens: {entry.tokens}) needs '{key}', "
                                          f"not in {measurements.path or 'the measurements'}; re-measure with "
                                          "`intervene measure` or give expert ids")
        bad = [e for e in entry.experts or [] if e >= n_exp]
        if bad:
            raise ConfigError(f"{here}: expert {bad[0]} out of range; the model has experts 0..{n_exp - 1}")


def resolve_router_bias(cfg: InterventionConfig, spec: ArchSpec, model_config: Any,
                        measurements: Measurements) -> list[RouterBiasEdit]:
    """The router_bias entries as per-layer edits ('top:N' ranked by risk difference on the
    measurements' router statistics over the entry's ``tokens``); validated first."""
    validate_router_bias(cfg, spec, model_config, measurements)
    edits: list[RouterBiasEdit] = []
    for entry in cfg.router_bias:
        for layer in entry.layers:
            edits.append(RouterBiasEdit(layer, _entry_experts(entry, layer, measurements), float(entry.bias)))
    if edits:
        k, n_exp = spec.top_k(model_config), spec.num_experts(model_config)
        for layer, vec in router_bias_vectors(edits, n_exp).items():
            left = int(torch.isfinite(vec).sum())
            if left < k:
                raise ConfigError(f"{cfg.source or 'config'}: router_bias -inf on {n_exp - left} of {n_exp} experts at "
                                  f"layer {layer} leaves {left} choosable, fewer than top-k = {k}")
    return edits


def _entry_experts(entry: RouterBiasEntry, layer: int, measurements: Measurements) -> tuple[int, ...]:
    if entry.top is None:
        return tuple(entry.experts or ())
    p = measurements.tensors[router_key("harmful", "freq", entry.tokens, layer)]
    q = measurements.tensors[router_key("harmless", "freq", entry.tokens, layer)]
    return tuple(sorted(maths.risk_difference_ranking(p, q)[:entry.top]))


def validate(cfg: InterventionConfig, spec: ArchSpec, model_config: Any, measurements: Measurements) -> None:
    """Named errors for anything the model or the measurements file cannot satisfy."""
    num_layers = int(model_config.num_hidden_layers)
    hidden = int(model_config.hidden_size)
    measurements.check_model(hidden, None)
    where = cfg.source or "config"
    check_indexing(cfg, measurements)
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
        m = measured_index(cfg, e.measurement)
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
        if e.biprojection_mean is not None:
            key = f"harmless_mean.{measured_index(cfg, e.biprojection_mean)}"
            if key not in measurements.tensors:
                raise ConfigError(f"{where}: ablate[{i}] biprojection_mean {e.biprojection_mean} needs '{key}', "
                                  f"not in {measurements.path or 'the measurements'}")
        if e.keep is not None and e.keep > hidden:
            raise ConfigError(f"{where}: ablate[{i}] keep {e.keep} exceeds the hidden size {hidden}")
    if cfg.experts != "all":
        n_exp = spec.num_experts(model_config)
        ids = cfg.experts if isinstance(cfg.experts, list) else [i for v in cfg.experts.values() for i in v]
        if not spec.is_moe:
            raise ConfigError(f"{where}: 'experts' subset given but architecture '{spec.name}' has no experts")
        if not any(t in EXPERT_SUBSET_TARGETS for e in cfg.ablate for t in cfg.targets_for(e, spec)):
            raise ConfigError(f"{where}: 'experts' subset given but no entry targets experts or expert_inputs")
        bad_ids = [i for i in ids if i >= n_exp]
        if bad_ids:
            raise ConfigError(f"{where}: expert id {bad_ids[0]} out of range; the model has experts 0..{n_exp - 1}")
        if isinstance(cfg.experts, dict):
            bad_layers = [layer for layer in cfg.experts if not spec.is_moe_layer(model_config, layer)]
            if bad_layers:
                raise ConfigError(f"{where}: 'experts' names layer {bad_layers[0]}, which is not a MoE layer")


def measured_index(cfg: InterventionConfig, m: Measurement) -> Measurement:
    """The measurements-file index (decoder-layer output, or 'embed') a config number names."""
    if cfg.indexing != "hidden_state" or m == "embed":
        return m
    if m == 0:
        return "embed"
    shifted = float(m) - 1
    return int(shifted) if shifted.is_integer() else shifted


def check_indexing(cfg: InterventionConfig, measurements: Measurements) -> None:
    """Measurements converted from a .refuse file record that their source numbered hidden states
    (``refuse_M`` is ``direction.{M-1}``); a config against them must say which numbering it uses,
    so that a number copied from a reference config cannot silently name the next layer."""
    source = measurements.meta.get("source_indexing")
    if source == "hidden_state" and cfg.indexing is None:
        raise ConfigError(
            f"{cfg.source or 'config'}: measurements {measurements.path or ''} were converted from a .refuse file "
            f"({measurements.meta.get('converted_from', '?')}), whose numbers index hidden states (refuse_M is "
            "direction.{M-1}, refuse_0 the embeddings); say which numbering this config's 'measurement' values use: "
            "'indexing: layer_output' (M = output of decoder layer M) or 'indexing: hidden_state' (the .refuse "
            "numbers), or convert a reference config with `intervene import-config`"
        )


def entry_direction(cfg: InterventionConfig, entry: AblateEntry, layer: int, measurements: Measurements) -> torch.Tensor:
    """The unit direction an entry uses at target ``layer``: source (each source layer's direction
    whitened against its own harmless second moment when ``whiten`` is set, then interpolated),
    biprojection against the TARGET layer's harmless mean (or the entry's ``biprojection_mean``), sparsity (or
    ``keep``), normalisation — in that order."""
    def source(name: int | str) -> torch.Tensor:
        if cfg.whiten is not None:
            return measurements.whitened_direction(name, cfg.whiten)
        return measurements.direction(name).to(torch.float32)

    m = measured_index(cfg, entry.measurement)
    if m == "embed":
        r = source("embed")
    else:
        lo = int(float(m) // 1)
        needed = {lo: source(lo)}
        if not float(m).is_integer():
            needed[lo + 1] = source(lo + 1)
        r = maths.interpolate(needed, float(m))
    if entry.biprojection_mean is not None:
        r = maths.biproject(r, measurements.harmless_mean(measured_index(cfg, entry.biprojection_mean)))
    elif cfg.biprojection:
        r = maths.biproject(r, measurements.harmless_mean(layer))
    r = maths.keep_largest(r, entry.keep) if entry.keep is not None else maths.sparsify(r, entry.sparsity)
    return maths.unit(r, f"direction for layer {layer} (measurement {m})")


def resolve_projections(cfg: InterventionConfig, spec: ArchSpec, model_config: Any,
                        measurements: Measurements) -> list[LayerEdit]:
    """The config's ``ablate`` entries as the ordered list of projections (config order; each
    entry's direction computed once per layer, whitening included). Call :func:`validate` first."""
    edits: list[LayerEdit] = []
    for entry in cfg.ablate:
        targets = cfg.targets_for(entry, spec)
        for layer in entry.layers:
            r_hat = entry_direction(cfg, entry, layer, measurements)
            for target in targets:
                scale = entry.scale_for(target)
                if scale is None:
                    continue
                experts = cfg.experts_for(layer) if target in EXPERT_SUBSET_TARGETS else None
                edits.append(LayerEdit(layer, target, r_hat, float(scale), cfg.method, experts))
    return edits


def resolve(cfg: InterventionConfig, spec: ArchSpec, model_config: Any, measurements: Measurements) -> list[Edit]:
    """Validate, then expand the config into one flat list: the projections (:class:`LayerEdit`,
    config order), then the router_bias edits (:class:`RouterBiasEdit`). Consumers take
    :func:`bind`'s :class:`Bound` instead, which keeps the kinds apart."""
    validate(cfg, spec, model_config, measurements)
    router_bias = resolve_router_bias(cfg, spec, model_config, measurements)
    return [*resolve_projections(cfg, spec, model_config, measurements), *router_bias]


@dataclass(frozen=True)
class Bound:
    """A config bound to a model: what it is (``config``, native; ``measurements``), what it is bound to
    (``spec``, ``model_config``: the text config) and what it does, one field per kind of edit."""

    config: InterventionConfig
    measurements: Measurements | None
    spec: ArchSpec
    model_config: Any
    projections: tuple[LayerEdit, ...]  # config order
    router_biases: dict[int, torch.Tensor]  # MoE layer -> float32 [E] added to the selection score

    @property
    def layers(self) -> list[int]:
        """Every decoder layer an edit of any kind touches, ascending."""
        return sorted({e.layer for e in self.projections} | set(self.router_biases))

    def at_layer(self, layer: int) -> Bound:
        """The edits of one decoder layer (a layer-streamed pass installs them layer by layer)."""
        return dataclasses.replace(self, projections=tuple(e for e in self.projections if e.layer == layer),
                                   router_biases={k: v for k, v in self.router_biases.items() if k == layer})


def bind(config: InterventionConfig | str | os.PathLike, measurements: Measurements | str | os.PathLike | None,
         model_config: Any) -> Bound:
    """The config (an object, or a native or reference-schema YAML path, translated against
    ``model_config``) and its measurements (loaded, a path, or None for the config's own file) checked
    against ``model_config`` (a transformers config; multimodal wrappers allowed) and resolved, once."""
    cfg = config if isinstance(config, InterventionConfig) else load_any_config(config, model_config=model_config)
    meas = measurements_for(measurements, cfg.measurements, cfg.source)
    spec, text = arch_for_config(model_config), text_config(model_config)
    validate(cfg, spec, text, meas)
    router_bias = resolve_router_bias(cfg, spec, text, meas)
    projections = resolve_projections(cfg, spec, text, meas)
    vectors = router_bias_vectors(router_bias, spec.num_experts(text)) if router_bias else {}
    return Bound(cfg, meas, spec, text, tuple(projections), vectors)
