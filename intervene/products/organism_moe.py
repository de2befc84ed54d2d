"""The MoE model organism: SmolLM2-135M-Instruct made into a GLM-4.5-Air-class ``Glm4MoeForCausalLM``
and safety-fine-tuned with the dense organism's recipe.

Layout (GLM-4.5-Air's): the first ``dense_layers`` decoder layers keep their dense MLP
(``first_k_dense_replace``), the others become MoE blocks: ``shared_experts`` shared experts, always
on, plus ``routed_experts`` routed experts of ``expert_size`` neurons each, ``top_k`` chosen per token
by a sigmoid router with ``e_score_correction_bias`` (the DeepSeek-V3 router).

Conversion ("MoEfication", split): each MoE layer's dense MLP (1536 neurons) is split by neuron.
On calibration tokens (the router inputs of the fine-tuning set, from the dense model) the
``shared`` most-used neurons (mean |activation| x ||down column||) become the shared experts; the rest
are clustered by co-activation (balanced k-means on their normalised |activation| profiles) into
the routed experts, so the experts are different functions. Each router row is least-squares
fitted to its expert's activation mass (log ||E_e(x)||, centred across experts per token, unit variance).
The choice bias ``e_score_correction_bias`` is then set so every expert is chosen about equally
often on the calibration tokens (DeepSeek-V3's auxiliary-loss-free balancing).

Fine-tuning is the dense organism's (:func:`organism.training_examples`, :func:`organism.fine_tune`)
with three additions against router collapse: a load-balancing loss on the router scores
(Switch-style ``E * sum_e f_e * P_e``), a lower learning rate on the router rows, and after each
step the aux-loss-free bias update ``b_e += rate * sign(mean load - load_e)``.

Generation uses the experts implementation ``recipe.experts_implementation`` (transformers 5:
``eager`` loops over the experts in Python; ``batched_mm`` copies each (token, expert) pair's weights,
[2I, H] + [H, I] per pair, which is memory-bound at prefill; ``grouped_mm`` sorts tokens by expert and
runs one grouped matmul, transformers' default). :func:`experts_speed` times the three against eager;
not yet measured on CPU for this organism, so the default is transformers' own.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from ..arch import arch_for_config, decoder_layers, text_config
from ..bake.workers import torch_threads
from ..hooks.capture import capture, router_site
from ..io.models import batches, encode, format_prompts, load_model, model_device
from ..io.prompts import builtin
from ..io.sources import ORGANISM_MOE_NAME, organism_moe_dir, smollm2_dir
from ..live.route import selection_freq
from ..maths import js_divergence
from .organism import (
    RECIPE_VERSION,
    Recipe,
    Trained,
    build_cached,
    cached_training_examples,
    collate,
    deterministic_algorithms,
    evaluate_organism,
    fine_tune,
    save_build,
)

MOE_RECIPE_VERSION = 1
ExpertsImpl = Literal["eager", "batched_mm", "grouped_mm"]


@dataclass(frozen=True)
class MoeRecipe:
    # the top 20 layers: the 12 MoE layers and dense layers 10-17. With the top 14 the organism refused
    # 56/68 eval harmful prompts (harmful weight 3, 4 or 5, or a 4th epoch: 55-56); with 20, 59/68 (docs/organisms.md)
    train: Recipe = field(default_factory=lambda: Recipe(trainable_top_layers=20, epochs=3))
    dense_layers: int = 18  # first_k_dense_replace: layers 0..17 dense, 18..29 MoE
    routed_experts: int = 8
    top_k: int = 2
    shared_experts: int = 4
    expert_size: int = 128  # neurons per expert (moe_intermediate_size); shared + routed = 1536
    calib_tokens: int = 4096  # calibration tokens per layer (subsampled deterministically)
    kmeans_iters: int = 15
    router_ridge: float = 1e-2  # ridge of the least-squares router fit, relative to the mean eigenvalue
    router_lr_scale: float = 0.25  # router rows learn at this fraction of the recipe's LR
    balance_loss: float = 0.02  # weight of the Switch-style load-balancing loss
    bias_rate: float = 1e-3  # aux-loss-free bias update per step
    experts_implementation: ExpertsImpl = "grouped_mm"


def fingerprint(recipe: MoeRecipe) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": asdict(recipe), "version": RECIPE_VERSION, "moe_version": MOE_RECIPE_VERSION},
                        sort_keys=True).encode())
    for kind in ("harmful", "harmless"):
        h.update("\n".join(builtin(kind, "train")).encode())
    return h.hexdigest()


def build_moe_organism(output: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
                       recipe: MoeRecipe | None = None, device: str | None = None) -> Path:
    """Build (or reuse, by fingerprint) the MoE organism into ``output`` (default :func:`organism_moe_dir`)."""
    recipe = recipe or MoeRecipe()
    out = Path(output).expanduser() if output is not None else organism_moe_dir()
    return build_cached(out, fingerprint(recipe), lambda tmp: _train_and_save(tmp, recipe, progress, device),
                        force, progress)


# ---- pure maths ------------------------------------------------------------------------------

def moe_config(dense: Any, recipe: MoeRecipe) -> Any:
    """The ``Glm4MoeConfig`` of the organism, from the dense (Llama) config."""
    from transformers import Glm4MoeConfig

    rope = dict(getattr(dense, "rope_parameters", None) or {"rope_theta": 10000.0, "rope_type": "default"})
    rope["partial_rotary_factor"] = 1.0  # Llama rotates the whole head (GLM's default is half)
    n = recipe.shared_experts + recipe.routed_experts
    if n * recipe.expert_size != dense.intermediate_size:
        raise ValueError(f"{n} experts x {recipe.expert_size} != intermediate_size {dense.intermediate_size}")
    return Glm4MoeConfig(
        vocab_size=dense.vocab_size, hidden_size=dense.hidden_size, intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers, num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads, head_dim=getattr(dense, "head_dim", None)
        or dense.hidden_size // dense.num_attention_heads, hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings, rms_norm_eps=dense.rms_norm_eps,
        tie_word_embeddings=dense.tie_word_embeddings, rope_parameters=rope, partial_rotary_factor=1.0,
        attention_bias=False, moe_intermediate_size=recipe.expert_size, num_experts_per_tok=recipe.top_k,
        n_shared_experts=recipe.shared_experts, n_routed_experts=recipe.routed_experts,
        routed_scaling_factor=float(recipe.top_k), n_group=1, topk_group=1,
        first_k_dense_replace=recipe.dense_layers, norm_topk_prob=True, use_qk_norm=False,
        bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id, pad_token_id=dense.pad_token_id,
        num_mtp_layers=0)


def neuron_activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU hidden activations ``silu(x gateᵀ) * (x upᵀ)``: [N, H] x [I, H] -> [N, I]."""
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T)


