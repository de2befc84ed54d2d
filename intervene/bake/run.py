"""``bake``: plan, then stream every shard into a temporary sibling directory, then rename.

Guarantees (each has a test in tests/test_bake_safety.py):
- the input is only ever opened for reading;
- nothing appears at the output path until every file is complete (temporary sibling
  ``.<name>.intervene-tmp-<pid>``, fsync'ed, then renamed; an existing output is swapped in one
  atomic exchange where the OS has it); a killed bake leaves only that hidden temporary
  directory, which the next bake of the same output removes;
- every refusal (quantized keys, missing keys, output inside the input, existing output) happens
  before the first byte is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config.schema import InterventionConfig, load_config
from ..errors import CheckpointError, InputError
from ..io.measurements import Measurements, load_measurements
from .plan import BakePlan, plan_bake, plan_summary, resolve_source
from ..io.checkpoint import INDEX_NAME, SafetensorsHeader, read_header
from .writer import ShardJob, ShardResult, header_bytes, write_shard

TMP_TAG = ".intervene-tmp-"
OLD_TAG = ".intervene-old-"
PARTIAL_MARKER = ".intervene-partial"
MANIFEST = "SHA256SUMS"
# torch threads for the edit arithmetic unless told otherwise: edited tensors are mostly a few MB
# and the bake is I/O bound; on a 16-core machine 4 threads streamed 1.2 GB at 0.91x plain-copy
# speed against 0.69x with 16 and 0.57x with 1 (benchmarks/bake.py). On cores busy with other
# work, --threads 1 avoids OpenMP waiting on descheduled threads.
DEFAULT_THREADS = 4
# weights in other formats are not copied (they would carry the UNEDITED model)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")


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
        return "\n".join(lines)


def bake(config: InterventionConfig | str | os.PathLike, output: str | os.PathLike | None = None,
         overwrite: bool = False, dry_run: bool = False, workers: int = 1, progress: bool = True,
         verify_hashes: bool = False, *, model: str | os.PathLike | None = None,
         measurements: Measurements | str | os.PathLike | None = None, threads: int | None = None) -> BakeResult:
    """Bake ``config`` into a new checkpoint at ``output`` (default: the config's ``output``).

    ``model`` / ``measurements`` override the config's entries. Returns what was done; with
    ``dry_run`` only the plan is made (every check runs, nothing is written). ``threads``: torch
    threads for the edit arithmetic (default: at most 4; 1 per worker process when
    ``workers > 1``) — 1 is best on a machine whose cores are busy with other work.
    """
    cfg = config if isinstance(config, InterventionConfig) else load_config(config)
    source = resolve_source(model if model is not None else cfg.model)
    meas = _measurements(measurements if measurements is not None else cfg.measurements)
    plan = plan_bake(cfg, source, meas)
    out = output if output is not None else cfg.output
    if dry_run:
        if out is not None:
            check_output(source, Path(out), overwrite)
        return BakeResult(plan=plan, output=None, dry_run=True, bytes_total=plan.total_bytes,
                          bytes_edited=plan.edited_bytes, tensors_edited=len(plan.edits))
    if out is None:
        raise InputError("no output directory: pass --output DIR or set 'output' in the config")
    return execute(plan, Path(out), overwrite=overwrite, workers=workers, progress=progress,
                   verify_hashes=verify_hashes, threads=threads)


def _measurements(m: Measurements | str | os.PathLike | None) -> Measurements:
    if isinstance(m, Measurements):
        return m
    if m is None:
        raise InputError("no measurements: set 'measurements' in the config or pass --measurements FILE")
    return load_measurements(m)


# ---- output directory safety ------------------------------------------------------------

def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def check_output(source: Path, output: Path, overwrite: bool) -> None:
    src, out = _real(source), _real(output)
    if out == src:
        raise InputError(f"output {output} is the input checkpoint: choose another directory (the input is never modified)")
    if src in out.parents:
        raise InputError(f"output {output} is inside the input checkpoint {source}: choose a directory outside it")
    if out in src.parents:
        raise InputError(f"output {output} contains the input checkpoint {source}: choose a directory that does not")
    if output.exists() or output.is_symlink():
        if not output.is_dir() or output.is_symlink():
            raise InputError(f"output {output} exists and is not a directory")
        if not overwrite:
            raise InputError(f"output {output} already exists; pass --overwrite to replace it")


def _cleanup_stale(output: Path) -> None:
    """Tidy up after killed bakes of this output (their process is gone): an old output that a
    killed ``--overwrite`` bake had moved aside is put back if the path is empty (the killed bake
    never finished, so the previous state is restored); temporaries are removed."""
    parent = output.parent
    if not parent.is_dir():
        return
    for p in sorted(parent.glob(f".{output.name}{OLD_TAG}*")):
        if not _owner_gone(p) or not (p / PARTIAL_MARKER).exists():
            continue
        if not os.path.lexists(output):
            os.rename(p, output)
            (output / PARTIAL_MARKER).unlink(missing_ok=True)
            print(f"intervene bake: restored {output} from {p.name}, left by a bake that was killed "
                  "while replacing it", file=sys.stderr)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{output.name}{TMP_TAG}*"):
        if _owner_gone(p):
            shutil.rmtree(p, ignore_errors=True)


def _owner_gone(path: Path) -> bool:
    """True when ``path`` ends in ``-PID`` (our temporaries do) and that process no longer runs."""
    pid = path.name.rsplit("-", 1)[-1]
    return pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- execution ----------------------------------------------------------------------------

def execute(plan: BakePlan, output: Path, overwrite: bool = False, workers: int = 1, progress: bool = True,
            verify_hashes: bool = False, threads: int | None = None) -> BakeResult:
    """Write the planned checkpoint to ``output`` (via a temporary sibling, renamed at the end)."""
    from ..io.models import versions

    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    output = Path(os.path.abspath(output))
    _cleanup_stale(output)  # first: it may put back an output a killed --overwrite bake moved aside
    check_output(plan.source, output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}{TMP_TAG}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    start = time.perf_counter()
    tmp.mkdir()
    try:
        (tmp / PARTIAL_MARKER).write_text("incomplete intervene bake; safe to delete\n")
        meta = {"intervene": json.dumps({"edit": plan_summary(plan), "config": plan.config.to_dict(),
                                         "versions": versions()}, sort_keys=True, default=str),
                "intervene_config_yaml": plan.config.to_yaml()}
        jobs = [ShardJob(str(h.path), str(tmp / h.path.name), plan.edits_in_shard(h.path.name), meta)
                for h in plan.checkpoint.shards]
        serial = workers == 1 or len(jobs) == 1
        wanted = threads if threads is not None else min(DEFAULT_THREADS, _current_threads())
        total = sum(len(header_bytes(h, meta)) + h.data_size for h in plan.checkpoint.shards)
        with _torch_threads(wanted if serial else None):
            results = _run_jobs(jobs, plan.checkpoint.shards, workers, progress, total, threads or 1)
        not_copied = _copy_side_files(plan.source, tmp, {h.path.name for h in plan.checkpoint.shards})
        _write_index(plan, tmp)
        (tmp / "README.md").write_text(model_card(plan, versions()))
        result = BakeResult(plan=plan, output=output, bytes_total=sum(r.bytes_total for r in results),
                            bytes_edited=sum(r.bytes_edited for r in results),
                            tensors_edited=sum(r.tensors_edited for r in results), not_copied=not_copied)
        if verify_hashes:
            result.untouched_checked = check_untouched(plan, tmp)
            (tmp / PARTIAL_MARKER).unlink()
            result.manifest = output / MANIFEST
            write_manifest(tmp)
        else:
            (tmp / PARTIAL_MARKER).unlink()
        _publish(tmp, output)
        result.seconds = time.perf_counter() - start
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, output: Path) -> None:
    """Make ``tmp`` the ``output``, durably (files and directories fsync'ed first).

    An existing output (--overwrite) is swapped with ``tmp`` in one atomic ``renameat2(...,
    RENAME_EXCHANGE)`` where the OS has it (Linux >= 3.15), so a kill at any instant leaves either
    the old or the new output at the path. Elsewhere the old output is first renamed aside to
    ``.NAME.intervene-old-PID``; a kill between the two renames leaves the path empty for a moment,
    and the next bake of that output puts the old one back (:func:`_cleanup_stale`)."""
    _fsync_tree(tmp)
    if not output.exists():
        os.rename(tmp, output)
        _fsync_dir(output.parent)
        return
    if _exchange(tmp, output):  # tmp now holds the old output (a dead bake's tmp is removed by _cleanup_stale)
        _fsync_dir(output.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = output.parent / f".{output.name}{OLD_TAG}{os.getpid()}"
    os.rename(output, old)
    (old / PARTIAL_MARKER).write_text("replaced output of an intervene bake; safe to delete\n")
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        (output / PARTIAL_MARKER).unlink(missing_ok=True)
        raise
    _fsync_dir(output.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (filesystem without exchange), EOPNOTSUPP: fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories themselves to disk, so a power cut
    after the rename cannot leave a complete-looking output with missing data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """``n`` torch threads for the block, restored after (it is process-wide state)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _current_threads() -> int:
    import torch

    return torch.get_num_threads()


def _run_jobs(jobs: list[ShardJob], headers: tuple[SafetensorsHeader, ...], workers: int, progress: bool,
              total: int, worker_threads: int = 1) -> list[ShardResult]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="bake", file=sys.stderr,
               disable=not progress, smoothing=0.1)
    try:
        if workers == 1 or len(jobs) == 1:
            return [write_shard(job, header, bar.update) for job, header in zip(jobs, headers)]
        return _run_parallel(jobs, headers, min(workers, len(jobs)), bar.update, worker_threads)
    finally:
        bar.close()


def _run_parallel(jobs: list[ShardJob], headers: tuple[SafetensorsHeader, ...], workers: int,
                  update: Callable[[int], None], threads: int = 1) -> list[ShardResult]:
    """Shards in separate processes; each worker streams one shard at a time, so memory stays
    bounded per worker. Progress comes back through a queue. Workers come from a fork server
    that imported torch once (fresh process: no forked OpenMP state from this one), so start-up
    costs one import, not one per worker; spawn where there is no fork server."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["intervene.bake.writer"])
    else:
        ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    results: dict[int, ShardResult] = {}
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(queue, threads, os.getpid()))
    try:
        futures = {pool.submit(_worker_run, job, header): i for i, (job, header) in enumerate(zip(jobs, headers))}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(queue, update)
            for fut in done:
                results[futures[fut]] = fut.result()  # re-raises a worker's CheckpointError
        _drain(queue, update)
    except BaseException:
        # Ctrl-C, a failed shard: stop every worker now rather than let them finish their shards
        # (workers ignore SIGINT themselves, so a Ctrl-C never prints a worker traceback)
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [results[i] for i in range(len(jobs))]


def _drain(queue: Any, update: Callable[[int], None]) -> None:
    import queue as queue_mod

    while True:
        try:
            update(queue.get_nowait())
        except queue_mod.Empty:
            return


_worker_queue: Any = None  # per worker process: where progress is reported (set by _worker_init)


def _worker_init(queue: Any, threads: int, main_pid: int | None = None) -> None:
    global _worker_queue
    import threading

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main process handles it
    torch.set_num_threads(threads)  # workers share the cores; the bake is I/O bound
    _worker_queue = queue
    if main_pid is not None:
        threading.Thread(target=_exit_when_gone, args=(main_pid,), daemon=True, name="bake-main-watch").start()


def _exit_when_gone(main_pid: int) -> None:
    """A SIGKILLed bake cannot stop its workers, and a worker waiting for its next shard would wait
    forever: each worker ends itself within a second of the main process."""
    while _alive(main_pid):
        time.sleep(0.5)
    os._exit(1)


def _worker_run(job: ShardJob, header: SafetensorsHeader) -> ShardResult:
    pending = [0]

    def report(n: int) -> None:  # batch small updates: a queue put per tiny tensor is wasteful
        pending[0] += n
        if pending[0] >= 16 * 1024 * 1024:
            _worker_queue.put(pending[0])
            pending[0] = 0

    result = write_shard(job, header, report)
    if pending[0]:
        _worker_queue.put(pending[0])
    return result


# ---- side files, index, card, hashes ------------------------------------------------------

def _copy_side_files(source: Path, tmp: Path, shards: set[str]) -> list[str]:
    """Copy config, tokenizer, generation and chat-template files and anything else that is not a
    weight file. The input's README is replaced by our model card. Returns weight files skipped."""
    skipped = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        if rel.as_posix() in (INDEX_NAME, "README.md", MANIFEST):
            continue  # rewritten for the output (a copied manifest would describe the input)
        if path.suffix.lower() in WEIGHT_SUFFIXES:
            if rel.as_posix() not in shards:
                skipped.append(rel.as_posix())
            continue
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return skipped


def _write_index(plan: BakePlan, tmp: Path) -> None:
    index = plan.checkpoint.index
    if index is None:
        return
    out = json.loads(json.dumps(index))
    meta = out.setdefault("metadata", {})
    meta["total_size"] = sum(h.data_size for h in plan.checkpoint.shards)
    (tmp / INDEX_NAME).write_text(json.dumps(out, indent=2) + "\n")


def model_card(plan: BakePlan, versions: dict[str, str]) -> str:
    s = plan_summary(plan)
    cfg = plan.config
    name = cfg.name or plan.source.name
    experts = s["experts"] if s["experts"] == "all" else json.dumps(s["experts"])
    lines = [
        f"# {name} — edited with intervene",
        "",
        f"This checkpoint is `{plan.source}` with a directional edit baked into its weights by "
        f"intervene {versions.get('intervene', '?')}.",
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{plan.source}` ({s['architecture']}) |",
        f"| method | {s['method']} |",
        f"| layers | {', '.join(map(str, s['layers']))} |",
        f"| targets | {', '.join(s['targets'])} |",
        f"| scale | {', '.join(f'{x:g}' for x in s['scales'])} |",
        f"| experts | {experts} |",
        f"| tensors edited | {s['tensors_edited']} |",
        f"| measurements | `{s['measurements']}` (sha256 {s['measurements_sha256']}) |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))} |",
        "",
        "Every edited tensor was projected in float32 and cast back to its stored dtype; all other tensors are",
        "byte-identical to the source. The same config applied live (`intervene try`) gives the same logits:",
        "check with `intervene verify CONFIG THIS_DIR`.",
        "",
        "## Config",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def check_untouched(plan: BakePlan, out_dir: Path) -> int:
    """Compare every untouched tensor's bytes in ``out_dir`` with the input. Returns the count."""
    checked = 0
    for header in plan.checkpoint.shards:
        out_header = read_header(out_dir / header.path.name)
        out_by_key = out_header.by_key()
        edited = plan.edits_in_shard(header.path.name)
        with open(header.path, "rb") as a, open(out_dir / header.path.name, "rb") as b:
            for info in header.tensors:
                if info.key in edited:
                    continue
                o = out_by_key.get(info.key)
                if o is None or (o.dtype, o.shape, o.nbytes) != (info.dtype, info.shape, info.nbytes):
                    raise CheckpointError(f"verify-hashes: '{info.key}' changed its entry in {header.path.name}")
                if _range_hash(a, header.data_start + info.begin, info.nbytes) != \
                        _range_hash(b, out_header.data_start + o.begin, o.nbytes):
                    raise CheckpointError(f"verify-hashes: untouched tensor '{info.key}' differs from the input "
                                          f"in {header.path.name}")
                checked += 1
    return checked


def _range_hash(f: Any, offset: int, length: int) -> bytes:
    h = hashlib.sha256()
    f.seek(offset)
    left = length
    while left:
        block = f.read(min(left, 16 * 1024 * 1024))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.digest()


def write_manifest(directory: Path) -> Path:
    """``SHA256SUMS`` (sha256sum format) over every file in ``directory``."""
    lines = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(16 * 1024 * 1024):
                h.update(block)
        lines.append(f"{h.hexdigest()}  {path.relative_to(directory).as_posix()}")
    target = directory / MANIFEST
    target.write_text("\n".join(lines) + "\n")
    return target
