"""Running sums of one prompt set and what a measurements file is built from them: the float64
accumulator (:class:`SetStats`), the tensors (:func:`build_measurements`) and the metadata
(:func:`measurement_meta`). :func:`intervene.measure.collect.measure` and the TransformerLens and
nnsight adapters (:mod:`intervene.interop`) all feed captured batches into this one module, so a
mean, a routing frequency or a prompt hash is defined once, whichever library did the forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import torch

from .. import maths
from ..arch import arch_for_config, text_config
from ..errors import InputError
from ..hooks.capture import EMBED, WritePart, resid_site, router_site, write_site
from ..io.files import sha256_lines, sha256_text
from ..io.measurements import MOMENT_PARTS, Measurements, attribution_key, router_key
from ..io.models import PromptFormat, versions

RESIDUAL_POSITION = "last prompt token (position -1, left padding)"
ATTRIBUTION_DEFINITION = (
    "attribution.<set>_<part>.{L}: mean over the set's prompts, at the last prompt token, of what layer L's part "
    "adds to the residual (residual multiplier applied): attention [H], mlp [H] (dense layers), shared_experts [H] "
    "(MoE block output minus its routed experts'), experts [E, H] (each routed expert's routing-weighted output, "
    "0 where not chosen), routing [E] (each expert's routing weight, 0 where not chosen)")
ROUTER_FREQ_DEFINITION = ("fraction of top-k token-slots choosing each expert, over all non-pad prompt tokens; "
                          "sums to 1 over experts")
# which tokens each family of router keys is taken over (the measurements' meta 'router_stats')
ROUTER_STATS = {
    "router.<set>_freq.{L}, router.<set>_logits.{L}":
        "all non-pad prompt tokens, chat-template tokens included",
    "router.<set>_freq_last.{L}, router.<set>_logits_last.{L}":
        "the last prompt token of each prompt only (position -1, left padding: where the answer starts)",
    "router.<set>_freq_user.{L}, router.<set>_logits_user.{L}":
        "the user's own tokens only: tokens whose characters overlap the user message in the formatted prompt "
        "(chat template, system prompt and generation prompt excluded)",
}


def check_prompt_sets(harmful: Sequence[str], harmless: Sequence[str]) -> None:
    for what, prompts in (("harmful", harmful), ("harmless", harmless)):
        if not prompts:
            raise InputError(f"the {what} prompt set is empty")


class Activations(Protocol):
    """What one captured batch offers: site name -> tensor (a dict, or :class:`intervene.capture`'s result)."""

    def __getitem__(self, site: str) -> torch.Tensor: ...


@dataclass
class SetStats:
    """float64 running sums for one prompt set."""

    n_prompts: int = 0
    resid_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # "embed" or "L" -> [H]
    n_tokens: dict[int, int] = field(default_factory=dict)  # MoE layer -> non-pad tokens seen
    expert_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E]
    logits_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E]
    keep_rows: bool = False  # keep every row (float32, CPU) for the harmless second moment
    # the same router sums over other token selections: ("last" | "user", layer) -> ...
    sel_tokens: dict[tuple[str, int], int] = field(default_factory=dict)
    sel_counts: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    sel_logits: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    writes_sum: dict[tuple[WritePart, int], torch.Tensor] = field(default_factory=dict)  # (part, layer) -> sum

    def add_writes(self, acts: Activations, layer: int, parts: Sequence[WritePart]) -> None:
        """Add one batch's component writes at the decision token (``capture(writes=True)``) of ``layer``:
        per-prompt rows summed over the batch (``[H]``, ``[E, H]`` or ``[E]`` per part)."""
        for part in parts:
            s = acts[write_site(layer, part)].to(torch.float64).sum(dim=0)
            key = (part, layer)
            self.writes_sum[key] = self.writes_sum[key] + s if key in self.writes_sum else s

    def add_batch(self, acts: Activations, mask: torch.Tensor, layers: Sequence[int], embed: bool,
                  moe_layers: Sequence[int], num_experts: int, last_token: bool = False,
                  user_mask: torch.Tensor | None = None) -> None:
        """Add one captured batch: last-token residuals ``[B, H]`` of ``embed`` and ``layers``, router
        logits ``[B, S, E]`` and top-k ``[B, S, k]`` of ``moe_layers``; ``mask`` ``[B, S]`` marks real tokens.
        ``last_token``: also the router statistics at position -1 (left padding); ``user_mask`` ``[B, S]``:
        also over those tokens (the user's own, :data:`ROUTER_STATS`)."""
        self.n_prompts += int(mask.shape[0])
        if embed:
            self.add_residual(EMBED, acts[EMBED])
        for layer in layers:
            self.add_residual(str(layer), acts[resid_site(layer)])
        mask = mask.to("cpu").bool()
        selections = router_selections(mask, last_token, user_mask)
        for layer in moe_layers:
            self.add_router_all(layer, acts[router_site(layer, "logits")], acts[router_site(layer, "topk")], mask,
                                num_experts, selections)

    def add_router_all(self, layer: int, logits: torch.Tensor, topk: torch.Tensor, mask: torch.Tensor,
                       num_experts: int, selections: dict[str, torch.Tensor]) -> None:
        """One MoE layer's router statistics over all real tokens (``mask``) and over each of
        ``selections`` (:func:`router_selections`)."""
        self.add_router(layer, logits, topk, mask, num_experts)
        for tokens, sel in selections.items():
            self.add_router(layer, logits, topk, sel, num_experts, tokens)

    def add_residual(self, name: str, rows: torch.Tensor) -> None:
        s = rows.to(torch.float64).sum(dim=0)
        self.resid_sum[name] = self.resid_sum[name] + s if name in self.resid_sum else s
        if self.keep_rows:
            self.rows.setdefault(name, []).append(rows.detach().to("cpu", torch.float32))

    def add_router(self, layer: int, logits: torch.Tensor, topk: torch.Tensor, mask: torch.Tensor,
                   num_experts: int, tokens: str = "all") -> None:
        chosen = topk[mask]  # [N, k]
        picked = logits[mask].to(torch.float64)  # [N, E]
        counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(torch.float64)
        if tokens != "all":
            key = (tokens, layer)
            self.sel_counts[key] = self.sel_counts.get(key, 0) + counts
            self.sel_logits[key] = self.sel_logits.get(key, 0) + picked.sum(dim=0)
            self.sel_tokens[key] = self.sel_tokens.get(key, 0) + int(chosen.shape[0])
            return
        self.expert_counts[layer] = self.expert_counts.get(layer, 0) + counts
        self.logits_sum[layer] = self.logits_sum.get(layer, 0) + picked.sum(dim=0)
        self.n_tokens[layer] = self.n_tokens.get(layer, 0) + int(chosen.shape[0])


