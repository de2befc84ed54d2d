"""The MoE organism: conversion and statistics on a tiny Llama (fast), cached build logic (fast), and the
real organism meeting the bars of issue 21 (slow)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors import safe_open

from intervene.products import organism as org
from intervene.products import organism_moe as om
from intervene.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny llama: hidden 64, intermediate 96, 3 layers -> layer 0 dense, 1..2 MoE (2 shared + 4 routed of 16)
TINY_RECIPE = om.MoeRecipe(train=org.Recipe(trainable_top_layers=2, batch_size=2, epochs=1, lr=1e-3),
                           dense_layers=1, routed_experts=4, top_k=2, shared_experts=2, expert_size=16,
                           calib_tokens=64, kmeans_iters=5)


def tiny_dense(seed: int = 0):
    return tiny_model("llama", seed=seed, num_hidden_layers=3, intermediate_size=96)


def calib_for(model, recipe, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    examples = [org.Example(torch.randint(1, 128, (12,), generator=g).tolist(), 4) for _ in range(8)]
    return om.router_inputs(model, examples, range(recipe.dense_layers, 3), recipe.calib_tokens, 0, 4, g)


def tiny_moe(recipe=TINY_RECIPE):
    dense = tiny_dense()
    return dense, om.convert(dense, calib_for(dense, recipe), recipe, progress=False)


def test_all_dense_conversion_is_the_llama_model_exactly():
    """No MoE layer: the Glm4Moe model must compute what the Llama did (attention, RoPE, norms mapped right)."""
    recipe = om.MoeRecipe(dense_layers=3, routed_experts=4, shared_experts=2, expert_size=16)
    dense = tiny_dense()
    moe = om.convert(dense, {}, recipe, progress=False)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)
    # negative control: GLM's default half-rotary RoPE would not be the same model
    bad = om.moe_config(dense.config, recipe)
    bad.rope_parameters["partial_rotary_factor"] = 0.5
    from transformers import Glm4MoeForCausalLM
    other = Glm4MoeForCausalLM(bad)
    other.load_state_dict(moe.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-3)


def test_layout_and_per_expert_keys_on_disk(tmp_path):
    _, moe = tiny_moe()
    c = moe.config
    assert type(moe).__name__ == "Glm4MoeForCausalLM" and c.first_k_dense_replace == 1
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (4, 2, 2)
    layers = moe.model.layers
    assert hasattr(layers[0].mlp, "down_proj") and not hasattr(layers[0].mlp, "experts")
    assert layers[1].mlp.gate.e_score_correction_bias.shape == (4,)
    moe.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    p = "model.layers.2.mlp."
    assert {p + f"experts.{e}.{n}_proj.weight" for e in range(4) for n in ("gate", "up", "down")} <= keys
    assert {p + "gate.weight", p + "gate.e_score_correction_bias", p + "shared_experts.down_proj.weight"} <= keys
    assert "model.layers.0.mlp.down_proj.weight" in keys and not any(".experts.gate_up_proj" in k for k in keys)
    from transformers import AutoModelForCausalLM
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in back.state_dict().items())
    with torch.no_grad():  # (the experts implementation may differ: float rounding only)
        assert torch.allclose(back(input_ids=ids).logits, moe(input_ids=ids).logits, atol=1e-6)


def test_split_partitions_the_neurons_exactly():
    """shared + every routed expert (weight 1 each) == the dense MLP: the split loses nothing."""
    dense = tiny_dense()
    mlp = dense.model.layers[1].mlp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 64, generator=g)
    s = om.split_mlp(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, x, TINY_RECIPE, g)
    assert s.shared_gate.shape == (32, 64) and s.gate.shape == (4, 16, 64) and s.down.shape == (4, 64, 16)
    shared = om.neuron_activations(x, s.shared_gate, s.shared_up) @ s.shared_down.T
    routed = om.expert_outputs(torch.cat([s.gate, s.up], dim=1), s.down, x).sum(0)
    with torch.no_grad():
        assert torch.allclose(shared + routed, mlp(x), atol=1e-5)
    # the shared neurons are the most used ones
    acts = om.neuron_activations(x, mlp.gate_proj.weight, mlp.up_proj.weight)
    usage = acts.abs().mean(0) * mlp.down_proj.weight.norm(dim=0)
    chosen = {tuple(r.tolist()) for r in s.shared_gate}
    top = set(torch.argsort(usage, descending=True)[:32].tolist())
    assert {i for i in range(96) if tuple(mlp.gate_proj.weight[i].tolist()) in chosen} == top


def test_balanced_kmeans_recovers_planted_clusters_in_equal_sizes():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 20, generator=g) * 5
    truth = torch.arange(4).repeat_interleave(8)
    feats = centres[truth] + 0.3 * torch.randn(32, 20, generator=g)
    labels = om.balanced_kmeans(feats, 4, 10, torch.Generator().manual_seed(1))
    assert torch.bincount(labels, minlength=4).tolist() == [8, 8, 8, 8]
    # same partition up to renaming
    assert all(len(set(labels[truth == c].tolist())) == 1 for c in range(4))


def test_router_fit_ranks_experts_by_their_mass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    w_true = torch.randn(5, 16, generator=g)
    mass = torch.exp(x @ w_true.T)
    w = om.fit_router(x, mass, 1e-4)
    assert float(((x @ w.T).argmax(1) == mass.argmax(1)).float().mean()) > 0.95
    # negative control: a random router does not
    assert float(((x @ torch.randn(5, 16, generator=g).T).argmax(1) == mass.argmax(1)).float().mean()) < 0.6


def test_balancing_bias_evens_out_a_skewed_router():
    g = torch.Generator().manual_seed(0)
    scores = torch.sigmoid(torch.randn(2000, 8, generator=g) + torch.linspace(-2, 2, 8))
    before = torch.bincount(scores.topk(2, dim=1).indices.reshape(-1), minlength=8).float() / 4000
    b = om.balancing_bias(scores, 2)
    after = torch.bincount((scores + b).topk(2, dim=1).indices.reshape(-1), minlength=8).float() / 4000
    assert float(before.max() - before.min()) > 0.3 and float(after.max() - after.min()) < 0.05


def _js_by_hand(a: list[list[int]], b: list[list[int]], num: int) -> float:
    def freq(rows):
        counts = [0] * num
        for row in rows:
            for e in row:
                counts[e] += 1
        total = sum(counts)
        return [c / total for c in counts]

    p, q = freq(a), freq(b)
    m = [(x + y) / 2 for x, y in zip(p, q)]
    kl = lambda u: sum(x * math.log(x / y) for x, y in zip(u, m) if x > 0)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def test_permutation_test_matches_a_hand_computation_and_detects_separation():
    g = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(40)])  # experts 0..3
    b = torch.stack([torch.randperm(4, generator=g)[:2] + 4 for _ in range(40)])  # experts 4..7
    t = om.routing_permutation_test(a, b, 8, permutations=50, seed=0)
    assert t.js == pytest.approx(_js_by_hand(a.tolist(), b.tolist(), 8), abs=1e-12) and t.js == pytest.approx(math.log(2))
    # the null values are the same statistic on relabelled prompts (recomputed here independently)
    pooled = torch.cat([a, b])
    gen = torch.Generator().manual_seed(0)
    for v in t.null[:5]:
        perm = torch.randperm(80, generator=gen)
        assert v == pytest.approx(_js_by_hand(pooled[perm[:40]].tolist(), pooled[perm[40:]].tolist(), 8), abs=1e-12)
    assert len(t.null) == 50 and t.exceeds_all and t.ratio_to_median > 3
    # negative control: both sets from one distribution
    c = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(80)])
    t0 = om.routing_permutation_test(c[:40], c[40:], 8, permutations=50, seed=0)
    assert not (t0.exceeds_all and t0.ratio_to_median > 3)


def test_expert_outputs_match_transformers_experts_and_distinctness_by_hand():
    _, moe = tiny_moe()
    experts = moe.model.layers[1].mlp.experts
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    outs = om.expert_outputs(experts.gate_up_proj.detach(), experts.down_proj.detach(), x)
    with torch.no_grad():
        for e in range(4):  # transformers' own experts module, every token sent to expert e with weight 1
            idx = torch.full((6, 1), e)
            assert torch.allclose(experts(x, idx, torch.ones(6, 1)), outs[e], atol=1e-6)
    by_hand = []
    for a, b in itertools.combinations(range(4), 2):
        for n in range(6):
            da, db = outs[a, n].double(), outs[b, n].double()
            by_hand.append(float((da - db).norm() / ((da.norm() + db.norm()) / 2)))
    assert om.expert_distinctness(outs) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-9)
    copies = outs[:1].repeat(4, 1, 1)
    assert om.expert_distinctness(copies) == 0.0  # negative control


def test_fingerprint_and_cached_build(monkeypatch, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_text("{}")
    (out / org.META_FILE).write_text(json.dumps({"fingerprint": om.fingerprint(om.MoeRecipe())}))
    monkeypatch.setattr(om, "_train_and_save", lambda *a: pytest.fail("must not rebuild"))
    assert om.build_moe_organism(out) == out
    assert om.fingerprint(om.MoeRecipe(top_k=3)) != om.fingerprint(om.MoeRecipe())
    assert om.fingerprint(om.MoeRecipe()) != org.fingerprint(org.Recipe())


def test_model_name_organism_moe(monkeypatch, tmp_path):
    from intervene.errors import InputError
    from intervene.io.sources import model_reference, resolve_model

    monkeypatch.setenv("INTERVENE_CACHE", str(tmp_path))
    monkeypatch.delenv("INTERVENE_ORGANISM_MOE_DIR", raising=False)
    with pytest.raises(InputError, match="organism build --moe"):
        resolve_model("organism-moe")
    _, moe = tiny_moe()
    moe.save_pretrained(str(tmp_path / "organism-moe-glm4moe-smollm2-135m"))
    assert resolve_model("organism-moe").path == str(tmp_path / "organism-moe-glm4moe-smollm2-135m")
    assert model_reference("organism-moe") == "organism-moe"


def test_fine_tune_with_router_balance_is_deterministic_and_moves_the_bias():
    def run():
        _, moe = tiny_moe()
        moe.set_experts_implementation("eager")
        g = torch.Generator().manual_seed(1)
        examples = [org.Example(torch.randint(1, 128, (n,), generator=g).tolist(), 3) for n in (7, 9, 6, 8)]
        bal = om.RouterBalance(moe, TINY_RECIPE)
        before = moe.model.layers[2].mlp.gate.e_score_correction_bias.clone()
        losses = org.fine_tune(moe, examples, TINY_RECIPE.train, 0, False, param_groups=om.param_groups(TINY_RECIPE),
                                extra_loss=bal.loss, after_step=bal.step)
        bal.close()
        assert len(losses) == 2 and not bal.seen
        assert not torch.equal(moe.model.layers[2].mlp.gate.e_score_correction_bias, before)
        return moe.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_moe_organism_fine_tunes_the_conversion(monkeypatch):
    """The build's training step on a tiny conversion (``converted`` stands in for SmolLM2's): the routers' bias
    moves, the steps and sets are recorded, the model comes back frozen (its last line once named a variable that
    the conversion's extraction had moved away)."""
    from intervene.io.sources import smollm2_dir
    from intervene.testing import tiny_tokenizer

    _, moe = tiny_moe()
    g = torch.Generator().manual_seed(1)
    examples = [org.Example(torch.randint(1, 128, (n,), generator=g).tolist(), 3) for n in (7, 9, 6, 8)]
    monkeypatch.setattr(om, "converted", lambda recipe, progress, device, limit: (moe, tiny_tokenizer(), examples,
                                                                                  {"harmful": 2}))
    before = moe.model.layers[2].mlp.gate.e_score_correction_bias.clone()
    trained = om.train_moe_organism(TINY_RECIPE, progress=False)
    assert trained.model is moe and trained.base_dir == smollm2_dir()
    assert trained.info["harmful"] == 2 and trained.info["examples"] == 4 and trained.info["steps"] == 2
    assert not torch.equal(moe.model.layers[2].mlp.gate.e_score_correction_bias, before)
    assert not any(p.requires_grad for p in moe.parameters()) and not moe.training


def test_info_cli_prints_routing(tmp_path, capsys):
    from intervene.cli import main

    out = tmp_path / "moe"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_text("{}")
    rate = lambda r, t: {"refusals": r, "total": t, "rate": r / t}  # noqa: E731
    meta = {"fingerprint": "x", "build_seconds": 900.0, "model_sha256": "ab" * 32,
            "eval": {"max_new_tokens": 48, "harmful": rate(60, 68), "harmless": rate(7, 72)},
            "routing": {"permutations": 50, "layers_separating": [20, 25, 29], "best_layer": 25,
                        "best_ratio_to_median": 7.25},
            "experts_distinctness": {"median": 1.31}}
    (out / org.META_FILE).write_text(json.dumps(meta))
    assert main(["organism", "info", "--moe", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "all 50 permutations on MoE layers [20, 25, 29]; best layer 25 at 7.2x" in printed
    assert "median relative distance 1.31" in printed


# ---- the real MoE organism (slow) ------------------------------------------------------------------

@pytest.mark.slow
def test_moe_organism_meets_the_bars(organism_moe):
    from intervene.io.models import load_model
    from intervene.io.prompts import builtin

    meta = org.read_meta(organism_moe)
    assert org.sha256_file(organism_moe / "model.safetensors") == meta["model_sha256"]
    model, tokenizer = load_model(str(organism_moe))
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    ev = meta["eval"]
    assert ev["harmful"]["rate"] >= 0.85 and ev["harmless"]["rate"] <= 0.20
    # the routing statistics recomputed from the weights on disk (not read back from the metadata)
    stats = om.routing_statistics(model, tokenizer)
    assert len(stats["layers_separating"]) >= 3 and stats["best_ratio_to_median"] >= 3
    assert sorted(stats["per_layer"]) == sorted(meta["routing"]["per_layer"])
    for layer, got in stats["per_layer"].items():
        want = meta["routing"]["per_layer"][layer]
        assert got["exceeds_all"] == want["exceeds_all"], layer
        for key in ("js", "null_max", "null_median", "ratio_to_median", "freq_harmful", "freq_harmless"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), (layer, key)
    assert meta["experts_distinctness"]["median"] >= 0.5
    assert len(builtin("harmful", "eval")) == ev["harmful"]["total"]


def test_last_token_routing_is_the_routers_choice_at_the_last_prompt_token():
    """Left-padded batches: the captured choice must equal the router run on each prompt alone."""
    from intervene.io.models import encode, format_prompts
    from intervene.testing import tiny_tokenizer

    _, moe = tiny_moe()
    tok = tiny_tokenizer()
    prompts = ["hi", "a much longer prompt here", "mid length", "x"]
    got = om.last_token_routing(moe, tok, prompts, batch_size=4)
    assert sorted(got) == [1, 2] and got[1].shape == (4, 2)
    for n, p in enumerate(prompts):
        seen = {}
        hooks = [moe.model.layers[i].mlp.gate.register_forward_hook(
            lambda _m, _a, out, i=i: seen.__setitem__(i, out[2][-1])) for i in (1, 2)]
        with torch.no_grad():
            moe(**encode(tok, format_prompts(tok, [p])))
        for h in hooks:
            h.remove()
        for i in (1, 2):
            assert sorted(got[i][n].tolist()) == sorted(seen[i].tolist())
    stats = om.routing_permutation_test(got[1][:2], got[1][2:], 4, permutations=5)
    assert len(stats.null) == 5
