"""``bake``: plan, then stream every shard into a temporary sibling directory, then publish it.
Guarantees (each has a test in tests/test_bake_safety.py): the input is only ever opened for reading;
nothing appears at the output path until every file is complete (:mod:`.publish`: fsync'ed, then
renamed or atomically exchanged; a killed bake leaves only a hidden temporary directory, which the
next bake of the same output removes); every refusal (quantized keys, missing keys, output inside
the input, existing output) happens before the first byte is written."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import load_config
from ..config.resolve import bind
from ..config.schema import InterventionConfig
from ..errors import CheckpointError, InputError
from ..io.measurements import Measurements, measurements_for
from ..io.models import versions
from .dequantize import dequantized_copy, keys_to_dequantize
from .gguf_export import baked_gguf_path, export_gguf, preflight
from .outputs import MANIFEST, check_untouched, shard_metadata, write_manifest, write_side_files
from .plan import BakePlan, plan_bake, read_model_config, resolve_source
from .publish import check_output, make_temporary, mark_complete, publish
from .workers import run_jobs
from .writer import ShardJob, TensorHook

if TYPE_CHECKING:
    from .dequantize import Dequantize
    from .gguf_export import GGUFExport


@dataclass
class BakeResult:
    plan: BakePlan
    output: Path | None  # None for a dry run
    dry_run: bool = False
    seconds: float = 0.0
    bytes_total: int = 0
    bytes_edited: int = 0
    tensors_edited: int = 0
    manifest: Path | None = None
    untouched_checked: int = 0  # --verify-hashes: untouched tensors compared with the input
    not_copied: list[str] = field(default_factory=list)  # weight files in other formats, left out
    gguf: GGUFExport | None = None  # bake --gguf: the GGUF written into the output, and its check

    @property
    def throughput(self) -> float:
        """Bytes per second written."""
        return self.bytes_total / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        if self.dry_run:
            return self.plan.describe()
        mib = 1024 * 1024
        lines = [f"baked {self.tensors_edited} tensors ({self.bytes_edited / mib:.1f} MiB edited of "
                 f"{self.bytes_total / mib:.1f} MiB) in {self.seconds:.1f}s "
                 f"({self.throughput / mib:.0f} MiB/s) -> {self.output}"]
        if self.manifest:
            lines.append(f"{MANIFEST} written; {self.untouched_checked} untouched tensors byte-identical to the input")
        if self.not_copied:
            lines.append(f"not copied (weights in another format, not edited): {', '.join(self.not_copied)}")
        if self.gguf:
            lines.append(self.gguf.summary())
        return "\n".join(lines)


def bake(config: InterventionConfig | str | os.PathLike, output: str | os.PathLike | None = None,
         overwrite: bool = False, dry_run: bool = False, workers: int = 1, progress: bool = True,
         verify_hashes: bool = False, *, model: str | os.PathLike | None = None,
         measurements: Measurements | str | os.PathLike | None = None, threads: int | None = None,
         on_tensor: TensorHook | None = None, dequantize: Dequantize | None = None,
         gguf: str | None = None) -> BakeResult:
    """Bake ``config`` into a new checkpoint at ``output`` (default: the config's ``output``).

    ``model`` / ``measurements`` override the config's entries. Returns what was done; with
    ``dry_run`` only the plan is made (every check runs, nothing is written). ``threads``: torch
    threads for the edit arithmetic (default: at most 4; 1 per worker process when
    ``workers > 1``) — 1 is best on a machine whose cores are busy with other work. ``on_tensor(key)``
    runs after each tensor is written, in worker processes too (picklable, then). ``dequantize``
    (``"edited"`` or ``"all"``): a FP8 / MXFP4 checkpoint's edited (or all) quantized tensors are
    dequantized to bf16 first (:mod:`.dequantize`). ``gguf`` (a type, e.g. ``"f16"``): the output is also
    converted to ``<output>/<name>-<type>.gguf`` and checked (:mod:`.gguf_export`); its refusals run first.
    """
    cfg = config if isinstance(config, InterventionConfig) else load_config(config, model=model)
    source = resolve_source(model if model is not None else cfg.model)
    meas = measurements_for(measurements, cfg.measurements, cfg.source)
    out = output if output is not None else cfg.output
    if gguf is not None:
        preflight(Path(source), gguf)  # type, converter, architecture: before anything is written
    if dequantize is not None:
        bound = bind(cfg, meas, read_model_config(Path(source)))
        keys_to_dequantize(bound, Path(source), dequantize)  # named errors before anything is written
        if dry_run or out is None:
            raise InputError("--dequantize writes a checkpoint: give --output DIR and no --dry-run")
        check_output(source, Path(out), overwrite)
        with dequantized_copy(bound, Path(source), dequantize, Path(os.path.abspath(out))) as copy:
            plan = plan_bake(bound, copy)
            return _with_gguf(execute(plan, Path(out), overwrite=overwrite, workers=workers, progress=progress,
                                      verify_hashes=verify_hashes, threads=threads, on_tensor=on_tensor), gguf)
    plan = plan_bake(cfg, source, meas)
    if dry_run:
        if out is not None:
            check_output(source, Path(out), overwrite)
        return BakeResult(plan=plan, output=None, dry_run=True, bytes_total=plan.total_bytes,
                          bytes_edited=plan.edited_bytes, tensors_edited=len(plan.edits))
    if out is None:
        raise InputError("no output directory: pass --output DIR or set 'output' in the config")
    return _with_gguf(execute(plan, Path(out), overwrite=overwrite, workers=workers, progress=progress,
                              verify_hashes=verify_hashes, threads=threads, on_tensor=on_tensor), gguf)


def _with_gguf(result: BakeResult, gguf: str | None) -> BakeResult:
    """``bake --gguf``: the published bake converted and checked (a failure leaves the bake complete, no GGUF)."""
    if gguf is None or result.output is None:
        return result
    try:
        result.gguf = export_gguf(result.output, baked_gguf_path(result.output, gguf), gguf)
    except InputError as e:
        raise InputError(f"baked {result.output}, but no GGUF: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"baked {result.output}, but no GGUF: {e}") from None
    return result


def execute(plan: BakePlan, output: Path, overwrite: bool = False, workers: int = 1, progress: bool = True,
            verify_hashes: bool = False, threads: int | None = None, *,
            on_tensor: TensorHook | None = None) -> BakeResult:
    """Write the planned checkpoint to ``output`` (via a temporary sibling, published at the end).
    ``on_tensor(key)`` runs after each tensor is written (tests: a pause, so a signal lands mid-run)."""
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    output = Path(os.path.abspath(output))
    start = time.perf_counter()
    tmp = make_temporary(plan.source, output, overwrite)
    try:
        vers = versions()
        meta = shard_metadata(plan, vers)
        jobs = [ShardJob(str(h.path), str(tmp / h.path.name), plan.edits_in_shard(h.path.name), meta)
                for h in plan.checkpoint.shards]
        results = run_jobs(jobs, plan.checkpoint.shards, workers=workers, threads=threads, progress=progress,
                           on_tensor=on_tensor)
        not_copied = write_side_files(plan, tmp, vers)
        result = BakeResult(plan=plan, output=output, bytes_total=sum(r.bytes_total for r in results),
                            bytes_edited=sum(r.bytes_edited for r in results),
                            tensors_edited=sum(r.tensors_edited for r in results), not_copied=not_copied)
        if verify_hashes:
            result.untouched_checked = check_untouched(plan, tmp)
        mark_complete(tmp)  # before the manifest, which lists every file
        if verify_hashes:
            result.manifest = output / MANIFEST
            write_manifest(tmp)
        publish(tmp, output)
        result.seconds = time.perf_counter() - start
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