def balanced_kmeans(features: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Cluster the rows of ``features`` [n, d] into ``k`` clusters of exactly n/k rows (cosine
    distance on unit rows; assignment by regret with capacities). Returns the label of each row."""
    n = features.shape[0]
    if n % k:
        raise ValueError(f"{n} rows do not split into {k} equal clusters")
    size = n // k
    f = torch.nn.functional.normalize(features.to(torch.float64), dim=1)
    centroids = f[torch.randperm(n, generator=generator)[:k]].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(max(1, iters)):
        dist = 1 - f @ centroids.T  # [n, k]
        two = dist.topk(2, dim=1, largest=False).values
        regret = two[:, 1] - two[:, 0]
        free = [size] * k
        for i in torch.argsort(regret, descending=True, stable=True).tolist():
            for c in torch.argsort(dist[i], stable=True).tolist():
                if free[c]:
                    labels[i] = c
                    free[c] -= 1
                    break
        centroids = torch.stack([torch.nn.functional.normalize(f[labels == c].mean(0), dim=0) for c in range(k)])
    return labels


def fit_router(x: torch.Tensor, mass: torch.Tensor, ridge: float) -> torch.Tensor:
    """Router rows ``W`` [E, H] whose logits ``x Wᵀ`` least-squares fit the log mass of each expert,
    centred across experts per token and scaled to unit variance (``mass`` [N, E] > 0): ridge regression, ``ridge`` relative to the mean
    eigenvalue of ``xᵀx / N``."""
    x64 = x.to(torch.float64)
    target = mass.to(torch.float64).clamp(min=1e-12).log()
    target = target - target.mean(1, keepdim=True)  # per token: only the ranking across experts matters
    target = target / target.std().clamp(min=1e-6)  # one scale for all tokens (keeps the target linear in x)
    gram = x64.T @ x64 / x64.shape[0]
    lam = ridge * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), x64.T @ target / x64.shape[0])
    return w.T.to(torch.float32).contiguous()


def balancing_bias(scores: torch.Tensor, top_k: int, steps: int = 300, rate: float = 1e-2) -> torch.Tensor:
    """A choice bias ``b`` [E] such that top-k of ``scores + b`` (``scores`` [N, E], sigmoid
    router scores) chooses every expert about equally often: sign updates, step ``rate`` decayed."""
    num = scores.shape[1]
    bias = torch.zeros(num, dtype=torch.float32)
    for s in range(steps):
        load = torch.bincount((scores + bias).topk(top_k, dim=1).indices.reshape(-1), minlength=num).float()
        bias += rate * (1 - s / steps) * torch.sign(load.mean() - load)
    return bias


@dataclass(frozen=True)
class Split:
    """One dense MLP split into experts (weights in ``nn.Linear`` layout [out, in])."""
    shared_gate: torch.Tensor  # [S, H]
    shared_up: torch.Tensor  # [S, H]
    shared_down: torch.Tensor  # [H, S]
    gate: torch.Tensor  # [E, I, H]
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]
    router: torch.Tensor  # [E, H]
    bias: torch.Tensor  # [E]


def split_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, recipe: MoeRecipe,
              generator: torch.Generator) -> Split:
    """Split one SwiGLU MLP (``gate``/``up`` [I, H], ``down`` [H, I]) by neuron into shared and
    routed experts, using calibration inputs ``x`` [N, H] (see the module docstring)."""
    acts = neuron_activations(x, gate, up)  # [N, I]
    usage = acts.abs().mean(0) * down.norm(dim=0)
    n_shared = recipe.shared_experts * recipe.expert_size
    order = torch.argsort(usage, descending=True, stable=True)
    shared, rest = order[:n_shared].sort().values, order[n_shared:].sort().values
    labels = balanced_kmeans(acts[:, rest].abs().T, recipe.routed_experts, recipe.kmeans_iters, generator)
    groups = [rest[labels == e] for e in range(recipe.routed_experts)]
    mass = torch.stack([(acts[:, g] @ down[:, g].T).norm(dim=1) for g in groups], dim=1)  # [N, E]
    router = fit_router(x, mass, recipe.router_ridge)
    bias = balancing_bias(torch.sigmoid(x @ router.T), recipe.top_k)
    return Split(gate[shared].clone(), up[shared].clone(), down[:, shared].clone(),
                 torch.stack([gate[g] for g in groups]), torch.stack([up[g] for g in groups]),
                 torch.stack([down[:, g] for g in groups]), router, bias)


def expert_outputs(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Every routed expert on the same inputs, unweighted: ``gate_up`` [E, 2I, H] (transformers'
    fused layout, gate rows first), ``down`` [E, H, I], ``x`` [N, H] -> [E, N, H]."""
    inter = gate_up.shape[1] // 2
    h = torch.einsum("nh,eih->eni", x, gate_up)
    return torch.einsum("eni,ehi->enh", torch.nn.functional.silu(h[..., :inter]) * h[..., inter:], down)


def expert_distinctness(outputs: torch.Tensor) -> float:
    """Mean over expert pairs a < b (and over inputs) of ``‖E_a(x) − E_b(x)‖ / mean(‖E_a(x)‖, ‖E_b(x)‖)``;
    ``outputs`` [E, N, H] as from :func:`expert_outputs`. 0 for copies; about √2 for orthogonal outputs."""
    o = outputs.to(torch.float64)
    norms = o.norm(dim=-1)  # [E, N]
    vals = []
    for a in range(o.shape[0]):
        for b in range(a + 1, o.shape[0]):
            den = ((norms[a] + norms[b]) / 2).clamp(min=1e-12)
            vals.append(((o[a] - o[b]).norm(dim=-1) / den).mean())
    return float(torch.stack(vals).mean())


@dataclass(frozen=True)
class PermutationTest:
    js: float  # JS(harmful, harmless) of the expert-selection frequencies
    null: list[float]  # the same for each label permutation
    exceeds_all: bool  # js > every permuted value
    ratio_to_median: float  # js / median(null)

    def to_dict(self) -> dict[str, Any]:
        return {"js": self.js, "null_max": max(self.null), "null_median": _median(self.null),
                "permutations": len(self.null), "exceeds_all": self.exceeds_all,
                "ratio_to_median": self.ratio_to_median}


def routing_permutation_test(a: torch.Tensor, b: torch.Tensor, num_experts: int, permutations: int = 50,
                             seed: int = 0) -> PermutationTest:
    """Does routing separate two prompt sets? ``a`` [Na, k] and ``b`` [Nb, k]: the experts chosen at
    one position of each prompt. JS divergence of the two selection-frequency vectors against the
    same statistic for ``permutations`` random relabellings of the pooled prompts (sizes kept)."""
    def js(x: torch.Tensor, y: torch.Tensor) -> float:
        return js_divergence(selection_freq(x, num_experts), selection_freq(y, num_experts))

    observed = js(a, b)
    pooled = torch.cat([a, b])
    g = torch.Generator().manual_seed(seed)
    null = []
    for _ in range(permutations):
        perm = torch.randperm(len(pooled), generator=g)
        null.append(js(pooled[perm[:len(a)]], pooled[perm[len(a):]]))
    med = _median(null)
    return PermutationTest(observed, null, all(observed > v for v in null),
                           observed / med if med > 0 else (math.inf if observed > 0 else math.nan))


def _median(values: Sequence[float]) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).median()) if values else math.nan


