"""Bake safety: the input is never modified, nothing incomplete appears at the output path, and
every refusal (quantized weights, GGUF, missing keys, bad output paths) happens before writing."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from intervene.bake import bake, plan_bake
from intervene.bake.outputs import check_untouched
from intervene.cli import main
from intervene.config.schema import parse_config
from intervene.errors import CheckpointError
from intervene.io.measurements import Measurements, load_measurements
from intervene.testing import GateWatch, gated_cli, save_tiny, tiny_model

HIDDEN = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- helpers ----------------------------------------------------------------------------------

def dir_hashes(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A per-expert DeepSeek-V3 checkpoint (dense layer 0, MoE layers 1-2), its measurements and config."""
    root = tmp_path_factory.mktemp("safety")
    src = save_tiny(tiny_model("deepseek_v3", seed=7), root / "src")
    g = torch.Generator().manual_seed(0)
    meas = root / "m.safetensors"
    Measurements({f"direction.{i}": torch.randn(HIDDEN, generator=g) for i in range(3)}).save(meas)
    return src, meas


def write_config(path: Path, model: Path, meas: Path, targets=("attention", "mlp", "experts"), **extra) -> Path:
    data = {"model": str(model), "measurements": str(meas), "targets": list(targets),
            "ablate": [{"layers": "0:3", "measurement": 1, "scale": 1.0}], **extra}
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def config(model: Path, meas: Path, targets=("attention", "mlp", "experts"), **extra):
    return parse_config({"model": str(model), "measurements": str(meas), "targets": list(targets),
                         "ablate": [{"layers": extra.pop("layers", "0:3"), "measurement": 1, "scale": 1.0}], **extra})


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a sharded checkpoint, passing each shard's tensor dict through ``edit`` (index rebuilt)."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors = edit(load_file(str(dst / name)))
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))
    return dst


def assert_nothing_written(parent: Path, output: Path) -> None:
    assert not output.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{output.name}.intervene")]


def cli(*argv: str) -> int:
    return main(list(argv))


# ---- output paths -------------------------------------------------------------------------------

def test_output_equal_inside_or_containing_input_refused(base, tmp_path, capsys):
    src, meas = base
    cfg = write_config(tmp_path / "c.yaml", src, meas)
    before = dir_hashes(src)
    for out, words in [(src, "is the input"), (src / "sub", "inside the input"), (src.parent, "contains the input")]:
        assert cli("bake", str(cfg), "-o", str(out), "--overwrite", "--no-progress") == 2
        assert words in capsys.readouterr().err
    assert dir_hashes(src) == before


def test_existing_output_needs_overwrite_which_replaces_it(base, tmp_path, capsys):
    src, meas = base
    cfg = write_config(tmp_path / "c.yaml", src, meas)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-file").write_text("old")
    assert cli("bake", str(cfg), "-o", str(out), "--no-progress") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "old-file").exists()
    assert cli("bake", str(cfg), "-o", str(out), "--overwrite", "--no-progress") == 0
    assert not (out / "old-file").exists() and (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]  # old copy and temp dir removed


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_overwrite_replaces_in_place(base, tmp_path, monkeypatch, exchange):
    import intervene.bake.publish as publish

    if not exchange:  # the fallback path of systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    src, meas = base
    cfg = write_config(tmp_path / "c.yaml", src, meas)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-file").write_text("old")
    assert cli("bake", str(cfg), "-o", str(out), "--overwrite", "--no-progress") == 0
    assert not (out / "old-file").exists() and (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]


def test_atomic_exchange_swaps_two_directories(tmp_path):
    from intervene.bake.publish import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    if not _exchange(a, b):
        pytest.skip("this OS/filesystem has no renameat2(RENAME_EXCHANGE); bake falls back to two renames")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"


def test_bake_killed_between_the_two_renames_restores_the_old_output(base, tmp_path, capsys):
    """Fallback path: the old output was moved aside, the new one not yet renamed in, then SIGKILL.
    The next bake puts the old output back first, so it still needs --overwrite to replace it."""
    src, meas = base
    cfg = write_config(tmp_path / "c.yaml", src, meas)
    out = tmp_path / "out"
    pid = _dead_pid()
    old = tmp_path / f".out.intervene-old-{pid}"
    old.mkdir()
    (old / "old-file").write_text("old")
    (old / ".intervene-partial").write_text("replaced output")
    new = tmp_path / f".out.intervene-tmp-{pid}"  # complete, marker already removed
    new.mkdir()
    (new / "model.safetensors").write_text("x")
    assert cli("bake", str(cfg), "-o", str(out), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "restored" in err and "already exists; pass --overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["old-file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]


