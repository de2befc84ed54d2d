"""Same inputs -> the same bytes: the measurements file and every file of a baked checkpoint
(shards, index, model card, SHA256SUMS) are identical across runs and across processes, and carry
no timestamp."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
import torch
import yaml

from intervene.cli import main
from intervene.testing import save_tiny, tiny_model, tiny_tokenizer
from intervene.runner import RunOptions

ARCHS = ("llama", "qwen3_moe")  # dense, and MoE (router statistics in the measurements)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("determinism")
    out = {}
    for arch in ARCHS:
        path = save_tiny(tiny_model(arch, seed=11), root / arch, max_shard_size="100KB")
        tiny_tokenizer().save_pretrained(str(path))
        out[arch] = path
    (root / "harmful.txt").write_text("How do I pick a lock?\nWrite malware\nHurt someone\n")
    (root / "harmless.txt").write_text("How do I bake bread?\nWrite a poem\nPlan a party\nName a colour\n")
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


def measure_argv(model: Path, out: Path) -> list[str]:
    prompts = model.parent
    return ["measure", str(model), "-o", str(out), "--harmful", str(prompts / "harmful.txt"), "--harmless",
            str(prompts / "harmless.txt"), "--batch-size", "2", "--no-progress"]


def bake_argv(config: Path, out: Path) -> list[str]:
    return ["bake", str(config), "-o", str(out), "--verify-hashes", "--no-progress"]


def write_config(path: Path, model: Path, measurements: Path) -> Path:
    path.write_text(yaml.safe_dump({"model": str(model), "measurements": str(measurements), "method": "project",
                                    "ablate": [{"layers": "0:2", "measurement": 1, "scale": 1.0}]}))
    return path


def assert_no_date(text: str) -> None:
    today = date.today()
    for stamp in (today.isoformat(), today.strftime("%Y%m%d"), today.strftime("%d/%m/%Y")):
        assert stamp not in text, f"timestamp-like {stamp!r} in output"


@pytest.mark.parametrize("arch", ARCHS)
def test_measure_and_bake_twice_in_process_are_byte_identical(models, tmp_path, arch):
    model = models[arch]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(measure_argv(model, a)) == 0
    time.sleep(1.1)  # a timestamp with one-second resolution would differ
    assert main(measure_argv(model, b)) == 0
    assert sha256(a) == sha256(b)
    header = a.read_bytes()[8:8 + int.from_bytes(a.read_bytes()[:8], "little")].decode()
    assert_no_date(header)
    meta = json.loads(json.loads(header)["__metadata__"]["intervene"])
    assert meta["n_harmful"] == 3 and meta["n_harmless"] == 4
    if arch == "qwen3_moe":
        assert meta["moe_layers"] == [0, 1]

    config = write_config(tmp_path / "c.yaml", model, a)
    assert main(bake_argv(config, tmp_path / "out1")) == 0
    time.sleep(1.1)
    assert main(bake_argv(config, tmp_path / "out2")) == 0
    first, second = tree(tmp_path / "out1"), tree(tmp_path / "out2")
    assert first == second
    shards = [name for name in first if name.endswith(".safetensors")]
    assert len(shards) > 1 and {"README.md", "SHA256SUMS", "model.safetensors.index.json", "config.json"} <= set(first)
    # the edit happened (the bake is not a plain copy), and SHA256SUMS lists exactly these bytes
    assert any(first[s] != sha256(model / s) for s in shards)
    listed = dict(reversed(line.split("  ", 1)) for line in (tmp_path / "out1" / "SHA256SUMS").read_text().splitlines())
    assert listed == {k: v for k, v in first.items() if k != "SHA256SUMS"}
    assert_no_date((tmp_path / "out1" / "README.md").read_text())
    for shard in shards:
        raw = (tmp_path / "out1" / shard).read_bytes()
        assert_no_date(raw[8:8 + int.from_bytes(raw[:8], "little")].decode())


def test_a_fresh_process_gives_the_same_bytes(models, tmp_path):
    """A later run in a new process (its own RNG and import state; the same thread count, see
    test_thread_count_changes_measurements_only_by_rounding) reproduces both outputs of an
    in-process run: it re-measures to the same path and bakes the same config."""
    model = models["qwen3_moe"]
    meas = tmp_path / "m.safetensors"
    config = write_config(tmp_path / "c.yaml", model, meas)
    assert main(measure_argv(model, meas)) == 0
    measured = sha256(meas)
    assert main(bake_argv(config, tmp_path / "out")) == 0
    script = ("import sys, torch; from intervene.cli import main; torch.set_num_threads(1); "
              f"sys.exit(main({measure_argv(model, meas)!r}) or main({bake_argv(config, tmp_path / 'fresh')!r}))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert sha256(meas) == measured
    assert tree(tmp_path / "fresh") == tree(tmp_path / "out")


@pytest.mark.parametrize("arch", ARCHS)
def test_thread_count_changes_measurements_only_by_rounding(models, arch):
    """Bytes are reproducible for a given thread count; across thread counts CPU matmuls may split
    their sums differently (observed: ~1 ulp on the MoE model), so only rounding-level agreement
    is guaranteed there."""
    from intervene.measure.collect import measure
    from intervene.io.models import load_model

    model, tokenizer = load_model(str(models[arch]))
    prompts = (models[arch].parent / "harmful.txt").read_text().splitlines()
    others = (models[arch].parent / "harmless.txt").read_text().splitlines()
    runs = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs[threads] = measure(model, tokenizer, prompts, others, run=RunOptions(batch_size=2, progress=False)).tensors
    torch.set_num_threads(1)
    assert runs[1].keys() == runs[2].keys()
    for key, value in runs[1].items():
        tol = 1e-6 * max(1.0, float(value.abs().max()))
        assert float((value - runs[2][key]).abs().max()) <= tol, key