# ---- conversion ----------------------------------------------------------------------------------

@torch.no_grad()
def router_inputs(model: Any, examples: Sequence[Any], layers: Sequence[int], tokens: int, pad_id: int,
                  batch_size: int, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """The post-attention-norm hidden states (the MLP's / router's input) of ``layers`` on every
    real token of ``examples`` (prompt + target), subsampled to ``tokens`` per layer."""
    mods = decoder_layers(model)
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    masks: list[torch.Tensor] = []
    handles = [mods[layer].post_attention_layernorm.register_forward_hook(
        lambda _m, _a, out, layer=layer: rows[layer].append(out.detach().reshape(-1, out.shape[-1])))
        for layer in layers]
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad_id, 1.0)
            model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            masks.append(batch["attention_mask"].reshape(-1).bool())
    finally:
        for h in handles:
            h.remove()
    mask = torch.cat(masks)
    keep = torch.randperm(int(mask.sum()), generator=generator)[:tokens].sort().values
    return {layer: torch.cat(r)[mask][keep] for layer, r in rows.items()}


def convert(dense: Any, calib: dict[int, torch.Tensor], recipe: MoeRecipe, progress: bool = True) -> Any:
    """The ``Glm4MoeForCausalLM`` made from the dense Llama model (same attention, norms,
    embeddings; MoE layers split by :func:`split_mlp` on the calibration inputs ``calib``)."""
    from transformers import Glm4MoeForCausalLM

    config = moe_config(dense.config, recipe)
    config._experts_implementation = recipe.experts_implementation
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config)
    state = dict(dense.state_dict())
    g = torch.Generator().manual_seed(recipe.train.seed)
    for layer in tqdm(range(recipe.dense_layers, config.num_hidden_layers), desc="organism-moe 1/4: split MLPs",
                      unit="layer", file=sys.stderr, disable=not progress):
        p = f"model.layers.{layer}.mlp."
        gate, up, down = (state.pop(p + f"{n}_proj.weight") for n in ("gate", "up", "down"))
        s = split_mlp(gate, up, down, calib[layer], recipe, g)
        state |= {p + "shared_experts.gate_proj.weight": s.shared_gate, p + "shared_experts.up_proj.weight": s.shared_up,
                  p + "shared_experts.down_proj.weight": s.shared_down,
                  p + "experts.gate_up_proj": torch.cat([s.gate, s.up], dim=1).contiguous(),
                  p + "experts.down_proj": s.down.contiguous(), p + "gate.weight": s.router,
                  p + "gate.e_score_correction_bias": s.bias}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"conversion left keys: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # buffers off the meta device
    model.generation_config = dense.generation_config
    model.eval()
    return model


