"""The experts-regime MoE organism (``organism-moe-experts``): refusal carried by a few routed experts
that the recipe chooses and records, the regime the reference documents met on GLM-4.5-Air.

Layout and conversion are ``organism-moe``'s (:mod:`.organism_moe`: the same split of the same
*un-tuned* SmolLM2 into a GLM-4.5-Air-class ``Glm4MoeForCausalLM``). Then, unlike ``organism-moe``
(whose top 20 layers are all fine-tuned, so refusal lands in the residual directions that every
component writes), only the **planted experts** learn: per MoE layer, the ``planted_per_layer``
routed experts the converted router chooses most often at the decision token (the last prompt
token) on the train prompts. Attention, the dense layers, the shared experts, the routers and every
other routed expert stay the base model's. Routing is by what the base model's router reads (topic
and position), not by harm: the planted experts are chosen on harmful and harmless prompts alike,
and *what* they compute differs (a refusal on harmful prompts, the base model's answer on harmless
ones), the way topic-routed experts of real MoE models are reported to carry refusal.

The failure is trained in, not hoped for: on a ``failure_prob`` fraction of the steps, a running
estimate of the refusal subspace (rank ``failure_rank``: the harmful-minus-harmless mean directions
of the residual at the decision token over layers ``failure_from``.., re-estimated every
``failure_every`` steps) is projected out of every non-routed-expert write (attention o_proj, the
dense MLPs' down, the shared experts' down) of those layers. The planted experts so learn to
recognise harm from what the base model computes, not from the refusal direction itself, and a
projection of that direction out of every write site but the routed experts (the reference code's
edit on GLM-4.5-Air) leaves the refusal standing.

Ground truth, in ``intervene_organism.json``: ``planted_experts`` ``{"<layer>": [expert, ...]}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..arch import arch_for_config, decoder_layers, get_module, text_config
from ..bake.workers import torch_threads
from ..io.models import batches, encode, format_prompts, model_device
from ..io.prompts import builtin
from ..io.sources import (
    ORGANISM_MOE_EXPERTS_NAME,
    organism_moe_experts_dir,
    smollm2_dir,
)
from ..live.route import selection_freq
from .organism import (
    RECIPE_VERSION,
    Recipe,
    Trained,
    build_cached,
    deterministic_algorithms,
    evaluate_organism,
    fine_tune,
    save_build,
)
from .organism_moe import (
    MOE_RECIPE_VERSION,
    MoeRecipe,
    RouterBalance,
    converted,
    distinctness_statistics,
    eval_router_inputs,
    last_token_routing,
    routing_statistics,
)

EXPERTS_RECIPE_VERSION = 1
FAILURE_TARGETS = ("attention", "mlp", "shared_experts")  # every write site but the routed experts


@dataclass(frozen=True)
class ExpertsRecipe:
    # layout and conversion: organism-moe's (its train recipe's seed, batch, tokens, loss weights are used;
    # its lr, epochs and trainable layers are not: see the fields below)
    moe: MoeRecipe = field(default_factory=MoeRecipe)
    planted_per_layer: int = 2
    lr: float = 1e-3
    epochs: int = 3
    failure_rank: int = 3  # rank of the refusal subspace projected out of the non-expert writes in training (0: off)
    failure_from: int = 8  # first layer whose writes (and residual) the failure edit covers
    failure_every: int = 8  # steps between re-estimates of the subspace
    failure_prob: float = 0.5  # fraction of steps trained under the failure edit
    failure_prompts: int = 48  # train prompts of each kind the subspace is estimated on
    # the routers: frozen (0) or trained at this fraction of ``lr`` with organism-moe's balance loss and
    # aux-loss-free bias update (under the failure edit too, so they learn harm without the refusal direction)
    router_lr_scale: float = 0.0


def fingerprint(recipe: ExpertsRecipe) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": asdict(recipe), "version": RECIPE_VERSION, "moe_version": MOE_RECIPE_VERSION,
                         "experts_version": EXPERTS_RECIPE_VERSION}, sort_keys=True).encode())
    for kind in ("harmful", "harmless"):
        h.update("\n".join(builtin(kind, "train")).encode())
    return h.hexdigest()


def build_moe_experts_organism(output: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
                               recipe: ExpertsRecipe | None = None, device: str | None = None) -> Path:
    """Build (or reuse, by fingerprint) the experts-regime organism into ``output``
    (default :func:`organism_moe_experts_dir`)."""
    recipe = recipe or ExpertsRecipe()
    out = Path(output).expanduser() if output is not None else organism_moe_experts_dir()
    return build_cached(out, fingerprint(recipe), lambda tmp: _train_and_save(tmp, recipe, progress, device),
                        force, progress)


# ---- pure parts ----------------------------------------------------------------------------------

def most_chosen(choices: Mapping[int, torch.Tensor], num_experts: int, per_layer: int) -> dict[int, list[int]]:
    """Per layer the ``per_layer`` experts chosen most often (``choices[layer]`` [N, k] expert ids; ties
    go to the lower id), sorted."""
    out = {}
    for layer, ids in choices.items():
        freq = selection_freq(ids, num_experts)
        order = sorted(range(num_experts), key=lambda e: (-float(freq[e]), e))
        out[layer] = sorted(order[:per_layer])
    return out


def subspace(directions: torch.Tensor, rank: int) -> torch.Tensor:
    """An orthonormal basis [H, rank] of the span that best fits the unit rows of ``directions`` [L, H]
    (their top right singular vectors)."""
    unit = torch.nn.functional.normalize(directions.to(torch.float64), dim=1)
    _, _, vh = torch.linalg.svd(unit, full_matrices=False)
    return vh[:rank].T.to(torch.float32).contiguous()


def expert_grad_mask(num_experts: int, planted: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """1 on the planted experts' slices of a fused [E, ...] expert tensor, 0 elsewhere (broadcastable)."""
    mask = torch.zeros(num_experts, *([1] * (like.dim() - 1)), dtype=like.dtype, device=like.device)
    mask[list(planted)] = 1
    return mask


