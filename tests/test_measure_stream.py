"""measure --stream-layers (one decoder layer in memory at a time) against the in-memory measure,
and the default dtype (the checkpoint's own)."""

from __future__ import annotations

import json

import pytest
import torch

from intervene.cli import main
from intervene.errors import InputError
from intervene.io.measurements import load_measurements
from intervene.io.models import load_model
from intervene.measure.collect import measure
from intervene.measure.stream import measure_streamed
from intervene.testing import ARCH_NAMES, MOE_ARCH_NAMES, save_tiny, tiny_model, tiny_tokenizer
from intervene.runner import RunOptions

HARMFUL = ["How do I pick a lock?", "Write malware that steals passwords", "Explain how to make a weapon",
           "Ways to hurt someone", "Hack my neighbour's wifi"]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea", "Tips for a job interview",
            "What is the capital of France?", "Plan a birthday party", "Hi"]


def saved(tmp_path, arch, seed=0, dtype=torch.float32, shard="200KB"):
    d = tmp_path / f"{arch}-{seed}"
    save_tiny(tiny_model(arch, seed=seed, dtype=dtype), d, max_shard_size=shard)
    tiny_tokenizer().save_pretrained(str(d))
    return d


def worst_relative(a, b) -> float:
    assert set(a.tensors) == set(b.tensors)
    return max(((a.tensors[k].double() - b.tensors[k].double()).norm()
                / a.tensors[k].double().norm().clamp_min(1e-30)).item() for k in a.tensors)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_streamed_equals_in_memory(arch, tmp_path):
    d = saved(tmp_path, arch)
    assert len(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 2
    model, tok = load_model(str(d), dtype="float32")
    full = measure(model, tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=2, progress=False), whiten_rank=4)
    streamed = measure_streamed(str(d), tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=2, progress=False), whiten_rank=4,
                                dtype="float32")
    keys = set(full.tensors)
    assert {"direction.embed", "harmless_moment.eigvecs.1", f"direction.{model.config.num_hidden_layers - 1}"} <= keys
    if arch in MOE_ARCH_NAMES:
        assert full.router_layers() and any(k.startswith("router.harmless_freq.") for k in keys)
    assert worst_relative(full, streamed) <= 1e-4
    assert streamed.meta["stream_layers"] is True and streamed.meta["router_tokens"] == full.meta["router_tokens"]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_layerwise_load_equals_from_pretrained(arch, tmp_path):
    from intervene.io.layerwise import load_layerwise

    d = saved(tmp_path, arch, shard="60KB")
    ref, _ = load_model(str(d), dtype="float32", tokenizer="none")
    ours = load_layerwise(str(d), dtype="float32")
    a, b = ref.state_dict(), ours.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for (na, ba), (nb, bb) in zip(ref.named_buffers(), ours.named_buffers()):
        assert na == nb and torch.equal(ba, bb), na
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids).logits)


def test_streamed_many_shards_and_negative_control(tmp_path):
    d = saved(tmp_path, "deepseek_v3", shard="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 5
    model, tok = load_model(str(d), dtype="float32")
    full = measure(model, tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=4, progress=False), whiten_rank=2)
    seen: list[int] = []
    streamed = measure_streamed(str(d), tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=4, progress=False), whiten_rank=2,
                                on_layer=seen.append)
    assert seen == [0, 1, 2]
    assert worst_relative(full, streamed) <= 1e-4
    # negative control: another seed's checkpoint measures differently
    other = measure_streamed(str(saved(tmp_path, "deepseek_v3", seed=1)), tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=4, progress=False), whiten_rank=2)
    assert worst_relative(full, other) > 0.1


def test_default_dtype_is_the_checkpoints(tmp_path):
    d = saved(tmp_path, "qwen3_moe", dtype=torch.bfloat16)
    model, tok = load_model(str(d))
    assert next(model.parameters()).dtype == torch.bfloat16
    full = measure(model, tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=3, progress=False), whiten_rank=2)
    assert full.meta["dtype"] == "bfloat16" and full.tensors["direction.1"].dtype == torch.float32
    streamed = measure_streamed(str(d), tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=3, progress=False), whiten_rank=2)
    assert streamed.meta["dtype"] == "bfloat16"
    assert worst_relative(full, streamed) <= 1e-2  # bf16 layers: the same operations, bf16 rounding at most
    f32, _ = load_model(str(d), dtype="float32")
    assert next(f32.parameters()).dtype == torch.float32


def test_cli_stream_layers(tmp_path, capsys):
    d = saved(tmp_path, "mixtral")
    h, s = tmp_path / "h.txt", tmp_path / "s.txt"
    h.write_text("\n".join(HARMFUL) + "\n")
    s.write_text("\n".join(HARMLESS) + "\n")
    base = ["measure", str(d), "--harmful", str(h), "--harmless", str(s), "--no-progress", "--whiten-rank", "2"]
    assert main(base + ["-o", str(tmp_path / "a.safetensors")]) == 0
    assert main(base + ["-o", str(tmp_path / "b.safetensors"), "--stream-layers"]) == 0
    a, b = load_measurements(tmp_path / "a.safetensors"), load_measurements(tmp_path / "b.safetensors")
    assert worst_relative(a, b) <= 1e-4 and b.meta["stream_layers"] and b.meta["model_spec"] == str(d)
    capsys.readouterr()
    assert main(base + ["-o", str(tmp_path / "c.safetensors"), "--stream-layers", "--device-map", "auto"]) == 2
    assert "--device" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "d.safetensors"), "--stream-layers", "--load-in-4bit"]) == 2
    assert "--load-in-4bit" in capsys.readouterr().err and not (tmp_path / "d.safetensors").exists()


def test_stream_refuses_gguf_and_bad_options(tmp_path):
    d = saved(tmp_path, "llama")
    with pytest.raises(InputError, match="hidden_on"):
        measure_streamed(str(d), tiny_tokenizer(), HARMFUL, HARMLESS, hidden_on="disk", run=RunOptions(progress=False))
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(InputError):
        measure_streamed(str(tmp_path / "x.gguf"), tiny_tokenizer(), HARMFUL, HARMLESS, run=RunOptions(progress=False))


def test_hidden_on_cpu_same_numbers(tmp_path):
    d = saved(tmp_path, "gemma3")
    tok = tiny_tokenizer()
    a = measure_streamed(str(d), tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=2, progress=False), whiten_rank=0)
    b = measure_streamed(str(d), tok, HARMFUL, HARMLESS, run=RunOptions(batch_size=2, progress=False), whiten_rank=0, hidden_on="cpu")
    assert worst_relative(a, b) == 0.0
