"""Streaming one shard: header, then every tensor in file order — edited ones read, projected in
float32 block by block and cast back, untouched ones copied as raw byte ranges. Memory: one edited
tensor's stored bytes plus float32 temporaries for one block (``BLOCK_BYTES``); untouched tensors
never enter Python memory (``os.copy_file_range``, run by a background thread while the next edited
tensor is projected). The output keeps the input's tensor order, dtypes, shapes and data offsets,
so the data section of an output shard differs from the input only inside edited tensors."""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from math import prod
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .. import maths
from ..errors import CheckpointError
from .plan import TensorEdit
from ..io.checkpoint import SafetensorsHeader, as_tensor

BLOCK_BYTES = 16 * 1024 * 1024  # float32 working set per block of an edited tensor (temporaries ~4x)
COPY_CHUNK = 64 * 1024 * 1024

Progress = Callable[[int], None]  # bytes written since the last call
TensorHook = Callable[[str], None]  # the key of a tensor whose bytes are now in the output


@dataclass(frozen=True)
class ShardJob:
    """Everything a (possibly separate) process needs to write one output shard."""

    source: str  # input shard path
    target: str  # output shard path
    edits: dict[str, list[TensorEdit]]  # key -> edits in config order (only keys of this shard)
    metadata: dict[str, str]  # extra safetensors metadata (merged over the input's)


@dataclass(frozen=True)
class ShardResult:
    name: str
    bytes_total: int
    bytes_edited: int
    tensors_edited: int
    seconds: float


