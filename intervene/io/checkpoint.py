"""Reading safetensors checkpoints without loading them: headers, tensor byte ranges, one tensor.

A safetensors file is ``u64 little-endian header length N`` + ``N bytes of JSON`` + a data
section in which each tensor occupies ``data_offsets = [begin, end)``. Parsing the header
ourselves gives the exact byte range of every tensor, so the bake can copy untouched tensors
byte for byte (and fast) and read only the tensors it edits.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

# safetensors dtype -> (bytes per element, torch dtype if the bake can edit it)
DTYPES: dict[str, tuple[float, torch.dtype | None]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I64": (8, None), "U64": (8, None), "I32": (4, None), "U32": (4, None), "I16": (2, None), "U16": (2, None),
    "I8": (1, None), "U8": (1, None), "BOOL": (1, None), "F8_E4M3": (1, None), "F8_E5M2": (1, None),
    "F8_E8M0": (1, None), "F4": (0.5, None), "F6_E2M3": (0.75, None), "F6_E3M2": (0.75, None),
}


def editable_dtype(dtype: str) -> torch.dtype | None:
    """The torch dtype of a float tensor the bake may edit; None for integer/quantized storage."""
    return DTYPES.get(dtype, (0, None))[1]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; offsets are relative to the data section."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: tensors in file (offset) order, the raw JSON entries in header order."""

    path: Path
    header_len: int
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]  # sorted by begin offset
    raw_entries: tuple[tuple[str, Any], ...]  # (key, entry) in the header's own order, without __metadata__

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    def by_key(self) -> dict[str, TensorInfo]:
        return {t.key: t for t in self.tensors}


def read_header(path: str | os.PathLike, require_data: bool = True) -> SafetensorsHeader:
    """Parse and check a safetensors header; a named CheckpointError for anything malformed
    (truncated file, corrupt JSON, missing fields, holes or overlaps between tensors, offsets
    outside the file). ``require_data=False`` (inspect, which reads headers only) accepts a file
    whose data section is cut or absent; everything else is still checked."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path} is not a safetensors file "
                                      f"(corrupt header: declared length {n}, file size {size})")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"shard not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, expected a safetensors file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    tensors = []
    for key, entry in entries:
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except KeyError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{key}' (no {e})") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{key}'") from None
        tensors.append(TensorInfo(key, dtype, shape, begin, end))
        if dtype in DTYPES:
            numel = 1
            for s in shape:
                numel *= s
            expected = int(numel * DTYPES[dtype][0])
            if end - begin != expected:
                raise CheckpointError(
                    f"{path}: tensor '{key}' {dtype}{list(shape)} should take {expected} bytes, header says {end - begin}"
                )
    tensors.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in tensors:
        if t.begin != pos or t.end < t.begin:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor '{t.key}' at bytes {t.begin}..{t.end}, expected to start at {pos})")
        pos = t.end
    if 8 + n + pos != size and (require_data or 8 + n + pos < size):
        what = "truncated" if 8 + n + pos > size else "has trailing bytes"
        raise CheckpointError(f"{path}: {what}: header describes {8 + n + pos} bytes, file has {size}")
    return SafetensorsHeader(path, n, {str(k): str(v) for k, v in metadata.items()}, tuple(tensors), tuple(entries))


def read_tensor_bytes(f: Any, header: SafetensorsHeader, info: TensorInfo) -> bytearray:
    """The raw bytes of one tensor, read from an open binary file into a fresh writable buffer."""
    buf = bytearray(info.nbytes)
    f.seek(header.data_start + info.begin)
    view = memoryview(buf)
    got = 0
    while got < info.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{header.path}: truncated while reading '{info.key}'")
        got += n
    return buf


def as_tensor(buf: bytearray, info: TensorInfo) -> torch.Tensor:
    """A tensor VIEW of ``buf`` (no copy): writing into it edits the buffer."""
    dtype = editable_dtype(info.dtype)
    if dtype is None:
        raise CheckpointError(f"tensor '{info.key}' has dtype {info.dtype}, which cannot be edited")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def load_tensor(path: str | os.PathLike, key: str) -> torch.Tensor:
    """One tensor by key (used for small tensors such as Gemma's post-norm weights)."""
    header = read_header(path)
    info = header.by_key().get(key)
    if info is None:
        raise CheckpointError(f"{path}: key '{key}' not found")
    with open(path, "rb") as f:
        buf = read_tensor_bytes(f, header, info)
    return as_tensor(buf, info).clone()


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors checkpoint directory: its shards (headers only) and the key -> shard map."""

    path: Path
    index: dict[str, Any] | None  # parsed model.safetensors.index.json, None for a single file
    shards: tuple[SafetensorsHeader, ...]  # in sorted file-name order
    weight_map: dict[str, str]  # key -> shard file name

    def shard(self, name: str) -> SafetensorsHeader:
        for s in self.shards:
            if s.path.name == name:
                return s
        raise KeyError(name)

    def info(self, key: str) -> TensorInfo:
        return self.shard(self.weight_map[key]).by_key()[key]

    @property
    def total_bytes(self) -> int:
        return sum(s.data_start + s.data_size for s in self.shards)


def open_checkpoint(path: str | os.PathLike, require_data: bool = True) -> Checkpoint:
    """Read the index (or the single ``model.safetensors``) and every shard header; checks that
    each key the index names exists in its shard. Reads no tensor data (``require_data``: see
    :func:`read_header`)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf" or (path.is_dir() and not (path / INDEX_NAME).exists()
                                                      and not (path / SINGLE_NAME).exists() and any(path.glob("*.gguf"))):
        raise CheckpointError(gguf_message(path))
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    index_path = path / INDEX_NAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index_path} is not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no 'weight_map'")
        names = sorted(set(weight_map.values()))
        for name in names:
            if os.path.basename(name) != name:
                raise CheckpointError(f"{index_path}: shard name '{name}' is not a plain file name")
            if not (path / name).exists():
                raise CheckpointError(f"{index_path} names shard '{name}', which does not exist in {path}")
        shards = tuple(read_header(path / name, require_data) for name in names)
        present = {s.path.name: set(s.by_key()) for s in shards}
        for key, name in weight_map.items():
            if key not in present[name]:
                raise CheckpointError(f"{index_path} maps '{key}' to {name}, but that shard has no such key")
        return Checkpoint(path, index, shards, dict(weight_map))
    single = path / SINGLE_NAME
    if single.exists():
        header = read_header(single, require_data)
        return Checkpoint(path, None, (header,), {t.key: SINGLE_NAME for t in header.tensors})
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path} holds PyTorch pickle weights (.bin/.pt), not safetensors; "
                              "convert it (load with transformers and save_pretrained) and bake the copy")
    raise CheckpointError(f"{path} has neither {INDEX_NAME} nor {SINGLE_NAME}")


def gguf_message(path: Path) -> str:
    return (f"{path} is a GGUF checkpoint: its tensors are stored in quantized blocks that cannot be edited in place. "
            "Dequantize it first (load it with transformers' gguf_file= and save_pretrained to a directory), "
            "then bake that safetensors directory")
