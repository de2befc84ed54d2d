"""router_bias (expert steering): live equals an independent edit of each router's scores, baked equals
live where the architecture has a selection-bias tensor, the bake refuses elsewhere, and the GLM-4.5-Air
class bake writes -inf exactly where asked."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from intervene.arch import arch_for_config, decoder_layers, get_module
from intervene.config.resolve import RouterBiasEdit, resolve, validate_router_bias
from intervene.config.schema import parse_config
from intervene.errors import CheckpointError, ConfigError
from intervene.hooks.apply import apply
from intervene.io.checkpoint import open_checkpoint
from intervene.testing import MOE_ARCH_NAMES, make_measurements, random_ids, save_tiny, tiny_config, tiny_model
from intervene.runner import RunOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BAKEABLE = ("glm4_moe", "deepseek_v3", "gpt_oss")


def _moe_layers(model) -> list[int]:
    spec = arch_for_config(model.config)
    return [i for i in range(model.config.num_hidden_layers) if spec.is_moe_layer(model.config, i)]


def _chosen(model, ids) -> dict[int, torch.Tensor]:
    """Top-k indices per MoE layer, read straight off the router outputs (the test's own hook)."""
    spec = arch_for_config(model.config)
    layers = decoder_layers(model)
    out: dict[int, list[torch.Tensor]] = {}
    handles = []
    for layer in _moe_layers(model):
        router = get_module(layers[layer], spec.router)

        def hook(_m, _a, output, layer=layer):
            if spec.router_output == "llama4":  # (scores, logits): chosen = scores > 0
                idx = output[1].topk(spec.top_k(model.config), dim=-1)[1]
            else:
                idx = output[2]
            out.setdefault(layer, []).append(idx.reshape(-1, idx.shape[-1]))
        handles.append(router.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(random_ids(batch=4, seq=12, seed=3) if ids is None else ids)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def _steering(model) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """Per MoE layer: -inf on the most chosen expert, +0.5 on the least chosen one (so the edit is
    visible); the config entries and the expected [E] vectors."""
    n_exp = arch_for_config(model.config).num_experts(model.config)
    entries, vectors = [], {}
    for layer, idx in _chosen(model, None).items():
        counts = torch.bincount(idx.flatten(), minlength=n_exp)
        top, low = int(counts.argmax()), int(counts.argmin())
        entries += [{"layers": [layer], "experts": [top], "bias": "-inf"},
                    {"layers": [layer], "experts": [low], "bias": 0.5}]
        vec = torch.zeros(n_exp)
        vec[top], vec[low] = -math.inf, 0.5
        vectors[layer] = vec
    return entries, vectors


@contextmanager
def _reference_edit(model, vectors: dict[int, torch.Tensor]):
    """The independent edit: the router's own code runs with the bias in its selection score.
    GLM-4/DeepSeek-V3: the buffer e_score_correction_bias gets the bias added by hand; every other
    router: F.linear is patched so that the router's logits come out with the bias added."""
    spec = arch_for_config(model.config)
    layers = decoder_layers(model)
    routers = {layer: get_module(layers[layer], spec.router) for layer in vectors}
    if spec.name in ("glm4_moe", "deepseek_v3"):
        saved = {layer: r.e_score_correction_bias.clone() for layer, r in routers.items()}
        for layer, r in routers.items():
            r.e_score_correction_bias += vectors[layer]
        try:
            yield
        finally:
            for layer, r in routers.items():
                r.e_score_correction_bias.copy_(saved[layer])
        return
    original = torch.nn.functional.linear
    by_ptr = {r.weight.data_ptr(): vectors[layer] for layer, r in routers.items()}

    def linear(x, weight, bias=None):
        out = original(x, weight, bias)
        vec = by_ptr.get(weight.data_ptr())
        return out if vec is None else out + vec.to(out.dtype)

    with mock.patch.object(torch.nn.functional, "linear", linear):
        yield


# the MoE families whose router's choice rule the table describes (the others refuse router_bias by name)
STEERABLE = [a for a in MOE_ARCH_NAMES if arch_for_config(tiny_config(a)).selection_bias is not None]
UNSTEERABLE = [a for a in MOE_ARCH_NAMES if a not in STEERABLE]


@pytest.mark.parametrize("arch", UNSTEERABLE)
def test_router_bias_refused_by_name_where_the_table_has_no_choice_rule(arch):
    model = tiny_model(arch)
    spec = arch_for_config(model.config)
    layer = next(i for i in range(model.config.num_hidden_layers) if spec.is_moe_layer(model.config, i))
    cfg = parse_config({"router_bias": [{"layers": [layer], "experts": [0], "bias": "-inf"}]})
    with pytest.raises(ConfigError, match=f"not supported on architecture '{spec.name}' yet"):
        validate_router_bias(cfg, spec, model.config, make_measurements(model.config.num_hidden_layers))


@pytest.mark.parametrize("arch", STEERABLE)
def test_live_router_bias_equals_independent_router_edit(arch):
    model = tiny_model(arch)
    meas = make_measurements(model.config.num_hidden_layers)
    entries, vectors = _steering(model)
    cfg = parse_config({"router_bias": entries})
    ids = random_ids(batch=4, seq=12, seed=3)
    with torch.no_grad():
        base = model(ids).logits
        with apply(model, cfg, meas):
            live = model(ids).logits
            chosen = _chosen(model, ids)
        with _reference_edit(model, vectors):
            reference = model(ids).logits
        after = model(ids).logits
    assert torch.equal(after, base), "router_bias not removed on exit"
    assert float((live - base).abs().max()) > 1e-3, "negative control: the steering must change the logits"
    torch.testing.assert_close(live, reference, atol=1e-6, rtol=0)
    assert bool(torch.isfinite(live).all())
    for layer, vec in vectors.items():
        banned = torch.nonzero(torch.isinf(vec)).flatten().tolist()
        assert not bool(torch.isin(chosen[layer], torch.tensor(banned)).any()), f"layer {layer}: a -inf expert was chosen"


def _bake(model, tmp_path: Path, entries: list[dict], meas, dtype: torch.dtype = torch.float32):
    from intervene.bake.run import bake

    src = save_tiny(model.to(dtype), tmp_path / "src")
    cfg = parse_config({"router_bias": entries, "model": str(src)})
    bake(cfg, tmp_path / "out", measurements=meas, progress=False)
    return src, tmp_path / "out", cfg


@pytest.mark.parametrize("arch", BAKEABLE)
def test_baked_router_bias_equals_live(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from intervene.bake.verify import verify

    model = tiny_model(arch)
    meas = make_measurements(model.config.num_hidden_layers)
    entries, _ = _steering(model)
    src, out, cfg = _bake(model, tmp_path, entries, meas)
    baked = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = random_ids(batch=4, seq=12, seed=3)
    with torch.no_grad(), apply(model, cfg, meas):
        live = model(ids).logits
    with torch.no_grad():
        got = baked(ids).logits
        base = model(ids).logits
    assert float((live - base).abs().max()) > 1e-3
    torch.testing.assert_close(got, live, atol=1e-6, rtol=0)
    result = verify(cfg, out, model=str(src), measurements=meas, random_tokens=4, progress=False)
    assert result.passed and result.effect > 1e-3, result.summary()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2", "llama4"])
def test_bake_refuses_router_bias_without_selection_bias(arch, tmp_path):
    model = tiny_model(arch)
    meas = make_measurements(model.config.num_hidden_layers)
    layer = _moe_layers(model)[0]
    with pytest.raises(CheckpointError) as err:
        _bake(model, tmp_path, [{"layers": [layer], "experts": [0], "bias": "-inf"}], meas)
    msg = str(err.value)
    assert "router_bias" in msg and f"'{arch}'" in msg and "try" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary output either"


def test_bake_refuses_when_checkpoint_lacks_the_bias_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("glm4_moe")
    meas = make_measurements(3)
    src = save_tiny(model, tmp_path / "src")
    ckpt = open_checkpoint(src)
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    shard = src / ckpt.weight_map[key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    import json

    data = json.loads(index.read_text())
    del data["weight_map"][key]
    index.write_text(json.dumps(data))
    from intervene.bake.run import bake

    cfg = parse_config({"router_bias": [{"layers": [1], "experts": [0], "bias": "-inf"}], "model": str(src)})
    with pytest.raises(CheckpointError, match=r"router_bias.*layers\.1\.mlp\.gate\.e_score_correction_bias"):
        bake(cfg, tmp_path / "out", measurements=meas, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glm_baked_correction_bias_is_minus_inf_exactly_there(dtype, tmp_path):
    """GLM-4.5-Air class: -inf exactly at the listed experts/layers (through safetensors and the
    bf16/fp32 casts), nothing else in any router (or anywhere) changes, the experts are never chosen,
    and transformers' router still yields finite weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = tiny_model("glm4_moe", num_hidden_layers=4)
    meas = make_measurements(4)
    steer = {1: [0, 3], 3: [5]}  # layer 2 (MoE) is left alone, layer 0 is dense
    entries = [{"layers": [layer], "experts": ids, "bias": "-inf"} for layer, ids in steer.items()]
    src, out, _ = _bake(model, tmp_path, entries, meas, dtype)

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            t.update(load_file(str(f)))
        return t

    before, after = tensors(src), tensors(out)
    assert before.keys() == after.keys()
    for key in before:
        if not key.endswith("e_score_correction_bias"):
            assert torch.equal(before[key], after[key]), f"{key} changed"
            continue
        layer = int(key.split(".")[2])
        want = before[key].clone()
        want[steer.get(layer, [])] = -math.inf
        assert after[key].dtype == before[key].dtype
        assert torch.equal(after[key], want), f"{key}: {after[key]} != {want}"
    assert sum(k.endswith("e_score_correction_bias") for k in before) == 3  # layers 1..3

    for load_dtype in (torch.float32, torch.bfloat16):
        baked = AutoModelForCausalLM.from_pretrained(str(out), dtype=load_dtype).eval()
        spec = arch_for_config(baked.config)
        for cast in (load_dtype, torch.float32 if load_dtype == torch.bfloat16 else torch.bfloat16):
            baked = baked.to(cast)
            layers = decoder_layers(baked)
            for layer, ids in steer.items():
                buf = get_module(layers[layer], spec.router).e_score_correction_bias
                assert torch.isneginf(buf[ids]).all() and torch.isfinite(buf[[e for e in range(8) if e not in ids]]).all()
            weights: list[torch.Tensor] = []
            hooks = [get_module(layers[layer], spec.router).register_forward_hook(
                lambda _m, _a, o: weights.append(o[1])) for layer in (1, 2, 3)]
            ids_in = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(5))
            chosen = _chosen(baked, ids_in)
            for h in hooks:
                h.remove()
            for layer, banned in steer.items():
                assert not bool(torch.isin(chosen[layer], torch.tensor(banned)).any()), f"layer {layer} chose {banned}"
            assert chosen[1].numel() == 8 * 32 * 2
            assert all(bool(torch.isfinite(w).all()) and bool((w > 0).all()) for w in weights)
            with torch.no_grad():
                assert bool(torch.isfinite(baked(ids_in).logits).all())


# ---- config and resolve ------------------------------------------------------------------------

def test_config_router_bias_parses_round_trips_and_allows_empty_ablate():
    cfg = parse_config({"router_bias": [{"layers": "1:3", "experts": [5, 3], "bias": "-inf"},
                                        {"layers": [2], "experts": "top:2", "bias": -2.5, "tokens": "user"}]})
    assert cfg.ablate == []
    a, b = cfg.router_bias
    assert (a.layers, a.experts, a.top, a.bias) == ([1, 2], [3, 5], None, -math.inf)
    assert (b.layers, b.experts, b.top, b.bias, b.tokens) == ([2], None, 2, -2.5, "user")
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    assert again.router_bias == cfg.router_bias
    assert parse_config({"router_bias": [{"layers": [1], "experts": [0], "bias": float("-inf")}]}).router_bias[0].bias == -math.inf
    assert "router_bias" not in parse_config({"ablate": [{"layer": 0, "measurement": 0}]}).to_dict()


@pytest.mark.parametrize("entry, match", [
    ({"layers": [1], "experts": [0], "bias": float("nan")}, "NaN"),
    ({"layers": [1], "experts": [0], "bias": ".nan"}, "NaN"),
    ({"layers": [1], "experts": [0], "bias": "inf"}, r"\+inf"),
    ({"layers": [1], "experts": [0]}, "missing 'bias'"),
    ({"layers": [1], "experts": "top:0", "bias": -1}, "top:N"),
    ({"layers": [1], "experts": [], "bias": -1}, "experts"),
    ({"layers": [1], "experts": [-1], "bias": -1}, "experts"),
    ({"layers": [1], "experts": [0], "bias": -1, "tokens": "last"}, "tokens"),
    ({"layers": [1], "experts": "top:1", "bias": -1, "tokens": "middle"}, "tokens"),
    ({"layers": [1], "experts": [0], "bias": -1, "scale": 1}, "unknown key"),
])
def test_config_router_bias_bad_values_are_named_errors(entry, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_config({"router_bias": [entry]})
    assert "router_bias[0]" in str(err.value)


def test_config_still_needs_something_to_do():
    with pytest.raises(ConfigError, match="ablate"):
        parse_config({"ablate": []})


@pytest.mark.parametrize("arch, entry, match", [
    ("llama", {"layers": [0], "experts": [0], "bias": "-inf"}, "needs a MoE model.*'llama'"),
    ("glm4_moe", {"layers": [0], "experts": [0], "bias": "-inf"}, "layer 0 is not a MoE layer"),
    ("glm4_moe", {"layers": [7], "experts": [0], "bias": "-inf"}, "layer 7 out of range"),
    ("glm4_moe", {"layers": [1], "experts": [8], "bias": "-inf"}, "expert 8 out of range"),
    ("glm4_moe", {"layers": [1], "experts": list(range(7)), "bias": "-inf"}, "fewer than top-k = 2"),
    ("glm4_moe", {"layers": [1], "experts": "top:2", "bias": "-inf"}, "router.harmful_freq_last.1"),
    ("glm4_moe", {"layers": [1], "experts": "top:9", "bias": "-inf"}, "has 8 experts"),
])
def test_resolve_router_bias_named_errors(arch, entry, match):
    from intervene.testing import tiny_config

    config = tiny_config(arch)
    with pytest.raises(ConfigError, match=match):
        resolve(parse_config({"router_bias": [entry]}), arch_for_config(config), config,
                make_measurements(config.num_hidden_layers))


def test_top_n_ranks_by_risk_difference_on_the_chosen_tokens():
    from intervene.testing import tiny_config

    config = tiny_config("glm4_moe")
    meas = make_measurements(3)
    p = torch.tensor([0.10, 0.30, 0.05, 0.20, 0.05, 0.10, 0.15, 0.05])
    q = torch.tensor([0.20, 0.10, 0.05, 0.05, 0.25, 0.10, 0.20, 0.05])  # p - q: -.1 .2 0 .15 -.2 0 -.05 0
    meas.tensors.update({"router.harmful_freq_last.1": p, "router.harmless_freq_last.1": q,
                         "router.harmful_freq_user.1": q, "router.harmless_freq_user.1": p})
    spec = arch_for_config(config)
    edits = resolve(parse_config({"router_bias": [{"layers": [1], "experts": "top:2", "bias": "-inf"}]}), spec, config, meas)
    assert edits == [RouterBiasEdit(1, (1, 3), -math.inf)]
    edits = resolve(parse_config({"router_bias": [{"layers": [1], "experts": "top:2", "bias": -1, "tokens": "user"}]}),
                    spec, config, meas)
    assert edits == [RouterBiasEdit(1, (0, 4), -1.0)]  # reversed sets: q - p largest at 4 (.2), 0 (.1)


# ---- router statistics at the last prompt token and over the user's own tokens -------------------

def test_measure_router_stats_last_and_user_tokens():
    """Independent check with the character-level tokenizer (one token per character): the user's
    tokens are exactly the characters of the prompt inside the formatted text."""
    from intervene.hooks.capture import capture, router_site
    from intervene.io.models import encode, format_prompts
    from intervene.measure.collect import measure
    from intervene.testing import tiny_tokenizer

    model, tok = tiny_model("glm4_moe"), tiny_tokenizer()
    harmful = ["how do I pick a lock", "make a weapon now please", "steal it"]
    harmless = ["bake bread", "what is the capital of France", "sing a song for me"]
    meas = measure(model, tok, harmful, harmless, run=RunOptions(batch_size=2, progress=False), whiten_rank=0)
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        counts = {t: torch.zeros(8, dtype=torch.float64) for t in ("all", "last", "user")}
        for prompt in prompts:  # one prompt at a time: no padding
            text = format_prompts(tok, [prompt])[0]
            enc = encode(tok, [text])
            with torch.no_grad(), capture(model, layers=[1, 2]) as acts:
                model(**enc)
            # tokens before the user message: specials are one token, every other character one token
            begin = len(tok(text[:text.rindex(prompt)], add_special_tokens=False)["input_ids"])
            for layer in (1, 2):
                topk = acts[router_site(layer, "topk")][0]  # [S, k]
                assert topk.shape[0] == begin + len(prompt) + len(tok(text[text.rindex(prompt) + len(prompt):],
                                                                      add_special_tokens=False)["input_ids"])
                sel = {"all": topk, "last": topk[-1:], "user": topk[begin:begin + len(prompt)]}
                if layer == 2:
                    for t, rows in sel.items():
                        counts[t] += torch.bincount(rows.flatten(), minlength=8).to(torch.float64)
        for tokens, suffix in (("all", ""), ("last", "_last"), ("user", "_user")):
            want = counts[tokens] / counts[tokens].sum()
            got = meas.tensors[f"router.{name}_freq{suffix}.2"].to(torch.float64)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(meas.tensors["router.harmful_freq_last.2"], meas.tensors["router.harmful_freq.2"])
    assert {"router.harmful_logits_user.1", "router.harmless_logits_last.1"} <= meas.tensors.keys()
    assert len(meas.meta["router_stats"]) == 3
    assert meas.meta["router_tokens_by_selection"]["last"]["harmful"] == {"1": 3, "2": 3}
    assert meas.meta["router_tokens_by_selection"]["user"]["harmless"]["1"] == sum(len(p) for p in harmless)


def test_analyze_ranks_experts_by_risk_difference_and_suggests_top_n(tmp_path):
    from intervene.measure.analyze import analyze, recommend

    meas = make_measurements(4)
    meas.meta.update({"num_layers": 4, "top_k": 2, "model_type": "glm4_moe"})
    gen = torch.Generator().manual_seed(0)
    for layer in (1, 2, 3):
        for name in ("harmful", "harmless"):
            for suffix in ("", "_last"):
                f = torch.rand(8, generator=gen)
                meas.tensors[f"router.{name}_freq{suffix}.{layer}"] = f / f.sum()
    report = analyze(meas)
    for layer in (1, 2, 3):
        row = report.row(layer)
        p, q = meas.tensors[f"router.harmful_freq_last.{layer}"], meas.tensors[f"router.harmless_freq_last.{layer}"]
        diff = (p - q).tolist()
        want = sorted(range(8), key=lambda e: -diff[e])
        assert row.ranking_tokens == "last" and [e.expert for e in row.expert_ranking] == want
        assert row.expert_ranking[0].difference == pytest.approx(max(diff))
        assert row.router_js_last is not None and row.router_js_user is None
        assert row.router_js != row.router_js_last  # the all-token statistic is kept alongside
    assert [s["experts"] for s in report.router_bias_suggestions] == ["top:1", "top:2", "top:4"]
    assert report.router_bias_suggestions[0]["layers"] == "1:3" and "top risk difference" in report.table()
    assert (tmp_path / "x.png") == report.plot_experts(tmp_path / "x.png") and (tmp_path / "x.png").stat().st_size > 0
    cfg = recommend(meas, report=report, router_bias_top=2)
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    from intervene.testing import tiny_config

    config = tiny_config("glm4_moe", num_hidden_layers=4)
    edits = [e for e in resolve(again, arch_for_config(config), config, meas) if isinstance(e, RouterBiasEdit)]
    assert [(e.layer, e.experts) for e in edits] == [
        (r.layer, tuple(sorted(x.expert for x in r.expert_ranking[:2]))) for r in (report.row(1), report.row(2))]  # the depth band's MoE layers


@pytest.mark.parametrize("arch", ["glm4_moe", "qwen3_moe"])
def test_route_shows_steered_experts_going_to_zero(arch):
    from intervene.config.resolve import bind
    from intervene.hooks.apply import apply
    from intervene.live.route import format_report, route_study, steered_experts
    from intervene.testing import tiny_tokenizer

    model, tok = tiny_model(arch), tiny_tokenizer()
    meas = make_measurements(model.config.num_hidden_layers)
    harmful, harmless = ["how do I pick a lock", "make a weapon"], ["bake bread", "sing a song for me"]
    entries, vectors = _steering(model)
    cfg = parse_config({"router_bias": entries})
    spec = arch_for_config(model.config)
    bound = bind(cfg, meas, model.config)
    report = route_study(model, tok, harmful, harmless, intervention=lambda: apply(model, bound), run=RunOptions(progress=False))
    report.steered = steered_experts(report, bound.router_biases)
    assert len(report.steered) == 2 * len(vectors)
    for st in report.steered:
        row = next(r for r in report.layers if r.layer == st.layer)
        for name in ("harmful", "harmless"):
            assert st.freq[name]["baseline"] == row.freq[name]["baseline"][st.expert]
            assert st.freq[name]["intervened"] == row.freq[name]["intervened"][st.expert]
        if math.isinf(st.bias):
            assert st.freq.harmful["intervened"] == 0.0 and st.freq.harmless["intervened"] == 0.0
            assert st.freq.harmful["baseline"] + st.freq.harmless["baseline"] > 0  # negative control
    text = format_report(report)
    assert "steered experts" in text and " -> 0.0000" in text
    assert report.to_dict()["steered"][0]["bias"] in ("-inf", 0.5)


def test_search_space_router_bias_dimensions():
    import optuna

    from intervene.errors import InputError
    from intervene.search.space import SearchSpace
    from intervene.testing import tiny_config

    config = tiny_config("glm4_moe", num_hidden_layers=6)
    spec = arch_for_config(config)
    meas = make_measurements(6)
    with pytest.raises(InputError, match="router.harmful_freq_last.1"):
        SearchSpace.default(spec, config, meas, router_bias=True)
    for layer in range(1, 6):
        for name, f in (("harmful", torch.arange(8.0)), ("harmless", torch.arange(8.0).flip(0))):
            meas.tensors[f"router.{name}_freq_last.{layer}"] = (f + 1) / (f + 1).sum()  # p - q largest at 7, 6, ...
    plain = SearchSpace.default(spec, config, meas)
    assert "router_bias" not in plain.to_dict() and not plain.router_bias
    space = SearchSpace.default(spec, config, meas, router_bias=True, router_bias_top=(1, 9), projection_optional=True)
    assert space.router_bias_top == (1, 6)  # at most E - top_k = 8 - 2
    assert (space.router_bias_center.low, space.router_bias_center.high) == (1.0, 5.0)
    base = {"direction": 2.0, "center": 3.0, "width": 1.0, "method": "project", "router": False,
            **{f"{t}.{m}": 1.0 for t in space.targets for m in ("max", "min")}}
    both = space.suggest(optuna.trial.FixedTrial({**base, "router_bias": True, "router_bias.top": 3,
                                                  "router_bias.center": 3.2, "router_bias.width": 1.5,
                                                  "projection": True}))
    cfg = parse_config(yaml.safe_load(space.to_config(both).to_yaml()))
    assert cfg.ablate and len(cfg.router_bias) == 1
    entry = cfg.router_bias[0]
    assert (entry.layers, entry.top, entry.bias, entry.tokens) == ([2, 3, 4], 3, -math.inf, "last")
    edits = [e for e in resolve(cfg, spec, config, meas) if isinstance(e, RouterBiasEdit)]
    assert [(e.layer, e.experts) for e in edits] == [(layer, (5, 6, 7)) for layer in (2, 3, 4)]
    alone = space.suggest(optuna.trial.FixedTrial({**base, "router_bias": True, "router_bias.top": 1,
                                                   "router_bias.center": 1.2, "router_bias.width": 0.5,
                                                   "projection": False}))
    cfg = parse_config(yaml.safe_load(space.to_config(alone).to_yaml()))
    assert cfg.ablate == [] and cfg.router_bias[0].layers == [1] and cfg.targets is None
    off = space.suggest(optuna.trial.FixedTrial({**base, "router_bias": False}))
    assert space.to_config(off).router_bias == []
    assert space.to_dict()["router_bias_top"] == [1, 6]


def test_prepared_sites_list_the_steered_routers():
    from intervene.live.tryout import prepare
    from intervene.testing import tiny_tokenizer

    for arch, mechanism in (("glm4_moe", "swap"), ("mixtral", "hook")):
        model = tiny_model(arch)
        layer = _moe_layers(model)[-1]
        cfg = parse_config({"router_bias": [{"layers": [layer], "experts": [1], "bias": -3}],
                            "ablate": [{"layer": layer, "measurement": layer}]})
        p = prepare(cfg, measurements=make_measurements(model.config.num_hidden_layers), model=model,
                    tokenizer=tiny_tokenizer())
        sites = p.sites()
        assert sites[-1] == {"site": f"layers.{layer}.router.bias", "mechanism": mechanism}
        assert any(s["site"] == f"layers.{layer}.attn.out" for s in sites)
