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
* ``router.<set>_freq_last.{L}``, ``router.<set>_logits_last.{L}``: the same at the last prompt
  token only (position -1), where the model decides how to answer;
* ``router.<set>_freq_user.{L}``, ``router.<set>_logits_user.{L}``: the same over the user's own
  tokens only (:func:`user_token_mask`: tokens whose characters overlap the user message in the
  formatted prompt; the template's fixed tokens, which dilute the all-token statistics, excluded).
  Fast tokenizers only (character offsets); the file's meta ``router_stats`` says which is which.

Harmless second moment (for ``whiten`` in configs, see ``intervene.maths.whiten``), at the same
last-token position, for the embedding and every layer, when ``whiten_rank > 0``:

* ``harmless_moment.eigvals.{L}`` [k], ``harmless_moment.eigvecs.{L}`` [k, H]: top-k eigenpairs of
  ``M = XᵀX / N`` (X: the N harmless rows, uncentred), ``k = min(whiten_rank, rank of X)``;
* ``harmless_moment.trace.{L}`` [1]: ``tr(M)`` (the mean squared norm).

Component writes (``attribution=True``, the default; ``intervene.measure.attribution`` reads them): the
mean over each set of what each layer's attention, dense MLP, shared experts and each routed expert
(its gated output) add to the residual at the last prompt token, and the routing weights there
(``attribution.<set>_<part>.{L}``, see ``intervene.io.measurements``). They cost one extra call of the
experts module per top-k slot on the last-token rows, and ``E·H`` floats per MoE layer and set in the file.

The harmless moment needs the harmless rows kept until the end: ``N·H·(layers + 1)`` float32 on the CPU (300 prompts
on a 4096-wide, 32-layer model: 160 MB). ``whiten_rank=0`` keeps nothing.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..arch import arch_for_config, text_config
from ..errors import InputError
from ..hooks.capture import capture, write_parts
from ..io.layerwise import release_free_memory
from ..io.measurements import Measurements
from ..io.models import PromptFormat, batches, encode, model_device
from ..runner import RunOptions
from .accumulate import SetStats, build_measurements, check_prompt_sets, measurement_meta


def measure(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *,
            prompt_format: PromptFormat | None = None, run: RunOptions | None = None, model_path: str | None = None,
            extra_meta: dict[str, Any] | None = None,
            whiten_rank: int = 64, on_batch: Callable[[], None] | None = None,
            attribution: bool = True) -> Measurements:
    """Means of the last-prompt-token residual after every decoder layer (and the embedding),
    for both prompt sets; ``direction.{L} = harmful_mean.{L} - harmless_mean.{L}``; with
    ``whiten_rank > 0`` also the top eigenpairs of the harmless second moment (module docstring);
    with ``attribution`` the mean write of each component (``attribution.*``, module docstring).
    ``on_batch()`` runs after each batch (the interrupt tests pause there)."""
    if isinstance(whiten_rank, bool) or not isinstance(whiten_rank, int) or whiten_rank < 0:
        raise InputError(f"whiten_rank must be an integer >= 0, got {whiten_rank!r}")
    prompt_format, run = prompt_format or PromptFormat(), run or RunOptions()
    batch_size = run.batch_size
    check_prompt_sets(harmful, harmless)
    config = text_config(model.config)
    spec = arch_for_config(model.config)
    num_layers = int(config.num_hidden_layers)
    moe_layers = [i for i in range(num_layers) if spec.is_moe_layer(config, i)]
    num_experts = spec.num_experts(config)
    harmful_text = prompt_format.render(tokenizer, harmful)
    harmless_text = prompt_format.render(tokenizer, harmless)
    users = {"harmful": list(harmful), "harmless": list(harmless)}
    total = -(-len(harmful_text) // batch_size) - (-len(harmless_text) // batch_size)

    bar = tqdm(total=total, desc="measure", unit="batch", file=sys.stderr, disable=not run.progress)
    try:
        stats = {
            name: _measure_set(model, tokenizer, texts, batch_size, moe_layers, num_experts, bar,
                               keep_rows=name == "harmless" and whiten_rank > 0, on_batch=on_batch,
                               prompts=users[name], attribution=attribution)
            for name, texts in (("harmful", harmful_text), ("harmless", harmless_text))
        }
    finally:
        bar.close()

    meta = measurement_meta(model, tokenizer, harmful, harmless, moe_layers=moe_layers, batch_size=batch_size,
                            prompt_format=prompt_format, whiten_rank=whiten_rank,
                            stats=stats, model_path=model_path, attribution=attribution)
    meta.update(extra_meta or {})
    return build_measurements(stats, meta, whiten_rank)


def sorted_batches(tokenizer: Any, texts: Sequence[str], batch_size: int, device: torch.device | str,
                   prompts: Sequence[str] | None = None) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """Encoded, left-padded batches of ``texts`` sorted by token length (means do not depend on the
    order; batching prompts of similar length wastes less on padding), each with the mask of its
    user tokens (:func:`user_token_mask`) when the user ``prompts`` are given, else None."""
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    ordered = [texts[i] for i in order]
    users = [prompts[i] for i in order] if prompts is not None else None
    for start, chunk in zip(range(0, len(ordered), batch_size), batches(ordered, batch_size)):
        enc = encode(tokenizer, chunk, device)
        if "attention_mask" in enc and not bool(enc["attention_mask"][:, -1].all()):
            raise InputError("the tokenizer pads on the right; the last prompt token must be at position -1 "
                             "(set tokenizer.padding_side = 'left')")
        yield enc, (user_token_mask(tokenizer, chunk, users[start:start + len(chunk)]) if users is not None else None)


def _measure_set(model: Any, tokenizer: Any, texts: list[str], batch_size: int, moe_layers: list[int],
                 num_experts: int, bar: Any, keep_rows: bool = False,
                 on_batch: Callable[[], None] | None = None, prompts: Sequence[str] | None = None,
                 attribution: bool = False) -> SetStats:
    stats = SetStats(keep_rows=keep_rows)
    extra = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # the lm_head over every position is wasted work here
    for enc, user in sorted_batches(tokenizer, texts, batch_size, model_device(model),
                                    prompts if moe_layers else None):
        with torch.inference_mode(), capture(model, embed=True, router=bool(moe_layers), writes=attribution) as acts:
            model(**enc, **extra)
        config = text_config(model.config)
        layers = range(int(config.num_hidden_layers))
        stats.add_batch(acts, acts.token_mask(), layers, True, moe_layers, num_experts, last_token=True,
                        user_mask=user)
        if attribution:
            spec = arch_for_config(model.config)
            for layer in layers:
                stats.add_writes(acts, layer, write_parts(spec, config, layer))
        del acts
        release_free_memory()  # the forward's temporaries: glibc would keep the heap they leave
        bar.update(1)
        if on_batch is not None:
            on_batch()
    return stats


def user_token_mask(tokenizer: Any, texts: Sequence[str], prompts: Sequence[str]) -> torch.Tensor | None:
    """``[B, S]`` bool, aligned with ``encode(tokenizer, texts)`` (left padding): True on tokens whose
    characters overlap the user message ``prompts[i]`` inside the formatted ``texts[i]`` (its last
    occurrence: the user turn comes after any system prompt). None for tokenizers without character
    offsets (slow tokenizers); a prompt not found verbatim in its formatted text has no user tokens."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    tokenizer.padding_side = "left"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False,
                    return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    mask = torch.zeros(offsets.shape[:2], dtype=torch.bool)
    for i, (text, prompt) in enumerate(zip(texts, prompts)):
        begin = text.rfind(prompt) if prompt else -1
        if begin < 0:
            continue
        end = begin + len(prompt)
        s, e = offsets[i, :, 0], offsets[i, :, 1]
        mask[i] = (e > s) & (s < end) & (e > begin)
    if "attention_mask" in enc:
        mask &= enc["attention_mask"].bool()
    return mask
