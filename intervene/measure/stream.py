"""``measure --stream-layers``: the same measurements as :func:`intervene.measure.collect.measure`,
for a model that does not fit in memory, one decoder layer in memory at a time.

1. The model skeleton is built with its parameters on the meta device (buffers such as the rotary
   frequencies are real: they are computed, not stored); the tensors outside the decoder layers
   (embeddings, final norm; not the unused output head) are loaded from the shards.
2. Every batch of both prompt sets runs through the model with each decoder layer's ``forward``
   replaced by a recorder: it keeps the layer's arguments (the hidden states entering layer 0 and
   the per-layer keyword arguments the model computed: masks of that layer's attention type,
   rotary embeddings, positions) and hands the hidden states on unchanged; the last one stops the
   forward. The embedding and the attention mask are captured by :func:`intervene.hooks.capture`.
3. For each layer L: its tensors are read from the shards (keys from the index through the
   architecture table's layer-key split), converted to the in-memory layout by transformers' own
   loader (``convert_and_load_state_dict_in_model``: fused experts, renamed keys), the layer runs
   on every batch with :func:`capture` hooks on it (residual at the last token, router logits and
   top-k), and its tensors go back to the meta device before the next layer is read. Steps 1-3 are
   :class:`intervene.runner.LayerRunner`'s, the layer loop the streamed first-token eval runs too.

The hidden states of all prompts (``[B, S, H]`` per batch, in the model's dtype) are kept between
layers: on the compute device by default (``hidden_on="device"``: they are small next to one layer of
a big model, e.g. 300 prompts × 150 tokens × 4096 × bf16 = 370 MB against 4.4 GB for one GLM-4.5-Air
MoE layer, and moving them every layer would cost two copies per layer); ``hidden_on="cpu"`` parks them
in CPU memory between batches for a prompt set that does not fit next to a layer on the accelerator.

Everything is accumulated by :class:`intervene.measure.accumulate.SetStats`, the accumulator the
in-memory path uses, so both paths define a mean, a routing frequency and a moment the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..arch import arch_for_config
from ..errors import InputError
from ..hooks.capture import capture, resid_site, router_site, write_parts
from ..io.layer_calls import LayerCall
from ..io.measurements import Measurements
from ..io.models import PromptFormat
from ..runner import HiddenOn, LayerRunner, RunOptions, progress_bar
from .accumulate import SetStats, build_measurements, check_prompt_sets, measurement_meta, router_selections
from .collect import sorted_batches


@dataclass
class _Batch:
    """One batch of one prompt set between layers."""

    set_name: str
    mask: torch.Tensor  # [B, S] bool, True on real tokens (CPU)
    hidden: torch.Tensor  # [B, S, H] entering the next layer
    calls: list[LayerCall] = field(default_factory=list)  # per layer: (args[1:], kwargs)
    selections: dict[str, torch.Tensor] = field(default_factory=dict)  # router statistics' token selections


def measure_streamed(spec: str, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *,
                     prompt_format: PromptFormat | None = None, run: RunOptions | None = None,
                     dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
                     hidden_on: HiddenOn = "device", model_path: str | None = None,
                     extra_meta: dict[str, Any] | None = None, whiten_rank: int = 64,
                     on_layer: Callable[[int], None] | None = None, attribution: bool = True) -> Measurements:
    """:func:`intervene.measure.collect.measure` with one decoder layer in memory at a time (module
    docstring). ``spec`` names a local safetensors checkpoint; ``device`` is where each layer runs.
    ``on_layer(L)`` runs after layer L (the memory benchmark samples there)."""
    if isinstance(whiten_rank, bool) or not isinstance(whiten_rank, int) or whiten_rank < 0:
        raise InputError(f"whiten_rank must be an integer >= 0, got {whiten_rank!r}")
    prompt_format, run = prompt_format or PromptFormat(), run or RunOptions()
    batch_size = run.batch_size
    check_prompt_sets(harmful, harmless)
    runner = LayerRunner(spec, dtype=dtype, device=device, hidden_on=hidden_on)
    model, device, config = runner.model, runner.device, runner.config
    arch = arch_for_config(model.config)
    num_layers = runner.num_layers
    moe_layers = [i for i in range(num_layers) if arch.is_moe_layer(config, i)]
    num_experts = arch.num_experts(config)
    texts = {"harmful": prompt_format.render(tokenizer, harmful),
             "harmless": prompt_format.render(tokenizer, harmless)}
    stats = {name: SetStats(keep_rows=name == "harmless" and whiten_rank > 0) for name in texts}

    def visit(layer: int) -> None:
        moe = layer in moe_layers
        for b in batches:
            with torch.inference_mode(), capture(model, layers=[layer], router=moe, writes=attribution) as acts:
                b.hidden = runner.step(layer, b.hidden, b.calls[layer])
            st = stats[b.set_name]
            st.add_residual(str(layer), acts[resid_site(layer)])
            if attribution:
                st.add_writes(acts, layer, write_parts(arch, config, layer))
            if moe:
                st.add_router_all(layer, acts[router_site(layer, "logits")], acts[router_site(layer, "topk")],
                                  b.mask, num_experts, b.selections)

    bar = progress_bar(num_layers + 1, "measure (streamed)", run.progress)
    try:
        users = {"harmful": list(harmful), "harmless": list(harmless)} if moe_layers else {"harmful": None, "harmless": None}
        batches = _first_pass(runner, tokenizer, texts, users, batch_size, stats)
        bar.update(1)
        runner.run_layers(visit, [b.calls for b in batches], bar=bar, after=on_layer)
    finally:
        bar.close()
    meta = measurement_meta(model, tokenizer, harmful, harmless, moe_layers=moe_layers, batch_size=batch_size,
                            prompt_format=prompt_format, whiten_rank=whiten_rank,
                            stats=stats, model_path=model_path, attribution=attribution)
    meta.update({"stream_layers": True, "device": str(device)})
    meta.update(extra_meta or {})
    return build_measurements(stats, meta, whiten_rank)


def _first_pass(runner: LayerRunner, tokenizer: Any, texts: dict[str, list[str]],
                prompts: dict[str, list[str] | None], batch_size: int, stats: dict[str, SetStats]) -> list[_Batch]:
    """Run every batch up to the first decoder layer: the embedding (accumulated here) and, per layer,
    the arguments the model passes it (:meth:`intervene.runner.LayerRunner.record`)."""
    out: list[_Batch] = []
    for set_name, set_texts in texts.items():
        for enc, user in sorted_batches(tokenizer, set_texts, batch_size, runner.device, prompts[set_name]):
            with torch.inference_mode(), capture(runner.model, layers=[], embed=True, router=False) as acts:
                recorded = runner.record(enc)
            mask = acts.token_mask()
            stats[set_name].add_batch(acts, mask, [], True, [], 0)
            out.append(_Batch(set_name, mask, recorded.hidden, recorded.calls, router_selections(mask, True, user)))
    return out


__all__ = ["measure_streamed", "HiddenOn"]
