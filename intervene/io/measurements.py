"""The measurements file: one safetensors file, float32 tensors, JSON metadata.

Keys (L = decoder layer whose OUTPUT residual was measured; ``embed`` = embedding output):
    harmful_mean.{L}, harmless_mean.{L}, direction.{L} (= harmful_mean - harmless_mean, raw)
    harmful_mean.embed, harmless_mean.embed, direction.embed
    router.harmful_freq.{L}, router.harmless_freq.{L}      per-expert top-k selection frequency
    router.harmful_logits.{L}, router.harmless_logits.{L}  mean router logits (MoE layers only)
        (both over ALL non-pad prompt tokens, chat-template tokens included)
    router.<set>_freq_last.{L}, router.<set>_logits_last.{L}  the same at the last prompt token only
    router.<set>_freq_user.{L}, router.<set>_logits_user.{L}  the same over the user's own tokens only
        (tokens overlapping the user message's characters; template and system prompt excluded)
    attribution.<set>_<part>.{L}  mean write of each component of layer L to the residual at the last prompt
        token (``intervene.measure.attribution``): parts attention [H], mlp [H] (dense layers), shared_experts [H],
        experts [E, H] (each routed expert's gated output), routing [E] (routing weights); absent when measured
        with --no-attribution
    harmless_moment.eigvals.{L} [k], harmless_moment.eigvecs.{L} [k, H], harmless_moment.trace.{L} [1]
        top-k eigenpairs and trace of the harmless uncentred second moment (``whiten`` in configs;
        absent in files measured with whiten_rank 0 or converted from .refuse)
Metadata: ``{"intervene": "<JSON string>"}`` with model, model_type, hidden_size, num_layers,
n_harmful, n_harmless, chat_template, system_prompt, intervene_version, moe_layers, ...; files converted
from a ``.refuse`` file have ``converted_from`` and ``source_indexing: "hidden_state"`` (a config using
them must state its ``indexing``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import safetensors
import safetensors.torch
import torch
from safetensors import SafetensorError

from ..errors import ConfigError, InputError, MeasurementError
from ..maths import whiten
from ..text import format_ranges
from .files import atomic_write

META_KEY = "intervene"
# which tokens router statistics are taken over -> the suffix of their keys (router.<set>_freq<suffix>.{L})
ROUTER_TOKEN_SUFFIX = {"all": "", "last": "_last", "user": "_user"}


def router_key(set_name: str, kind: str, tokens: str, layer: int) -> str:
    """``router.harmful_freq_last.12`` for ``('harmful', 'freq', 'last', 12)``."""
    return f"router.{set_name}_{kind}{ROUTER_TOKEN_SUFFIX[tokens]}.{layer}"


def attribution_key(set_name: str, part: str, layer: int) -> str:
    """``attribution.harmful_experts.12`` for ``('harmful', 'experts', 12)``."""
    return f"attribution.{set_name}_{part}.{layer}"


MOMENT_PARTS = ("eigvals", "eigvecs", "trace")  # harmless_moment.{part}.{L}, in this order


@dataclass
class Measurements:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    # ---- access ----------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Decoder-layer indices that have a direction, ascending."""
        return sorted(int(k.split(".")[1]) for k in self.tensors if k.startswith("direction.") and k.split(".")[1].isdigit())

    @property
    def hidden_size(self) -> int:
        return int(next(iter(v for k, v in self.tensors.items() if k.startswith("direction."))).shape[-1])

    def _get(self, kind: str, layer: int | str) -> torch.Tensor:
        key = f"{kind}.{layer}"
        if key not in self.tensors:
            where = f" in {self.path}" if self.path else ""
            raise MeasurementError(
                f"measurement '{key}' not found{where}; measured layers: {format_ranges(self.layers, dash='..', comma=', ')}"
            )
        return self.tensors[key]

    def direction(self, layer: int | str) -> torch.Tensor:
        return self._get("direction", layer)

    def harmful_mean(self, layer: int | str) -> torch.Tensor:
        return self._get("harmful_mean", layer)

    def harmless_mean(self, layer: int | str) -> torch.Tensor:
        return self._get("harmless_mean", layer)

    def has_moment(self, layer: int | str) -> bool:
        return all(f"harmless_moment.{part}.{layer}" in self.tensors for part in MOMENT_PARTS)

    def harmless_moment(self, layer: int | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(eigvals [k], eigvecs [k, H], trace [1])`` of the harmless second moment at ``layer``."""
        if not self.has_moment(layer):
            where = f" {self.path}" if self.path else ""
            raise MeasurementError(
                f"measurements{where} have no 'harmless_moment.*.{layer}' (needed by 'whiten'); re-measure with "
                "`intervene measure` (--whiten-rank > 0) to store them"
            )
        return tuple(self.tensors[f"harmless_moment.{part}.{layer}"] for part in MOMENT_PARTS)

    def whitened_direction(self, layer: int | str, lam: float) -> torch.Tensor:
        """``direction.{layer}`` whitened against the harmless second moment (``maths.whiten``)."""
        return whiten(self.direction(layer), *self.harmless_moment(layer), lam)

    def directions(self) -> dict[int, torch.Tensor]:
        return {layer: self.direction(layer) for layer in self.layers}

    def router_layers(self) -> list[int]:
        return sorted(int(k.rsplit(".", 1)[1]) for k in self.tensors if k.startswith("router.harmful_freq."))

    def check_model(self, hidden_size: int, num_layers: int | None = None, what: str = "model") -> None:
        """Named error when this file was measured on a different model."""
        if self.hidden_size != hidden_size:
            raise MeasurementError(
                f"measurements {self.path or ''} have hidden size {self.hidden_size} but the {what} has "
                f"hidden size {hidden_size}: they were measured on a different model"
            )
        if num_layers is not None and self.layers and max(self.layers) >= num_layers:
            raise MeasurementError(
                f"measurements {self.path or ''} have layer {max(self.layers)} but the {what} has only "
                f"{num_layers} layers: they were measured on a different model"
            )

    # ---- I/O -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        save_measurements(self, path)


def save_measurements(m: Measurements, path: str | os.PathLike,
                      before_publish: Callable[[Path], None] | None = None) -> None:
    """Write atomically (:func:`intervene.io.files.atomic_write`: a temporary file in the same
    directory, then rename); ``before_publish(tmp)`` runs once the temporary file is complete."""
    path = Path(path)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in sorted(m.tensors.items())}
    meta = {META_KEY: json.dumps(m.meta, sort_keys=True, default=str)}
    try:
        atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=meta), before_publish)
    except (OSError, SafetensorError) as e:  # disk full, permissions: one line naming the file
        raise MeasurementError(f"writing measurements {path} failed: {_first_line(e)}") from None


def load_measurements(path: str | os.PathLike) -> Measurements:
    """Read a measurements file (safetensors, or a jim-plus ``.refuse`` file which is converted)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"measurements file not found: {path}")
    if path.is_dir():
        raise InputError(f"measurements path is a directory, expected a file: {path}")
    if path.suffix == ".refuse":
        return load_refuse(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MeasurementError(f"{path} is not a readable safetensors measurements file ({_first_line(e)})") from None
    meta: dict[str, Any] = {}
    if META_KEY in raw_meta:
        try:
            meta = json.loads(raw_meta[META_KEY])
        except json.JSONDecodeError:
            raise MeasurementError(f"{path}: metadata entry '{META_KEY}' is not valid JSON") from None
    if not any(k.startswith("direction.") for k in tensors):
        raise MeasurementError(f"{path} has no 'direction.*' tensors: not an intervene measurements file")
    return Measurements(tensors=tensors, meta=meta, path=str(path))


def measurements_for(given: Measurements | str | os.PathLike | None, configured: str | None,
                     where: str | None = None) -> Measurements:
    """The measurements a config runs with: ``given`` (loaded, or a path; e.g. ``--measurements``)
    else the config's own ``configured`` file. ``where`` names the config in the error."""
    if isinstance(given, Measurements):
        return given
    path = given if given is not None else configured
    if not path:
        raise ConfigError(f"{where or 'config'}: no 'measurements' file (set 'measurements' in the config "
                         "or pass --measurements FILE)")
    return load_measurements(path)


def load_refuse(path: str | os.PathLike) -> Measurements:
    """Convert a jim-plus/llm-abliteration ``.refuse`` file (torch.save of a dict).

    Loaded with ``weights_only=True``: a pickle holding arbitrary objects is rejected, never
    executed. Its index 0 is the embedding output, so its ``i`` is our decoder layer ``i - 1``.
    """
    path = Path(path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError ...
        raise MeasurementError(
            f"{path}: refused to load .refuse file with weights_only=True ({_unpickle_reason(e)}); "
            "it is corrupt or contains arbitrary Python objects, which are never executed"
        ) from None
    if not isinstance(data, dict):
        raise MeasurementError(f"{path}: .refuse file must hold a dict, found {type(data).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    n_layers = 0
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            continue
        for kind, ours in (("harmful", "harmful_mean"), ("harmless", "harmless_mean"), ("refuse", "direction")):
            prefix = f"{kind}_"
            if isinstance(key, str) and key.startswith(prefix) and key[len(prefix):].isdigit():
                i = int(key[len(prefix):])
                name = "embed" if i == 0 else str(i - 1)
                tensors[f"{ours}.{name}"] = value.detach().to(torch.float32).reshape(-1)
                n_layers = max(n_layers, i)
    for name in {k.split(".", 1)[1] for k in tensors}:
        if f"direction.{name}" not in tensors and f"harmful_mean.{name}" in tensors and f"harmless_mean.{name}" in tensors:
            tensors[f"direction.{name}"] = tensors[f"harmful_mean.{name}"] - tensors[f"harmless_mean.{name}"]
    if not any(k.startswith("direction.") for k in tensors):
        raise MeasurementError(f"{path}: no harmful_N/harmless_N/refuse_N tensors found in .refuse file")
    # source_indexing: the numbers of the tool that wrote the file index hidden states (refuse_M is our
    # direction.{M-1}); config.resolve makes a config against this file say which numbering it uses
    meta = {"converted_from": str(path), "source_indexing": "hidden_state",
            "num_layers": int(data.get("layers", n_layers)) if isinstance(data.get("layers", 0), int) else n_layers}
    return Measurements(tensors=tensors, meta=meta, path=str(path))


def _unpickle_reason(e: BaseException) -> str:
    """The line of torch's weights-only error that names the refused object (its first line is
    generic advice to re-run with weights_only=False, which we never do)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(e).__name__])[0]


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
