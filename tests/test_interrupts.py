"""Interrupted runs leave nothing that looks complete: the real CLI in a subprocess, stopped by a gate
injected into its hooks (:func:`intervene.testing.main_with_gates`: ``measure(on_batch=...)``,
``save_measurements(before_publish=...)``, ``bake(on_tensor=...)``) that reports "paused at X" and
blocks; the test waits for that report (a blocking read, no timing) and only then sends the signal,
so it lands at the named point however busy the machine is.

SIGINT (Ctrl-C: sent to the whole process group) -> exit 130, one line, temporaries removed.
SIGKILL -> at most a hidden temporary remains, never a file or directory at the final path.
Either way the previous output (if any) is intact and a re-run succeeds. The single-process bake
is interrupted in test_bake_safety.py; here: measure, and bake with --workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from intervene.bake.publish import PARTIAL_MARKER, TMP_TAG
from intervene.cli import main
from intervene.io.measurements import Measurements, load_measurements
from intervene.testing import GateWatch, gated_cli, save_tiny, tiny_model, tiny_tokenizer, wait_for_exit

N_PROMPTS = 3  # per set; with --batch-size 1: 6 batches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupts")
    save_tiny(tiny_model("llama", seed=5), root / "model", max_shard_size="60KB")  # 6 shards
    tiny_tokenizer().save_pretrained(str(root / "model"))
    (root / "harmful.txt").write_text("".join(f"harmful request number {i}\n" for i in range(N_PROMPTS)))
    (root / "harmless.txt").write_text("".join(f"harmless request number {i}\n" for i in range(N_PROMPTS)))
    g = torch.Generator().manual_seed(0)
    Measurements({f"direction.{i}": torch.randn(64, generator=g) for i in range(2)}).save(root / "m.safetensors")
    (root / "c.yaml").write_text(yaml.safe_dump({
        "model": str(root / "model"), "measurements": str(root / "m.safetensors"),
        "ablate": [{"layers": "0:2", "measurement": 1, "scale": 1.0}]}))
    return root


# ---- helpers -----------------------------------------------------------------------------------

@pytest.fixture
def gate():
    with GateWatch() as watch:
        yield watch


def start(argv: list, gate: GateWatch, stderr: Path, **gates: int | str) -> subprocess.Popen:
    """``intervene ...`` stopped at ``gates`` (see :func:`intervene.testing.main_with_gates`) in its own
    process group (like a job in a terminal)."""
    with open(stderr, "w") as err:
        return subprocess.Popen(gated_cli(argv, gate.fifo, **gates), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)


def wait_paused(gate: GateWatch, proc: subprocess.Popen, point: str, stderr: Path) -> None:
    gate.wait(proc, point, describe=stderr.read_text)


def interrupt(proc: subprocess.Popen, sig: signal.Signals) -> int:
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches every process of the foreground group
    else:
        os.kill(proc.pid, signal.SIGKILL)  # the main process only (OOM killer, kill -9)
    return proc.wait(timeout=120)


def descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (workers, fork server, resource tracker), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def assert_gone(pids: set[int]) -> None:
    left = wait_for_exit(pids)
    assert not left, f"processes left running: {sorted(left)}"


def assert_one_line_interrupted(stderr: Path, verb: str) -> None:
    err = stderr.read_text()
    assert "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == f"intervene {verb}: interrupted"


# ---- measure -----------------------------------------------------------------------------------------

def measure_argv(base: Path, out: Path, *extra: str) -> list:
    return ["measure", base / "model", "-o", out, "--harmful", base / "harmful.txt", "--harmless",
            base / "harmless.txt", "--batch-size", "1", *extra]


def test_measure_interrupted_between_batches_writes_nothing(base, tmp_path, gate):
    """Ctrl-C mid-measure (a SIGKILL there is no different: nothing is written before the end)."""
    out = tmp_path / "m.safetensors"
    stderr = tmp_path / "stderr.txt"
    proc = start(measure_argv(base, out), gate, stderr, batch=2)  # 2 of the 6 batches done: mid-measure
    wait_paused(gate, proc, "batch", stderr)
    assert interrupt(proc, signal.SIGINT) == 130
    assert_one_line_interrupted(stderr, "measure")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]  # no output, no temporary
    assert main([str(a) for a in measure_argv(base, out, "--no-progress")]) == 0
    assert load_measurements(out).layers == [0, 1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_measure_interrupted_while_saving_keeps_previous_file(base, tmp_path, sig, gate):
    """The complete temporary file exists (the hook pauses before the rename): the previous
    measurements at the final path must survive, and what is left is named as a temporary."""
    out = tmp_path / "m.safetensors"
    old = Measurements({"direction.0": torch.ones(64), "direction.1": torch.ones(64)}, meta={"run": "previous"})
    old.save(out)
    old_bytes = out.read_bytes()
    stderr = tmp_path / "stderr.txt"
    proc = start(measure_argv(base, out, "--limit", "1", "--no-progress"), gate, stderr, save=1)
    wait_paused(gate, proc, "save", stderr)
    assert len(list(tmp_path.glob(".m.safetensors.*.tmp"))) == 1  # written in full, not yet renamed
    rc = interrupt(proc, sig)
    assert out.read_bytes() == old_bytes
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("m.safetensors", "stderr.txt"))
    if sig == signal.SIGINT:
        assert rc == 130
        assert_one_line_interrupted(stderr, "measure")
        assert left == []
    else:
        assert rc == -signal.SIGKILL
        assert len(left) == 1 and re.fullmatch(r"\.m\.safetensors\..+\.tmp", left[0]), left  # hidden temporary
    assert main([str(a) for a in measure_argv(base, out, "--limit", "1", "--no-progress")]) == 0
    new = load_measurements(out)
    assert new.meta["n_harmful"] == 1 and "run" not in new.meta


# ---- bake with worker processes ----------------------------------------------------------------------

def baked_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_bake(base, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["bake", str(base / "c.yaml"), "-o", str(out), "--no-progress"]) == 0
    return baked_files(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_parallel_bake_interrupted(base, reference_bake, tmp_path, sig, gate):
    out = tmp_path / "out"
    stderr = tmp_path / "stderr.txt"
    # stop in the last shard: every shard job has been handed out then, so a worker that outlived a
    # killed main process would find no next job to fail on and wait forever
    weight_map = json.loads((base / "model" / "model.safetensors.index.json").read_text())["weight_map"]
    last_key = min(key for key, shard in weight_map.items() if shard == max(weight_map.values()))
    proc = start(["bake", base / "c.yaml", "-o", out, "--workers", "2", "--no-progress"], gate, stderr,
                 tensor=last_key)
    wait_paused(gate, proc, "tensor", stderr)
    children = descendants(proc.pid)
    tmp = tmp_path / f".out{TMP_TAG}{proc.pid}"
    assert tmp.is_dir()
    rc = interrupt(proc, sig)
    assert_gone(children)  # no worker keeps writing after its parent is gone
    assert not out.exists()
    if sig == signal.SIGINT:
        assert rc == 130
        assert_one_line_interrupted(stderr, "bake")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]
    else:
        assert rc == -signal.SIGKILL
        # only the hidden temporary remains, marked incomplete
        assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name, "stderr.txt"]
        assert (tmp / PARTIAL_MARKER).exists()
    assert main(["bake", str(base / "c.yaml"), "-o", str(out), "--no-progress"]) == 0  # serial: saves a start-up
    assert baked_files(out) == reference_bake
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stderr.txt"]  # stale temporary removed
