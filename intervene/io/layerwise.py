"""Loading a safetensors checkpoint into a model skeleton one group of tensors at a time: the
tensors outside the decoder layers, then one decoder layer (keys from the index, grouped by the
architecture table's layer-key split), each through transformers' own key conversion
(``convert_and_load_state_dict_in_model``: fused experts, renamed keys), with the shard files
opened for that group only. ``measure --stream-layers`` loads and frees one layer at a time;
:func:`load_layerwise` loads them all, so that a whole model is read without the whole checkpoint
being memory-mapped at once (transformers' loader keeps every shard mapped until the end, and the
pages it has read count in the process's resident memory next to the loaded weights). FP8
block-scaled and MXFP4 tensors (:mod:`.quantized`) are read dequantized to bf16."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..arch import arch_for_config, decoder_layers, split_layer_key, text_config
from ..errors import InputError
from .checkpoint import INDEX_NAME, SINGLE_NAME, open_checkpoint
from .models import parse_dtype
from .quantized import QuantizedReader, find_quantized, raw_tensor
from .sources import load_model_config, resolve_model


def stream_skeleton(spec: str, dtype: str | torch.dtype | None = "auto") -> tuple[Any, torch.dtype]:
    """The model with its parameters on the meta device (buffers real) and its dtype; ``auto`` is the
    checkpoint's dtype (config ``dtype``), float32 where the config names none."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_model_config(spec)
    arch_for_config(config)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = _config_dtype(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    return model, torch_dtype


def _config_dtype(config: Any) -> torch.dtype:
    for c in (config, text_config(config)):
        d = getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d, None)
        if isinstance(d, torch.dtype) and d.is_floating_point:
            return d
    return torch.float32


class LayerLoader:
    """Reads one group of checkpoint tensors (a decoder layer, or everything outside the layers) into
    the skeleton with transformers' own key conversion, and sends a layer back to the meta device."""

    def __init__(self, model: Any, path: str | Path, dtype: torch.dtype, device: torch.device,
                 with_head: bool = False) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model, self.dtype, self.device = model, dtype, device
        self.checkpoint = open_checkpoint(path)
        self.by_layer: dict[int, list[str]] = {}
        self.outside: list[str] = []
        head = None if with_head else _output_head_prefix(model)
        for key in self.checkpoint.weight_map:
            split = split_layer_key(key)
            if split is not None:
                self.by_layer.setdefault(split[1], []).append(key)
            elif head is None or not key.startswith(head):
                self.outside.append(key)
        self.mapping = get_model_conversion_mapping(model, None, None)
        self._open: dict[str, Any] = {}
        self._infos: dict[str, dict[str, Any]] = {}  # shard -> key -> TensorInfo
        # FP8 / MXFP4 tensors are read dequantized (bf16), under the names transformers loads them by
        self.quantized = {q.data_key: q for q in find_quantized(self.checkpoint).values()}
        self.scales = {q.scale_key for q in self.quantized.values()}
        if self.quantized:
            self.reader = QuantizedReader(self.checkpoint, json.loads((self.checkpoint.path / "config.json").read_text()))

    def _slices(self, keys: Sequence[str]) -> dict[str, Any]:
        """The group's tensors, read into fresh memory through the one header reader (no memory map:
        a tensor viewing a mapped shard would keep the whole mapping, and every page read from it,
        resident for as long as the layer lives)."""
        out = {}
        for key in keys:
            if key in self.scales:
                continue
            if key in self.quantized:
                q = self.quantized[key]
                out[q.key] = self.reader.read(q)
                continue
            name = self.checkpoint.weight_map[key]
            if name not in self._open:
                self._open[name] = open(self.checkpoint.path / name, "rb")
            if name not in self._infos:
                self._infos[name] = self.checkpoint.shard(name).by_key()
            out[key] = raw_tensor(self._open[name], self.checkpoint.shard(name), self._infos[name][key])
        return out

    def load(self, keys: Sequence[str], what: str) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype, weight_mapping=self.mapping)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar per layer is ours; transformers' would add one per load
        # synchronous: the loader's thread pool is made anew per call, and every new thread's malloc
        # arena keeps what the layer it read left behind (measured: +24 MB resident per layer)
        was = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        try:
            info, _ = convert_and_load_state_dict_in_model(self.model, self._slices(keys), config)
        finally:
            if was is None:
                os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
            else:
                os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = was
            self.close()
            if bars:
                hf_logging.enable_progress_bar()
        if info.conversion_errors or info.mismatched_keys:
            bad = next(iter(info.conversion_errors or info.mismatched_keys))
            raise InputError(f"{self.checkpoint.path}: cannot load '{bad}' of {what} into the model skeleton")

    def load_outside(self) -> None:
        self.load(self.outside, "the embeddings")

    def layers(self) -> list[int]:
        return sorted(self.by_layer)

    def load_layer(self, layer: int) -> None:
        keys = self.by_layer.get(layer)
        if not keys:
            raise InputError(f"{self.checkpoint.path}: no tensors of decoder layer {layer} in the checkpoint")
        self.load(keys, f"layer {layer}")
        module = decoder_layers(self.model)[layer]
        left = [n for n, p in module.named_parameters() if p.is_meta]
        if left:
            raise InputError(f"{self.checkpoint.path}: layer {layer} parameter '{left[0]}' is not in the checkpoint")

    def unload_layer(self, layer: int) -> None:
        decoder_layers(self.model)[layer].to("meta")
        release_free_memory()

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def release_free_memory() -> None:
    """Hand the freed heap of the layer just unloaded back to the OS (glibc keeps it otherwise)."""
    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _output_head_prefix(model: Any) -> str | None:
    """``'lm_head.'``: the output head is not needed to measure residuals (tied heads are not on disk)."""
    head = model.get_output_embeddings()
    if head is None or head.weight is model.get_input_embeddings().weight:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    return None


def can_load_layerwise(spec: str, device_map: Any = None) -> bool:
    """A local safetensors checkpoint directory, no device map: what :func:`load_layerwise` reads."""
    src = resolve_model(spec)
    path = Path(src.path)
    return (device_map is None and not src.is_hub and not src.gguf_file
            and ((path / INDEX_NAME).exists() or (path / SINGLE_NAME).exists()))


def load_layerwise(spec: str, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu") -> Any:
    """The whole model (output head included, tied weights tied) in eval mode, read one layer at a
    time: the same weights as ``from_pretrained``, at a peak of the model plus one layer."""
    model, torch_dtype = stream_skeleton(spec, dtype)
    loader = LayerLoader(model, resolve_model(spec).path, torch_dtype, torch.device(device), with_head=True)
    loader.load_outside()
    for layer in range(int(text_config(model.config).num_hidden_layers)):
        loader.load_layer(layer)
        release_free_memory()  # the conversion's temporaries (per-expert copies before stacking)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise InputError(f"{loader.checkpoint.path}: parameter '{left[0]}' is not in the checkpoint")
    return model


__all__ = ["stream_skeleton", "LayerLoader", "load_layerwise", "can_load_layerwise", "release_free_memory"]
