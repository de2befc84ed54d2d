"""Running the shard jobs: in this process, or in a pool of worker processes (``--workers``), with one
progress bar. Workers ignore SIGINT (Ctrl-C reaches the whole process group; this process handles
it and terminates them), end themselves within a second of a SIGKILLed main process, and run few
torch threads each, since the bake is I/O bound."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_mod
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from ..io.checkpoint import SafetensorsHeader
from .publish import alive
from .writer import ShardJob, ShardResult, TensorHook, header_bytes, write_shard

# torch threads for the edit arithmetic unless told otherwise: edited tensors are mostly a few MB
# and the bake is I/O bound; on a 16-core machine 4 threads streamed 1.2 GB at 0.91x plain-copy
# speed against 0.69x with 16 and 0.57x with 1 (benchmarks/bake.py). On cores busy with other
# work, --threads 1 avoids OpenMP waiting on descheduled threads.
DEFAULT_THREADS = 4
PROGRESS_BATCH = 16 * 1024 * 1024  # bytes a worker accumulates before one progress message


def run_jobs(jobs: list[ShardJob], headers: tuple[SafetensorsHeader, ...], workers: int = 1,
             threads: int | None = None, progress: bool = True,
             on_tensor: TensorHook | None = None) -> list[ShardResult]:
    """Write every job's shard, in order of ``jobs``; ``workers > 1`` runs them in that many processes
    (``threads`` torch threads each, default 1); in this process ``threads`` defaults to at most
    :data:`DEFAULT_THREADS`, restored afterwards. ``on_tensor`` goes to :func:`write_shard` (in
    worker processes too: it must then be picklable)."""
    serial = workers == 1 or len(jobs) == 1
    total = sum(len(header_bytes(h, job.metadata)) + h.data_size for job, h in zip(jobs, headers))
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="bake", file=sys.stderr,
               disable=not progress, smoothing=0.1)
    try:
        if serial:
            wanted = threads if threads is not None else min(DEFAULT_THREADS, _current_threads())
            with torch_threads(wanted):
                return [write_shard(job, header, bar.update, on_tensor) for job, header in zip(jobs, headers)]
        return _run_parallel(jobs, headers, min(workers, len(jobs)), bar.update, threads or 1, on_tensor)
    finally:
        bar.close()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``n`` torch threads for the block, restored after (it is process-wide state)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _current_threads() -> int:
    return torch.get_num_threads()


def _run_parallel(jobs: list[ShardJob], headers: tuple[SafetensorsHeader, ...], workers: int,
                  update: Callable[[int], None], threads: int = 1,
                  on_tensor: TensorHook | None = None) -> list[ShardResult]:
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
        futures = {pool.submit(_worker_run, job, header, on_tensor): i
                   for i, (job, header) in enumerate(zip(jobs, headers))}
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
    while True:
        try:
            update(queue.get_nowait())
        except queue_mod.Empty:
            return


# Per worker process, set once by _worker_init: where progress is reported. A multiprocessing
# queue can only reach a worker when it starts, not with each job.
_worker_queue: Any = None


def _worker_init(queue: Any, threads: int, main_pid: int | None = None) -> None:
    global _worker_queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main process handles it
    torch.set_num_threads(threads)  # workers share the cores; the bake is I/O bound
    _worker_queue = queue
    if main_pid is not None:
        threading.Thread(target=_exit_when_gone, args=(main_pid,), daemon=True, name="bake-main-watch").start()


def _exit_when_gone(main_pid: int) -> None:
    """A SIGKILLed bake cannot stop its workers, and a worker waiting for its next shard would wait
    forever: each worker ends itself within a second of the main process."""
    while alive(main_pid):
        time.sleep(0.5)
    os._exit(1)


def _worker_run(job: ShardJob, header: SafetensorsHeader, on_tensor: TensorHook | None = None) -> ShardResult:
    pending = [0]

    def report(n: int) -> None:  # batch small updates: a queue put per tiny tensor is wasteful
        pending[0] += n
        if pending[0] >= PROGRESS_BATCH:
            _worker_queue.put(pending[0])
            pending[0] = 0

    result = write_shard(job, header, report, on_tensor)
    if pending[0]:
        _worker_queue.put(pending[0])
    return result
