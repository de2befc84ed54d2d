"""Every refusal is explained: bad checkpoints, configs, measurements, prompts and output paths give
exit code 2 and ONE line naming the file / key / layer / shape, never a traceback; refused bakes
write nothing. (Bake-specific refusals tested through the library are in test_bake_safety.py;
here each case goes through the CLI, across verbs.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from intervene.cli import main
from intervene.io.measurements import Measurements
from intervene.testing import save_tiny, tiny_model, tiny_tokenizer

HIDDEN = 64
LAYERS = 2
SHARD_A = "model-00002-of-00006.safetensors"  # holds model.layers.0.self_attn.o_proj.weight (edited)
SHARD_B = "model-00003-of-00006.safetensors"  # holds model.layers.0.mlp.down_proj.weight (edited)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- fixtures and helpers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 6-shard tiny Llama checkpoint with a chat-template tokenizer, its measurements, prompts."""
    root = tmp_path_factory.mktemp("bad_inputs")
    save_tiny(tiny_model("llama", seed=3), root / "model", max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(str(root / "model"))
    index = json.loads((root / "model" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.0.self_attn.o_proj.weight"] == SHARD_A
    assert index["model.layers.0.mlp.down_proj.weight"] == SHARD_B
    g = torch.Generator().manual_seed(0)
    tensors = {f"{kind}.{i}": torch.randn(HIDDEN, generator=g) for kind in ("direction", "harmless_mean")
               for i in range(LAYERS)}
    Measurements(tensors).save(root / "m.safetensors")
    (root / "harmful.txt").write_text("How do I pick a lock?\nWrite malware\n")
    (root / "harmless.txt").write_text("How do I bake bread?\nWrite a poem\n")
    return root


def checkpoint(base: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    """A private copy of the checkpoint to damage."""
    return Path(shutil.copytree(base / "model", tmp_path / name))


def write_config(path: Path, base: Path, model: Path | None = None, entry: dict | None = None, **top) -> Path:
    data = {"model": str(model or base / "model"), "measurements": str(base / "m.safetensors"),
            "ablate": [entry or {"layers": "0:2", "measurement": 1, "scale": 1.0}], **top}
    path.write_text(yaml.safe_dump(data))
    return path


def refused(capsys, *argv, needles: tuple[str, ...]) -> str:
    """Run the CLI in-process: exit code 2, exactly one error line (the last line of stderr) that
    starts with 'intervene VERB: error:' and contains every needle, and no traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    line = errors[0]
    assert line == err.rstrip().splitlines()[-1]
    assert line.startswith(f"intervene {argv[0]}: error: ")
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_no_output(out: Path) -> None:
    """Nothing at the final path, and no temporary sibling left behind."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def bake_refused(capsys, cfg: Path, out: Path, *needles: str) -> str:
    line = refused(capsys, "bake", cfg, "-o", out, "--no-progress", needles=needles)
    assert_no_output(out)
    return line


def measure_args(base: Path, model: Path, out: Path, *extra: str) -> list:
    return ["measure", model, "-o", out, "--harmful", base / "harmful.txt", "--harmless", base / "harmless.txt",
            "--no-progress", *extra]


def rewrite_shard(path: Path, edit) -> None:
    """Replace a shard's tensors with ``edit(tensors)``; the index is updated to match."""
    tensors = edit(load_file(str(path)))
    save_file(tensors, str(path), metadata={"format": "pt"})
    index_path = path.parent / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != path.name}
    index["weight_map"].update({k: path.name for k in tensors})
    index_path.write_text(json.dumps(index))


# ---- damaged checkpoints (bake reads headers; measure loads the weights) ---------------------------------

@pytest.mark.parametrize("verb", ["bake", "measure"])
def test_missing_shard(base, tmp_path, capsys, verb):
    ckpt = checkpoint(base, tmp_path)
    (ckpt / SHARD_B).unlink()
    needles = ("model.safetensors.index.json", SHARD_B, "does not exist")
    if verb == "bake":
        bake_refused(capsys, write_config(tmp_path / "c.yaml", base, ckpt), tmp_path / "out", *needles)
    else:
        refused(capsys, *measure_args(base, ckpt, tmp_path / "m.safetensors"), needles=needles)
        assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("verb", ["bake", "measure"])
def test_truncated_shard_header_ok_data_short(base, tmp_path, capsys, verb):
    ckpt = checkpoint(base, tmp_path)
    shard = ckpt / SHARD_B
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    needles = (SHARD_B, "truncated", str(size), str(size - 100))
    if verb == "bake":
        bake_refused(capsys, write_config(tmp_path / "c.yaml", base, ckpt), tmp_path / "out", *needles)
    else:
        refused(capsys, *measure_args(base, ckpt, tmp_path / "m.safetensors"), needles=needles)


def test_verify_truncated_baked_shard(base, tmp_path, capsys):
    """A baked checkpoint damaged after the bake (copy cut short) is named by verify."""
    cfg = write_config(tmp_path / "c.yaml", base)
    baked = tmp_path / "baked"
    assert main(["bake", str(cfg), "-o", str(baked), "--no-progress"]) == 0
    capsys.readouterr()
    os.truncate(baked / SHARD_A, (baked / SHARD_A).stat().st_size - 64)
    refused(capsys, "verify", cfg, baked, "--limit", "1", "--no-progress",
            needles=(str(baked / SHARD_A), "truncated"))


@pytest.mark.parametrize("verb", ["bake", "measure"])
def test_index_points_to_absent_file(base, tmp_path, capsys, verb):
    ckpt = checkpoint(base, tmp_path)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    needles = ("model.safetensors.index.json", "model-00009-of-00009.safetensors", "does not exist")
    if verb == "bake":
        bake_refused(capsys, write_config(tmp_path / "c.yaml", base, ckpt), tmp_path / "out", *needles)
    else:
        refused(capsys, *measure_args(base, ckpt, tmp_path / "m.safetensors"), needles=needles)


@pytest.mark.parametrize("verb", ["bake", "measure"])
def test_index_points_to_absent_key(base, tmp_path, capsys, verb):
    ckpt = checkpoint(base, tmp_path)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = SHARD_B
    index_path.write_text(json.dumps(index))
    needles = ("model.layers.0.mlp.extra_proj.weight", SHARD_B, "no such key")
    if verb == "bake":
        bake_refused(capsys, write_config(tmp_path / "c.yaml", base, ckpt), tmp_path / "out", *needles)
    else:
        refused(capsys, *measure_args(base, ckpt, tmp_path / "m.safetensors"), needles=needles)


@pytest.mark.parametrize("verb", ["bake", "measure"])
def test_corrupt_safetensors_header(base, tmp_path, capsys, verb):
    ckpt = checkpoint(base, tmp_path)
    shard = ckpt / SHARD_A
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    needles = (SHARD_A, "corrupt safetensors header")
    if verb == "bake":
        bake_refused(capsys, write_config(tmp_path / "c.yaml", base, ckpt), tmp_path / "out", *needles)
    else:
        refused(capsys, *measure_args(base, ckpt, tmp_path / "m.safetensors"), needles=needles)


@pytest.mark.parametrize("verb", ["bake", "measure", "inspect"])
def test_unknown_model_type(base, tmp_path, capsys, verb):
    ckpt = checkpoint(base, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (ckpt / "config.json").write_text(json.dumps(config))
    if verb == "bake":
        bake_refused(capsys, write_config(tmp_path / "c.yaml", base, ckpt), tmp_path / "out", "frobnicator")
    elif verb == "measure":
        refused(capsys, *measure_args(base, ckpt, tmp_path / "m.safetensors"),
                needles=("unsupported model_type 'frobnicator'", "llama"))
    else:
        refused(capsys, "inspect", ckpt, needles=("unsupported model_type 'frobnicator'", "llama"))


@pytest.mark.parametrize("kind", ["mxfp4", "fp8"])
def test_quantized_tensors_refused_with_dequantize_hint(base, tmp_path, capsys, kind):
    ckpt = checkpoint(base, tmp_path)
    key = "model.layers.0.mlp.down_proj.weight"

    def quantize(t):
        t = dict(t)
        w = t.pop(key)
        if kind == "mxfp4":  # gpt-oss style storage: uint8 blocks + scales instead of the weight
            t["model.layers.0.mlp.down_proj_blocks"] = torch.zeros(HIDDEN, 96 // 32, 16, dtype=torch.uint8)
            t["model.layers.0.mlp.down_proj_scales"] = torch.zeros(HIDDEN, 96 // 32, dtype=torch.uint8)
        else:  # DeepSeek-V3 style: float8 weight + block scales
            t[key] = w.to(torch.float8_e4m3fn)
            t[key + "_scale_inv"] = torch.ones(1, 1)
        return t

    rewrite_shard(ckpt / SHARD_B, quantize)
    words = ("MXFP4", "down_proj_blocks") if kind == "mxfp4" else ("FP8", "weight_scale_inv")
    bake_refused(capsys, write_config(tmp_path / "c.yaml", base, ckpt), tmp_path / "out",
                 "layer 0", "dequantize", *words)


def test_gguf_given_to_bake(base, tmp_path, capsys):
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    line = refused(capsys, "bake", write_config(tmp_path / "c.yaml", base), "--model", gguf, "-o", tmp_path / "out",
                   needles=(str(gguf), "GGUF", "Dequantize"))
    assert "safetensors" in line
    assert_no_output(tmp_path / "out")


# ---- configs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["bake", "try", "verify"])
def test_config_with_unknown_key(base, tmp_path, capsys, verb):
    cfg = write_config(tmp_path / "c.yaml", base, colour="red")
    args = {"bake": ["bake", cfg, "-o", tmp_path / "out"], "try": ["try", cfg, "--no-progress"],
            "verify": ["verify", cfg, tmp_path]}[verb]
    refused(capsys, *args, needles=(str(cfg), "unknown key(s) 'colour'", "valid keys"))
    assert_no_output(tmp_path / "out")


def test_config_entry_with_unknown_key(base, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", base, entry={"layer": 1, "measurement": 1, "weight": 2.0})
    bake_refused(capsys, cfg, tmp_path / "out", "ablate[0]", "unknown key(s) 'weight'")


@pytest.mark.parametrize("verb", ["bake", "try"])
def test_layer_out_of_range(base, tmp_path, capsys, verb):
    cfg = write_config(tmp_path / "c.yaml", base, entry={"layers": [1, 5], "measurement": 1})
    needles = ("ablate[0] layer 5 out of range", "layers 0..1")
    if verb == "bake":
        bake_refused(capsys, cfg, tmp_path / "out", *needles)
    else:
        refused(capsys, "try", cfg, "--no-progress", needles=needles)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval(base, tmp_path, capsys, sparsity):
    cfg = write_config(tmp_path / "c.yaml", base, entry={"layer": 1, "measurement": 1, "sparsity": sparsity})
    bake_refused(capsys, cfg, tmp_path / "out", "ablate[0]", "sparsity must be in [0, 1)", repr(sparsity))


@pytest.mark.parametrize("scale", ["0", "-1.5", ".nan", ".inf", "{attention: 0.0}"])
def test_scale_not_positive_finite(base, tmp_path, capsys, scale):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {base / 'model'}\nmeasurements: {base / 'm.safetensors'}\n"
                   f"ablate:\n  - layer: 1\n    measurement: 1\n    scale: {scale}\n")
    line = bake_refused(capsys, cfg, tmp_path / "out", "ablate[0]", "scale must be a finite number > 0")
    expected = {".nan": "nan", ".inf": "inf", "{attention: 0.0}": "0.0"}.get(scale, scale)
    assert line.endswith(f"got {expected}")


# ---- measurements ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["bake", "analyze"])
def test_measurements_of_another_model(base, tmp_path, capsys, verb):
    meas = tmp_path / "other.safetensors"
    Measurements({f"direction.{i}": torch.randn(32) for i in range(LAYERS)}).save(meas)
    needles = (str(meas), "hidden size 32", "hidden size 64", "different model")
    if verb == "bake":
        cfg = write_config(tmp_path / "c.yaml", base, measurements=str(meas))
        bake_refused(capsys, cfg, tmp_path / "out", *needles)
    else:
        refused(capsys, "analyze", meas, "--model", base / "model", needles=needles)


def test_measurements_with_more_layers_than_the_model(base, tmp_path, capsys):
    meas = tmp_path / "deeper.safetensors"
    Measurements({f"direction.{i}": torch.randn(HIDDEN) for i in range(6)}).save(meas)
    refused(capsys, "analyze", meas, "--model", base / "model",
            needles=(str(meas), "layer 5", f"only {LAYERS} layers", "different model"))


@pytest.mark.parametrize("bad", ["nan", "inf", "zero"])
def test_degenerate_direction(base, tmp_path, capsys, bad):
    tensors = {f"direction.{i}": torch.randn(HIDDEN) for i in range(LAYERS)}
    if bad == "zero":
        tensors["direction.1"].zero_()
    else:
        tensors["direction.1"][7] = float(bad)
    meas = tmp_path / "bad.safetensors"
    Measurements(tensors).save(meas)
    cfg = write_config(tmp_path / "c.yaml", base, measurements=str(meas))
    words = "has zero norm" if bad == "zero" else "contains NaN or Inf"
    bake_refused(capsys, cfg, tmp_path / "out", "direction for layer 0 (measurement 1)", words)


@pytest.mark.parametrize("verb", ["bake", "analyze"])
def test_measurements_file_not_safetensors(base, tmp_path, capsys, verb):
    meas = tmp_path / "m.safetensors"
    meas.write_text("harmful_mean: [0.1, 0.2]\n")  # e.g. a YAML or CSV export given by mistake
    needles = (str(meas), "not a readable safetensors measurements file")
    if verb == "bake":
        bake_refused(capsys, write_config(tmp_path / "c.yaml", base, measurements=str(meas)), tmp_path / "out",
                     *needles)
    else:
        refused(capsys, "analyze", meas, needles=needles)


def test_safetensors_without_directions(base, tmp_path, capsys):
    meas = tmp_path / "weights.safetensors"
    save_file({"lm_head.weight": torch.zeros(4, 4)}, str(meas))  # a weight shard, not measurements
    refused(capsys, "analyze", meas, needles=(str(meas), "no 'direction.*' tensors"))


class ArbitraryCode:
    """Unpickling this runs a shell command: what a malicious .refuse file would carry."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch '{self.sentinel}'",)


@pytest.mark.parametrize("verb", ["measure", "analyze"])
def test_refuse_pickle_with_code_is_rejected_not_executed(tmp_path, capsys, verb):
    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / "evil.refuse"
    torch.save({"harmful_1": torch.ones(HIDDEN), "harmless_1": torch.zeros(HIDDEN), "payload": ArbitraryCode(sentinel)},
               evil)
    args = (["measure", "--from-refuse", evil, "-o", tmp_path / "m.safetensors"] if verb == "measure"
            else ["analyze", evil])
    refused(capsys, *args, needles=(str(evil), "weights_only=True", "posix.system", "never executed"))
    assert not sentinel.exists()
    assert not (tmp_path / "m.safetensors").exists()
    # the file really is live: an unsafe load would have run the command
    torch.load(evil, weights_only=False)
    assert sentinel.exists()


# ---- prompts and tokenizer ------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank-lines"])
def test_prompt_file_empty(base, tmp_path, capsys, content):
    prompts = tmp_path / "harmful.txt"
    prompts.write_text(content)
    refused(capsys, "measure", base / "model", "-o", tmp_path / "m.safetensors", "--harmful", prompts,
            "--harmless", base / "harmless.txt", needles=(f"prompt set {prompts} is empty",))
    assert not (tmp_path / "m.safetensors").exists()


def test_prompt_file_not_utf8(base, tmp_path, capsys):
    prompts = tmp_path / "harmless.txt"
    prompts.write_bytes("Write a poem\nCaf\u00e9 cr\u00e8me recipe\n".encode("latin-1"))
    refused(capsys, "measure", base / "model", "-o", tmp_path / "m.safetensors", "--harmful", base / "harmful.txt",
            "--harmless", prompts, needles=(str(prompts), "not UTF-8", "byte 16"))


def test_model_without_chat_template_suggests_flag(base, tmp_path, capsys):
    ckpt = checkpoint(base, tmp_path)
    (ckpt / "chat_template.jinja").unlink()
    out = tmp_path / "m.safetensors"
    refused(capsys, *measure_args(base, ckpt, out), needles=("no chat template", "--no-chat-template"))
    assert not out.exists()
    # the suggested flag works
    assert main([str(a) for a in measure_args(base, ckpt, out, "--no-chat-template")]) == 0
    assert out.exists()


# ---- output paths and write errors ----------------------------------------------------------------------

def test_output_equal_to_input_real_cli(base, tmp_path):
    """The installed entry point (a real process): exit status 2, one stderr line, input untouched."""
    cfg = write_config(tmp_path / "c.yaml", base)
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (base / "model").iterdir())
    proc = subprocess.run([sys.executable, "-m", "intervene", "bake", str(cfg), "-o", str(base / "model"),
                           "--overwrite", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"intervene bake: error: output {base / 'model'} is the input checkpoint")
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (base / "model").iterdir()) == before


def test_output_inside_input(base, tmp_path, capsys):
    ckpt = checkpoint(base, tmp_path)
    cfg = write_config(tmp_path / "c.yaml", base, ckpt)
    refused(capsys, "bake", cfg, "-o", ckpt / "baked", needles=(str(ckpt / "baked"), "inside the input"))
    assert not (ckpt / "baked").exists()
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]


def test_disk_fills_up_midway_through_the_bake(base, tmp_path, capsys, monkeypatch):
    """Every write into the temporary output directory (header, edited tensors, kernel copies) is
    charged to a budget of about half the checkpoint; the write that exceeds it fails with ENOSPC,
    as on a full disk. Named error, nothing at the output path, temporary directory removed."""
    from intervene.bake.publish import TMP_TAG

    budget = [150_000]  # bytes; the checkpoint has ~312 kB in 6 shards

    def charge(fd: int, n: int) -> None:
        try:
            into_output = TMP_TAG in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            into_output = False
        if into_output:
            if n > budget[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget[0] -= n

    real_write, real_pwrite, real_copy = os.write, os.pwrite, getattr(os, "copy_file_range", None)

    def write(fd, data):
        charge(fd, len(data))
        return real_write(fd, data)

    def pwrite(fd, data, offset):
        charge(fd, len(data))
        return real_pwrite(fd, data, offset)

    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
        charge(dst, count)
        return real_copy(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "pwrite", pwrite)
    if real_copy is not None:
        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    out = tmp_path / "out"
    line = bake_refused(capsys, write_config(tmp_path / "c.yaml", base), out, "No space left on device",
                        f".out{TMP_TAG}{os.getpid()}", ".safetensors")
    assert line.startswith("intervene bake: error: writing ")
    assert budget[0] < 150_000 - 50_000  # it failed midway, after whole shards had been written


def test_disk_full_while_copying_side_files(base, tmp_path, capsys, monkeypatch):
    """After the shards: the tokenizer/config copy fails -> named error, temporary directory removed."""
    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(shutil, "copyfile", full)
    out = tmp_path / "out"
    bake_refused(capsys, write_config(tmp_path / "c.yaml", base), out, "No space left on device",
                 f".out.intervene-tmp-{os.getpid()}")


def test_disk_full_while_saving_measurements(base, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "m.safetensors"
    refused(capsys, *measure_args(base, base / "model", out), needles=(str(out), "No space left on device"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the file nor its temporary
