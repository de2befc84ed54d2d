"""Which tensors a saved checkpoint changed, read from the checkpoint itself (never assumed from what a
tool says it edits): every tensor of the edited checkpoint against the same-named tensor of the original,
one tensor at a time through intervene's safetensors reader (``intervene.io.checkpoint``). Equal bytes
and dtype: unchanged. Other dtype (a tool that saves bf16 from a float32 organism): the original is
rounded to the edited tensor's dtype first, so rounding alone is no change."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from intervene.io.checkpoint import Checkpoint, as_tensor, editable_dtype, open_checkpoint, read_tensor_bytes


@dataclass
class TensorDiff:
    """The edited checkpoint against the original, by tensor name."""

    changed: dict[str, float] = field(default_factory=dict)  # name -> ||edited - original|| / ||original||
    added: list[str] = field(default_factory=list)  # in the edited checkpoint only
    missing: list[str] = field(default_factory=list)  # in the original only
    retyped: list[str] = field(default_factory=list)  # saved in another dtype (changed or not)
    reshaped: list[str] = field(default_factory=list)  # same name, another shape (counted as changed)

    @property
    def changed_names(self) -> list[str]:
        return sorted(self.changed)


class _Reader:
    """One tensor at a time from a checkpoint, its shard files opened once."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.files: dict[str, object] = {}

    def raw(self, key: str) -> tuple[bytearray, object]:
        name = self.checkpoint.weight_map[key]
        header = self.checkpoint.shard(name)
        f = self.files.get(name)
        if f is None:
            f = self.files[name] = open(header.path, "rb")
        info = header.by_key()[key]
        return read_tensor_bytes(f, header, info), info

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def relative_change(original: torch.Tensor, edited: torch.Tensor) -> float:
    o, e = original.double(), edited.double()
    norm = float(o.norm())
    return float((e - o).norm()) / norm if norm > 0 else float((e - o).norm())


def diff_checkpoints(original: str | Path, edited: str | Path) -> TensorDiff:
    """Every tensor of ``edited`` against ``original`` (two safetensors checkpoint directories)."""
    a, b = _Reader(open_checkpoint(original)), _Reader(open_checkpoint(edited))
    diff = TensorDiff()
    try:
        keys_a, keys_b = set(a.checkpoint.weight_map), set(b.checkpoint.weight_map)
        diff.added = sorted(keys_b - keys_a)
        diff.missing = sorted(keys_a - keys_b)
        for key in sorted(keys_a & keys_b):
            buf_a, info_a = a.raw(key)
            buf_b, info_b = b.raw(key)
            if info_a.dtype == info_b.dtype and info_a.shape == info_b.shape and buf_a == buf_b:
                continue
            if info_a.dtype != info_b.dtype:
                diff.retyped.append(key)
            if info_a.shape != info_b.shape:
                diff.reshaped.append(key)
                diff.changed[key] = float("nan")
                continue
            if editable_dtype(info_a.dtype) is None or editable_dtype(info_b.dtype) is None:
                diff.changed[key] = float("nan")  # integer / quantized storage: the bytes differ
                continue
            ta, tb = as_tensor(buf_a, info_a), as_tensor(buf_b, info_b)
            if info_a.dtype != info_b.dtype:
                ta = ta.to(tb.dtype)
                if torch.equal(ta, tb):
                    continue
            diff.changed[key] = relative_change(ta, tb)
    finally:
        a.close()
        b.close()
    return diff


__all__ = ["TensorDiff", "relative_change", "diff_checkpoints"]
