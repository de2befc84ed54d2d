"""``eval --first-token --stream-layers`` and ``search --stream-layers``' cheap proxy: first-token
log-probabilities of a model that does not fit in memory, one decoder layer in memory at a time, the
unedited model and the model under a config out of ONE pass over the layers.

The skeleton, the layer loader, the recorded layer arguments and the layer loop are those of
:func:`intervene.measure.stream.measure_streamed`: :class:`intervene.runner.LayerRunner`; the output head
is loaded too (tied heads are re-tied). Each batch
carries two hidden-state streams: the baseline's and the edited one. For each layer L, once it is
loaded, the edited stream runs through it under :func:`intervene.hooks.apply.apply` of the
bound config's edits at layer L -- the live hooks and weight swaps themselves, installed on the loaded layer
and removed before the baseline stream runs through it unedited. Before the first edited layer the
edited stream IS the baseline's (not computed twice). At the end the model's own output part (final
norm, lm_head at the last position, any logit scaling) runs on each stream
(:func:`~intervene.io.layer_calls.head_logits`) and the log-softmax is taken in float32.

A layer's edits only touch that layer's modules (sites and the router's selection bias belong to one
decoder layer), so installing them layer by layer is the whole config's ``apply``."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..config.resolve import Bound
from ..config.schema import InterventionConfig
from ..errors import InputError
from ..hooks.apply import apply, bind_model, sited
from ..io.layer_calls import LayerCall, head_logits
from ..io.measurements import Measurements
from ..io.models import PromptFormat, batches, encode
from ..runner import LayerRunner, RunOptions
from .evaluate import FirstTokenReport, FirstTokenSettings, PerSet, first_token_report


@dataclass
class _Streams:
    """One batch between layers: its layer arguments and its two hidden-state streams."""

    enc: dict[str, torch.Tensor]
    calls: list[LayerCall]
    base: torch.Tensor | None  # the unedited model's (None once not needed)
    edited: torch.Tensor | None = None  # None: the same as ``base`` (no edited layer yet)


class LayerStream(LayerRunner):
    """A local safetensors checkpoint opened for first-token passes one decoder layer at a time
    (:class:`~intervene.runner.LayerRunner`): the skeleton with its embeddings, final norm and output head
    loaded. ``device`` is where each layer runs; ``hidden_on`` where the hidden states wait between
    layers (as ``measure``'s)."""

    def __init__(self, spec: str, *, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
                 hidden_on: str = "device") -> None:
        super().__init__(spec, dtype=dtype, device=device, hidden_on=hidden_on, with_head=True)

    def resolve(self, config: InterventionConfig | str | os.PathLike,
                measurements: Measurements | str | os.PathLike | None = None) -> Bound:
        """The config bound to this model, checked (:func:`~intervene.hooks.apply.sited`) before any
        layer is read."""
        return sited(self.model, bind_model(self.model, config, measurements))

    def encode(self, texts: Sequence[str], tokenizer: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Left-padded batches of already formatted ``texts`` on the compute device."""
        return [encode(tokenizer, chunk, self.device) for chunk in batches(list(texts), batch_size)]

    def logprobs(self, encoded: Sequence[dict[str, torch.Tensor]], edits: Bound | None, *, baseline: bool = True,
                 progress: bool = False, desc: str = "first-token (streamed)"
                 ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """One pass over the layers: per batch, float32 log-softmax of the next token at the last
        position [B, V] (CPU) of the unedited model (``baseline``; else None) and of the model under
        ``edits`` (a bound config; None when ``edits`` is None; one without edits gives the baseline's numbers)."""
        if not baseline and edits is None:
            raise ValueError("LayerStream.logprobs: nothing to compute (no baseline and no edits)")
        bound = sited(self.model, edits) if edits is not None else None
        edited_layers = bound.layers if bound is not None else []
        first_edited = min(edited_layers, default=self.num_layers)
        streams = []
        for enc in encoded:
            recorded = self.record(enc)
            streams.append(_Streams(enc, recorded.calls, recorded.hidden))

        def visit(layer: int) -> None:
            if edits is not None and (layer >= first_edited or not baseline):
                here = bound.at_layer(layer) if layer in edited_layers else None
                with apply(self.model, here) if here is not None else contextlib.nullcontext():
                    for s in streams:
                        start = s.edited if s.edited is not None else s.base
                        s.edited = self.step(layer, start, s.calls[layer])
                        if not baseline:
                            s.base = None
            if baseline:
                for s in streams:
                    s.base = self.step(layer, s.base, s.calls[layer])

        self.run_layers(visit, [s.calls for s in streams], progress=progress, desc=desc)
        base_out = [self._logprobs(s.enc, s.base) for s in streams] if baseline else None
        if edits is None:
            return base_out, None
        edited_out = [self._logprobs(s.enc, s.edited) if s.edited is not None else base_out[i]
                      for i, s in enumerate(streams)]
        return base_out, edited_out

    def _logprobs(self, enc: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head_logits(self.model, enc, hidden).float(), dim=-1).cpu()

    def describe(self) -> dict[str, Any]:
        return {"stream_layers": True, "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "hidden_on": self.hidden_on}


def first_token_streamed(model: str, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                         config: InterventionConfig | str | os.PathLike | None = None,
                         measurements: Measurements | str | os.PathLike | None = None, *,
                         prompt_format: PromptFormat | None = None, run: RunOptions | None = None,
                         dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
                         hidden_on: str = "device") -> FirstTokenReport:
    """:func:`intervene.live.evaluate.first_token_scores` of the checkpoint ``model`` (a local
    safetensors directory) with ``config`` applied live, one decoder layer in memory at a time
    (module docstring): first-token refusal scores per set and KL(base ‖ intervened), baseline and
    intervened from one pass. Without a config the intervened numbers are the baseline's (KL = 0)."""
    if not harmful or not harmless:
        raise InputError("first_token_streamed needs at least one harmful and one harmless prompt")
    prompt_format, run = prompt_format or PromptFormat(), run or RunOptions()
    batch_size = run.batch_size
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    stream = LayerStream(model, dtype=dtype, device=device, hidden_on=hidden_on)
    edits = stream.resolve(config, measurements) if config is not None else None
    config = edits.config if edits is not None else None
    texts = PerSet.of(lambda name: prompt_format.render(tokenizer, (harmful, harmless)[name == "harmless"]))
    encoded = PerSet.of(lambda name: stream.encode(texts[name], tokenizer, batch_size))
    n_harmful = len(encoded.harmful)
    base, new = stream.logprobs(encoded.harmful + encoded.harmless, edits, progress=run.progress)

    def split(rows: list[torch.Tensor]) -> PerSet[torch.Tensor]:
        return PerSet(torch.cat(rows[:n_harmful]), torch.cat(rows[n_harmful:]))

    base_lp = split(base)
    new_lp = split(new) if new is not None else base_lp
    settings = FirstTokenSettings(batch_size, prompt_format.system_prompt, prompt_format.chat_template,
                                  stream_layers=True, dtype=stream.describe()["dtype"], device=str(stream.device))
    return first_token_report(tokenizer, base_lp, new_lp, config is not None, settings,
                              config.to_dict() if config is not None else None)


__all__ = ["LayerStream", "first_token_streamed"]