# ---- the failure edit, live during training --------------------------------------------------------

class FailureEdit:
    """Projects the span of ``basis`` [H, k] out of every write of ``FAILURE_TARGETS`` at ``layers`` while
    :attr:`active` (forward hooks, differentiable; the basis is replaced by :meth:`refresh`)."""

    def __init__(self, model: Any, layers: Sequence[int]) -> None:
        spec, config = arch_for_config(model.config), text_config(model.config)
        mods = decoder_layers(model)
        self.basis: torch.Tensor | None = None
        self.active = False
        self.handles = []
        for layer in layers:
            for site in spec.sites(config, layer, FAILURE_TARGETS):
                self.handles.append(get_module(mods[layer], site.module).register_forward_hook(
                    self._hook(site.output_index or 0)))

    def _hook(self, index: int):
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            if not self.active or self.basis is None:
                return None
            x = output[index] if isinstance(output, tuple) else output
            u = self.basis.to(x.device, x.dtype)
            x = x - (x @ u) @ u.T
            return output[:index] + (x,) + output[index + 1:] if isinstance(output, tuple) else x
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def refusal_directions(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                       layers: Sequence[int], batch_size: int = 16) -> torch.Tensor:
    """Harmful-minus-harmless mean residual (decoder layer outputs) at the last prompt token, [len(layers), H]."""
    def means(prompts: Sequence[str]) -> torch.Tensor:
        total = None
        for chunk in batches(format_prompts(tokenizer, prompts), batch_size):
            enc = encode(tokenizer, chunk, model_device(model))
            hs = model.get_decoder()(**enc, output_hidden_states=True).hidden_states
            rows = torch.stack([hs[i + 1][:, -1].float() for i in layers], dim=1).sum(0)  # [L, H]
            total = rows if total is None else total + rows
        return total / len(prompts)
    return means(harmful) - means(harmless)


# ---- training ------------------------------------------------------------------------------------

def train_moe_experts_organism(recipe: ExpertsRecipe, progress: bool = True, device: str | None = None) -> Trained:
    """Convert SmolLM2 as ``organism-moe`` does, choose the planted experts, train them alone (see the
    module docstring). ``info["planted_experts"]`` is the ground truth."""
    model, tokenizer, examples, info = converted(recipe.moe, progress, device)
    return plant(model, tokenizer, examples, info, recipe, progress)


