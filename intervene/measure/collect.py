"""Measure harmful vs harmless residual means (and routing statistics on MoE layers).

One forward pass per batch, no generation (prompts are sorted by token length before batching,
which changes nothing in the means but saves padding). Prompts are chat-formatted with the generation
prompt and LEFT-padded, so position -1 of every row is the last prompt token: the point where
the model decides how to answer. Means are accumulated in float64 on the CPU whatever the model
dtype or device map, then stored as float32 (see ``intervene.io.measurements`` for the keys).

Router statistics (MoE layers), over every NON-PAD token of every prompt (chat-template tokens
included, pad positions excluded through the attention mask):

* ``router.<set>_freq.{L}``   per-expert top-k selection frequency: the fraction of token-slots
  (each token has k slots) that chose expert e. ``freq[e] = count(e) / (n_tokens · k)``; it
  sums to 1 over experts. Uniform routing gives 1/E.
* ``router.<set>_logits.{L}`` mean router logits over the same tokens.

Harmless second moment (for ``whiten`` in configs, see ``intervene.maths.whiten``), at the same
last-token position, for the embedding and every layer, when ``whiten_rank > 0``:

* ``harmless_moment.eigvals.{L}`` [k], ``harmless_moment.eigvecs.{L}`` [k, H]: top-k eigenpairs of
  ``M = XᵀX / N`` (X: the N harmless rows, uncentred), ``k = min(whiten_rank, rank of X)``;
* ``harmless_moment.trace.{L}`` [1]: ``tr(M)`` (the mean squared norm).

These need the harmless rows kept until the end: ``N·H·(layers + 1)`` float32 on the CPU (300 prompts
on a 4096-wide, 32-layer model: 160 MB). ``whiten_rank=0`` keeps nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .. import maths
from ..arch import arch_for_config, text_config
from ..errors import InputError
from ..hooks.capture import EMBED, capture, resid_site, router_site
from ..io.measurements import MOMENT_PARTS, Measurements
from ..io.models import batches, encode, format_prompts, model_device, versions

RESIDUAL_POSITION = "last prompt token (position -1, left padding)"
SLOW_ENV = "INTERVENE_TEST_SLOW_MEASURE"  # tests only: seconds to sleep after each batch (interrupt tests)
ROUTER_FREQ_DEFINITION = ("fraction of top-k token-slots choosing each expert, over all non-pad prompt tokens; "
                          "sums to 1 over experts")


@dataclass
class _SetStats:
    """float64 running sums for one prompt set."""

    n_prompts: int = 0
    resid_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # "embed" or "L" -> [H]
    n_tokens: dict[int, int] = field(default_factory=dict)  # MoE layer -> non-pad tokens seen
    expert_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E]
    logits_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E]
    keep_rows: bool = False  # keep every row (float32, CPU) for the second moment
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add_residual(self, name: str, rows: torch.Tensor) -> None:
        s = rows.to(torch.float64).sum(dim=0)
        self.resid_sum[name] = self.resid_sum[name] + s if name in self.resid_sum else s
        if self.keep_rows:
            self.rows.setdefault(name, []).append(rows.detach().to("cpu", torch.float32))

    def add_router(self, layer: int, logits: torch.Tensor, topk: torch.Tensor, mask: torch.Tensor,
                   num_experts: int) -> None:
        chosen = topk[mask]  # [N, k]
        picked = logits[mask].to(torch.float64)  # [N, E]
        counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(torch.float64)
        self.expert_counts[layer] = self.expert_counts.get(layer, 0) + counts
        self.logits_sum[layer] = self.logits_sum.get(layer, 0) + picked.sum(dim=0)
        self.n_tokens[layer] = self.n_tokens.get(layer, 0) + int(chosen.shape[0])

    def means(self) -> dict[str, torch.Tensor]:
        return {name: s / self.n_prompts for name, s in self.resid_sum.items()}


def measure(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], batch_size: int = 16,
            system_prompt: str | None = None, chat_template: bool = True, model_path: str | None = None,
            progress: bool = True, extra_meta: dict[str, Any] | None = None,
            whiten_rank: int = 64) -> Measurements:
    """Means of the last-prompt-token residual after every decoder layer (and the embedding),
    for both prompt sets; ``direction.{L} = harmful_mean.{L} - harmless_mean.{L}``; with
    ``whiten_rank > 0`` also the top eigenpairs of the harmless second moment (module docstring)."""
    if isinstance(whiten_rank, bool) or not isinstance(whiten_rank, int) or whiten_rank < 0:
        raise InputError(f"whiten_rank must be an integer >= 0, got {whiten_rank!r}")
    for what, prompts in (("harmful", harmful), ("harmless", harmless)):
        if not prompts:
            raise InputError(f"the {what} prompt set is empty")
    config = text_config(model.config)
    spec = arch_for_config(model.config)
    num_layers = int(config.num_hidden_layers)
    moe_layers = [i for i in range(num_layers) if spec.is_moe_layer(config, i)]
    num_experts = spec.num_experts(config)
    harmful_text = format_prompts(tokenizer, harmful, system_prompt, chat_template)
    harmless_text = format_prompts(tokenizer, harmless, system_prompt, chat_template)
    total = -(-len(harmful_text) // batch_size) - (-len(harmless_text) // batch_size)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="measure", unit="batch", file=sys.stderr, disable=not progress)
    try:
        stats = {
            name: _measure_set(model, tokenizer, texts, batch_size, moe_layers, num_experts, bar,
                               keep_rows=name == "harmless" and whiten_rank > 0)
            for name, texts in (("harmful", harmful_text), ("harmless", harmless_text))
        }
    finally:
        bar.close()

    tensors: dict[str, torch.Tensor] = {}
    harmful_means, harmless_means = stats["harmful"].means(), stats["harmless"].means()
    for name in [EMBED] + [str(i) for i in range(num_layers)]:
        h, m = harmful_means[name], harmless_means[name]
        tensors[f"harmful_mean.{name}"] = h.to(torch.float32)
        tensors[f"harmless_mean.{name}"] = m.to(torch.float32)
        tensors[f"direction.{name}"] = (h - m).to(torch.float32)
        if whiten_rank > 0:
            tensors.update(moment_tensors(name, stats["harmless"].rows.pop(name), whiten_rank))
    for layer in moe_layers:
        for name, st in stats.items():
            counts = st.expert_counts[layer]
            tensors[f"router.{name}_freq.{layer}"] = (counts / counts.sum()).to(torch.float32)
            tensors[f"router.{name}_logits.{layer}"] = (st.logits_sum[layer] / st.n_tokens[layer]).to(torch.float32)

    template = getattr(tokenizer, "chat_template", None) if chat_template else None
    if isinstance(template, dict):  # some tokenizers keep several named templates
        template = template.get("default") or next(iter(template.values()), None)
    vers = versions()
    meta: dict[str, Any] = {
        "kind": "measurements",
        "model": model_path or getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None),
        "model_type": config.model_type,
        "arch": spec.name,
        "hidden_size": int(config.hidden_size),
        "num_layers": num_layers,
        "moe_layers": moe_layers,
        "num_experts": num_experts,
        "top_k": spec.top_k(config),
        "dense_leading_layers": spec.dense_leading_layers(config),
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "harmful_sha256": _sha256_lines(harmful),
        "harmless_sha256": _sha256_lines(harmless),
        "chat_template": bool(chat_template),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "system_prompt": system_prompt,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "position": RESIDUAL_POSITION,
        "whiten_rank": whiten_rank,
        "router_freq": ROUTER_FREQ_DEFINITION if moe_layers else None,
        "router_tokens": {name: {str(k): v for k, v in st.n_tokens.items()} for name, st in stats.items()}
        if moe_layers else None,
        "intervene_version": vers["intervene"],
        "versions": vers,
    }
    meta.update(extra_meta or {})
    return Measurements(tensors=tensors, meta=meta)


def moment_tensors(name: str, rows: Sequence[torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The ``harmless_moment.{eigvals,eigvecs,trace}.{name}`` tensors (float32) from the harmless
    last-token rows of one site, given as batches ``[B, H]``."""
    parts = maths.second_moment_eig(torch.cat(list(rows)), rank)
    return {f"harmless_moment.{part}.{name}": t.to(torch.float32) for part, t in zip(MOMENT_PARTS, parts)}


