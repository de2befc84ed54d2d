"""Live interventions: project a direction out of a loaded model at run time, nothing written.

    with intervene.apply(model, "configs/dense.yaml"):
        model.generate(...)            # edited behaviour
    model.generate(...)                # original behaviour, bit for bit

``apply`` binds the config with :func:`intervene.config.resolve.bind` (or takes a
:class:`~intervene.config.resolve.Bound` already made) -- the same projections and router biases the
bake consumes -- and installs each projection at the hook sites that :meth:`intervene.arch.ArchSpec.sites`
lists. Two mechanisms, chosen per site:

*hook*  (``method: project``, all experts) -- write side: a forward hook projects ``y ← y - s(y·r̂)r̂``
        on the site module's output; read side: a forward pre-hook projects the module's input
        (``args[0]`` or ``hidden_states=``). Both equal the weight edit of DESIGN.md §2 exactly
        (linear algebra), for any dtype, device map or experts implementation.
*swap*  (``method: norm_preserving``, or an expert subset on a fused experts site) -- no
        activation hook equals a norm-preserving edit, and fused experts have no per-expert
        module to hook. The site's parameters are replaced in memory by
        :func:`intervene.maths.edit_tensor` of themselves -- the function the bake uses, so live
        equals baked -- and copied back from a saved original on exit (bit-exact,
        ``torch.equal``). An expert subset edits and saves only the selected experts' slices
        along the tensor's expert axis; the other experts are never touched. This was preferred
        over a custom experts implementation because it is exact under every
        ``experts_implementation`` (eager, batched_mm, grouped_mm) and for Llama4, whose experts
        module does not dispatch on it.

A subset (``experts: [...]``) restricts only the ROUTED experts: the shared expert and
Qwen2-MoE's shared-expert gate, which ``expert_inputs`` also reads through, are edited in full.

Order: several edits on one site compose in config order, exactly like the bake applying them
one after the other to the weights. On the write side that is hook 1 then hook 2; on the read
side a weight edited as ``W P₁ P₂`` sees ``P₂`` first, so the pre-hook applies the edits in
reverse. One hook per site does this; all edits of a site use the same mechanism.

Gemma3: ``o_proj``/``down_proj`` outputs pass through a per-channel post-norm; their sites carry
``post_norm`` and the direction used there is ``maths.post_norm_direction(r̂, norm.weight)``,
which removes r̂ exactly from the residual (live and bake alike).

Router bias (config ``router_bias``, ``Bound.router_biases``): added where
the architecture adds its own selection bias (``ArchSpec.selection_bias``). ``correction_bias``
(GLM-4 MoE, DeepSeek-V3) and ``router_bias`` (gpt-oss): the router's ``e_score_correction_bias`` /
``bias`` is swapped for ``maths.add_selection_bias`` of itself -- the tensor and the arithmetic the
bake writes -- and restored on exit. ``logits`` (the others): a forward hook on the router returns
its output as if the bias had been added to its logits before top-k (``ArchSpec.rechoose``).

Site names are stable and printable (``layers.12.attn.out``, ``layers.3.router.in``):
:func:`list_sites` lists them for a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .. import maths
from ..arch import ArchSpec, Site, TensorRef, arch_for_config, decoder_layers, get_module, site_name, text_config
from ..config.resolve import Bound, LayerEdit, bind
from ..config.schema import InterventionConfig
from ..errors import ArchitectureError, ConfigError
from ..io.measurements import Measurements

MODES = ("auto", "hooks", "weights")


@dataclass
class SiteEdit:
    """The edits installed at one site, with the mechanism used (``hook`` or ``swap``)."""

    name: str  # e.g. "layers.12.experts.out"
    layer: int
    site: Site
    edits: list[LayerEdit] = field(default_factory=list)
    directions: list[torch.Tensor] = field(default_factory=list)  # per edit, post-norm rescaled if needed
    mechanism: str = "hook"


@dataclass
class LiveIntervention:
    """What ``apply`` installed (yielded by the context manager)."""

    sites: list[SiteEdit]
    edits: list[LayerEdit]  # the projections
    router_bias: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E] added to the selection score
    router_bias_mechanism: str = ""  # "hook" (logits re-chosen) or "swap" (the router's own bias tensor)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def describe(self) -> str:
        steered = [f"layers.{layer}.router.bias{'':14s} {self.router_bias_mechanism:5s} experts "
                   + ",".join(f"{e}:{float(v[e]):g}" for e in torch.nonzero(v).flatten().tolist())
                   for layer, v in sorted(self.router_bias.items())]
        return "\n".join(steered + [f"{s.name:32s} {s.mechanism:5s} " + ", ".join(
            f"s={e.scale:g}" + (f" experts={list(e.experts)}" if e.experts is not None and _has_expert_axis(s.site) else "")
            for e in s.edits) for s in self.sites])


# ---- public API --------------------------------------------------------------------------------

@contextlib.contextmanager
def apply(model: Any, config: Bound | InterventionConfig | str | os.PathLike,
          measurements: Measurements | str | os.PathLike | None = None,
          mode: str = "auto") -> Iterator[LiveIntervention]:
    """Apply an intervention config live for the duration of the ``with`` block.

    ``config`` is a :class:`Bound` (bound once, e.g. to check it before a baseline, then applied as
    often as needed without resolving again), an :class:`InterventionConfig` or a YAML path (native
    or reference schema); ``measurements`` a loaded :class:`Measurements`, a path, or None to read
    ``config.measurements`` (ignored for a :class:`Bound`). ``mode``: ``auto`` (hooks where exact,
    weight swaps where needed), ``weights`` (swap every site's weights, the bake done in memory),
    ``hooks`` (refuse anything that needs a swap).
    """
    bound = config if isinstance(config, Bound) else bind_model(model, config, measurements)
    with apply_edits(model, bound.projections, bound.router_biases, mode=mode, spec=bound.spec) as live:
        yield live


def bind_model(model: Any, config: InterventionConfig | str | os.PathLike,
               measurements: Measurements | str | os.PathLike | None = None) -> Bound:
    """:func:`intervene.config.resolve.bind` against a loaded model's config."""
    return bind(config, measurements, model.config)


@contextlib.contextmanager
def apply_edits(model: Any, projections: Sequence[LayerEdit], router_biases: Mapping[int, torch.Tensor] | None = None,
                mode: str = "auto", *, spec: ArchSpec | None = None) -> Iterator[LiveIntervention]:
    """Install resolved edits (a :class:`Bound`'s ``projections`` and ``router_biases``); remove every
    hook and restore every swapped weight on exit, also when the block raises."""
    if mode not in MODES:
        raise ConfigError(f"unknown live mode '{mode}'; valid: {', '.join(MODES)}")
    spec = spec or arch_for_config(model.config)
    plan = plan_sites(model, projections, mode, spec=spec)
    biases = dict(router_biases or {})
    if biases and spec.selection_bias != "logits" and mode == "hooks":
        raise ConfigError(f"router_bias on '{spec.name}' swaps the router's '{spec.selection_bias_tensor}'; "
                          "mode='hooks' cannot apply it")
    handles: list[Any] = []
    saved: list[tuple[torch.Tensor, torch.Tensor, int | None, int | None]] = []
    try:
        layers = decoder_layers(model)
        for layer, vec in biases.items():
            _install_router_bias(spec, layers[layer], layer, vec, handles, saved)
        for site_edit in plan:
            layer_module = layers[site_edit.layer]
            module = get_module(layer_module, site_edit.site.module)
            if site_edit.mechanism == "swap":
                _swap(layer_module, site_edit, saved)
            elif site_edit.site.side == "write":
                handles.append(module.register_forward_hook(_write_hook(site_edit)))
            else:
                handles.append(module.register_forward_pre_hook(_read_hook(site_edit), with_kwargs=True))
        yield LiveIntervention(sites=plan, edits=list(projections), router_bias=biases,
                               router_bias_mechanism="hook" if spec.selection_bias == "logits" else "swap")
    finally:
        for handle in reversed(handles):
            handle.remove()
        _restore(saved)


def plan_sites(model: Any, edits: Sequence[LayerEdit], mode: str = "auto", *,
               spec: ArchSpec | None = None) -> list[SiteEdit]:
    """Group projections by site (first-seen order; edits in config order) and pick each site's mechanism."""
    spec = spec or arch_for_config(model.config)
    config = text_config(model.config)
    layers = decoder_layers(model)
    by_name: dict[str, SiteEdit] = {}
    for edit in sited_edits(model, edits, spec=spec):
        for site in spec.sites(config, edit.layer, [edit.target]):
            name = site_name(edit.layer, site)
            entry = by_name.setdefault(name, SiteEdit(name, edit.layer, site))
            entry.edits.append(edit)
            entry.directions.append(_site_direction(spec, layers[edit.layer], site, edit.direction, name))
    plan = list(by_name.values())
    for entry in plan:
        needs_swap = any(e.method == "norm_preserving" for e in entry.edits) or (
            _has_expert_axis(entry.site) and any(e.experts is not None for e in entry.edits))
        if needs_swap and mode == "hooks":
            raise ConfigError(f"{entry.name}: norm_preserving edits and expert subsets need weight swaps; "
                              "mode='hooks' cannot apply them")
        entry.mechanism = "swap" if (needs_swap or mode == "weights") else "hook"
    return plan


def sited_edits(model: Any, projections: Sequence[LayerEdit], *, spec: ArchSpec | None = None) -> list[LayerEdit]:
    """The projections that act on this model: one whose target has no module at its layer ('mlp' on a
    MoE layer, 'experts' on a dense one) is left out. Named errors: a layer out of range, or projections
    none of which has a module. Reads no weights (a meta-device skeleton will do), so a layer-streamed
    pass can check a config before any layer loads and install each layer's share of it when that layer
    is in memory."""
    spec = spec or arch_for_config(model.config)
    config = text_config(model.config)
    n_layers = len(decoder_layers(model))
    for edit in projections:
        if not 0 <= edit.layer < n_layers:
            raise ConfigError(f"edit at layer {edit.layer} out of range; the model has layers 0..{n_layers - 1}")
    kept = [e for e in projections if spec.sites(config, e.layer, [e.target])]
    if projections and not kept:
        wanted = sorted({e.target for e in projections})
        layers_ = sorted({e.layer for e in projections})
        raise ConfigError(f"the config edits nothing on this model: target(s) {', '.join(wanted)} have no module at "
                          f"layer(s) {', '.join(map(str, layers_))} (e.g. 'mlp' on MoE layers, 'experts' on dense ones)")
    return kept


def sited(model: Any, bound: Bound) -> Bound:
    """``bound`` with its projections :func:`sited_edits` on this model (same checks, same errors)."""
    return dataclasses.replace(bound, projections=tuple(sited_edits(model, bound.projections, spec=bound.spec)))


def list_sites(model: Any, targets: Sequence[str] | None = None) -> list[str]:
    """Every hook site of the model, e.g. ``layers.0.attn.out``, ``layers.1.router.in``."""
    spec = arch_for_config(model.config)
    config = text_config(model.config)
    wanted = tuple(targets) if targets is not None else spec.targets
    return [site_name(layer, site) for layer in range(int(config.num_hidden_layers))
            for site in spec.sites(config, layer, wanted)]


# ---- directions ----------------------------------------------------------------------------------

def _site_direction(spec: ArchSpec, layer_module: Any, site: Site, direction: torch.Tensor,
                    where: str) -> torch.Tensor:
    r_hat = direction.detach().to(torch.float32).cpu()
    if site.post_norm:
        norm = get_module(layer_module, site.post_norm)
        weight = norm.weight
        if weight.device.type == "meta":  # CPU-offloaded norm: its weights live in the offload hook
            weight = _cpu_offloaded(norm, "weight")
            if weight is None:
                raise ArchitectureError(f"{where}: post-norm '{site.post_norm}' weights are offloaded to disk")
        r_hat = maths.post_norm_direction(r_hat, weight.detach().cpu(), spec.norm_weight_offset)
    return r_hat


def _has_expert_axis(site: Site) -> bool:
    return any(ref.expert_axis is not None for ref in site.tensors)


class _Projector:
    """``x ← x - s(x·r̂)r̂`` for a list of (r̂, s), in float32, with r̂ cached per device."""

    def __init__(self, directions: Sequence[torch.Tensor], scales: Sequence[float]):
        self.pairs = list(zip(directions, scales))
        self._on: dict[torch.device, list[torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rs = self._on.get(x.device)
        if rs is None:
            rs = [r.to(x.device) for r, _ in self.pairs]
            self._on[x.device] = rs
        for r, (_, scale) in zip(rs, self.pairs):
            x = maths.project_out(x, r, -1, scale)
        return x


def _write_hook(site_edit: SiteEdit) -> Callable:
    project = _Projector(site_edit.directions, [e.scale for e in site_edit.edits])
    index = site_edit.site.output_index or 0

    def hook(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return output[:index] + (project(output[index]),) + output[index + 1:]
        return project(output)

    return hook


def _read_hook(site_edit: SiteEdit) -> Callable:
    # weights edited in order give W·P1·P2: the input meets the LAST edit first
    project = _Projector(site_edit.directions[::-1], [e.scale for e in site_edit.edits][::-1])
    name = site_edit.name

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> Any:
        if args:
            return (project(args[0]),) + tuple(args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": project(kwargs["hidden_states"])}
        raise ArchitectureError(f"{name}: module called without a positional input or 'hidden_states'")

    return pre_hook


# ---- router bias ------------------------------------------------------------------------------------

def _install_router_bias(spec: ArchSpec, layer_module: Any, layer: int, vec: torch.Tensor, handles: list[Any],
                         saved: list[tuple[torch.Tensor, torch.Tensor, int | None, int | None]]) -> None:
    """``spec.selection_bias``: swap the router's own bias tensor, or hook its output (module docstring)."""
    router = get_module(layer_module, spec.router)
    where = f"layers.{layer}.{spec.router}"
    if spec.selection_bias == "logits":
        def hook(module: Any, args: Any, output: Any) -> Any:
            return spec.rechoose(module, output, vec, layer)

        handles.append(router.register_forward_hook(hook))
        return
    tensor = getattr(router, spec.selection_bias_tensor or "", None)
    if not isinstance(tensor, torch.Tensor):
        raise ArchitectureError(f"{where}: router has no tensor '{spec.selection_bias_tensor}' to add router_bias to")
    if tensor.device.type == "meta":
        resident = _cpu_offloaded(router, spec.selection_bias_tensor)
        if resident is None:
            raise ArchitectureError(f"{where}.{spec.selection_bias_tensor} is offloaded to disk; router_bias needs it in memory")
        tensor = resident
    if tensor.shape != vec.shape:
        raise ArchitectureError(f"{where}.{spec.selection_bias_tensor} has shape {list(tensor.shape)}, "
                                f"expected [{vec.numel()}] (one entry per expert)")
    with torch.no_grad():
        saved.append((tensor, _keep(tensor), None, None))
        tensor.copy_(maths.add_selection_bias(tensor.detach(), vec))


# ---- weight swaps ---------------------------------------------------------------------------------

def _parameter(layer_module: Any, ref: TensorRef, site_name_: str) -> torch.Tensor:
    module = get_module(layer_module, ref.module)
    param = getattr(module, ref.param, None)
    if not isinstance(param, torch.Tensor):
        raise ArchitectureError(f"{site_name_}: '{ref.module}.{ref.param}' is not a tensor on {type(module).__name__}")
    if param.device.type == "meta":
        resident = _cpu_offloaded(module, ref.param)
        if resident is None:
            raise ArchitectureError(
                f"{site_name_}: '{ref.module}.{ref.param}' is offloaded to disk; weight swaps (norm_preserving, "
                "expert subsets) need the weights in memory -- give the model more GPU/CPU memory or use "
                "method: project with experts: all (hooks work with any offload)"
            )
        return resident
    if not param.is_floating_point():  # bitsandbytes 4/8-bit storage (uint8/int8)
        raise ArchitectureError(
            f"{site_name_}: '{ref.module}.{ref.param}' is stored quantized ({param.dtype}, e.g. --load-in-4bit/8bit): "
            "weight swaps (norm_preserving, expert subsets) cannot edit it; use method: project with experts: all "
            "(hooks work on quantized models) or load the model unquantized"
        )
    return param


def _cpu_offloaded(module: Any, param: str) -> torch.Tensor | None:
    """Under accelerate CPU offload (``device_map`` with 'cpu' next to a GPU) the parameter is on the
    meta device and its weights live in the module hook's ``weights_map``, copied to the execution
    device at every forward. That CPU tensor is what a swap edits. Disk-offloaded weights are
    re-read from files at every forward: None."""
    hooks = [getattr(module, "_hf_hook", None)]
    hooks += list(getattr(hooks[0], "hooks", ()) or ())  # SequentialHook
    for hook in hooks:
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is None:
            continue
        dataset, prefix = getattr(weights_map, "dataset", None), getattr(weights_map, "prefix", "")
        state_dict = getattr(dataset, "state_dict", None)
        if isinstance(state_dict, dict) and isinstance(state_dict.get(prefix + param), torch.Tensor):
            return state_dict[prefix + param]
        if isinstance(weights_map, dict) and isinstance(weights_map.get(param), torch.Tensor):
            return weights_map[param]
    return None


def _swap(layer_module: Any, site_edit: SiteEdit,
          saved: list[tuple[torch.Tensor, torch.Tensor, int | None, int | None]]) -> None:
    """Replace the site's tensors by their edits (in config order); remember the originals.

    Fused expert tensors are edited one expert slice at a time (the edit acts on fibres along
    the H axis, so slices are independent): peak extra memory is one slice, not the tensor.
    """
    for ref in site_edit.site.tensors:
        param = _parameter(layer_module, ref, site_edit.name)
        if ref.expert_axis is None:
            with torch.no_grad():
                saved.append((param, _keep(param), None, None))
                edited = param.detach()
                for edit, r_hat in zip(site_edit.edits, site_edit.directions):
                    edited = maths.edit_tensor(edited, r_hat, ref.hidden_axis, edit.scale, edit.method, ref.is_bias)
                param.copy_(edited)
            continue
        n_experts = param.shape[ref.expert_axis]
        subsets = [e.experts for e in site_edit.edits]
        touched = sorted(set(range(n_experts)) if any(s is None for s in subsets) else {i for s in subsets for i in s})
        bad = [i for i in touched if i >= n_experts]
        if bad:
            raise ConfigError(f"{site_edit.name}: expert {bad[0]} out of range; the model has experts 0..{n_experts - 1}")
        axis = ref.hidden_axis - (1 if ref.expert_axis < ref.hidden_axis else 0)  # H axis within a slice
        with torch.no_grad():
            for expert in touched:
                view = param.select(ref.expert_axis, expert)
                saved.append((param, _keep(view), ref.expert_axis, expert))
                edited = view.detach()
                for edit, r_hat, subset in zip(site_edit.edits, site_edit.directions, subsets):
                    if subset is None or expert in subset:
                        edited = maths.edit_tensor(edited, r_hat, axis, edit.scale, edit.method, ref.is_bias)
                view.copy_(edited)


def _keep(t: torch.Tensor) -> torch.Tensor:
    """A bit-exact copy of the original, kept in CPU memory (an accelerator holds only the edit)."""
    return t.detach().to("cpu", copy=True)


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor, int | None, int | None]]) -> None:
    with torch.no_grad():
        for param, original, expert_axis, expert in reversed(saved):
            target = param if expert_axis is None else param.select(expert_axis, expert)
            target.copy_(original)
    saved.clear()


__all__ = ["apply", "apply_edits", "bind_model", "plan_sites", "sited_edits", "sited", "list_sites", "LiveIntervention",
           "SiteEdit", "MODES"]
