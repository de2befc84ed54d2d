"""``bake --lora``: the adapter, loaded with PEFT on the original, equals the full bake of the same config;
what an adapter cannot carry is refused by name before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from intervene.bake import bake
from intervene.bake.lora import bake_lora, lora_factors
from intervene.bake.plan import TensorEdit
from intervene.bake.verify import verify
from intervene.cli import main
from intervene.config.schema import parse_config
from intervene.errors import ConfigError
from intervene.testing import make_measurements, random_ids, save_tiny, tiny_model

peft = pytest.importorskip("peft")
TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def source(root: Path, arch: str) -> Path:
    model = tiny_model(arch, seed=3)
    src = save_tiny(model, root / arch)
    make_measurements(model.config.num_hidden_layers, path=str(root / f"{arch}.m")).save(root / f"{arch}.m.safetensors")
    return src


def config(src: Path, targets, method="project", scale=1.0):
    meas = src.parent / f"{src.name}.m.safetensors"
    num = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    # two entries: every edited module of layer 1 gets two projections (rank 2), the rest one
    return parse_config({"model": str(src), "measurements": str(meas), "method": method, "targets": list(targets),
                         "ablate": [{"layers": f"0:{num}", "measurement": 1, "scale": scale},
                                    {"layers": 1, "measurement": 0, "scale": 0.7}]})


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(random_ids()).logits.float()


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch,targets", [("llama", ("attention", "mlp")), ("gemma3", ("attention", "mlp")),
                                          ("qwen2_moe", ("attention", "shared_experts"))],
                         ids=["llama", "gemma3-post-norm", "qwen2_moe-shared-experts"])
def test_adapter_on_the_original_equals_the_full_bake(tmp_path, arch, targets):
    src = source(tmp_path, arch)
    cfg = config(src, targets)
    full = load(bake(cfg, output=tmp_path / "full", progress=False).output)
    result = bake_lora(cfg, output=tmp_path / "lora")
    files = sorted(p.name for p in result.output.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    base = load(src)
    original = logits(base)
    adapted = peft.PeftModel.from_pretrained(base, str(result.output)).eval()
    with_adapter = logits(adapted)
    baked = logits(full)
    assert (baked - original).abs().max() > 1e-2  # the edit is visible
    assert (with_adapter - baked).abs().max() <= TOL
    with adapted.disable_adapter():  # the original is still there, side by side
        assert torch.equal(logits(adapted), original)
    # rank 1 per projection: layer 1's modules carry two edits (rank 2), the others one
    weights = load_file(str(result.output / "adapter_model.safetensors"))
    for name, rank in result.ranks.items():
        assert rank == (2 if ".layers.1." in name else 1), (name, rank)
        assert weights[f"base_model.model.{name}.lora_A.weight"].shape[0] == rank
        assert weights[f"base_model.model.{name}.lora_B.weight"].dtype == torch.float32
    # merged into the weights it is the full bake's tensors
    merged = adapted.merge_and_unload().state_dict()
    for key, value in full.state_dict().items():
        assert (merged[key] - value).abs().max() <= 1e-6, key


def test_lora_factors_match_the_issue_formulas():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    r = torch.randn(6, generator=g)
    r = r / r.norm()
    op = TensorEdit(key="k", shard="s", layer=0, target="attention", hidden_axis=0, expert_axis=None, experts=None,
                    expert=None, is_bias=False, direction=r, scale=0.8)
    a, b = lora_factors(w, [op])
    assert torch.allclose(b[:, 0], -0.8 * r) and torch.allclose(a[0], r @ w)  # write: B = −s r̂, A = r̂ᵀW
    wr = torch.randn(5, 6, generator=g)  # read side [out, H]
    a, b = lora_factors(wr, [TensorEdit(**{**op.__dict__, "hidden_axis": 1})])
    assert torch.allclose(b[:, 0], -0.8 * wr @ r) and torch.allclose(a[0], r)  # read: B = −s W r̂, A = r̂ᵀ
    assert torch.allclose(wr + b @ a, wr - 0.8 * torch.outer(wr @ r, r), atol=1e-6)


@pytest.mark.parametrize("arch,targets,needle", [
    ("llama", ("attention",), "method 'norm_preserving' is not low rank"),
    ("qwen3_moe", ("experts",), "'model.layers.0.mlp.experts.0.down_proj' is absent"),
    ("qwen2_moe", ("router",), "is a Qwen2MoeTopKRouter, not an nn.Linear"),
    ("gpt_oss", ("attention",), "cannot edit the bias 'model.layers.0.self_attn.o_proj.bias'"),
    ("llama4", ("experts",), "stores its experts [E, in, out] (table layout EIH)"),
    ("deepseek_v3", ("mlp",), "retargets every '*.down_proj' module of a 'deepseek_v3' model to the fused experts"),
])
def test_what_an_adapter_cannot_carry_is_refused_by_name_before_writing(tmp_path, arch, targets, needle):
    src = source(tmp_path, arch)
    method = "norm_preserving" if "norm_preserving" in needle else "project"
    with pytest.raises(ConfigError) as info:
        bake_lora(config(src, targets, method), output=tmp_path / "lora")
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "lora").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def fused_source(root: Path, arch: str) -> Path:
    model = tiny_model(arch, seed=3)
    src = save_tiny(model, root / arch, save_original_format=False)  # fused [E, out, in] experts on disk
    make_measurements(model.config.num_hidden_layers, path="m").save(root / f"{arch}.m.safetensors")
    return src


@pytest.mark.parametrize("targets,experts", [(("attention", "experts"), "all"), (("attention", "experts"), [1, 5]),
                                             (("attention", "expert_inputs"), "all")],
                         ids=["experts", "expert-subset", "expert-inputs"])
def test_fused_experts_through_peft_target_parameters_equal_the_full_bake(tmp_path, targets, experts):
    src = fused_source(tmp_path, "qwen2_moe")
    cfg = config(src, targets)
    if experts != "all":
        cfg = parse_config({**cfg.to_dict(), "experts": experts})
    full = load(bake(cfg, output=tmp_path / "full", progress=False).output)
    result = bake_lora(cfg, output=tmp_path / "lora")
    adapter_cfg = json.loads((result.output / "adapter_config.json").read_text())
    assert adapter_cfg["target_parameters"] and all(".mlp.experts." in p for p in adapter_cfg["target_parameters"])
    adapted = peft.PeftModel.from_pretrained(load(src), str(result.output)).eval()
    assert (logits(adapted) - logits(full)).abs().max() <= TOL
    merged = adapted.merge_and_unload().state_dict()
    for key, value in full.state_dict().items():
        if ".mlp.experts." in key:
            assert (merged[key] - value).abs().max() <= 1e-6, key
    # negative control: the routed experts really changed (and, for a subset, only those experts)
    before = load(src).state_dict()
    key = "model.layers.0.mlp.experts." + ("down_proj" if "experts" in targets else "gate_up_proj")
    changed = [e for e in range(8) if not torch.equal(full.state_dict()[key][e], before[key][e])]
    assert changed == (list(range(8)) if experts == "all" else experts)


@pytest.mark.parametrize("arch,targets,needle", [
    ("qwen3_moe", ("experts",), "belongs to a 'qwen3_moe' model, whose expert targets PEFT"),
    ("qwen2_moe", ("experts", "expert_inputs"), "cannot edit two parameters of 'model.layers.0.mlp.experts'"),
])
def test_fused_experts_peft_cannot_target_exactly_are_refused(tmp_path, arch, targets, needle):
    src = fused_source(tmp_path, arch)
    with pytest.raises(ConfigError) as info:
        bake_lora(config(src, targets), output=tmp_path / "lora")
    assert needle in str(info.value)
    assert not (tmp_path / "lora").exists()


def test_cli_lora_and_verify_accepts_the_adapter_directory(tmp_path, capsys):
    src = source(tmp_path, "llama")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(config(src, ("attention", "mlp")).to_yaml())
    assert main(["bake", str(cfg_path), "--lora", "--output", str(tmp_path / "lora")]) == 0
    assert "LoRA adapter: 4 modules" in capsys.readouterr().out
    card = (tmp_path / "lora" / "README.md").read_text()
    assert card.startswith("---\nbase_model: llama\nbase_model_relation: adapter\n") and "library_name: peft" in card
    good = verify(cfg_path, tmp_path / "lora", random_tokens=3, progress=False)
    assert good.passed and good.max_abs_diff <= TOL and good.effect > 1e-2
    # negative control: the adapter of another scale does not verify against this config
    other = config(src, ("attention", "mlp"), scale=0.5)
    bake_lora(other, output=tmp_path / "lora-half")
    bad = verify(cfg_path, tmp_path / "lora-half", random_tokens=3, progress=False)
    assert not bad.passed and bad.max_abs_diff > 1e-3
    assert main(["bake", str(cfg_path), "--lora", "--output", str(tmp_path / "x"), "--dry-run"]) == 0
    assert not (tmp_path / "x").exists()
