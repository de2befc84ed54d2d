"""Interrupted runs leave nothing that looks complete: the real CLI in a subprocess, slowed down by
pauses injected into its hooks (:func:`intervene.testing.main_with_pauses`: ``measure(on_batch=...)``,
``save_measurements(before_publish=...)``, ``bake(on_tensor=...)``) so the signal lands mid-run every time.

SIGINT (Ctrl-C: sent to the whole process group) -> exit 130, one line, temporaries removed.
SIGKILL -> at most a hidden temporary remains, never a file or directory at the final path.
Either way the previous output (if any) is intact and a re-run succeeds. The single-process bake
is interrupted in test_bake_safety.py; here: measure, and bake with --workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from intervene.bake.publish import PARTIAL_MARKER, TMP_TAG
from intervene.cli import main
from intervene.io.measurements import Measurements, load_measurements
from intervene.testing import paused_cli, save_tiny, tiny_model, tiny_tokenizer

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

def start(argv: list, pauses: dict[str, float], stderr: Path) -> subprocess.Popen:
    """``intervene ...`` (with ``pauses``, see :func:`intervene.testing.main_with_pauses`) in its own
    process group (like a job in a terminal)."""
    with open(stderr, "w") as err:
        return subprocess.Popen(paused_cli(argv, **pauses), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)


def wait_until(condition, proc: subprocess.Popen, stderr: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"finished before the interrupt (rc {proc.returncode}): {stderr.read_text()}"
        assert time.time() < deadline, "the run did not reach the point to interrupt in time"
        time.sleep(0.02)


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


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(pid)
        except OSError:
            pass
    return out


def assert_gone(pids: set[int], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while alive(pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pids), f"processes left running: {sorted(alive(pids))}"


def assert_one_line_interrupted(stderr: Path, verb: str) -> None:
    err = stderr.read_text()
    assert "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == f"intervene {verb}: interrupted"


# ---- measure -----------------------------------------------------------------------------------------

def measure_argv(base: Path, out: Path, *extra: str) -> list:
    return ["measure", base / "model", "-o", out, "--harmful", base / "harmful.txt", "--harmless",
            base / "harmless.txt", "--batch-size", "1", *extra]


def test_measure_interrupted_between_batches_writes_nothing(base, tmp_path):
    """Ctrl-C mid-measure (a SIGKILL there is no different: nothing is written before the end)."""
    out = tmp_path / "m.safetensors"
    stderr = tmp_path / "stderr.txt"
    proc = start(measure_argv(base, out), {"per_batch": 1.0}, stderr)
    # the progress bar (stderr) shows at least one of the 6 batches done, so the run is mid-measure
    done = re.compile(rf"measure:[^\r\n]*\b[1-5]/{2 * N_PROMPTS}\b")
    wait_until(lambda: done.search(stderr.read_text()), proc, stderr)
    assert interrupt(proc, signal.SIGINT) == 130
    assert_one_line_interrupted(stderr, "measure")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]  # no output, no temporary
    assert main([str(a) for a in measure_argv(base, out, "--no-progress")]) == 0
    assert load_measurements(out).layers == [0, 1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_measure_interrupted_while_saving_keeps_previous_file(base, tmp_path, sig):
    """The complete temporary file exists (the hook pauses before the rename): the previous
    measurements at the final path must survive, and what is left is named as a temporary."""
    out = tmp_path / "m.safetensors"
    old = Measurements({"direction.0": torch.ones(64), "direction.1": torch.ones(64)}, meta={"run": "previous"})
    old.save(out)
    old_bytes = out.read_bytes()
    stderr = tmp_path / "stderr.txt"
    proc = start(measure_argv(base, out, "--limit", "1", "--no-progress"), {"per_batch": 1.0, "before_save": 1.0},
                 stderr)
    wait_until(lambda: any(tmp_path.glob(".m.safetensors.*.tmp")), proc, stderr)
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
def test_parallel_bake_interrupted(base, reference_bake, tmp_path, sig):
    out = tmp_path / "out"
    stderr = tmp_path / "stderr.txt"
    proc = start(["bake", base / "c.yaml", "-o", out, "--workers", "2", "--no-progress"], {"per_tensor": 0.3},
                 stderr)

    def late() -> bool:
        """5 of the 6 shards started: every shard job has been handed out, so a worker that
        outlived a killed main process would find no next job to fail on and wait forever."""
        tmps = list(tmp_path.glob(f".out{TMP_TAG}*"))
        return bool(tmps) and len(list(tmps[0].glob("*.safetensors"))) >= 5

    wait_until(late, proc, stderr)
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