def router_selections(mask: torch.Tensor, last_token: bool, user_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The token selections router statistics are also kept over (:data:`ROUTER_STATS`): ``last``, the
    last prompt token (position -1: left padding), and ``user``, the user's own tokens (``user_mask``)."""
    mask = mask.to("cpu").bool()
    selections: dict[str, torch.Tensor] = {}
    if last_token:
        last = torch.zeros_like(mask)
        last[:, -1] = True
        selections["last"] = last & mask
    if user_mask is not None:
        selections["user"] = user_mask.to("cpu").bool() & mask
    return selections


def moment_tensors(name: str, rows: Sequence[torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The ``harmless_moment.{eigvals,eigvecs,trace}.{name}`` tensors (float32) from the harmless
    last-token rows of one site, given as batches ``[B, H]``."""
    parts = maths.second_moment_eig(torch.cat(list(rows)), rank)
    return {f"harmless_moment.{part}.{name}": t.to(torch.float32) for part, t in zip(MOMENT_PARTS, parts)}


def build_measurements(stats: Mapping[str, SetStats], meta: dict[str, Any], whiten_rank: int = 0) -> Measurements:
    """``harmful_mean``/``harmless_mean``/``direction`` of every accumulated site, router statistics
    of every accumulated MoE layer, and the harmless second moment when ``whiten_rank > 0`` and the
    harmless stats kept their rows (consumed here)."""
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
    for part, layer in harmful.writes_sum:
        for set_name, st in stats.items():
            tensors[attribution_key(set_name, part, layer)] = (st.writes_sum[(part, layer)] / st.n_prompts).to(torch.float32)
    for tokens, layer in harmful.sel_counts:
        if not all(st.sel_tokens.get((tokens, layer), 0) > 0 for st in stats.values()):
            continue  # a set without such tokens (e.g. no user span found): no statistic rather than NaN
        for set_name, st in stats.items():
            counts = st.sel_counts[(tokens, layer)]
            tensors[router_key(set_name, "freq", tokens, layer)] = (counts / counts.sum()).to(torch.float32)
            tensors[router_key(set_name, "logits", tokens, layer)] = (
                st.sel_logits[(tokens, layer)] / st.sel_tokens[(tokens, layer)]).to(torch.float32)
    return Measurements(tensors=tensors, meta=meta)


def chat_template_sha256(tokenizer: Any, chat_template: bool) -> str | None:
    """Hash of the chat template the prompts were formatted with (None for raw prompts)."""
    template = getattr(tokenizer, "chat_template", None) if chat_template else None
    if isinstance(template, dict):  # some tokenizers keep several named templates
        template = template.get("default") or next(iter(template.values()), None)
    return sha256_text(template) if template else None


def measurement_meta(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *,
                     moe_layers: Sequence[int], batch_size: int, prompt_format: PromptFormat,
                     whiten_rank: int, stats: Mapping[str, SetStats], model_path: str | None = None,
                     library: str | None = None, layers: Sequence[int] | None = None,
                     attribution: bool = False) -> dict[str, Any]:
    """The metadata of a measurements file. ``library`` (``"nnsight 0.8.1"``) records which library
    captured it (``captured_with``, and its version among ``versions``); ``layers`` the layers
    captured when not all of them were."""
    config = text_config(model.config)
    spec = arch_for_config(model.config)
    vers = versions()
    meta: dict[str, Any] = {"kind": "measurements"}
    if library is not None:
        meta["captured_with"] = library
        name, _, version = library.partition(" ")
        vers[name] = version
    meta["model"] = model_path or getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    meta.update({
        "model_type": config.model_type,
        "arch": spec.name,
        "hidden_size": int(config.hidden_size),
        "num_layers": int(config.num_hidden_layers),
    })
    if layers is not None:
        meta["layers"] = list(layers)
    meta.update({
        "moe_layers": list(moe_layers),
        "num_experts": spec.num_experts(config),
        "top_k": spec.top_k(config),
        "dense_leading_layers": spec.dense_leading_layers(config),
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "harmful_sha256": sha256_lines(harmful),
        "harmless_sha256": sha256_lines(harmless),
        "chat_template": bool(prompt_format.chat_template),
        "chat_template_sha256": chat_template_sha256(tokenizer, prompt_format.chat_template),
        "system_prompt": prompt_format.system_prompt,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "position": RESIDUAL_POSITION,
        "whiten_rank": whiten_rank,
        "router_freq": ROUTER_FREQ_DEFINITION if moe_layers else None,
        "router_tokens": {set_name: {str(k): v for k, v in st.n_tokens.items()} for set_name, st in stats.items()}
        if moe_layers else None,
        "router_stats": ROUTER_STATS if moe_layers else None,
        "attribution": ATTRIBUTION_DEFINITION if attribution else None,
        "router_tokens_by_selection": {
            tokens: {set_name: {str(layer): n for (t, layer), n in st.sel_tokens.items() if t == tokens}
                     for set_name, st in stats.items()}
            for tokens in sorted({t for st in stats.values() for t, _ in st.sel_tokens})} if moe_layers else None,
        "intervene_version": vers["intervene"],
        "versions": vers,
    })
    return meta


__all__ = ["ATTRIBUTION_DEFINITION", "SetStats", "build_measurements", "check_prompt_sets", "measurement_meta", "moment_tensors", "chat_template_sha256",
           "RESIDUAL_POSITION", "ROUTER_FREQ_DEFINITION", "ROUTER_STATS"]
