"""A model skeleton's own forward with its decoder layers' ``forward`` replaced, for the layer-streamed
verbs: :func:`record_layer_calls` runs a batch up to the first decoder layer and records what the model
passes every layer (the hidden states entering layer 0; per layer the other arguments: masks of its
attention type, rotary embeddings, positions), and :func:`head_logits` runs the model's own output part
(final norm, lm_head, any logit scaling or soft-capping) on final hidden states computed elsewhere,
every layer handing them on. Only the embeddings (and, for :func:`head_logits`, the final norm and the
output head) need real weights; the layers may be on the meta device."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch

from ..arch import decoder_layers

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # a layer's arguments after the hidden states, and kwargs


class _StopForward(Exception):
    """Raised by the last layer's recorder: nothing after the decoder layers is needed."""


def forward_extras(model: Any) -> dict[str, Any]:
    """No cache, and the output head at the last position only where the model's forward can."""
    extra: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    return extra


@contextlib.contextmanager
def _layer_forwards(model: Any, make: Callable[[int, int], Callable[..., Any]]) -> Iterator[None]:
    """Every decoder layer's ``forward`` replaced by ``make(index, n_layers)``, restored on exit."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.forward = make(i, len(layers))
    try:
        yield
    finally:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward  # back to the class's forward


def record_layer_calls(model: Any, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[LayerCall]]:
    """Run ``enc`` up to the first decoder layer: (hidden states entering layer 0 [B, S, H], per layer
    the arguments the model passes it). Hooks installed around this call (e.g. :func:`capture` on the
    embedding) see the forward as usual."""
    current: dict[str, Any] = {"calls": []}

    def make(index: int, n: int) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if index == 0:
                current["hidden"] = hidden_states.detach()
            current["calls"].append((args, kwargs))
            if index == n - 1:
                raise _StopForward
            return hidden_states
        return forward

    with _layer_forwards(model, make), torch.inference_mode():
        try:
            model(**enc, **forward_extras(model))
        except _StopForward:
            pass
    return current["hidden"], current["calls"]


def head_logits(model: Any, enc: dict[str, torch.Tensor], final_hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits at the last position [B, V] for ``final_hidden`` [B, S, H], the output of its
    last decoder layer on ``enc``: the model's own forward runs with every layer handing the hidden
    states on and the last one returning ``final_hidden``, so whatever the model does after its layers
    is done exactly as in a whole-model forward."""
    def make(index: int, n: int) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return final_hidden.to(hidden_states.device) if index == n - 1 else hidden_states
        return forward

    with _layer_forwards(model, make), torch.inference_mode():
        logits = model(**enc, **forward_extras(model)).logits
    return logits[:, -1, :]


__all__ = ["LayerCall", "forward_extras", "record_layer_calls", "head_logits"]
