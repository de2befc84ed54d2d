"""``bake --dequantize``: a quantized checkpoint (FP8 block-scaled, MXFP4; see
:mod:`intervene.io.quantized`) is first streamed into a hidden sibling of the output with the tensors
to edit (``edited``) or all quantized tensors (``all``) dequantized to bf16, one tensor at a time and
the rest copied byte for byte, with ``config.json``'s ``quantization_config`` updated (the dequantized
modules added to ``modules_to_not_convert``) or removed; the ordinary bake then streams that copy into
the output, and the copy is removed. Memory: one tensor (its stored bytes plus one float32 piece)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from ..arch import split_layer_key
from ..config.resolve import Bound
from ..errors import CheckpointError, InputError
from ..io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from ..io.quantized import QuantizedReader, QuantizedTensor, find_quantized, updated_config
from .plan import layer_prefix
from .writer import copy_range, pwrite_all

Dequantize = Literal["edited", "all"]
DEQUANTIZE_CHOICES: tuple[Dequantize, ...] = ("edited", "all")


def keys_to_dequantize(bound: Bound, source: Path, mode: Dequantize,
                       checkpoint: Checkpoint | None = None) -> dict[str, QuantizedTensor]:
    """The quantized tensors ``mode`` dequantizes: ``all`` of them, or those whose dequantized key
    the bound config's projections match (the architecture table's on-disk patterns, as the bake plan matches them)."""
    if mode not in DEQUANTIZE_CHOICES:
        raise InputError(f"--dequantize must be one of {', '.join(DEQUANTIZE_CHOICES)}, got {mode!r}")
    checkpoint = checkpoint or open_checkpoint(source)
    quantized = find_quantized(checkpoint)
    if not quantized:
        raise CheckpointError(f"{source}: --dequantize given, but no FP8 (weight_scale_inv) or MXFP4 (_blocks/_scales) "
                              "tensors found")
    if mode == "all":
        return quantized
    spec, model_config = bound.spec, bound.model_config
    prefix = layer_prefix(checkpoint, spec)
    modules: set[str] = set()
    for le in bound.projections:
        patterns = [p for p in spec.disk_patterns(model_config, le.layer) if p.target == le.target]
        for key in quantized:
            parts = split_layer_key(key)
            if parts and parts[0] == prefix and parts[1] == le.layer and any(p.match(parts[2]) for p in patterns):
                modules.add(module_of(key, spec, prefix))
    # a module is dequantized whole: transformers leaves modules, not tensors, unquantized (the fused
    # experts of a layer are one module, whose gate/up go with the edited down projections)
    return {key: q for key, q in quantized.items() if module_of(key, spec, prefix) in modules}


def module_of(key: str, spec: Any, prefix: str) -> str:
    """The in-memory module holding a checkpoint key: a layer's experts (per-expert on disk or fused)
    are one module, ``<prefix>.L.<experts>``; anything else is its key without ``.weight``."""
    parts = split_layer_key(key)
    if parts and parts[0] == prefix and spec.experts:
        rest = parts[2]
        tail = spec.experts.split(".")[-1]  # "experts"
        blocks = (spec.mlp_block,) + tuple(spec.disk_moe_block_aliases)
        if any(rest.startswith(f"{b}.{tail}.") for b in blocks):
            return f"{prefix}.{parts[1]}.{spec.experts}"
    return key[: -len(".weight")] if key.endswith(".weight") else key


@contextmanager
def dequantized_copy(bound: Bound, source: Path, mode: Dequantize, near: Path,
                     on_tensor: Callable[[str], None] | None = None) -> Iterator[Path]:
    """A hidden sibling of ``near`` holding ``source`` with ``mode``'s tensors dequantized; removed on exit."""
    checkpoint = open_checkpoint(source)
    chosen = keys_to_dequantize(bound, source, mode, checkpoint)
    spec = bound.spec
    prefix = layer_prefix(checkpoint, spec)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.dequantize.", dir=near.parent))
    try:
        model_config = json.loads((source / "config.json").read_text())
        for item in source.iterdir():  # tokenizer, generation config, ...: everything but the weights
            if item.is_file() and item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
                shutil.copy2(item, tmp / item.name)
        write_dequantized(checkpoint, tmp, chosen, model_config, on_tensor)
        everything = len(chosen) == len(find_quantized(checkpoint))
        modules = sorted({module_of(k, spec, prefix) for k in chosen}) if chosen else []
        new_config = updated_config(model_config, modules, all_of_them=everything)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_dequantized(checkpoint: Checkpoint, out_dir: Path, chosen: dict[str, QuantizedTensor],
                      model_config: dict[str, Any], on_tensor: Callable[[str], None] | None = None) -> int:
    """Write every shard of ``checkpoint`` into ``out_dir`` with the ``chosen`` tensors dequantized (their
    scale tensors dropped) and all others copied byte for byte; one dequantized tensor in memory at a
    time. The index is rewritten; ``config.json`` is left to the caller. Returns bytes written."""
    reader = QuantizedReader(checkpoint, model_config)
    dropped = {q.scale_key for q in chosen.values()}
    by_data = {q.data_key: q for q in chosen.values()}
    weight_map: dict[str, str] = {}
    total = 0
    for header in checkpoint.shards:
        entries: list[tuple[str, dict[str, Any], TensorInfo | QuantizedTensor]] = []
        offset = 0
        for info in header.tensors:
            if info.key in dropped:
                continue
            if info.key in by_data:
                q = by_data[info.key]
                entries.append((q.key, {"dtype": "BF16", "shape": list(q.shape),
                                        "data_offsets": [offset, offset + q.nbytes]}, q))
                offset += q.nbytes
            else:
                entries.append((info.key, {"dtype": info.dtype, "shape": list(info.shape),
                                           "data_offsets": [offset, offset + info.nbytes]}, info))
                offset += info.nbytes
        obj: dict[str, Any] = {"__metadata__": dict(header.metadata)} if header.metadata else {}
        for key, entry, _ in entries:
            obj[key] = entry
            weight_map[key] = header.path.name
        raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        head = struct.pack("<Q", len(raw)) + raw
        target = out_dir / header.path.name
        src_fd = os.open(header.path, os.O_RDONLY)
        dst_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(dst_fd, head, 0)
            for _key, entry, item in entries:
                at = len(head) + entry["data_offsets"][0]
                if isinstance(item, QuantizedTensor):
                    for piece in reader.chunks(item):
                        data = memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
                        pwrite_all(dst_fd, data, at)
                        at += len(data)
                        del piece, data
                else:
                    copy_range(src_fd, dst_fd, header.data_start + item.begin, at, item.nbytes)
                if on_tensor is not None:
                    on_tensor(_key)
            os.fsync(dst_fd)
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        total += len(head) + offset
    if checkpoint.index is not None:
        index = dict(checkpoint.index)
        index["weight_map"] = weight_map
        index.setdefault("metadata", {})["total_size"] = total
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total



__all__ = ["Dequantize", "DEQUANTIZE_CHOICES", "keys_to_dequantize", "dequantized_copy", "write_dequantized"]
