"""TransformerLens (4.x ``TransformerBridge``) interop: capture with TL hooks, intervene with TL hooks.

    bridge = boot_bridge(model, tokenizer)                    # wraps the loaded HF model
    m = capture_means(bridge, tokenizer, harmful, harmless)   # == intervene.measure.collect.measure(...)
    hooks = lens_hooks(bridge, resolve_edits(bridge, "config.yaml", m))
    logits = bridge.run_with_hooks(input_ids, fwd_hooks=hooks)  # == under intervene.apply(...)
    logits = run_with_config(bridge, input_ids, "config.yaml", m)  # the same in one call

TransformerLens 4 has no ``HookedTransformer``; ``TransformerBridge.boot_transformers(name,
hf_model=model)`` wraps a loaded HF model **in place**: its submodules become bridge
components (each with ``hook_in``/``hook_out``) and attention is switched to ``eager``. The
forward stays the HF forward (logits identical), and intervene's own hooks keep working on
``bridge.original_model``.

Measurement semantics (same as :mod:`intervene.measure.collect`): layer ``L`` is the OUTPUT of decoder
layer ``L`` (TL ``blocks.{L}.hook_resid_post``, before the final norm), ``embed`` is TL
``hook_embed``; the last position of a left-padded batch; float64 sums. Positions 0..S-1 are
passed explicitly (the bridge would otherwise derive them from the attention mask on padded
rows, which intervene's forward does not). Router input: the router component's ``hook_in``;
logits and chosen experts: its ``hook_out`` and ``hook_expert_indices``. Two routers are read
from their own output tuple instead (a scoped forward hook on the router component), because
their TL hooks do not carry intervene's numbers: DeepSeek-V2/V3 (no indices hook; V3 picks
experts with a bias and groups, not by top-k of the logits) and Llama4 (``hook_out`` carries
the sigmoid scores; intervene records the logits).

Where a config's sites go (the site's module, located in the bridge's component tree):

========================  ====================================================================
site (intervene)          TransformerLens hook
========================  ====================================================================
``attn.out``              ``blocks.L.attn.o.hook_out``
``mlp.out``               ``blocks.L.mlp.out.hook_out`` (DeepSeek/GLM/Llama4 dense layers:
                          ``blocks.L.mlp.dense_out.hook_out``)
``router.in``             ``blocks.L.mlp.gate.hook_in`` (gpt-oss, Llama4: ``mlp.router``)
``experts.out``           ``blocks.L.mlp.experts.hook_out`` (Qwen2-MoE); Mixtral, OLMoE,
                          Qwen3-MoE, gpt-oss have no experts component, but their MoE block
                          adds nothing after the experts, so ``blocks.L.mlp.hook_out`` is
                          the same activation
``experts.in``            ``blocks.L.mlp.experts.hook_in`` (Qwen2-MoE only)
``shared_experts.out``    ``blocks.L.mlp.shared_expert(s).out.hook_out``
``shared_experts.in``     ``blocks.L.mlp.shared_expert(s).hook_in``
``shared_expert_gate.in`` ``blocks.L.mlp.shared_expert_gate.hook_in``
========================  ====================================================================

Limits of TransformerLens 4.3.0 (measured on the tiny models of :mod:`intervene.testing`): the
bridge has **no hook point** for the routed experts of DeepSeek-V2/V3, GLM-4-MoE and Llama4
(``experts`` and ``expert_inputs`` targets), nor for the experts' inputs of Mixtral, OLMoE,
Qwen3-MoE, gpt-oss, nor for GLM-4-MoE's shared experts. :func:`lens_hooks` refuses those sites
with a named error; :func:`run_with_config` then applies the whole config with intervene's own
hooks on ``bridge.original_model`` (exact, same numbers). Norm-preserving edits and expert
subsets change weights, which no activation hook equals: same fallback.

Measured with transformer-lens 4.3.0: on all 13 tiny architectures, captures and logits under
every target (TL hooks or the fallback) equal intervene's own hooks bit for bit, except
DeepSeek-V2, where booting alone changes the model's logits by rounding (1.5e-7, no hook set):
5e-7 on residuals, 2e-7 on logits.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable, Sequence

import torch

from ..arch import ArchSpec, Site, arch_for_config, decoder_layers, get_module, site_name, text_config
from ..config.schema import InterventionConfig
from ..errors import ArchitectureError, ConfigError, InputError
from ..hooks.capture import EMBED, resid_site, router_site
from ..io.measurements import Measurements
from ..io.models import PromptFormat, model_device
from . import _common, require
from ._common import forward_inputs

transformer_lens = require("transformer_lens", "lens")

LIBRARY = f"transformer_lens {getattr(transformer_lens, '__version__', '?')}"
TLHook = tuple[str, Callable[[Any, Any], Any]]


# ---- the bridge --------------------------------------------------------------------------------

def boot_bridge(model: Any, tokenizer: Any = None, name: str | None = None) -> Any:
    """Wrap a loaded HF model in a ``TransformerBridge`` (the model is modified in place).

    ``tokenizer`` is copied first (the bridge sets its BOS and padding side); without one the
    bridge loads a tokenizer by ``name`` (default: the model's ``name_or_path``). Models built
    from a config have no ``architectures`` entry; it is filled in from the class name.
    """
    require("transformer_lens.model_bridge.sources.transformers", "lens")  # attaches boot_transformers
    from transformer_lens.model_bridge import TransformerBridge

    config = model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    name = name or getattr(config, "_name_or_path", None) or type(model).__name__
    tok = copy.deepcopy(tokenizer) if tokenizer is not None else None
    return TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok, device=str(model_device(model)),
                                               dtype=next(model.parameters()).dtype)


def hf_model(bridge: Any) -> Any:
    """The wrapped HF model (``bridge.original_model``)."""
    model = getattr(bridge, "original_model", None)
    if model is None or not hasattr(model, "config"):
        raise InputError(f"expected a TransformerBridge wrapping a HF model, got {type(bridge).__name__}")
    return model


def _component_paths(bridge: Any) -> dict[int, str]:
    """id(module) -> its path in the bridge's component tree (``blocks.3.attn.o``)."""
    paths: dict[int, str] = {}
    for name, module in bridge.named_modules(remove_duplicate=False):
        if name and "_original_component" not in name and not name.startswith("original_model"):
            paths.setdefault(id(module), name)
    return paths


def site_hook_name(bridge: Any, layer: int, site: Site, paths: dict[int, str] | None = None) -> str:
    """The TL hook point equal to intervene's site: ``hook_out`` of the component wrapping the
    site's module (write side) or its ``hook_in`` (read side). Named error if there is none."""
    model = hf_model(bridge)
    spec = arch_for_config(model.config)
    paths = _component_paths(bridge) if paths is None else paths
    layer_module = decoder_layers(model)[layer]
    suffix = "hook_out" if site.side == "write" else "hook_in"
    path = paths.get(id(get_module(layer_module, site.module)))
    if path is not None and f"{path}.{suffix}" in bridge.hook_dict:
        return f"{path}.{suffix}"
    if site.target == "experts" and spec.shared_expert is None:
        # the MoE block returns the experts' output unchanged (reshaped): same activation
        block = paths.get(id(get_module(layer_module, spec.mlp_block)))
        if block is not None and f"{block}.hook_out" in bridge.hook_dict:
            return f"{block}.hook_out"
    raise ArchitectureError(
        f"{site_name(layer, site)}: the TransformerBridge of '{spec.name}' has no hook point for "
        f"'{site.module}'; use run_with_config (it falls back to intervene's hooks) or "
        "intervene.apply(bridge.original_model, ...)"
    )


def lens_sites(bridge: Any, targets: Sequence[str] | None = None) -> dict[str, str | None]:
    """Every intervene site of the model -> its TL hook name (None where the bridge has none)."""
    model = hf_model(bridge)
    spec = arch_for_config(model.config)
    config = text_config(model.config)
    paths = _component_paths(bridge)
    out: dict[str, str | None] = {}
    for layer in range(int(config.num_hidden_layers)):
        for site in spec.sites(config, layer, tuple(targets) if targets is not None else spec.targets):
            try:
                out[site_name(layer, site)] = site_hook_name(bridge, layer, site, paths)
            except ArchitectureError:
                out[site_name(layer, site)] = None
    return out


# ---- capture -----------------------------------------------------------------------------------

def capture_batch(bridge: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  layers: Sequence[int] | None = None, embed: bool = True,
                  router: bool = True) -> dict[str, torch.Tensor]:
    """One forward through the bridge; the sites and shapes of :func:`intervene.capture`
    (``positions='last'``): ``embed`` and ``layers.L.resid_out`` ``[B, H]``,
    ``layers.L.router.logits`` ``[B, S, E]`` and ``.topk`` ``[B, S, k]`` on MoE layers."""
    model = hf_model(bridge)
    spec = arch_for_config(model.config)
    config = text_config(model.config)
    wanted, moe_layers = _common.layer_selection(model, layers)
    inputs = _common.forward_inputs(input_ids, attention_mask)
    batch, seq = inputs["input_ids"].shape
    acts: dict[str, torch.Tensor] = {}

    def last(site: str) -> Callable:
        def fn(activation: torch.Tensor, hook: Any) -> None:
            acts[site] = activation[:, -1].detach().to("cpu", copy=True)

        return fn

    def per_token(site: str, transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Callable:
        def fn(activation: torch.Tensor, hook: Any) -> None:
            acts[site] = transform(activation.detach()).reshape(batch, seq, -1).to("cpu", copy=True)

        return fn

    def last_of_tokens(site: str) -> Callable:  # router input: [T, H] or [B, S, H]
        def fn(activation: torch.Tensor, hook: Any) -> None:
            acts[site] = activation.detach().reshape(batch, seq, -1)[:, -1].to("cpu", copy=True)

        return fn

    hooks: list[TLHook] = [("hook_embed", last(EMBED))] if embed else []
    hooks += [(f"blocks.{layer}.hook_resid_post", last(resid_site(layer))) for layer in wanted]
    expected = ([EMBED] if embed else []) + [resid_site(layer) for layer in wanted]
    torch_hooks: list[tuple[Any, Callable]] = []  # (module, forward hook): routers TL does not expose faithfully
    if router:
        paths = _component_paths(bridge)
        layer_modules = decoder_layers(model)
        for layer in moe_layers:
            site = spec.sites(config, layer, ["router"])[0]
            component = site_hook_name(bridge, layer, site, paths)[: -len(".hook_in")]
            hooks.append((f"{component}.hook_in", last_of_tokens(router_site(layer, "in"))))
            if spec.router_output == "topk" and f"{component}.hook_expert_indices" in bridge.hook_dict:
                hooks.append((f"{component}.hook_out", per_token(router_site(layer, "logits"))))
                hooks.append((f"{component}.hook_expert_indices", per_token(router_site(layer, "topk"))))
            else:
                # DeepSeek's router component has no indices hook (and its choice uses a bias and
                # groups, so top-k of the logits is not it); Llama4's hook_out carries the scores,
                # not the logits. Read the router's own output tuple, as intervene.capture does.
                torch_hooks.append((get_module(layer_modules[layer], spec.router),
                                    _router_tuple_hook(acts, layer, spec, spec.top_k(config), batch, seq)))
            expected += [router_site(layer, k) for k in ("in", "logits", "topk")]
    handles = []
    try:
        handles = [module.register_forward_hook(fn) for module, fn in torch_hooks]
        with torch.no_grad():
            bridge.run_with_hooks(inputs["input_ids"], fwd_hooks=hooks, return_type=None,
                                  attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"])
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in expected if name not in acts]
    if missing:
        raise ArchitectureError(f"TransformerBridge hooks did not fire for: {', '.join(missing)}")
    return acts


def _router_tuple_hook(acts: dict[str, torch.Tensor], layer: int, spec: ArchSpec, top_k: int, batch: int,
                       seq: int) -> Callable:
    def hook(_module: Any, _args: Any, output: Any) -> None:
        logits, topk = spec.unpack_router_output(output, top_k, layer)
        acts[router_site(layer, "logits")] = logits.detach().reshape(batch, seq, -1).to("cpu", copy=True)
        acts[router_site(layer, "topk")] = topk.detach().reshape(batch, seq, -1).to("cpu", copy=True)

    return hook


def capture_means(bridge: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                  batch_size: int = 16, prompt_format: PromptFormat | None = None,
                  layers: Sequence[int] | None = None, embed: bool = True, router: bool = True,
                  whiten_rank: int = 64) -> Measurements:
    """:func:`intervene.measure.collect.measure` through the bridge: same prompts formatting, batches,
    positions and float64 means, same keys and metadata (plus ``captured_with``), except the component
    writes (``attribution.*``), which only ``measure`` captures."""
    return _common.capture_means(hf_model(bridge), functools.partial(capture_batch, bridge), LIBRARY, tokenizer,
                                 harmful, harmless, batch_size, prompt_format or PromptFormat(), layers, embed,
                                 router, whiten_rank)


# ---- interventions -----------------------------------------------------------------------------

def resolve_edits(bridge: Any, config: InterventionConfig | str | os.PathLike | _common.Edits,
                  measurements: Measurements | str | os.PathLike | None = None) -> _common.Edits:
    """The config bound to the wrapped model (:func:`intervene.config.resolve.bind`); resolved edits pass through."""
    return _common.resolve_edits(hf_model(bridge), config, measurements)


def lens_hooks(bridge: Any, edits: _common.Edits) -> list[TLHook]:
    """``(hook_name, fn)`` pairs for ``bridge.run_with_hooks(fwd_hooks=...)`` or
    ``bridge.hooks(...)`` that apply the edits as intervene's live hooks do: ``y ← y - s(y·r̂)r̂``
    on a write site's output, the same on a read site's input. Named error for a site the bridge
    cannot reach or an edit that needs edited weights (see the module docstring)."""
    model = hf_model(bridge)
    plan = _common.site_plan(model, edits)
    _common.refuse_swaps(plan, "TransformerLens", "run_with_config (it swaps the weights in memory) or "
                         "intervene.apply(bridge.original_model, ...)")
    paths = _component_paths(bridge)
    return [(site_hook_name(bridge, s.layer, s.site, paths), _tl_fn(_common.site_projection(s), s.site.output_index))
            for s in plan]


def _tl_fn(project: _common.Projection, index: int | None) -> Callable[[Any, Any], Any]:
    def fn(activation: Any, hook: Any) -> Any:
        if isinstance(activation, tuple):
            i = index or 0
            return activation[:i] + (project(activation[i]),) + activation[i + 1:]
        return project(activation)

    return fn


def run_with_config(bridge: Any, input_ids: torch.Tensor,
                    config: InterventionConfig | str | os.PathLike | _common.Edits,
                    measurements: Measurements | str | os.PathLike | None = None,
                    attention_mask: torch.Tensor | None = None, fallback: bool = True) -> torch.Tensor:
    """Logits ``[B, S, V]`` of the bridge under the config's projections, applied as TL hooks.

    Configs that TL hooks cannot express (see the module docstring) are applied with
    :func:`intervene.hooks.apply.apply` on ``bridge.original_model`` instead when
    ``fallback`` is true, and refused with the named error otherwise.
    """
    model = hf_model(bridge)
    edits = resolve_edits(bridge, config, measurements)
    inputs = _common.forward_inputs(input_ids, attention_mask)
    kwargs = dict(attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"])
    try:
        hooks = lens_hooks(bridge, edits)
    except (ArchitectureError, ConfigError):
        if not fallback:
            raise
        with torch.no_grad(), _common.live(model, edits):
            return bridge(inputs["input_ids"], return_type="logits", **kwargs)
    with torch.no_grad():
        return bridge.run_with_hooks(inputs["input_ids"], fwd_hooks=hooks, return_type="logits", **kwargs)


__all__ = ["forward_inputs", "boot_bridge", "hf_model", "site_hook_name", "lens_sites", "capture_batch",
           "capture_means", "resolve_edits", "lens_hooks", "run_with_config", "LIBRARY"]
