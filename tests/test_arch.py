"""The architecture table against real (tiny) models and the checkpoints transformers writes."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from intervene.arch import (
    ALL_TARGETS,
    SUPPORTED_MODEL_TYPES,
    arch_for_config,
    decoder_layers,
    get_arch,
    get_module,
    split_layer_key,
)
from intervene.errors import ArchitectureError
from intervene.testing import ARCH_NAMES, MOE_ARCH_NAMES, random_ids, save_tiny, tiny_model


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_sites_exist_with_hidden_axis(arch):
    model = tiny_model(arch)
    spec = arch_for_config(model.config)
    H = model.config.hidden_size
    E = spec.num_experts(model.config)
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    fired: dict[str, int] = {}
    handles = []
    n_sites = 0
    for i, layer in enumerate(layers):
        # the MoE-layer rule agrees with the modules the model actually built
        if spec.is_moe:
            has_router = True
            try:
                get_module(layer, spec.router)
            except ArchitectureError:
                has_router = False
            assert has_router == spec.is_moe_layer(model.config, i), f"{arch} layer {i}"
        for site in spec.sites(model.config, i, ALL_TARGETS):
            module = get_module(layer, site.module)
            for ref in site.tensors:
                t = getattr(get_module(layer, ref.module), ref.param)
                assert isinstance(t, torch.Tensor)
                assert t.shape[ref.hidden_axis] == H, f"{arch} layer {i} {ref.module}.{ref.param} {tuple(t.shape)}"
                if ref.expert_axis is not None:
                    assert t.shape[ref.expert_axis] == E
            if site.post_norm:
                assert get_module(layer, site.post_norm).weight.shape == (H,)
            name = f"{i}.{site.name}"
            fired[name] = 0
            handles.append(module.register_forward_hook(lambda *_, n=name: fired.__setitem__(n, fired[n] + 1)))
            n_sites += 1
    try:
        with torch.no_grad():
            model(random_ids())
    finally:
        for h in handles:
            h.remove()
    assert n_sites >= 2 * model.config.num_hidden_layers
    assert all(v == 1 for v in fired.values()), {k: v for k, v in fired.items() if v != 1}


def expected_target(rest: str, moe: bool) -> str | None:
    """Which target edits a checkpoint key (relative to its layer), written out by hand from
    DESIGN.md and the transformers reference — independent of intervene.arch."""
    if re.fullmatch(r"self_attn\.o_proj\.(weight|bias)|linear_attn\.out_proj\.weight", rest):
        return "attention"  # linear_attn: Qwen3-Next / Qwen3.5 Gated-DeltaNet layers
    if not moe:
        return "mlp" if re.fullmatch(r"(mlp|feed_forward)\.down_proj\.weight", rest) else None
    block = r"(mlp|block_sparse_moe|feed_forward)"
    rules = [
        (rf"{block}\.experts\.\d+\.(down_proj|w2)\.weight", "experts"),
        (rf"{block}\.experts\.(down_proj|down_proj_bias)", "experts"),
        (rf"{block}\.experts\.\d+\.(gate_proj|up_proj|w1|w3)\.weight", "expert_inputs"),
        (rf"{block}\.experts\.gate_up_proj", "expert_inputs"),
        (rf"{block}\.shared_experts?\.down_proj\.weight", "shared_experts"),
        (rf"{block}\.shared_experts?\.(gate_proj|up_proj)\.weight", "expert_inputs"),
        (rf"{block}\.shared_expert_gate\.weight", "expert_inputs"),
        (rf"{block}\.(gate|router)\.weight", "router"),
        # granitemoe's own names for its fused experts and router (transformers' conversion mapping)
        (rf"{block}\.output_linear\.weight", "experts"),
        (rf"{block}\.input_linear\.weight", "expert_inputs"),
        (rf"{block}\.router\.layer\.weight", "router"),
    ]
    return next((target for pattern, target in rules if re.fullmatch(pattern, rest)), None)


def checkpoint_keys(directory) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


@pytest.mark.parametrize("original_format", [True, False], ids=["per-expert", "fused"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_disk_patterns_match_saved_checkpoint(arch, original_format, tmp_path):
    model = tiny_model(arch)
    spec = arch_for_config(model.config)
    H = model.config.hidden_size
    E = spec.num_experts(model.config)
    save_tiny(model, tmp_path, save_original_format=original_format)
    keys = checkpoint_keys(tmp_path)
    seen_targets: set[str] = set()
    per_expert_keys = 0
    for key, shape in keys.items():
        split = split_layer_key(key)
        if split is None:
            continue
        _, layer, rest = split
        moe = spec.is_moe_layer(model.config, layer)
        pats = spec.disk_patterns(model.config, layer)
        matches = [p for p in pats if p.match(rest)]
        want = expected_target(rest, moe)
        if want is None:
            assert matches == [], f"{arch}: {key} should not be edited, matched {[p.target for p in matches]}"
            continue
        assert len(matches) == 1, f"{arch}: {key} matched {len(matches)} patterns"
        pat = matches[0]
        assert pat.target == want, f"{arch}: {key} -> {pat.target}, expected {want}"
        assert shape[pat.hidden_axis] == H, f"{arch}: {key} {shape} axis {pat.hidden_axis}"
        if pat.expert_axis is not None:
            assert shape[pat.expert_axis] == E
        m = pat.match(rest)
        if "expert" in m.groupdict():
            assert 0 <= int(m.group("expert")) < E
            per_expert_keys += 1
        if pat.post_norm:
            assert f"{key[: key.index(rest)]}{pat.post_norm}" in keys
        seen_targets.add(pat.target)
    # every target that has an in-memory site in some layer is found on disk, and nothing else
    in_memory = {site.target for i in range(model.config.num_hidden_layers) for site in spec.sites(model.config, i)}
    assert seen_targets == in_memory, (arch, seen_targets, in_memory)
    assert in_memory <= set(spec.targets)
    # transformers writes per-expert tensors only in the original format, and never for gpt-oss / Llama4
    if arch in MOE_ARCH_NAMES:
        fused_anyway = arch in ("gpt_oss", "llama4", "granitemoe")
        assert (per_expert_keys > 0) == (original_format and not fused_anyway), (arch, per_expert_keys)


def test_unknown_model_type_names_it_and_the_supported_list():
    with pytest.raises(ArchitectureError) as info:
        get_arch("foo")
    msg = str(info.value)
    assert "'foo'" in msg and "\n" not in msg
    for model_type in ("llama", "gemma3_text", "mixtral", "deepseek_v3", "glm4_moe", "gpt_oss", "llama4_text"):
        assert model_type in msg
    # every table entry has a tiny model in the parametrised tests, and every tiny model an entry
    assert len(SUPPORTED_MODEL_TYPES) == len(ARCH_NAMES) and {get_arch(t).name for t in SUPPORTED_MODEL_TYPES} == set(ARCH_NAMES)


def test_multimodal_wrappers_resolve_to_their_text_model():
    from transformers import Gemma3Config, Llama4Config

    assert arch_for_config(Llama4Config()).name == "llama4"
    assert arch_for_config(Gemma3Config()).name == "gemma3"
    from transformers import Qwen3_5MoeConfig

    assert arch_for_config(Qwen3_5MoeConfig()).name == "qwen3_5_moe"


def test_config_variant_the_table_cannot_express_is_refused_by_name(tmp_path):
    from intervene.bake import plan_bake
    from intervene.testing import make_measurements, tiny_config

    config = tiny_config("ernie4_5_moe", use_bias=True)
    with pytest.raises(ArchitectureError, match=r"architecture 'ernie4_5_moe': config use_bias=true gives o_proj"):
        arch_for_config(config)
    assert arch_for_config(tiny_config("ernie4_5_moe")).name == "ernie4_5_moe"  # the default variant is supported
    # the bake refuses before writing anything
    save_tiny(tiny_model("ernie4_5_moe", use_bias=True), tmp_path / "src")
    from intervene.config.schema import parse_config

    cfg = parse_config({"ablate": [{"layers": "0:2", "measurement": 1, "scale": 1.0}]})
    with pytest.raises(ArchitectureError, match="use_bias"):
        plan_bake(cfg, tmp_path / "src", make_measurements(3))


def test_deepseek_v2_group_limited_rechoose_keeps_only_the_best_groups():
    """DeepSeek-V2's group-limited greedy routing, re-chosen under a bias: experts outside the ``topk_group``
    groups with the highest best-expert score are never chosen (the mask written here with plain indexing)."""
    from types import SimpleNamespace

    from intervene.arch import ARCHITECTURES

    spec = next(a for a in ARCHITECTURES if a.name == "deepseek_v2")
    g = torch.Generator().manual_seed(3)
    tokens, groups, n, k = 5, 4, 16, 3
    router = SimpleNamespace(top_k=k, topk_method="group_limited_greedy", num_group=groups, num_experts=n,
                             topk_group=2, routed_scaling_factor=1.5)
    logits = torch.randn(tokens, n, generator=g)
    bias = torch.randn(n, generator=g)
    _, weights, index = spec.rechoose(router, (logits, None, logits.topk(k)[1]), bias)
    probs = (logits + bias).softmax(dim=-1)
    for t in range(tokens):
        best_per_group = [float(probs[t, i * 4:(i + 1) * 4].max()) for i in range(groups)]
        kept = sorted(range(groups), key=lambda i: -best_per_group[i])[:2]
        allowed = torch.zeros(n, dtype=torch.bool)
        for i in kept:
            allowed[i * 4:(i + 1) * 4] = True
        want = torch.where(allowed, probs[t], torch.zeros(())).topk(k)
        assert sorted(index[t].tolist()) == sorted(want.indices.tolist())
        assert all(allowed[e] for e in index[t].tolist())
        torch.testing.assert_close(weights[t].sort().values, (want.values * 1.5).sort().values)