def header_bytes(header: SafetensorsHeader, extra_metadata: dict[str, str]) -> bytes:
    """The input's header JSON (same entries, same order) with metadata merged, padded with spaces
    to a multiple of 8 bytes like safetensors does."""
    meta = dict(header.metadata)
    meta.update(extra_metadata)
    obj: dict[str, object] = {"__metadata__": meta} if meta else {}
    for key, entry in header.raw_entries:
        obj[key] = entry
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def copy_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy ``length`` bytes between file descriptors at explicit offsets: a kernel copy
    (``os.copy_file_range``, no user-space buffer) where the OS has one, 64 MiB chunks otherwise."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src_fd, dst_fd, min(length - done, 1 << 30), src_offset + done, dst_offset + done)
                if n == 0:
                    break
                done += n
        except OSError as e:
            if done or e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
                raise
    while done < length:
        block = os.pread(src_fd, min(COPY_CHUNK, length - done), src_offset + done)
        if not block:
            raise CheckpointError(f"source truncated at byte {src_offset + done}")
        pwrite_all(dst_fd, block, dst_offset + done)
        done += len(block)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (pwrite may write less than asked)."""
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pread_into(fd: int, buf: bytearray, offset: int, what: str) -> None:
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise CheckpointError(f"{what}: truncated at byte {offset + got}")
        got += n


def blocks(shape: Sequence[int], hidden_axis: int, max_elems: int) -> Iterator[tuple[slice, ...]]:
    """Index tuples covering ``shape`` in blocks of at most ``max_elems`` elements (at least one
    whole fibre), never splitting the hidden axis: each fibre along it is edited as a whole."""
    ndim = len(shape)
    other = [a for a in range(ndim) if a != hidden_axis]
    total = prod(shape)

    def block_size(k: int) -> int:  # elements when other[:k] are fixed to one index each
        return total // max(1, prod(shape[a] for a in other[:k]))

    k = 0
    while k < len(other) and block_size(k) > max_elems:
        k += 1
    if k == 0:
        yield (slice(None),) * ndim
        return
    split = other[k - 1]
    per_index = block_size(k)
    step = max(1, max_elems // max(1, per_index))
    for idx in product(*(range(shape[a]) for a in other[: k - 1])):
        for start in range(0, shape[split], step):
            sl = [slice(None)] * ndim
            for a, i in zip(other[: k - 1], idx):
                sl[a] = slice(i, i + 1)
            sl[split] = slice(start, min(start + step, shape[split]))
            yield tuple(sl)


def apply_edits(t: torch.Tensor, ops: Sequence[TensorEdit], block_bytes: int = BLOCK_BYTES) -> None:
    """Edit ``t`` IN PLACE with ``ops`` in order, in float32 (float64 tensors stay float64), one
    block at a time; one cast back to the stored dtype per block."""
    if t.numel() == 0 or not ops:
        return
    expert_axis = ops[0].expert_axis
    units: list[tuple[torch.Tensor, list[TensorEdit]]]
    if expert_axis is not None and any(op.experts is not None for op in ops):
        units = []
        for e in range(t.shape[expert_axis]):
            chosen = [op for op in ops if op.experts is None or e in op.experts]
            if chosen:
                units.append((t.narrow(expert_axis, e, 1), chosen))
    else:
        units = [(t, list(ops))]
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    max_elems = max(1, block_bytes // torch.tensor([], dtype=work).element_size())
    for view, chosen in units:
        axis = chosen[0].hidden_axis
        for sl in blocks(view.shape, axis, max_elems):
            block = view[sl]
            x = block.to(work)
            for op in chosen:
                if op.add is not None:  # router_bias: the [E] selection-bias tensor, whole (maths.add_selection_bias)
                    x = x + op.add.to(x.dtype)
                elif op.method == "project" or op.is_bias:
                    x = maths.project_out(x, op.direction, op.hidden_axis, op.scale)
                else:
                    x = maths.edit_tensor(x, op.direction, op.hidden_axis, op.scale, op.method, op.is_bias)
            block.copy_(x)  # casts to the stored dtype (round to nearest even, as .to() does)


def write_shard(job: ShardJob, header: SafetensorsHeader, progress: Progress | None = None,
                on_tensor: TensorHook | None = None) -> ShardResult:
    """Write ``job.target`` from ``job.source``. The caller owns the directory (temporary).

    Untouched runs of tensors are kernel-copied by a background thread while this thread edits
    the next edited tensor: both write at explicit offsets (the output's layout is the input's,
    shifted by the header length), so the result does not depend on which finishes first.
    ``on_tensor(key)`` runs after each tensor is written (untouched ones are then copied one at a
    time, in this thread); the interrupt tests pass a pause, so that a signal lands mid-shard."""
    start = time.perf_counter()
    lock = threading.Lock()

    def report(n: int) -> None:  # called from both threads
        if progress:
            with lock:
                progress(n)

    head = header_bytes(header, job.metadata)
    out_start = len(head)  # the output's data section starts here
    edited_bytes = 0
    target = Path(job.target)
    src_fd = dst_fd = -1
    copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bake-copy")
    pending = []
    try:
        src_fd = os.open(job.source, os.O_RDONLY)
        dst_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pwrite_all(dst_fd, head, 0)

        def copy_run(begin: int, end: int) -> None:
            for offset in range(begin, end, 1 << 30):  # chunks, so the progress bar moves
                n = min(1 << 30, end - offset)
                copy_range(src_fd, dst_fd, header.data_start + offset, out_start + offset, n)
                report(n)

        run_begin: int | None = None  # pending run of untouched tensors [run_begin, run_end)
        run_end = 0
        for info in header.tensors:
            ops = job.edits.get(info.key)
            if not ops:
                if run_begin is None:
                    run_begin = info.begin
                run_end = info.end
                if on_tensor is not None:
                    copy_run(run_begin, run_end)
                    run_begin = None
                    on_tensor(info.key)
                continue
            if run_begin is not None:
                pending.append(copier.submit(copy_run, run_begin, run_end))
                run_begin = None
            buf = bytearray(info.nbytes)
            _pread_into(src_fd, buf, header.data_start + info.begin, f"{job.source} '{info.key}'")
            apply_edits(as_tensor(buf, info), ops)
            pwrite_all(dst_fd, buf, out_start + info.begin)
            del buf
            edited_bytes += info.nbytes
            report(info.nbytes)
            if on_tensor is not None:
                on_tensor(info.key)
        if run_begin is not None:
            pending.append(copier.submit(copy_run, run_begin, run_end))
        for fut in pending:
            fut.result()  # re-raises a copy error here
        report(out_start)  # the header, counted last so totals add up
    except OSError as e:
        raise CheckpointError(f"writing {target} failed: {e.strerror or e}") from None
    finally:
        copier.shutdown(wait=True, cancel_futures=True)
        for fd in (src_fd, dst_fd):
            if fd >= 0:
                os.close(fd)
    return ShardResult(target.name, out_start + header.data_size, edited_bytes, len(job.edits),
                       time.perf_counter() - start)
