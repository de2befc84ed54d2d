"""The resolved edit, the contract the live hooks and the bake share: :func:`resolve` checks a parsed
config against a model (its architecture, config and measurements; named errors for anything they
cannot satisfy) and expands it into the ordered list of :class:`LayerEdit` that both apply, so the
directions, scales and orders tried live and baked are identical."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import maths
from ..arch import ArchSpec, Target
from ..errors import ConfigError
from ..io.measurements import Measurements
from .schema import AblateEntry, InterventionConfig, Measurement, Method

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
                experts = cfg.experts_for(layer) if target in EXPERT_SUBSET_TARGETS else None
                edits.append(LayerEdit(layer, target, r_hat, float(scale), cfg.method, experts))
    return edits