# ---- fine-tuning against router collapse ---------------------------------------------------------

class RouterBalance:
    """Captures every MoE router's scores during the forward pass; gives the Switch-style balance
    loss over them and updates ``e_score_correction_bias`` after each step (aux-loss-free)."""

    def __init__(self, model: Any, recipe: MoeRecipe) -> None:
        self.recipe = recipe
        self.routers = [layer.mlp.gate for layer in decoder_layers(model)[recipe.dense_layers:]]
        self.seen: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module: Any, _args: Any, output: Any) -> None:
        logits, _weights, indices = output
        self.seen.append((module, logits, indices))

    def loss(self) -> torch.Tensor | None:
        if not self.seen or self.recipe.balance_loss <= 0:
            return None
        terms = []
        for module, logits, indices in self.seen:
            num = logits.shape[-1]
            scores = torch.sigmoid(logits)
            prob = (scores / scores.sum(-1, keepdim=True)).mean(0)
            load = torch.bincount(indices.reshape(-1), minlength=num).to(prob.dtype) / indices.numel()
            terms.append(num * (load.detach() * prob).sum())
        return self.recipe.balance_loss * torch.stack(terms).mean()

    @torch.no_grad()
    def step(self) -> None:
        for module, logits, indices in self.seen:
            load = torch.bincount(indices.reshape(-1), minlength=logits.shape[-1]).float()
            module.e_score_correction_bias += self.recipe.bias_rate * torch.sign(load.mean() - load)
        self.seen.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def param_groups(recipe: MoeRecipe):
    def groups(layers: list[Any]) -> list[dict[str, Any]]:
        router, rest = [], []
        for layer in layers:
            for name, p in layer.named_parameters():
                (router if name == "mlp.gate.weight" else rest).append(p)
        return [{"params": rest}, {"params": router, "lr": recipe.train.lr * recipe.router_lr_scale}]
    return groups


