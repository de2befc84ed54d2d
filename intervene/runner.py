"""Running a model over batches, whole or one decoder layer at a time: the one place that knows how.

A model that fits runs whole (:func:`load_whole`: read one layer at a time where it can, for a lower
peak, else through transformers). One that does not fit runs as a :class:`LayerRunner`: its skeleton
with parameters on the meta device (:func:`intervene.io.layerwise.stream_skeleton`), the tensors
outside the decoder layers loaded, every batch run up to layer 0 once (:meth:`LayerRunner.record`: the
hidden states and, per layer, the arguments the model passes it), then :meth:`LayerRunner.run_layers`,
the one layer loop: read a layer, let the caller run its batches through it (:meth:`LayerRunner.step`,
under :func:`~intervene.hooks.capture.capture` hooks or :func:`~intervene.hooks.apply.apply_edits`, as
the caller chooses), free that layer's arguments, send the layer back to the meta device.
``measure --stream-layers``, ``eval --first-token --stream-layers`` and the streamed search proxy all
run through it, and :func:`check_stream_layers` is every refusal of ``--stream-layers``, written once."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from .arch import decoder_layers, text_config
from .errors import InputError
from .io.layer_calls import LayerCall, record_layer_calls
from .io.layerwise import LayerLoader, can_load_layerwise, load_layerwise, stream_skeleton
from .io.models import Quantization, load_model, load_tokenizer
from .io.sources import ModelSource, resolve_model

HiddenOn = Literal["device", "cpu"]
HIDDEN_ON: tuple[HiddenOn, ...] = ("device", "cpu")


def check_stream_layers(spec: str | None = None, *, device_map: Any = None, quantization: Quantization | None = None,
                        hidden_on: str = "device", generates: bool = False) -> ModelSource | None:
    """Every refusal of ``--stream-layers``, as a named :class:`InputError`: generation (it needs the
    whole model), a device map (the runner places each layer itself), bitsandbytes quantization (a whole
    model's), an unknown ``hidden_on``, and, given ``spec``, a model that is not a local safetensors
    checkpoint (returned resolved otherwise)."""
    if generates:
        raise InputError("--stream-layers needs --first-token: generation needs the whole model; for a model larger "
                         "than memory run the generation-based eval with --device-map auto (CPU/disk offload)")
    if device_map:
        raise InputError("--stream-layers places each layer itself: give --device, not --device-map")
    if quantization:
        raise InputError(f"--stream-layers loads each layer's own weights; --load-in-{quantization} "
                         "quantizes a whole model (use one or the other)")
    if hidden_on not in HIDDEN_ON:
        raise InputError(f"hidden_on must be 'device' or 'cpu', got {hidden_on!r}")
    if spec is None:
        return None
    src = resolve_model(spec)
    if src.is_hub or src.gguf_file:
        raise InputError(f"--stream-layers reads a local safetensors checkpoint; {src.display} is not one")
    return src


def load_whole(spec: str, *, dtype: str | torch.dtype | None = "auto", device_map: str | None = None,
               quantization: Quantization | None = None) -> tuple[Any, Any]:
    """(model, tokenizer), the model whole: a local checkpoint without a device map or quantization is
    read one layer at a time (peak: the model + one layer, :func:`~intervene.io.layerwise.load_layerwise`),
    anything else through transformers (:func:`~intervene.io.models.load_model`)."""
    if can_load_layerwise(spec, device_map) and quantization is None:
        return load_layerwise(spec, dtype=dtype), load_tokenizer(spec)
    return load_model(spec, dtype=dtype, device_map=device_map, quantization=quantization)


@dataclass(frozen=True)
class RunOptions:
    """How a verb runs its model: the dtype, whole (``device_map``, ``quantization``) or one decoder
    layer at a time (``stream_layers`` on ``device``, hidden states waiting on ``hidden_on``), the batch
    size and the progress bars."""

    dtype: str | None = "auto"
    device_map: str | None = None
    quantization: Quantization | None = None
    stream_layers: bool = False
    device: str = "cpu"
    hidden_on: HiddenOn = "device"
    batch_size: int = 16
    progress: bool = True


@dataclass
class LayerPass:
    """One batch between layers: the hidden states entering the next layer and, per layer, the
    arguments the model passes it (emptied once the layer has run)."""

    hidden: torch.Tensor
    calls: list[LayerCall]


class LayerRunner:
    """A local safetensors checkpoint opened to run one decoder layer at a time: the skeleton with the
    tensors outside the layers loaded (the output head too with ``with_head``; tied heads re-tied).
    ``device`` is where each layer runs; ``hidden_on`` where the hidden states wait between layers
    (``"device"``: they are small next to one layer of a big model; ``"cpu"``: for prompt sets that do
    not fit next to a layer on the accelerator)."""

    def __init__(self, spec: str, *, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
                 hidden_on: str = "device", with_head: bool = False) -> None:
        src = check_stream_layers(spec, hidden_on=hidden_on)
        assert src is not None
        self.spec, self.hidden_on, self.device = spec, hidden_on, torch.device(device)
        self.model, self.dtype = stream_skeleton(spec, dtype)
        self.config = text_config(self.model.config)
        self.num_layers = int(self.config.num_hidden_layers)
        self.layers = decoder_layers(self.model)
        self.loader = LayerLoader(self.model, src.path, self.dtype, self.device, with_head=with_head)
        self.loader.load_outside()
        if with_head:
            self.model.tie_weights()
            head = self.model.get_output_embeddings()
            left = [n for n, p in head.named_parameters() if p.is_meta] if head is not None else ["weight"]
            if left:
                raise InputError(f"{self.loader.checkpoint.path}: the output head's '{left[0]}' "
                                 "is not in the checkpoint")

    def park(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` where hidden states wait between layers."""
        return hidden if self.hidden_on == "device" else hidden.to("cpu")

    def record(self, enc: dict[str, torch.Tensor]) -> LayerPass:
        """Run ``enc`` up to the first decoder layer (hooks installed around this call see the embedding)."""
        hidden, calls = record_layer_calls(self.model, enc)
        return LayerPass(self.park(hidden), list(calls))

    def step(self, layer: int, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """Decoder layer ``layer`` (loaded) on ``hidden`` with its recorded arguments; the output parked."""
        args, kwargs = call
        with torch.inference_mode():
            out = self.layers[layer](hidden.to(self.device), *args, **kwargs)
        return self.park(out[0] if isinstance(out, (tuple, list)) else out)

    def run_layers(self, visit: Callable[[int], None], calls: Sequence[list[LayerCall]], *, progress: bool = False,
                   desc: str = "layers", bar: Any = None, after: Callable[[int], None] | None = None) -> None:
        """The layer loop: for each decoder layer in order, read it, ``visit(layer)`` (which runs the
        batches through it, :meth:`step`), drop that layer's arguments from every batch's ``calls``, send the layer
        back to the meta device, tick the progress bar (``bar``, or one of ``num_layers`` made here), then
        ``after(layer)``. The shard files are closed at the end, also on an error."""
        own = bar is None
        if own:
            bar = progress_bar(self.num_layers, desc, progress, leave=False)
        try:
            for layer in range(self.num_layers):
                self.loader.load_layer(layer)
                visit(layer)
                for batch_calls in calls:
                    batch_calls[layer] = ((), {})  # this layer's masks are not needed again
                self.loader.unload_layer(layer)
                bar.update(1)
                if after is not None:
                    after(layer)
        finally:
            if own:
                bar.close()
            self.loader.close()


def progress_bar(total: int, desc: str, progress: bool, *, leave: bool = True) -> Any:
    """A layer progress bar on stderr (disabled without ``progress``)."""
    return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, disable=not progress, leave=leave)


__all__ = ["HiddenOn", "HIDDEN_ON", "RunOptions", "check_stream_layers", "load_whole", "LayerPass", "LayerRunner",
           "progress_bar"]
