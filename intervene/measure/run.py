"""``intervene measure`` as one library call: the model named by a spec measured whole or one decoder
layer at a time (:mod:`intervene.runner` decides how, and refuses what ``--stream-layers`` cannot do),
on prompt sets given by spec or as lists, the sources recorded in the measurements' metadata."""

from __future__ import annotations

from typing import Sequence

from ..io.measurements import Measurements
from ..io.models import PromptFormat, load_tokenizer
from ..io.prompts import load_prompts
from ..io.sources import check_supported, model_reference
from ..runner import RunOptions, check_stream_layers, load_whole
from .collect import measure
from .stream import measure_streamed


def measure_model(model: str, harmful: str | Sequence[str] = "builtin:harmful:train",
                  harmless: str | Sequence[str] = "builtin:harmless:train", *, field: str | None = None,
                  limit: int | None = None, run: RunOptions | None = None,
                  prompt_format: PromptFormat | None = None, whiten_rank: int = 64,
                  attribution: bool = True) -> Measurements:
    """The measurements of ``model`` (a MODEL spec) on ``harmful`` / ``harmless`` (prompt specs, read with
    ``field`` and at most ``limit`` prompts each, or lists): :func:`~intervene.measure.collect.measure` of
    the whole model, or with ``run.stream_layers`` :func:`~intervene.measure.stream.measure_streamed`.
    An unknown model type and a missing chat template are named errors before any weights are read."""
    run, prompt_format = run or RunOptions(), prompt_format or PromptFormat()
    check_supported(model)  # unknown model_type: named error before any weights are read
    harmful_set = _prompts(harmful, field, limit)
    harmless_set = _prompts(harmless, field, limit)
    if prompt_format.chat_template:  # no chat template: named error before any weights are read
        prompt_format.render(load_tokenizer(model), harmful_set[:1])
    extra_meta = {"quantization": run.quantization, "harmful_source": _source(harmful),
                  "harmless_source": _source(harmless), "field": field, "limit": limit, "model_spec": model}
    common = dict(prompt_format=prompt_format, run=run,
                  model_path=model_reference(model), whiten_rank=whiten_rank,
                  extra_meta=extra_meta, attribution=attribution)
    if run.stream_layers:
        check_stream_layers(model, device_map=run.device_map, quantization=run.quantization, hidden_on=run.hidden_on)
        return measure_streamed(model, load_tokenizer(model), harmful_set, harmless_set, dtype=run.dtype,
                                device=run.device, hidden_on=run.hidden_on, **common)
    loaded, tokenizer = load_whole(model, dtype=run.dtype, device_map=run.device_map, quantization=run.quantization)
    return measure(loaded, tokenizer, harmful_set, harmless_set, **common)


def _prompts(spec: str | Sequence[str], field: str | None, limit: int | None) -> list[str]:
    return load_prompts(spec, field=field, limit=limit) if isinstance(spec, str) else list(spec)[:limit]


def _source(spec: str | Sequence[str]) -> str:
    return spec if isinstance(spec, str) else f"{len(spec)} prompts"


__all__ = ["measure_model"]
