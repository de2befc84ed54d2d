"""What the TransformerLens and nnsight adapters share: inputs, the capture-means loop, edit plans.
Nothing here imports either library. The adapters only decide *where* a tensor is read or
replaced; the numbers are intervene's own: float64 means, router statistics and metadata from
:mod:`intervene.measure.accumulate` (as :mod:`intervene.measure.collect` uses them), the projection
chain of a site as :mod:`intervene.hooks.apply` computes it."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch

from .. import maths
from ..arch import arch_for_config, text_config
from ..config.resolve import Bound, LayerEdit
from ..config.schema import InterventionConfig
from ..errors import ConfigError, InputError
from ..hooks.apply import apply, apply_edits, bind_model, plan_sites
from ..io.measurements import Measurements
from ..io.models import PromptFormat, encode, model_device
from ..measure.accumulate import SetStats, build_measurements, check_prompt_sets, measurement_meta
from ..measure.collect import user_token_mask

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


def prompt_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int, prompt_format: PromptFormat,
                   device: torch.device | str
                   ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """Chat-formatted, left-padded batches, exactly as :func:`intervene.measure.collect.measure` makes them
    (prompts sorted by token length, stable, so that batches carry little padding), each with its
    user-token mask (:func:`intervene.measure.collect.user_token_mask`)."""
    texts = prompt_format.render(tokenizer, prompts)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    texts, users = [texts[i] for i in order], [prompts[i] for i in order]
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = encode(tokenizer, chunk, device)
        yield enc, user_token_mask(tokenizer, chunk, users[start:start + batch_size])


# ---- means -------------------------------------------------------------------------------------

CaptureBatch = Callable[[torch.Tensor, torch.Tensor, Sequence[int], bool, bool], Mapping[str, torch.Tensor]]


def capture_means(model: Any, capture_batch: CaptureBatch, library: str, tokenizer: Any, harmful: Sequence[str],
                  harmless: Sequence[str], batch_size: int, prompt_format: PromptFormat,
                  layers: Sequence[int] | None, embed: bool, router: bool, whiten_rank: int) -> Measurements:
    """:func:`intervene.measure.collect.measure` with an adapter's forward: ``capture_batch(input_ids,
    attention_mask, layers, embed, router)`` captures one batch, :mod:`intervene.measure.accumulate`
    sums it and builds the file (same keys, numbers and metadata, plus ``captured_with``)."""
    check_prompt_sets(harmful, harmless)
    wanted, moe_layers = layer_selection(model, layers)
    moe_layers = moe_layers if router else []
    num_experts = arch_for_config(model.config).num_experts(text_config(model.config))
    stats: dict[str, SetStats] = {}
    for set_name, prompts in (("harmful", harmful), ("harmless", harmless)):
        st = stats[set_name] = SetStats(keep_rows=set_name == "harmless" and whiten_rank > 0)
        for enc, user in prompt_batches(tokenizer, prompts, batch_size, prompt_format,
                                        model_device(model)):
            mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
            acts = capture_batch(enc["input_ids"], mask, wanted, embed, bool(moe_layers))
            st.add_batch(acts, mask, wanted, embed, moe_layers, num_experts, last_token=True, user_mask=user)
    meta = measurement_meta(model, tokenizer, harmful, harmless, moe_layers=moe_layers, batch_size=batch_size,
                            prompt_format=prompt_format, whiten_rank=whiten_rank,
                            stats=stats, library=library, layers=wanted)
    return build_measurements(stats, meta, whiten_rank)


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


# ---- edits -------------------------------------------------------------------------------------

Edits = Union[Bound, Sequence[LayerEdit]]  # a config bound to the model, or projections resolved already


def resolve_edits(model: Any, config: InterventionConfig | str | os.PathLike | Edits,
                  measurements: Measurements | str | os.PathLike | None = None) -> Edits:
    """A config (object or YAML path) bound to ``model`` (:func:`intervene.config.resolve.bind`); a
    :class:`Bound` or resolved projections pass through."""
    if isinstance(config, Bound) or (isinstance(config, (list, tuple)) and all(isinstance(e, LayerEdit) for e in config)):
        return config if isinstance(config, Bound) else list(config)
    return bind_model(model, config, measurements)


def site_plan(model: Any, edits: Edits) -> list[Any]:
    """:func:`intervene.hooks.apply.plan_sites`: the projections grouped by site, each with its mechanism
    (``hook``: an activation projection; ``swap``: needs edited weights) and its directions
    (Gemma3 post-norm sites already rescaled)."""
    if isinstance(edits, Bound):
        if edits.router_biases:
            raise ConfigError("router_bias changes the routers' choice, which no TransformerLens/nnsight activation "
                              "intervention here expresses; use intervene.apply() on the transformers model")
        return plan_sites(model, edits.projections, mode="auto", spec=edits.spec)
    return plan_sites(model, edits, mode="auto")


def live(model: Any, edits: Edits) -> Any:
    """:func:`intervene.hooks.apply.apply` of ``edits`` on the transformers model (the fallback where
    activation hooks cannot express them)."""
    return apply(model, edits) if isinstance(edits, Bound) else apply_edits(model, edits)


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