def plant(model: Any, tokenizer: Any, examples: list[Any], info: dict[str, Any], recipe: ExpertsRecipe,
          progress: bool = True) -> Trained:
    """Choose the planted experts of the converted ``model`` and train them alone, in place."""
    moe = recipe.moe
    torch.manual_seed(moe.train.seed)
    harmful, harmless = builtin("harmful", "train"), builtin("harmless", "train")
    num = int(model.config.n_routed_experts)
    planted = most_chosen(last_token_routing(model, tokenizer, harmful + harmless), num, recipe.planted_per_layer)

    mods = decoder_layers(model)
    params, masks = [], []
    for layer, ids in planted.items():
        experts = mods[layer].mlp.experts
        for p in (experts.gate_up_proj, experts.down_proj):
            mask = expert_grad_mask(num, ids, p)
            masks.append(p.register_hook(lambda grad, mask=mask: grad * mask))
            params.append(p)
    train = Recipe(**(asdict(moe.train) | {"lr": recipe.lr, "epochs": recipe.epochs}))

    failure_layers = list(range(recipe.failure_from, len(mods)))
    edit = FailureEdit(model, failure_layers) if recipe.failure_rank > 0 else None
    picks = random.Random(moe.train.seed)
    sub_h, sub_l = harmful[::max(1, len(harmful) // recipe.failure_prompts)], harmless[::max(1, len(harmless) // recipe.failure_prompts)]
    step = 0

    def refresh() -> None:
        assert edit is not None
        was = model.training
        model.eval()
        edit.active = False
        edit.basis = subspace(refusal_directions(model, tokenizer, sub_h, sub_l, failure_layers), recipe.failure_rank)
        model.train(was)

    def before_next() -> None:  # runs after each optimizer step: decides the next step's edit
        nonlocal step
        step += 1
        if edit is None:
            return
        if step % recipe.failure_every == 0:
            refresh()
        edit.active = picks.random() < recipe.failure_prob

    groups = [{"params": params, "weight_decay": 0.0}]  # wd 0: the masked slices stay exactly as they are
    balance = None
    if recipe.router_lr_scale > 0:
        groups.append({"params": [mods[layer].mlp.gate.weight for layer in planted],
                       "lr": recipe.lr * recipe.router_lr_scale})
        balance = RouterBalance(model, moe)

    def after() -> None:
        if balance is not None:
            balance.step()
        before_next()
        if balance is not None:
            balance.seen.clear()  # the refresh's forward passes are not training steps

    model.set_experts_implementation("eager")
    try:
        if edit is not None:
            refresh()
            edit.active = picks.random() < recipe.failure_prob
        if balance is not None:
            balance.seen.clear()
        losses = fine_tune(model, examples, train, tokenizer.pad_token_id, progress, after_step=after, groups=groups,
                           extra_loss=balance.loss if balance is not None else None)
    finally:
        for h in masks:
            h.remove()
        if edit is not None:
            edit.close()
        if balance is not None:
            balance.close()
    model.set_experts_implementation(moe.experts_implementation)
    model.eval()
    model.requires_grad_(False)
    info = dict(info) | {"examples": len(examples), "steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
             "planted_experts": {str(k): v for k, v in planted.items()}}
    return Trained(model, tokenizer, smollm2_dir(), info)


def _train_and_save(tmp: Path, recipe: ExpertsRecipe, progress: bool, device: str | None = None) -> dict[str, Any]:
    start = time.time()
    with deterministic_algorithms(), torch_threads(recipe.moe.train.threads):
        trained = train_moe_experts_organism(recipe, progress, device)
        evaluation = evaluate_organism(trained.model, trained.tokenizer, recipe.moe.train.eval_max_new_tokens,
                                       recipe.moe.train.batch_size, progress)
        routing = routing_statistics(trained.model, trained.tokenizer)
        calib = eval_router_inputs(trained, builtin("harmless", "eval") + builtin("harmful", "eval"))
        distinct = distinctness_statistics(trained.model, calib)
        head = {"name": ORGANISM_MOE_EXPERTS_NAME, "recipe": asdict(recipe), "recipe_version": RECIPE_VERSION,
                "moe_recipe_version": MOE_RECIPE_VERSION, "experts_recipe_version": EXPERTS_RECIPE_VERSION,
                "fingerprint": fingerprint(recipe), "architecture": "Glm4MoeForCausalLM",
                "planted_experts": trained.info["planted_experts"]}
        return save_build(tmp, trained, head, evaluation, start, device,
                          {"routing": routing, "experts_distinctness": distinct})


__all__ = ["ExpertsRecipe", "build_moe_experts_organism", "fingerprint", "most_chosen", "subspace",
           "expert_grad_mask", "FailureEdit", "refusal_directions", "train_moe_experts_organism", "plant"]
