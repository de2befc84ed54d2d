"""nnsight (0.8) interop: capture and intervene inside ``model.trace(...)``.

    nm = wrap(model)                                          # nnsight.NNsight around a loaded HF model
    m = capture_means(nm, tokenizer, harmful, harmless)       # == intervene.measure.collect.measure(...)
    edits = resolve_edits(nm, "config.yaml", m)
    with nm.trace() as tracer:
        with tracer.invoke(**forward_inputs(input_ids, attention_mask)):
            pass
        nnsight_edits(tracer, nm, edits)                      # one whole-batch invoke per site
        with tracer.invoke():
            out = {"logits": nm.output.logits.save()}
    logits = run_with_config(nm, input_ids, "config.yaml", m)  # the same in one call

Any nnsight model over a HF causal LM works: ``NNsight(model)`` (no tokenizer needed),
``TransformersModel`` or the deprecated ``LanguageModel``. nnsight runs the body of a trace in
a worker thread against the live forward, so -- as nnsight requires -- these functions must be
called from code in a file (a module, a script, a test), not typed at a bare ``python -`` prompt.

Ordering. Inside one invoke nnsight requires modules to be touched in execution order, and that
order differs between architectures (Qwen2-MoE runs its shared expert before the router,
DeepSeek after the experts). Each site therefore gets its own empty ``tracer.invoke()``, which
sees the whole batch; the order of sites then does not matter.

Semantics are intervene's (see :mod:`intervene.interop.lens` for the same list): layer ``L`` is
the output of decoder layer ``L`` (``model.model.layers[L].output``), ``embed`` the output of the
input embeddings, the last position of a left-padded batch, float64 means; positions 0..S-1 are
passed explicitly (nnsight's ``TransformersModel`` derives them from the attention mask on padded
rows, intervene's forward does not). Router logits and chosen experts come from the router's
output tuple (``mlp.gate.output``; Llama4 ``feed_forward.router.output`` = (scores, logits)).

Edits: a write site's module output becomes ``y - s(y·r̂)r̂``, a read site's first input the
same, with :func:`intervene.maths.project_out` -- every site intervene's live hooks know,
on every architecture. Norm-preserving edits and expert subsets change weights, which no
activation edit equals: :func:`nnsight_edits` refuses them; :func:`run_with_config` applies such
configs with intervene's weight swaps around the trace.

Measured with nnsight 0.8.1 on the tiny models of :mod:`intervene.testing`: captures and logits
under every target equal intervene's own hooks bit for bit on all 13 architectures.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import torch

from ..arch import Site, arch_for_config, text_config
from ..config.schema import InterventionConfig
from ..errors import ArchitectureError, InputError
from ..hooks.capture import EMBED, resid_site, router_site
from ..io.measurements import Measurements
from ..io.models import PromptFormat
from . import _common, require
from ._common import forward_inputs

nnsight = require("nnsight", "nnsight")

LIBRARY = f"nnsight {getattr(nnsight, '__version__', '?')}"


# ---- the model ---------------------------------------------------------------------------------

def wrap(model: Any) -> Any:
    """``nnsight.NNsight(model)``: trace a loaded HF model (not modified, no tokenizer needed)."""
    return nnsight.NNsight(model)


def hf_model(nn_model: Any) -> Any:
    """The HF model an nnsight model wraps."""
    model = getattr(nn_model, "_module", None)
    if model is None or not hasattr(model, "config"):
        raise InputError(f"expected an nnsight model wrapping a HF model, got {type(nn_model).__name__}")
    return model


def envoy(nn_model: Any, path: str) -> Any:
    """The envoy at a dotted module path of the wrapped model (``model.layers.3.mlp.gate``)."""
    node = nn_model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def module_path(model: Any, module: Any) -> str:
    """Dotted path of ``module`` inside ``model``."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ArchitectureError(f"module {type(module).__name__} is not part of {type(model).__name__}")


def site_path(model: Any, layer: int, site: Site) -> str:
    """Module path of intervene's site, e.g. ``model.layers.3.mlp.experts``."""
    spec = arch_for_config(model.config)
    return f"{spec.layers_path}.{layer}.{site.module}"


# ---- capture -----------------------------------------------------------------------------------

