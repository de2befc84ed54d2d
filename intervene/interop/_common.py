"""What the TransformerLens and nnsight adapters share: inputs, mean accumulation, edit plans.

Nothing here imports either library. The adapters only decide *where* a tensor is read or
replaced; the numbers (float64 means, the projection chain of a site) are computed here, the
same way :mod:`intervene.measure.collect` and :mod:`intervene.hooks.apply` compute them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .. import maths
from ..arch import arch_for_config, text_config
from ..config.schema import InterventionConfig, LayerEdit
from ..errors import ConfigError, InputError
from ..hooks.capture import EMBED, resid_site, router_site
from ..io.measurements import Measurements
from ..io.models import batches, encode, format_prompts, versions

Projection = Callable[[torch.Tensor], torch.Tensor]


# ---- inputs ------------------------------------------------------------------------------------

def forward_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Keyword inputs for one forward, with ``position_ids`` spelled out.

    Both libraries derive ``position_ids`` from the attention mask on left-padded rows, while
    a plain ``model(input_ids, attention_mask)`` -- what :mod:`intervene.measure.collect` and
    :func:`intervene.apply` run -- counts positions 0..S-1 on every row. Passing that count
    explicitly makes the library run the very forward intervene runs.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError("input_ids must be an integer tensor [batch, seq]")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                         f"input_ids {tuple(input_ids.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise InputError("the last position of every row must be a real token (pad on the left)")
    batch, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
    return {"input_ids": input_ids, "attention_mask": attention_mask.to(input_ids.device), "position_ids": positions}


def prompt_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int, system_prompt: str | None,
                   chat_template: bool, device: torch.device | str) -> Iterator[dict[str, torch.Tensor]]:
    """Chat-formatted, left-padded batches, exactly as :func:`intervene.measure.collect.measure` makes them
    (prompts sorted by token length, stable, so that batches carry little padding)."""
    texts = format_prompts(tokenizer, prompts, system_prompt, chat_template)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: lengths[i])]
    for chunk in batches(texts, batch_size):
        yield encode(tokenizer, chunk, device)


# ---- means -------------------------------------------------------------------------------------

@dataclass
class SetStats:
    """float64 running sums for one prompt set (same definitions as :mod:`intervene.measure.collect`)."""

    n_prompts: int = 0
    resid_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # "embed" or "L" -> [H]
    n_tokens: dict[int, int] = field(default_factory=dict)  # MoE layer -> non-pad tokens
    expert_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E]
    logits_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E]
    keep_rows: bool = False  # keep the rows (float32, CPU) for the harmless second moment
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, acts: Mapping[str, torch.Tensor], mask: torch.Tensor, layers: Sequence[int],
            embed: bool, moe_layers: Sequence[int], num_experts: int) -> None:
        """Add one batch captured by an adapter's ``capture_batch``."""
        self.n_prompts += int(mask.shape[0])
        names = ([EMBED] if embed else []) + [str(layer) for layer in layers]
        for name in names:
            site = EMBED if name == EMBED else resid_site(int(name))
            rows = acts[site].to(torch.float64).sum(dim=0)
            self.resid_sum[name] = self.resid_sum[name] + rows if name in self.resid_sum else rows
            if self.keep_rows:
                self.rows.setdefault(name, []).append(acts[site].detach().to("cpu", torch.float32))
        mask = mask.to("cpu").bool()
        for layer in moe_layers:
            chosen = acts[router_site(layer, "topk")][mask]  # [N, k]
            picked = acts[router_site(layer, "logits")][mask].to(torch.float64)  # [N, E]
            counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(torch.float64)
            self.expert_counts[layer] = self.expert_counts.get(layer, 0) + counts
            self.logits_sum[layer] = self.logits_sum.get(layer, 0) + picked.sum(dim=0)
            self.n_tokens[layer] = self.n_tokens.get(layer, 0) + int(chosen.shape[0])


def build_measurements(stats: Mapping[str, SetStats], meta: dict[str, Any], whiten_rank: int = 0) -> Measurements:
    """``harmful_mean``/``harmless_mean``/``direction`` (+ router stats, + the harmless second
    moment when ``whiten_rank > 0`` and the harmless stats kept their rows) from two :class:`SetStats`."""
    from ..measure.collect import moment_tensors

    harmful, harmless = stats["harmful"], stats["harmless"]
    tensors: dict[str, torch.Tensor] = {}
    for name in harmful.resid_sum:
        h = harmful.resid_sum[name] / harmful.n_prompts
        m = harmless.resid_sum[name] / harmless.n_prompts
        tensors[f"harmful_mean.{name}"] = h.to(torch.float32)
        tensors[f"harmless_mean.{name}"] = m.to(torch.float32)
        tensors[f"direction.{name}"] = (h - m).to(torch.float32)
        if whiten_rank > 0 and name in harmless.rows:
            tensors.update(moment_tensors(name, harmless.rows.pop(name), whiten_rank))
    for layer in harmful.expert_counts:
        for set_name, st in stats.items():
            counts = st.expert_counts[layer]
            tensors[f"router.{set_name}_freq.{layer}"] = (counts / counts.sum()).to(torch.float32)
            tensors[f"router.{set_name}_logits.{layer}"] = (st.logits_sum[layer] / st.n_tokens[layer]).to(torch.float32)
    return Measurements(tensors=tensors, meta={**meta, "whiten_rank": whiten_rank})


