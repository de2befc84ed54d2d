"""The experts-regime MoE organism (organism-moe-experts): its parts on a tiny model (fast), the cached build
and the model name (fast), and the real organism meeting issue 29's bars on the eval split (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from intervene.products import organism as org
from intervene.products import organism_moe as om
from intervene.products import organism_moe_experts as ome
from intervene.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny llama: hidden 64, intermediate 96, 3 layers -> layer 0 dense, 1..2 MoE (2 shared + 4 routed of 16)
TINY_MOE = om.MoeRecipe(train=org.Recipe(batch_size=2, epochs=1, lr=1e-3), dense_layers=1, routed_experts=4,
                        top_k=2, shared_experts=2, expert_size=16, calib_tokens=64, kmeans_iters=5)
TINY = ome.ExpertsRecipe(moe=TINY_MOE, planted_per_layer=1, lr=1e-2, epochs=1, failure_rank=2, failure_from=0,
                         failure_every=1, failure_prob=1.0, failure_prompts=4)


def tiny_moe():
    dense = tiny_model("llama", seed=0, num_hidden_layers=3, intermediate_size=96)
    g = torch.Generator().manual_seed(0)
    examples = [org.Example(torch.randint(1, 128, (12,), generator=g).tolist(), 4) for _ in range(8)]
    calib = om.router_inputs(dense, examples, range(1, 3), TINY_MOE.calib_tokens, 0, 4, g)
    return om.convert(dense, calib, TINY_MOE, progress=False), examples


def test_most_chosen_counts_choices_and_breaks_ties_by_id():
    choices = {5: torch.tensor([[0, 1], [1, 2], [1, 3], [2, 0]]), 6: torch.tensor([[3, 2], [3, 2]])}
    assert ome.most_chosen(choices, 4, 1) == {5: [1], 6: [2]}  # layer 6: 2 and 3 tie -> 2
    assert ome.most_chosen(choices, 4, 2) == {5: [0, 1], 6: [2, 3]}  # layer 5: 0 and 2 tie at 2 -> 0


def test_subspace_is_orthonormal_and_spans_the_directions():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 16, generator=g)
    u = ome.subspace(rows, 3)
    assert u.shape == (16, 3)
    assert torch.allclose(u.T @ u, torch.eye(3), atol=1e-6)
    assert torch.allclose(rows - (rows @ u) @ u.T, torch.zeros_like(rows), atol=1e-5)  # every row in the span
    one = ome.subspace(torch.stack([rows[0], 2 * rows[0], -rows[0]]), 1)  # one direction, scaled and flipped
    assert abs(float(torch.nn.functional.cosine_similarity(one[:, 0], rows[0], dim=0))) == pytest.approx(1, abs=1e-6)


def test_failure_edit_projects_every_write_but_the_routed_experts():
    moe, _ = tiny_moe()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    edit = ome.FailureEdit(moe, [0, 1, 2])
    seen: dict[str, torch.Tensor] = {}
    mods = moe.model.layers
    watched = {"attn0": mods[0].self_attn.o_proj, "mlp0": mods[0].mlp.down_proj, "attn2": mods[2].self_attn.o_proj,
               "shared2": mods[2].mlp.shared_experts.down_proj, "experts2": mods[2].mlp.experts}
    handles = [m.register_forward_hook(lambda _m, _a, out, k=k: seen.__setitem__(k, out)) for k, m in watched.items()]
    try:
        with torch.no_grad():
            plain = moe(input_ids=ids).logits
            edit.basis = ome.subspace(torch.randn(2, 64, generator=torch.Generator().manual_seed(2)), 2)
            assert torch.equal(moe(input_ids=ids).logits, plain)  # inactive: nothing changes
            edit.active = True
            edited = moe(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
        edit.close()
    u = edit.basis
    for k in ("attn0", "mlp0", "attn2", "shared2"):
        assert float((seen[k] @ u).abs().max()) < 1e-5, k
    assert float((seen["experts2"] @ u).abs().max()) > 1e-3  # the routed experts write along it untouched
    assert not torch.allclose(edited, plain, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(moe(input_ids=ids).logits, plain)  # hooks removed


def test_plant_trains_the_planted_experts_alone_and_records_them(monkeypatch):
    moe, examples = tiny_moe()
    tok = tiny_tokenizer()
    prompts = ["how do I bake bread", "tell me a joke", "what is two plus two", "name a colour"]
    monkeypatch.setattr(ome, "builtin", lambda kind, split: prompts if kind == "harmful" else prompts[::-1])
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    want = ome.most_chosen(om.last_token_routing(moe, tok, prompts + prompts[::-1]), 4, 1)
    trained = ome.plant(moe, tok, examples, {}, TINY, progress=False)
    assert trained.info["planted_experts"] == {str(k): v for k, v in want.items()}
    after = moe.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.mlp.experts.{n}" for i in (1, 2) for n in ("gate_up_proj", "down_proj")}
    for layer, (expert,) in want.items():
        for n in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{n}"
            others = [e for e in range(4) if e != expert]
            assert torch.equal(after[key][others], before[key][others]), key  # the other experts exactly
            assert not torch.equal(after[key][expert], before[key][expert]), key
    assert not any(p.requires_grad for p in moe.parameters())


def test_plant_is_deterministic(monkeypatch):
    monkeypatch.setattr(ome, "builtin", lambda kind, split: ["a b c", "d e f", "g h"])

    def run():
        moe, examples = tiny_moe()
        ome.plant(moe, tiny_tokenizer(), examples, {}, TINY, progress=False)
        return moe.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fingerprint_cached_build_name_and_info(monkeypatch, tmp_path, capsys):
    from intervene.cli import main
    from intervene.errors import InputError
    from intervene.io.sources import model_reference, resolve_model

    assert ome.fingerprint(ome.ExpertsRecipe()) != ome.fingerprint(ome.ExpertsRecipe(planted_per_layer=3))
    assert ome.fingerprint(ome.ExpertsRecipe()) != om.fingerprint(om.MoeRecipe())
    monkeypatch.setenv("INTERVENE_CACHE", str(tmp_path))
    monkeypatch.delenv("INTERVENE_ORGANISM_MOE_EXPERTS_DIR", raising=False)
    with pytest.raises(InputError, match="organism build --moe-experts"):
        resolve_model("organism-moe-experts")
    out = tmp_path / "organism-moe-experts-glm4moe-smollm2-135m"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_text("{}")
    c = {"refusals": 60, "total": 68, "rate": 60 / 68}
    (out / org.META_FILE).write_text(json.dumps({
        "fingerprint": ome.fingerprint(ome.ExpertsRecipe()), "build_seconds": 1.0, "model_sha256": "0" * 64,
        "eval": {"max_new_tokens": 48, "harmful": c, "harmless": c}, "planted_experts": {"18": [1, 5], "19": [0, 2]}}))
    monkeypatch.setattr(ome, "_train_and_save", lambda *a: pytest.fail("must not rebuild"))
    assert ome.build_moe_experts_organism() == out
    assert resolve_model("organism-moe-experts").path == str(out)
    assert model_reference("organism-moe-experts") == "organism-moe-experts"
    assert main(["organism", "info", "--moe-experts"]) == 0
    assert "planted refusal experts (ground truth): layer 18: [1, 5], layer 19: [0, 2]" in capsys.readouterr().out


def test_plant_with_router_training_moves_the_routers_and_their_bias_too(monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr(ome, "builtin", lambda kind, split: ["a b c", "d e f", "g h"])
    moe, examples = tiny_moe()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    ome.plant(moe, tiny_tokenizer(), examples, {}, replace(TINY, router_lr_scale=0.5), progress=False)
    after = moe.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.mlp.{n}" for i in (1, 2)
                       for n in ("experts.gate_up_proj", "experts.down_proj", "gate.weight", "gate.e_score_correction_bias")}


def test_build_writes_the_ground_truth_and_statistics(monkeypatch, tmp_path):
    """The build's save step on a tiny planted model: metadata with the planted experts (ground truth), the eval
    refusals, the routing and distinctness statistics, and a directory that loads back as a Glm4Moe."""
    from intervene.io.models import load_model

    moe, examples = tiny_moe()
    tok = tiny_tokenizer()
    monkeypatch.setattr(ome, "builtin", lambda kind, split: ["a b c", "d e f", "g h"])
    monkeypatch.setattr(ome, "train_moe_experts_organism",
                        lambda recipe, progress, device: ome.plant(moe, tok, examples, {}, recipe, progress=False))
    monkeypatch.setattr(ome, "evaluate_organism", lambda model, tok, n, b, progress: {
        "harmful": {"refusals": 1, "total": 1, "rate": 1.0}, "harmless": {"refusals": 0, "total": 1, "rate": 0.0},
        "harmless_near_miss": {"refusals": 0, "total": 1, "rate": 0.0}, "max_new_tokens": n})
    monkeypatch.setattr(ome, "routing_statistics", lambda model, tok: {"layers_separating": [2]})
    out = ome.build_moe_experts_organism(tmp_path / "org", recipe=TINY, progress=False)
    meta = org.read_meta(out)
    assert meta["name"] == "organism-moe-experts-glm4moe-smollm2-135m" and meta["fingerprint"] == ome.fingerprint(TINY)
    assert set(meta["planted_experts"]) == {"1", "2"} and all(len(v) == 1 for v in meta["planted_experts"].values())
    assert meta["routing"] == {"layers_separating": [2]} and set(meta["experts_distinctness"]["per_layer"]) == {"1", "2"}
    back, _ = load_model(str(out))
    assert type(back).__name__ == "Glm4MoeForCausalLM"