def capture_batch(nn_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  layers: Sequence[int] | None = None, embed: bool = True,
                  router: bool = True) -> dict[str, torch.Tensor]:
    """One traced forward; the sites and shapes of :func:`intervene.capture` (``positions='last'``):
    ``embed`` and ``layers.L.resid_out`` ``[B, H]``, ``layers.L.router.in`` ``[B, H]``,
    ``layers.L.router.logits`` ``[B, S, E]`` and ``.topk`` ``[B, S, k]`` on MoE layers."""
    model = hf_model(nn_model)
    spec = arch_for_config(model.config)
    config = text_config(model.config)
    wanted, moe_layers = _common.layer_selection(model, layers)
    moe_layers = moe_layers if router else []
    inputs = _common.forward_inputs(input_ids, attention_mask)
    batch, seq = inputs["input_ids"].shape
    top_k = spec.top_k(config)
    embed_path = module_path(model, model.get_input_embeddings())
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad(), nn_model.trace() as tracer:
        with tracer.invoke(**inputs):
            if embed:
                acts[EMBED] = _last(envoy(nn_model, embed_path).output).save()
        for layer in wanted:
            with tracer.invoke():
                if layer in moe_layers:
                    router_envoy = envoy(nn_model, f"{spec.layers_path}.{layer}.{spec.router}")
                    acts[router_site(layer, "in")] = router_envoy.input.reshape(batch, seq, -1)[:, -1].save()
                    logits, chosen = spec.unpack_router_output(router_envoy.output, top_k, layer)
                    acts[router_site(layer, "logits")] = logits.reshape(batch, seq, -1).save()
                    acts[router_site(layer, "topk")] = chosen.reshape(batch, seq, -1).save()
                acts[resid_site(layer)] = _last(envoy(nn_model, f"{spec.layers_path}.{layer}").output).save()
    return {site: value.detach().to("cpu", copy=True) for site, value in acts.items()}


def _last(output: Any) -> torch.Tensor:
    """Last position of a module output (decoder layers return a tensor in transformers 5.x)."""
    return (output[0] if isinstance(output, (tuple, list)) else output)[:, -1]


def capture_means(nn_model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                  batch_size: int = 16, prompt_format: PromptFormat | None = None,
                  layers: Sequence[int] | None = None, embed: bool = True, router: bool = True,
                  whiten_rank: int = 64) -> Measurements:
    """:func:`intervene.measure.collect.measure` through nnsight traces: same prompt formatting, batches,
    positions and float64 means; same keys and metadata (plus ``captured_with``), except the component
    writes (``attribution.*``), which only ``measure`` captures."""
    return _common.capture_means(hf_model(nn_model), functools.partial(capture_batch, nn_model), LIBRARY, tokenizer,
                                 harmful, harmless, batch_size, prompt_format or PromptFormat(), layers, embed,
                                 router, whiten_rank)


# ---- interventions -----------------------------------------------------------------------------

def resolve_edits(nn_model: Any, config: InterventionConfig | str | os.PathLike | _common.Edits,
                  measurements: Measurements | str | os.PathLike | None = None) -> _common.Edits:
    """The config bound to the wrapped model (:func:`intervene.config.resolve.bind`); resolved edits pass through."""
    return _common.resolve_edits(hf_model(nn_model), config, measurements)


def nnsight_edits(tracer: Any, nn_model: Any, edits: _common.Edits) -> None:
    """Add the edits to a trace in invoke mode (``with nn_model.trace() as tracer:``), after the
    invoke that carries the input: one whole-batch ``tracer.invoke()`` per site replaces the site
    module's output (write) or first input (read) by its projection."""
    model = hf_model(nn_model)
    plan = _common.site_plan(model, edits)
    _common.refuse_swaps(plan, "nnsight", "run_with_config (it swaps the weights in memory around the trace) or "
                         "intervene.apply(model, ...) around the trace")
    for site_edit in plan:
        project = _common.site_projection(site_edit)
        node = envoy(nn_model, site_path(model, site_edit.layer, site_edit.site))
        index = site_edit.site.output_index or 0
        with tracer.invoke():
            if site_edit.site.side == "write":
                output = node.output
                if isinstance(output, tuple):
                    node.output = output[:index] + (project(output[index]),) + output[index + 1:]
                else:
                    node.output = project(output)
            else:
                node.input = project(node.input)


def run_with_config(nn_model: Any, input_ids: torch.Tensor,
                    config: InterventionConfig | str | os.PathLike | _common.Edits,
                    measurements: Measurements | str | os.PathLike | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, S, V]`` of one traced forward under the config's projections (nnsight edits).
    Configs that need edited weights (norm_preserving, expert subsets) run the trace inside
    :func:`intervene.hooks.apply.apply` instead."""
    model = hf_model(nn_model)
    edits = resolve_edits(nn_model, config, measurements)
    inputs = _common.forward_inputs(input_ids, attention_mask)
    plan = _common.site_plan(model, edits)
    if any(s.mechanism != "hook" for s in plan):
        with _common.live(model, edits):
            return _trace_logits(nn_model, inputs, [])
    return _trace_logits(nn_model, inputs, edits)


def _trace_logits(nn_model: Any, inputs: dict[str, torch.Tensor], edits: _common.Edits) -> torch.Tensor:
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad(), nn_model.trace() as tracer:
        with tracer.invoke(**inputs):
            pass
        if edits:
            nnsight_edits(tracer, nn_model, edits)
        with tracer.invoke():
            out["logits"] = nn_model.output.logits.save()
    return out["logits"]


__all__ = ["forward_inputs", "wrap", "hf_model", "envoy", "site_path", "capture_batch", "capture_means",
           "resolve_edits", "nnsight_edits", "run_with_config", "LIBRARY"]