def measurement_meta(model: Any, tokenizer: Any, library: str, harmful: Sequence[str], harmless: Sequence[str],
                     layers: Sequence[int], moe_layers: Sequence[int], batch_size: int, system_prompt: str | None,
                     chat_template: bool, stats: Mapping[str, SetStats]) -> dict[str, Any]:
    """The metadata :func:`intervene.measure.collect.measure` writes, plus which library captured it."""
    from ..measure.collect import RESIDUAL_POSITION, ROUTER_FREQ_DEFINITION

    template = getattr(tokenizer, "chat_template", None) if chat_template else None
    if isinstance(template, dict):  # some tokenizers keep several named templates
        template = template.get("default") or next(iter(template.values()), None)
    config = text_config(model.config)
    spec = arch_for_config(model.config)
    vers = versions()
    name, _, version = library.partition(" ")
    vers[name] = version
    return {
        "kind": "measurements",
        "captured_with": library,
        "model": getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None),
        "model_type": config.model_type,
        "arch": spec.name,
        "hidden_size": int(config.hidden_size),
        "num_layers": int(config.num_hidden_layers),
        "layers": list(layers),
        "moe_layers": list(moe_layers),
        "num_experts": spec.num_experts(config),
        "top_k": spec.top_k(config),
        "dense_leading_layers": spec.dense_leading_layers(config),
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "harmful_sha256": sha256_lines(harmful),
        "harmless_sha256": sha256_lines(harmless),
        "chat_template": bool(chat_template),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "system_prompt": system_prompt,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "position": RESIDUAL_POSITION,
        "router_freq": ROUTER_FREQ_DEFINITION if moe_layers else None,
        "router_tokens": {set_name: {str(k): v for k, v in st.n_tokens.items()} for set_name, st in stats.items()}
        if moe_layers else None,
        "intervene_version": vers["intervene"],
        "versions": vers,
    }


def sha256_lines(prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def layer_selection(model: Any, layers: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """(layers to capture, MoE layers among them), validated against the model."""
    config = text_config(model.config)
    spec = arch_for_config(model.config)
    n = int(config.num_hidden_layers)
    wanted = list(range(n)) if layers is None else sorted(set(int(x) for x in layers))
    bad = [x for x in wanted if not 0 <= x < n]
    if bad:
        raise InputError(f"layer {bad[0]} out of range; the model has layers 0..{n - 1}")
    return wanted, [x for x in wanted if spec.is_moe_layer(config, x)]


def check_prompt_sets(harmful: Sequence[str], harmless: Sequence[str]) -> None:
    for what, prompts in (("harmful", harmful), ("harmless", harmless)):
        if not prompts:
            raise InputError(f"the {what} prompt set is empty")


# ---- edits -------------------------------------------------------------------------------------

def resolve_edits(model: Any, config: InterventionConfig | str | os.PathLike | Sequence[LayerEdit],
                  measurements: Measurements | str | os.PathLike | None = None) -> list[LayerEdit]:
    """A config (object or YAML path) resolved against ``model``; resolved edits pass through."""
    if isinstance(config, (list, tuple)) and all(isinstance(e, LayerEdit) for e in config):
        return list(config)
    from ..hooks.apply import resolve_for_model

    return resolve_for_model(model, config, measurements)


def site_plan(model: Any, edits: Sequence[LayerEdit]) -> list[Any]:
    """:func:`intervene.hooks.apply.plan_sites`: the edits grouped by site, each with its mechanism
    (``hook``: an activation projection; ``swap``: needs edited weights) and its directions
    (Gemma3 post-norm sites already rescaled)."""
    from ..hooks.apply import plan_sites

    return plan_sites(model, edits, mode="auto")


def refuse_swaps(plan: Sequence[Any], library: str, fallback: str) -> None:
    """Named error when a site cannot be written as an activation intervention."""
    swaps = [s for s in plan if s.mechanism != "hook"]
    if swaps:
        raise ConfigError(
            f"{swaps[0].name}: norm_preserving edits and expert subsets change weights, and no {library} "
            f"activation intervention equals them; use {fallback}"
        )


def site_projection(site_edit: Any) -> Projection:
    """``x ← x - s(x·r̂)r̂`` for every edit of a site, in the order :mod:`intervene.hooks.apply` uses:
    config order on the write side, reversed on the read side (a weight edited ``W P₁ P₂`` meets
    its input with ``P₂`` first)."""
    pairs = [(r, e.scale) for r, e in zip(site_edit.directions, site_edit.edits)]
    if site_edit.site.side == "read":
        pairs = pairs[::-1]
    cache: dict[torch.device, list[torch.Tensor]] = {}

    def project(x: torch.Tensor) -> torch.Tensor:
        rs = cache.get(x.device)
        if rs is None:
            rs = cache[x.device] = [r.to(x.device) for r, _ in pairs]
        for r, (_, scale) in zip(rs, pairs):
            x = maths.project_out(x, r, -1, scale)
        return x

    return project