def test_dry_run_prints_plan_and_writes_nothing(base, tmp_path, capsys):
    src, meas = base
    cfg = write_config(tmp_path / "c.yaml", src, meas)
    out = tmp_path / "out"
    assert cli("bake", str(cfg), "-o", str(out), "--dry-run") == 0
    text = capsys.readouterr().out
    assert "H axis" in text and "model.layers.0.mlp.down_proj.weight" in text
    assert "model.layers.1.mlp.experts.7.down_proj.weight  64x24" in text
    assert "20 tensors to edit" in text  # 3 o_proj + 1 dense down_proj + 2 x 8 expert down_proj
    assert_nothing_written(tmp_path, out)


# ---- refusals before writing ------------------------------------------------------------------------

def test_mxfp4_blocks_refused_with_dequantize_message(tmp_path, capsys):
    src = save_tiny(tiny_model("gpt_oss", seed=1), tmp_path / "gptoss")

    def to_mxfp4(t):
        out = {}
        for k, v in t.items():
            if k.endswith("mlp.experts.down_proj"):  # [E, I, H] bf16 -> MXFP4 blocks/scales (out-major, uint8)
                e, i, h = v.shape
                out[k + "_blocks"] = torch.zeros(e, h, i // 8, 4, dtype=torch.uint8)
                out[k + "_scales"] = torch.zeros(e, h, i // 8, dtype=torch.uint8)
            else:
                out[k] = v
        return out

    q = rewrite(src, tmp_path / "mxfp4", to_mxfp4)
    meas = tmp_path / "m.safetensors"
    Measurements({f"direction.{i}": torch.randn(HIDDEN) for i in range(2)}).save(meas)
    cfg = write_config(tmp_path / "c.yaml", q, meas, targets=["attention", "experts"], ablate=[
        {"layers": "0:2", "measurement": 1}])
    assert cli("bake", str(cfg), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "MXFP4" in err and "down_proj_blocks" in err and "dequantize" in err and "layer 0" in err
    assert_nothing_written(tmp_path, tmp_path / "out")
    # attention alone is not quantized in such checkpoints: that bake is allowed
    cfg2 = write_config(tmp_path / "c2.yaml", q, meas, targets=["attention"], ablate=[{"layers": "0:2", "measurement": 1}])
    assert cli("bake", str(cfg2), "-o", str(tmp_path / "out2"), "--no-progress") == 0


def test_fp8_weight_scale_inv_and_int_dtypes_refused(base, tmp_path):
    src, meas = base
    key = "model.layers.1.mlp.experts.2.down_proj.weight"

    def to_fp8(t):
        t = dict(t)
        if key in t:
            t[key] = t[key].to(torch.float8_e4m3fn)
            t[key + "_scale_inv"] = torch.ones(1)
        return t

    fp8 = rewrite(src, tmp_path / "fp8", to_fp8)
    with pytest.raises(CheckpointError, match=r"FP8 block scales.*dequantize"):
        bake(config(fp8, meas), output=tmp_path / "out", progress=False)

    def to_int8(t):
        k = "model.layers.0.self_attn.o_proj.weight"
        return {n: (v.to(torch.int8) if n == k else v) for n, v in t.items()}

    i8 = rewrite(src, tmp_path / "i8", to_int8)
    with pytest.raises(CheckpointError, match=r"o_proj.weight' is stored as I8 .*dequantize"):
        bake(config(i8, meas), output=tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_gguf_refused(base, tmp_path, capsys):
    _, meas = base
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    cfg = write_config(tmp_path / "c.yaml", gguf, meas)
    assert cli("bake", str(cfg), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "GGUF" in err and "Dequantize" in err
    gguf_dir = tmp_path / "ggufdir"
    gguf_dir.mkdir()
    shutil.copy(gguf, gguf_dir / "model.gguf")
    with pytest.raises(CheckpointError, match="GGUF"):
        bake(config(gguf_dir, meas), output=tmp_path / "out", progress=False)


def test_missing_expert_key_refused_before_writing(base, tmp_path):
    src, meas = base
    missing = "model.layers.1.mlp.experts.3.down_proj.weight"
    broken = rewrite(src, tmp_path / "broken", lambda t: {k: v for k, v in t.items() if k != missing})
    before = dir_hashes(broken)
    with pytest.raises(CheckpointError, match=r"layer 1 target 'experts': expert 3 is missing"):
        bake(config(broken, meas), output=tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")
    assert dir_hashes(broken) == before
    # an expert subset that does not need expert 3 bakes fine
    bake(config(broken, meas, experts=[0, 1]), output=tmp_path / "out", progress=False)


def test_missing_target_key_names_layer_target_and_pattern(base, tmp_path):
    src, meas = base
    gone = "model.layers.2.self_attn.o_proj.weight"
    broken = rewrite(src, tmp_path / "broken", lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError, match=r"layer 2 target 'attention': no key matches .*model\.layers\.2\.self_attn\\\.o_proj"):
        bake(config(broken, meas), output=tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_corrupt_and_truncated_shards_refused(base, tmp_path):
    src, meas = base
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        bake(config(bad, meas), output=tmp_path / "out", progress=False)
    shutil.rmtree(bad)
    shutil.copytree(src, bad)
    shard = sorted(bad.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        bake(config(bad, meas), output=tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_write_error_leaves_nothing(base, tmp_path, monkeypatch):
    src, meas = base
    import intervene.bake.writer as writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "copy_range", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        bake(config(src, meas), output=tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "out")


# ---- hashes -------------------------------------------------------------------------------------------

def test_verify_hashes_manifest_and_untouched_check(base, tmp_path):
    src, meas = base
    before = dir_hashes(src)
    result = bake(config(src, meas), output=tmp_path / "out", progress=False, verify_hashes=True)
    assert dir_hashes(src) == before
    assert result.untouched_checked == sum(len(h.tensors) for h in result.plan.checkpoint.shards) - len(result.plan.edits)
    lines = (result.output / "SHA256SUMS").read_text().splitlines()
    listed = {name: digest for digest, name in (line.split("  ", 1) for line in lines)}
    actual = dir_hashes(result.output)
    actual.pop("SHA256SUMS")
    assert listed == actual
    # the untouched-tensor check does catch a changed byte
    plan = plan_bake(config(src, meas), src, load_measurements(meas))
    header = plan.checkpoint.shards[0]
    victim = next(t for t in header.tensors if t.key not in plan.edits and t.nbytes)
    path = result.output / header.path.name
    from intervene.io.checkpoint import read_header

    offset = read_header(path).data_start + victim.begin
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"untouched tensor '{victim.key}' differs"):
        check_untouched(plan, result.output)


# ---- interruption -------------------------------------------------------------------------------------

def _start_stopped_bake(cfg: Path, out: Path, gate: GateWatch) -> subprocess.Popen:
    """A bake that stops after its first tensor (written into the temporary directory) until signalled."""
    proc = subprocess.Popen(gated_cli(["bake", cfg, "-o", out, "--no-progress"], gate.fifo, tensor=1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gate.wait(proc, "tensor", describe=lambda: proc.stderr.read().decode())
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_bake_leaves_no_output_and_rerun_succeeds(base, tmp_path, sig):
    src, meas = base
    before = dir_hashes(src)
    cfg = write_config(tmp_path / "c.yaml", src, meas)
    out = tmp_path / "out"
    with GateWatch() as gate:
        proc = _start_stopped_bake(cfg, out, gate)
    tmps = [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.intervene-tmp-")]
    assert len(tmps) == 1 and any(tmps[0].glob("*.safetensors"))  # stopped mid-write
    tmp = tmps[0]
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    assert not out.exists()
    if sig == signal.SIGINT:
        assert rc == 130 and not tmp.exists()  # interrupted cleanly: temporary directory removed
    else:
        assert rc == -signal.SIGKILL and tmp.exists()  # killed: only the hidden temporary directory remains
    assert dir_hashes(src) == before
    assert cli("bake", str(cfg), "-o", str(out), "--no-progress") == 0
    assert (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]  # the stale temporary dir was removed
