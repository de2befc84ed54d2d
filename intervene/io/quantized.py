"""Quantized safetensors checkpoints: finding the quantized tensors, dequantizing one to bf16, and
streaming a checkpoint into a (partly or wholly) dequantized copy one tensor at a time.

Two published layouts (the names and maths of transformers' own loaders, ``integrations/
finegrained_fp8.py`` and ``integrations/mxfp4.py``, which the tests use as the reference):

* **FP8 block-scaled** (DeepSeek-V3, GLM-4.5-Air-FP8; ``quant_method: fp8``): ``X.weight`` is
  ``F8_E4M3`` ``[N, K]`` and ``X.weight_scale_inv`` ``[ceil(N/bn), ceil(K/bk)]`` (``weight_block_size``
  ``[bn, bk]``, default 128×128) multiplies each block: ``W = w · s[i // bn, j // bk]``.
* **MXFP4** (gpt-oss; ``quant_method: mxfp4``): ``X_blocks`` ``U8 [E, R, G, 16]`` packs two FP4 (E2M1)
  values per byte (low nibble first), ``X_scales`` ``U8 [E, R, G]`` is a shared power-of-two exponent
  (E8M0, bias 127) per 32 values: ``row = lut[nibbles] · 2^(scale-127)``, ``[E, R, G·32]``, stored
  transposed in memory as ``X`` ``[E, G·32, R]``.

Dequantized tensors are computed in float32 and stored as bf16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import torch

from ..errors import CheckpointError
from .checkpoint import Checkpoint, SafetensorsHeader, TensorInfo, editable_dtype, read_tensor_bytes

QuantFormat = Literal["fp8", "mxfp4"]
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
DEFAULT_FP8_BLOCK = (128, 128)
CHUNK_BYTES = 64 * 1024 * 1024  # float32 working set of one dequantized piece
_STORAGE = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
            "U8": torch.uint8, "I8": torch.int8}


@dataclass(frozen=True)
class QuantizedTensor:
    """One dequantizable tensor: ``key`` is its dequantized name (what transformers loads)."""

    key: str
    format: QuantFormat
    data_key: str  # FP8: the weight itself; MXFP4: X_blocks
    scale_key: str  # FP8: X.weight_scale_inv; MXFP4: X_scales
    shape: tuple[int, ...]  # dequantized shape

    @property
    def nbytes(self) -> int:  # as bf16
        n = 2
        for s in self.shape:
            n *= s
        return n


def quantization_method(model_config: dict[str, Any]) -> str | None:
    qc = model_config.get("quantization_config")
    return qc.get("quant_method") if isinstance(qc, dict) else None


def fp8_block_size(model_config: dict[str, Any]) -> tuple[int, int] | None:
    qc = model_config.get("quantization_config") or {}
    block = qc.get("weight_block_size", DEFAULT_FP8_BLOCK)
    return None if block is None else (int(block[0]), int(block[1]))


def find_quantized(checkpoint: Checkpoint) -> dict[str, QuantizedTensor]:
    """Every FP8 (``.weight`` + ``.weight_scale_inv``) and MXFP4 (``_blocks`` + ``_scales``) pair, by
    dequantized key."""
    out: dict[str, QuantizedTensor] = {}
    keys = checkpoint.weight_map
    for key in keys:
        if key.endswith(".weight_scale_inv"):
            data = key[: -len("_scale_inv")]
            if data in keys:
                info = checkpoint.info(data)
                if editable_dtype(info.dtype) is None:
                    out[data] = QuantizedTensor(data, "fp8", data, key, info.shape)
        elif key.endswith("_blocks"):
            base = key[: -len("_blocks")]
            if base + "_scales" in keys:
                e, r, g, b = checkpoint.info(key).shape
                out[base] = QuantizedTensor(base, "mxfp4", key, base + "_scales", (e, g * b * 2, r))
    return out


def raw_tensor(f: Any, header: SafetensorsHeader, info: TensorInfo) -> torch.Tensor:
    """One stored tensor in its storage dtype (FP8, E8M0 and bytes included)."""
    dtype = editable_dtype(info.dtype) or _STORAGE.get(info.dtype)
    if dtype is None:
        raise CheckpointError(f"{header.path}: '{info.key}' is stored as {info.dtype}, which cannot be dequantized")
    buf = read_tensor_bytes(f, header, info)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """``W[i, j] = w[i, j] · s[i // bn, j // bk]`` in float32 (``block=None``: one scale per tensor) -> bf16."""
    w = weight.to(torch.float32)
    s = scale_inv.to(torch.float32)
    if block is None or s.numel() == 1:
        return (w * s.reshape(())).to(torch.bfloat16)
    rows, cols = w.shape[-2:]
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(s.shape[-2:]) != want:
        raise CheckpointError(f"FP8 weight {list(w.shape)} with blocks {list(block)} needs scales {list(want)}, "
                              f"got {list(s.shape)} (quantization_config.weight_block_size)")
    s = s.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return (w * s).to(torch.bfloat16)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[E, R, G, 16]`` packed FP4 + ``[E, R, G]`` E8M0 exponents -> ``[E, G·32, R]`` bf16."""
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise CheckpointError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.view(torch.uint8).to(torch.int64)
    vals = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).flatten(-2)  # [E, R, G, 32]
    exp = scales.view(torch.uint8).to(torch.int32) - 127
    vals = torch.ldexp(vals, exp.unsqueeze(-1).to(torch.float32))
    e, r, g, _ = blocks.shape
    return vals.reshape(e, r, g * 32).transpose(1, 2).contiguous().to(torch.bfloat16)


class QuantizedReader:
    """Reads dequantized tensors of one checkpoint (one open file per call)."""

    def __init__(self, checkpoint: Checkpoint, model_config: dict[str, Any]) -> None:
        self.checkpoint = checkpoint
        self.block = fp8_block_size(model_config)

    def _stored(self, q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for key in (q.data_key, q.scale_key):
            header = self.checkpoint.shard(self.checkpoint.weight_map[key])
            with open(header.path, "rb") as f:
                parts.append(raw_tensor(f, header, header.by_key()[key]))
        return parts[0], parts[1]

    def chunks(self, q: QuantizedTensor, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """The dequantized tensor as contiguous bf16 pieces in storage order (FP8: row blocks; MXFP4:
        one expert at a time), so that writing it never holds more than a piece in float32."""
        data, scale = self._stored(q)
        if q.format == "mxfp4":
            for e in range(data.shape[0]):
                yield dequantize_mxfp4(data[e:e + 1], scale[e:e + 1])
            return
        if self.block is None or scale.numel() == 1 or data.dim() != 2:
            yield dequantize_fp8(data, scale, self.block)
            return
        bn = self.block[0]
        rows = max(bn, (max_bytes // max(1, 4 * data.shape[-1])) // bn * bn)
        for r0 in range(0, data.shape[0], rows):
            yield dequantize_fp8(data[r0:r0 + rows], scale[r0 // bn:(r0 + rows + bn - 1) // bn], self.block)

    def read(self, q: QuantizedTensor) -> torch.Tensor:
        """The whole dequantized tensor (bf16)."""
        return torch.cat(list(self.chunks(q)), dim=0)


def updated_config(model_config: dict[str, Any], modules: Iterable[str], all_of_them: bool) -> dict[str, Any]:
    """``config.json`` after dequantizing the tensors of ``modules`` (in-memory module names):
    everything dequantized removes ``quantization_config`` and sets ``dtype: bfloat16``; some adds
    the modules to its ``modules_to_not_convert`` (the list transformers reads to leave modules
    unquantized)."""
    out = dict(model_config)
    if all_of_them:
        out.pop("quantization_config", None)
        out["dtype"] = "bfloat16"
        out.pop("torch_dtype", None)
        return out
    qc = dict(out.get("quantization_config") or {})
    kept = list(qc.get("modules_to_not_convert") or [])
    for module in modules:
        if module not in kept:
            kept.append(module)
    qc["modules_to_not_convert"] = kept
    out["quantization_config"] = qc
    return out


__all__ = ["QuantizedTensor", "QuantFormat", "find_quantized", "dequantize_fp8", "dequantize_mxfp4", "QuantizedReader",
           "updated_config", "quantization_method", "raw_tensor"]
