"""``intervene verify``: baked logits vs the live-hooked original, with a dtype tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from intervene.bake import bake
from intervene.cli import main
from intervene.testing import save_tiny, tiny_model, tiny_tokenizer
from intervene.io.measurements import Measurements
from intervene.bake.verify import default_tolerance, stored_dtype, verify

HIDDEN = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_config(path: Path, model: Path, meas: Path, scale: float = 1.0,
                 targets=("attention", "experts", "shared_experts", "router")) -> Path:
    path.write_text(yaml.safe_dump({
        "model": str(model), "measurements": str(meas), "targets": list(targets),
        "ablate": [{"layers": "0:2", "measurement": 1, "scale": scale}]}))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen2-MoE with a character tokenizer, its measurements, a config and its correct bake,
    plus a bake of the same edit at half the scale (a wrong checkpoint for that config)."""
    root = tmp_path_factory.mktemp("verify")
    src = save_tiny(tiny_model("qwen2_moe", seed=11), root / "src")
    tiny_tokenizer().save_pretrained(str(src))
    g = torch.Generator().manual_seed(0)
    meas = root / "m.safetensors"
    Measurements({f"direction.{i}": torch.randn(HIDDEN, generator=g) for i in range(2)}).save(meas)
    cfg = write_config(root / "cfg.yaml", src, meas)
    good = bake(cfg, output=root / "good", progress=False).output
    half = write_config(root / "half.yaml", src, meas, scale=0.5)
    wrong = bake(half, output=root / "wrong", progress=False).output
    return root, cfg, good, wrong


def test_correct_bake_passes_with_prompts(setup, tmp_path, capsys):
    root, cfg, good, _ = setup
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I bake bread?\nTell me a joke.\nWhat is 2+2?\n")
    out = tmp_path / "v.json"
    assert main(["verify", str(cfg), str(good), "--prompts", str(prompts), "--json", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("PASS")
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["n_sequences"] == 3
    assert data["max_abs_diff"] <= 1e-5 < 1e-2 < data["effect"]  # equal to rounding; the edit itself is visible
    assert data["tolerance"] == pytest.approx(1e-4 * max(1.0, data["logit_scale"] / 10))
    assert "3 prompts from" in data["inputs"] and data["versions"]["intervene"] and data["config"]["ablate"]


def test_wrong_bake_fails_with_exit_1(setup, tmp_path, capsys):
    root, cfg, _, wrong = setup
    out = tmp_path / "v.json"
    assert main(["verify", str(cfg), str(wrong), "--random-tokens", "4", "--json", str(out), "--no-progress"]) == 1
    assert capsys.readouterr().out.startswith("FAIL")
    data = json.loads(out.read_text())
    assert data["passed"] is False and data["max_abs_diff"] > 10 * data["tolerance"]
    assert data["inputs"] == "4 random sequences of 16 ids"


def test_sequential_loading_gives_the_same_numbers(setup):
    _, cfg, good, _ = setup
    together = verify(cfg, good, random_tokens=3, progress=False)
    one_by_one = verify(cfg, good, random_tokens=3, sequential=True, progress=False)
    assert together.passed and one_by_one.passed
    assert (together.max_abs_diff, together.effect, together.logit_scale, together.n_positions) == \
           (one_by_one.max_abs_diff, one_by_one.effect, one_by_one.logit_scale, one_by_one.n_positions)


def test_without_tokenizer_falls_back_to_random_ids(tmp_path):
    src = save_tiny(tiny_model("llama", seed=2), tmp_path / "src")  # no tokenizer files
    meas = tmp_path / "m.safetensors"
    Measurements({f"direction.{i}": torch.randn(HIDDEN) for i in range(2)}).save(meas)
    cfg = write_config(tmp_path / "c.yaml", src, meas, targets=["attention", "mlp"])
    baked = bake(cfg, output=tmp_path / "out", progress=False).output
    result = verify(cfg, baked, progress=False)
    assert result.passed and "no tokenizer found" in result.inputs and result.n_sequences == 8


def test_bf16_verification(setup, tmp_path):
    root, _, _, _ = setup
    model = tiny_model("qwen2_moe", seed=11).to(torch.bfloat16)
    src = save_tiny(model, tmp_path / "src16")
    cfg = write_config(tmp_path / "c.yaml", src, root / "m.safetensors")
    baked = bake(cfg, output=tmp_path / "out", progress=False).output
    assert stored_dtype(baked) == torch.bfloat16
    in_bf16 = verify(cfg, baked, random_tokens=4, dtype="bfloat16", progress=False)
    assert in_bf16.passed and in_bf16.dtype == "bfloat16" and "eps(bfloat16)" in in_bf16.tolerance_rule
    in_fp32 = verify(cfg, baked, random_tokens=4, dtype="float32", progress=False)  # weights upcast exactly
    assert in_fp32.passed and "bfloat16 weights" in in_fp32.tolerance_rule
    assert in_fp32.max_abs_diff < in_fp32.effect / 10


def test_default_tolerance_rules():
    assert default_tolerance(torch.float32, 5.0) == (1e-4, "1e-4·max(1, max|logit|/10)")
    assert default_tolerance(torch.float32, 40.0)[0] == pytest.approx(4e-4)
    assert default_tolerance(torch.bfloat16, 20.0)[0] == pytest.approx(8 * 2 ** -7 * 20)
    assert default_tolerance(torch.float16, 0.5)[0] == pytest.approx(8 * 2 ** -10)
    assert default_tolerance(torch.float32, 20.0, torch.bfloat16)[0] == pytest.approx(2 * 2 ** -7 * 20)


def test_bad_arguments_named(setup, capsys):
    _, cfg, good, _ = setup
    assert main(["verify", str(cfg), str(good), "--random-tokens", "0"]) == 2
    assert "--random-tokens must be >= 1" in capsys.readouterr().err
    assert main(["verify", str(cfg), str(good.parent / "nope")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["verify", str(cfg), str(good), "--random-tokens", "2", "--tolerance", "-1"]) == 2
    assert "--tolerance must be a finite number > 0" in capsys.readouterr().err