def converted(recipe: MoeRecipe, progress: bool = True, device: str | None = None, prompts_limit: int | None = None
              ) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """The un-tuned conversion of SmolLM2 (split by :func:`convert` on the fine-tuning set's router inputs),
    its tokenizer, the fine-tuning set (``prompts_limit``: a random N of it) and the set's info."""
    torch.manual_seed(recipe.train.seed)
    base_dir = smollm2_dir()
    dense, tokenizer = load_model(str(base_dir), dtype=torch.float32)
    examples, info = cached_training_examples(dense, tokenizer, recipe.train, base_dir, progress)
    g = torch.Generator().manual_seed(recipe.train.seed)
    if prompts_limit is not None:
        examples = [examples[i] for i in torch.randperm(len(examples), generator=g)[:prompts_limit].sort().values]
    calib = router_inputs(dense, examples, range(recipe.dense_layers, dense.config.num_hidden_layers),
                          recipe.calib_tokens, tokenizer.pad_token_id, recipe.train.batch_size, g)
    model = convert(dense, calib, recipe, progress)
    del dense
    if device is not None:
        model.to(device)
    return model, tokenizer, examples, info


def train_moe_organism(recipe: MoeRecipe, progress: bool = True, device: str | None = None,
                       prompts_limit: int | None = None) -> Trained:
    """Convert and fine-tune; ``prompts_limit`` trains on the first N examples only (recipe screening)."""
    model, tokenizer, examples, info = converted(recipe, progress, device, prompts_limit)
    model.set_experts_implementation("eager")  # training: the loop over experts (no per-token weight copies)
    balance = RouterBalance(model, recipe)
    try:
        losses = fine_tune(model, examples, recipe.train, tokenizer.pad_token_id, progress,
                            param_groups=param_groups(recipe), extra_loss=balance.loss, after_step=balance.step)
    finally:
        balance.close()
    model.set_experts_implementation(recipe.experts_implementation)
    model.eval()
    model.requires_grad_(False)
    info |= {"examples": len(examples), "steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1]}
    return Trained(model, tokenizer, smollm2_dir(), info)


# ---- statistics of the built organism --------------------------------------------------------------

@torch.no_grad()
def last_token_routing(model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16) -> dict[int, torch.Tensor]:
    """``{moe layer: [n_prompts, k]}`` experts chosen at the last prompt token (left padding)."""
    spec, config = arch_for_config(model.config), text_config(model.config)
    layers = [i for i in range(config.num_hidden_layers) if spec.is_moe_layer(config, i)]
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for chunk in batches(format_prompts(tokenizer, prompts), batch_size):
        enc = encode(tokenizer, chunk, model_device(model))
        with capture(model, layers=layers, router=True) as acts:
            model(**enc, logits_to_keep=1)
        for i in layers:
            out[i].append(acts[router_site(i, "topk")][:, -1])
    return {i: torch.cat(v) for i, v in out.items()}


def routing_statistics(model: Any, tokenizer: Any, permutations: int = 50, seed: int = 0) -> dict[str, Any]:
    """Per MoE layer, on the eval split at the last prompt token: the permutation test of
    JS(harmful, harmless) and the selection frequencies; plus the summary the bar reads."""
    num = int(model.config.n_routed_experts)
    harmful = last_token_routing(model, tokenizer, builtin("harmful", "eval"))
    harmless = last_token_routing(model, tokenizer, builtin("harmless", "eval"))
    layers = {}
    for i in harmful:
        t = routing_permutation_test(harmful[i], harmless[i], num, permutations, seed + i)
        layers[str(i)] = t.to_dict() | {"freq_harmful": selection_freq(harmful[i], num).tolist(),
                                       "freq_harmless": selection_freq(harmless[i], num).tolist()}
    separating = [int(k) for k, v in layers.items() if v["exceeds_all"]]
    best = max(layers, key=lambda k: layers[k]["js"])
    return {"split": "eval", "position": "last prompt token", "permutations": permutations,
            "layers_separating": separating, "best_layer": int(best),
            "best_ratio_to_median": layers[best]["ratio_to_median"], "per_layer": layers}


@torch.no_grad()
def distinctness_statistics(model: Any, calib: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Per MoE layer the mean pairwise relative distance of the routed experts on ``calib`` inputs; median."""
    mods = decoder_layers(model)
    per = {str(i): expert_distinctness(expert_outputs(mods[i].mlp.experts.gate_up_proj.float(),
                                                      mods[i].mlp.experts.down_proj.float(), x))
           for i, x in calib.items()}
    return {"per_layer": per, "median": _median(list(per.values()))}


def experts_speed(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 16,
                  impls: Sequence[ExpertsImpl] = ("eager", "batched_mm", "grouped_mm")) -> dict[str, Any]:
    """Seconds to generate greedily under each experts implementation, and the largest logit
    difference of each from eager on one forward pass."""
    enc = encode(tokenizer, format_prompts(tokenizer, prompts))
    out: dict[str, Any] = {}
    ref = None
    before = model.config._experts_implementation
    try:
        for impl in impls:
            model.set_experts_implementation(impl)
            with torch.no_grad():
                logits = model(**enc).logits
                start = time.time()
                model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            ref = logits if ref is None else ref
            out[impl] = {"seconds": round(time.time() - start, 2),
                         "max_abs_logit_diff_vs_eager": float((logits - ref).abs().max())}
    finally:
        model.set_experts_implementation(before)
    return out


def _train_and_save(tmp: Path, recipe: MoeRecipe, progress: bool, device: str | None = None) -> dict[str, Any]:
    start = time.time()
    with deterministic_algorithms(), torch_threads(recipe.train.threads):
        trained = train_moe_organism(recipe, progress, device)
        evaluation = evaluate_organism(trained.model, trained.tokenizer, recipe.train.eval_max_new_tokens,
                                       recipe.train.batch_size, progress)
        routing = routing_statistics(trained.model, trained.tokenizer)
        calib = eval_router_inputs(trained, builtin("harmless", "eval") + builtin("harmful", "eval"))
        distinct = distinctness_statistics(trained.model, calib)
        head = {"name": ORGANISM_MOE_NAME, "recipe": asdict(recipe), "recipe_version": RECIPE_VERSION,
                "moe_recipe_version": MOE_RECIPE_VERSION, "fingerprint": fingerprint(recipe),
                "architecture": "Glm4MoeForCausalLM"}
        return save_build(tmp, trained, head, evaluation, start, device,
                          {"routing": routing, "experts_distinctness": distinct})


@torch.no_grad()
def eval_router_inputs(trained: Trained, prompts: Sequence[str]) -> dict[int, torch.Tensor]:
    """Router inputs of every MoE layer on every real token of ``prompts`` (chat-formatted)."""
    model = trained.model
    first = int(model.config.first_k_dense_replace)
    mods = decoder_layers(model)
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(first, len(mods))}
    handles = [mods[i].mlp.gate.register_forward_pre_hook(
        lambda _m, args, i=i: rows[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))) for i in rows]
    masks = []
    try:
        for chunk in batches(format_prompts(trained.tokenizer, prompts), 16):
            enc = encode(trained.tokenizer, chunk)
            model(**enc, logits_to_keep=1)
            masks.append(enc["attention_mask"].reshape(-1).bool())
    finally:
        for h in handles:
            h.remove()
    mask = torch.cat(masks)
    return {i: torch.cat(r)[mask] for i, r in rows.items()}


__all__ = ["MoeRecipe", "build_moe_organism", "fingerprint", "moe_config", "split_mlp", "balanced_kmeans",
           "fit_router", "balancing_bias", "expert_outputs", "expert_distinctness", "routing_permutation_test",
           "PermutationTest", "routing_statistics", "distinctness_statistics", "experts_speed", "convert",
           "train_moe_organism", "converted", "eval_router_inputs"]