def _measure_set(model: Any, tokenizer: Any, texts: list[str], batch_size: int, moe_layers: list[int],
                 num_experts: int, bar: Any, keep_rows: bool = False) -> _SetStats:
    stats = _SetStats(keep_rows=keep_rows)
    device = model_device(model)
    # means do not depend on order: batching prompts of similar length wastes less on padding
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: lengths[i])]
    extra = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # the lm_head over every position is wasted work here
    slow = float(os.environ.get(SLOW_ENV, "0") or 0)
    for chunk in batches(texts, batch_size):
        enc = encode(tokenizer, chunk, device)
        if "attention_mask" in enc and not bool(enc["attention_mask"][:, -1].all()):
            raise InputError("the tokenizer pads on the right; the last prompt token must be at position -1 "
                             "(set tokenizer.padding_side = 'left')")
        with torch.inference_mode(), capture(model, embed=True, router=bool(moe_layers)) as acts:
            model(**enc, **extra)
        mask = acts.token_mask()
        stats.n_prompts += len(chunk)
        stats.add_residual(EMBED, acts[EMBED])
        for layer in range(int(text_config(model.config).num_hidden_layers)):
            stats.add_residual(str(layer), acts[resid_site(layer)])
        for layer in moe_layers:
            stats.add_router(layer, acts[router_site(layer, "logits")], acts[router_site(layer, "topk")], mask,
                             num_experts)
        bar.update(1)
        if slow:
            time.sleep(slow)
    return stats


def _sha256_lines(prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
