"""A measurements file as a plain dict keyed the TransformerLens way, and back (exact round trip).

    d = to_lens_dict(load_measurements("m.safetensors"))
    r = d["blocks.14.hook_resid_post"]        # raw direction of layer 14 (harmful - harmless)
    m = from_lens_dict(d, meta)               # the same Measurements, tensor for tensor

Keys (``L`` = decoder layer; the residual after layer ``L`` is TL's ``blocks.{L}.hook_resid_post``,
which is also ``blocks.{L+1}.hook_resid_pre``):

=======================================  ====================================================
``blocks.{L}.hook_resid_post``           ``direction.{L}`` (raw, not unit: ``maths.unit`` it)
``hook_embed``                           ``direction.embed``
``harmful_mean.blocks.{L}.hook_resid_post``   ``harmful_mean.{L}``
``harmless_mean.blocks.{L}.hook_resid_post``  ``harmless_mean.{L}``
``harmful_mean.hook_embed``              ``harmful_mean.embed``
``harmless_mean.hook_embed``             ``harmless_mean.embed``
``intervene.<key>``                      any other tensor, unchanged (router statistics:
                                         ``intervene.router.harmful_freq.{L}`` ...)
=======================================  ====================================================

Tensors are the stored ones (float32), not copies: ``to_lens_dict`` then ``from_lens_dict``
gives back the same keys and bit-identical values. The metadata is not a tensor: pass
``measurements.meta`` to ``from_lens_dict`` to keep it. Needs neither TransformerLens nor nnsight.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ..errors import MeasurementError
from ..io.measurements import Measurements

OTHER_PREFIX = "intervene."
_OURS = re.compile(r"^(?P<kind>direction|harmful_mean|harmless_mean)\.(?P<name>\d+|embed)$")
_LENS = re.compile(r"^(?:(?P<kind>harmful_mean|harmless_mean)\.)?"
                   r"(?:blocks\.(?P<layer>\d+)\.hook_resid_post|(?P<embed>hook_embed))$")


def lens_key(key: str) -> str:
    """The lens-dict key of a measurements key (``direction.3`` -> ``blocks.3.hook_resid_post``)."""
    m = _OURS.match(key)
    if m is None:
        return OTHER_PREFIX + key
    hook = "hook_embed" if m["name"] == "embed" else f"blocks.{m['name']}.hook_resid_post"
    return hook if m["kind"] == "direction" else f"{m['kind']}.{hook}"


def intervene_key(key: str) -> str:
    """The measurements key of a lens-dict key (inverse of :func:`lens_key`)."""
    if key.startswith(OTHER_PREFIX):
        return key[len(OTHER_PREFIX):]
    m = _LENS.match(key)
    if m is None:
        raise MeasurementError(
            f"lens dict key '{key}' is not one of blocks.L.hook_resid_post, hook_embed, "
            f"harmful_mean.<hook>, harmless_mean.<hook> or {OTHER_PREFIX}<key>"
        )
    name = "embed" if m["embed"] else m["layer"]
    return f"{m['kind'] or 'direction'}.{name}"


def to_lens_dict(measurements: Measurements) -> dict[str, torch.Tensor]:
    """Every tensor of ``measurements`` under its TransformerLens-style key (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in measurements.tensors.items():
        out[lens_key(key)] = value
    return out


def from_lens_dict(d: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Measurements:
    """The :class:`Measurements` a lens dict was made from (``meta`` attached as given)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in d.items():
        if not isinstance(value, torch.Tensor):
            raise MeasurementError(f"lens dict entry '{key}' is a {type(value).__name__}, not a tensor")
        ours = intervene_key(key)
        if ours in tensors:
            raise MeasurementError(f"lens dict keys '{key}' and '{lens_key(ours)}' both map to '{ours}'")
        tensors[ours] = value
    if not any(k.startswith("direction.") for k in tensors):
        raise MeasurementError("lens dict has no blocks.L.hook_resid_post or hook_embed direction")
    return Measurements(tensors=tensors, meta=dict(meta or {}))


__all__ = ["to_lens_dict", "from_lens_dict", "lens_key", "intervene_key", "OTHER_PREFIX"]
