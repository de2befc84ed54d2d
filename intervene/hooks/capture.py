"""Read-only capture hooks: residual stream, embedding output, router input / logits / top-k.

    with capture(model, layers=[10, 11]) as acts:
        model(**batch)
    acts["layers.10.resid_out"]        # [B, H]   residual after decoder layer 10, last token
    acts["layers.11.router.logits"]    # [B, S, E] (MoE layers only), every position
    acts.token_mask()                  # [B, S] bool, True on real (non-pad) tokens

Site names (stable, listable with :func:`capture_sites`):

``embed``                    output of the input embedding module (Gemma3: already ×√H)
``layers.L.resid_out``       output of decoder layer L, i.e. the residual stream after layer L,
                             taken BEFORE the final norm (unlike ``output_hidden_states[-1]``)
``layers.L.router.in``       the router's input (the post-attention-norm hidden state)
``layers.L.router.logits``   router logits ``F.linear(router.in, W, b)``
``layers.L.router.topk``     indices of the experts the router chose (int64)

With ``writes=True``, each layer's writes to the residual at the LAST position (the decision token),
each already multiplied by the family's residual multiplier (``ArchSpec.residual_multiplier``), so that
on every layer ``resid_out - resid_in`` is their sum:

``layers.L.writes.attention``       [B, H]     the attention block's output (after its post-norm, Gemma)
``layers.L.writes.mlp``             [B, H]     the dense MLP's output (dense layers)
``layers.L.writes.experts``         [B, E, H]  each routed expert's gated output (routing weight
                                               multiplied in; zero for experts not chosen)
``layers.L.writes.routing``         [B, E]     each expert's routing weight (0 when not chosen; Llama4:
                                               the router score that scales the expert's input)
``layers.L.writes.shared_experts``  [B, H]     the MoE block's output minus its routed experts' (the
                                               shared expert, with its gate where it has one)

Routed experts have no module each: the experts module is called again, inside its own hook, once
per top-k slot on the last-position rows (``ArchSpec.experts_call``), which gives each chosen
expert's gated output; nothing is written to the model.

Positions. Residual, embedding and router-input sites follow ``positions``: ``"last"`` keeps
the last position of each sequence only (``[B, H]``; with LEFT padding that is the last prompt
token), ``"all"`` keeps every position (``[B, S, H]``). Router logits and top-k are always kept
at every position (``[B, S, E]`` / ``[B, S, k]``) because routing statistics are taken over
every prompt token; pad positions are still in there, and :meth:`Captured.token_mask` (the
attention mask of each forward call) says which positions are real. Tensors are detached and
moved to the CPU in the dtype the model produced them in.

Each forward call inside the block adds one entry per site; ``acts[site]`` concatenates them
along the batch axis. Hooks are removed when the block exits, also on exceptions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

import torch
from einops import rearrange

from ..arch import ArchSpec, arch_for_config, decoder_layers, get_module, text_config
from ..errors import ArchitectureError, InputError

Positions = Literal["last", "all"]
RouterPart = Literal["in", "logits", "topk"]
WritePart = Literal["attention", "mlp", "experts", "routing", "shared_experts"]
POSITIONS: tuple[Positions, ...] = ("last", "all")
EMBED = "embed"


def resid_site(layer: int) -> str:
    return f"layers.{layer}.resid_out"


def router_site(layer: int, kind: RouterPart) -> str:
    return f"layers.{layer}.router.{kind}"


def write_site(layer: int, part: WritePart) -> str:
    return f"layers.{layer}.writes.{part}"


def write_parts(spec: ArchSpec, config: Any, layer: int) -> tuple[WritePart, ...]:
    """The ``writes`` sites :func:`capture` records at ``layer``."""
    if not spec.is_moe_layer(config, layer):
        return ("attention", "mlp")
    return ("attention", "experts", "routing") + (("shared_experts",) if spec.shared_expert else ())


def capture_sites(model_or_config: Any, layers: Iterable[int] | None = None, embed: bool = False,
                  router: bool = True, writes: bool = False) -> list[str]:
    """The site names :func:`capture` records for these arguments, in a stable order."""
    config = _config_of(model_or_config)
    spec = arch_for_config(config)
    tconf = text_config(config)
    names = [EMBED] if embed else []
    for layer in _layer_list(tconf, layers):
        names.append(resid_site(layer))
        if router and spec.is_moe_layer(tconf, layer):
            names += [router_site(layer, k) for k in ("in", "logits", "topk")]
        if writes:
            names += [write_site(layer, part) for part in write_parts(spec, tconf, layer)]
    return names


@dataclass
class Captured:
    """What a :func:`capture` block recorded. ``acts[site]`` → tensor (calls concatenated)."""

    positions: Positions
    data: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    masks: list[torch.Tensor] = field(default_factory=list)  # one [B, S] bool per forward call

    def __getitem__(self, site: str) -> torch.Tensor:
        calls = self.calls(site)
        if len(calls) == 1:
            return calls[0]
        try:
            return torch.cat(calls, dim=0)
        except RuntimeError:
            raise InputError(
                f"site '{site}' was captured in {len(calls)} forward calls with different sequence "
                "lengths; use acts.calls(site) for the per-call tensors"
            ) from None

    def __contains__(self, site: object) -> bool:
        return site in self.data and bool(self.data[site])

    def keys(self) -> list[str]:
        return [k for k, v in self.data.items() if v]

    def calls(self, site: str) -> list[torch.Tensor]:
        """One tensor per forward call made inside the block."""
        if site not in self:
            raise KeyError(f"site '{site}' was not captured; captured: {', '.join(self.keys()) or 'nothing'}")
        return self.data[site]

    def token_mask(self) -> torch.Tensor:
        """``[B, S]`` bool of the forward calls (concatenated), True on non-pad tokens."""
        if not self.masks:
            raise KeyError("no forward call of the captured model was seen")
        return self.masks[0] if len(self.masks) == 1 else torch.cat(self.masks, dim=0)

    def clear(self) -> None:
        for v in self.data.values():
            v.clear()
        self.masks.clear()


@contextmanager
def capture(model: Any, layers: Iterable[int] | None = None, embed: bool = False, router: bool = True,
            positions: Positions = "last", writes: bool = False) -> Iterator[Captured]:
    """Record residuals (and router data on MoE layers; with ``writes``, each component's write at the
    last position) of ``layers`` (default: all) during the forward calls made inside the block. See the
    module docstring for sites and shapes."""
    if positions not in POSITIONS:
        raise InputError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    config = text_config(model.config)
    spec = arch_for_config(model.config)
    layer_modules = decoder_layers(model)
    wanted = _layer_list(config, layers)
    acts = Captured(positions=positions)
    shapes: dict[int, tuple[int, int]] = {}  # layer -> (B, S) of the call in progress
    handles: list[Any] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        t = t[:, -1] if positions == "last" else t
        return t.detach().to("cpu", copy=True)

    def record(site: str, t: torch.Tensor) -> None:
        acts.data.setdefault(site, []).append(t)

    try:
        handles.append(model.register_forward_pre_hook(_mask_hook(acts), with_kwargs=True))
        if embed:
            handles.append(model.get_input_embeddings().register_forward_hook(
                lambda _m, _a, out: record(EMBED, keep(_first(out)))))
        for layer in wanted:
            module = layer_modules[layer]
            handles.append(module.register_forward_pre_hook(_shape_hook(shapes, layer)))
            handles.append(module.register_forward_hook(_resid_hook(record, keep, resid_site(layer))))
            if router and spec.is_moe_layer(config, layer):
                router_module = get_module(module, spec.router)
                handles.append(router_module.register_forward_pre_hook(
                    _router_in_hook(record, keep, shapes, layer)))
                handles.append(router_module.register_forward_hook(
                    _router_out_hook(record, shapes, layer, spec, spec.top_k(config))))
            if writes:
                handles += _write_hooks(module, spec, config, layer, record, shapes)
        yield acts
    finally:
        for h in handles:
            h.remove()


# ---- hook factories (closures keep each hook's site explicit) ------------------------------

def _mask_hook(acts: Captured):
    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            acts.masks.append(mask.detach().to("cpu").bool())
        elif ids is not None:
            acts.masks.append(torch.ones(tuple(ids.shape[:2]), dtype=torch.bool))
        return None

    return hook


def _shape_hook(shapes: dict[int, tuple[int, int]], layer: int):
    def hook(_module, args):
        hidden = args[0]
        shapes[layer] = (int(hidden.shape[0]), int(hidden.shape[1]))
        return None

    return hook


def _resid_hook(record, keep, site: str):
    def hook(_module, _args, output):
        record(site, keep(_first(output)))
        return None

    return hook


def _router_in_hook(record, keep, shapes, layer: int):
    def hook(_module, args):
        x = args[0]
        if x.dim() == 2:  # [T, H] -> [B, S, H]
            x = x.reshape(*shapes[layer], x.shape[-1])
        record(router_site(layer, "in"), keep(x))
        return None

    return hook


def _router_out_hook(record, shapes, layer: int, spec: ArchSpec, top_k: int):
    def hook(_module, _args, output):
        logits, topk = spec.unpack_router_output(output, top_k, layer)
        b, s = shapes[layer]
        record(router_site(layer, "logits"), logits.detach().reshape(b, s, -1).to("cpu", copy=True))
        record(router_site(layer, "topk"), topk.detach().reshape(b, s, -1).to("cpu", copy=True))
        return None

    return hook


def _write_hooks(module: Any, spec: ArchSpec, config: Any, layer: int, record, shapes) -> list[Any]:
    """The hooks of ``writes=True`` on one decoder layer (module docstring)."""
    mult = spec.residual_multiplier(config)
    moe = spec.is_moe_layer(config, layer)
    routed: dict[str, torch.Tensor] = {}  # the routed experts' total at the last positions, for the block hook

    def last_rows(t: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` at the last position from ``[B, S, H]`` or the flattened ``[B*S, H]``."""
        b, s = shapes[layer]
        return t.reshape(b, s, t.shape[-1])[:, -1]

    def attention_hook(_m, _a, out):
        record(write_site(layer, "attention"), _cpu(last_rows(_first(out)) * mult))

    def block_hook(_m, _a, out):
        total = last_rows(_first(out)) * mult
        if not moe:
            record(write_site(layer, "mlp"), _cpu(total))
        elif spec.shared_expert:
            record(write_site(layer, "shared_experts"), _cpu(total - routed.pop("total") * mult))

    attn = spec.post_norms.get("attention") or spec.attention_out(config, layer)
    block = spec.post_norms.get("mlp") or spec.mlp_block
    handles = [get_module(module, attn).register_forward_hook(attention_hook),
               get_module(module, block).register_forward_hook(block_hook)]
    if not moe:
        return handles
    experts = get_module(module, spec.experts)
    num_experts = spec.num_experts(config)

    def store(gated: torch.Tensor, weights: torch.Tensor, total: torch.Tensor) -> None:
        routed["total"] = total  # the experts module's own output: the per-expert split is not trusted for it
        record(write_site(layer, "experts"), _cpu(gated * mult))
        record(write_site(layer, "routing"), _cpu(weights))

    if spec.experts_call == "all_experts":
        scores: dict[str, torch.Tensor] = {}

        def router_hook(_m, _a, out):
            scores["last"] = last_rows(out[0])  # [B, E]

        def all_experts_hook(_m, _a, out):
            b, s = shapes[layer]
            # Llama4 stacks every expert's output along the token rows: expert-major
            per_expert = rearrange(out, "(e b s) h -> e b s h", e=num_experts, b=b, s=s)[:, :, -1]
            store(rearrange(per_expert, "e b h -> b e h"), scores.pop("last"), per_expert.sum(dim=0))

        handles.append(get_module(module, spec.router).register_forward_hook(router_hook))
        handles.append(experts.register_forward_hook(all_experts_hook))
        return handles

    busy: list[bool] = [False]

    def topk_hook(mod, args, out):
        if busy[0]:
            return None  # the per-slot calls below
        if len(args) < 3:
            raise ArchitectureError(f"layer {layer}: {spec.name}'s experts module was called with {len(args)} "
                                    "positional arguments; the table's experts_call 'topk' expects (hidden, "
                                    "top_k_index, top_k_weights)")
        hidden, index, weights = (last_rows(a) for a in args[:3])
        gated = hidden.new_zeros(hidden.shape[0], num_experts, hidden.shape[-1])
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        busy[0] = True
        try:
            with torch.no_grad():
                for slot in range(index.shape[-1]):
                    one = mod(hidden, index[:, slot:slot + 1], weights[:, slot:slot + 1])
                    gated[rows, index[:, slot]] += one.reshape(hidden.shape).to(gated.dtype)
        finally:
            busy[0] = False
        routing = weights.new_zeros(hidden.shape[0], num_experts).scatter_add(1, index, weights)
        store(gated, routing, last_rows(out))
        return None

    handles.append(experts.register_forward_hook(topk_hook))
    return handles


# ---- helpers ---------------------------------------------------------------------------------

def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _first(output: Any) -> torch.Tensor:
    """5.x decoder layers return a Tensor; older code and MoE blocks return tuples."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def _layer_list(config: Any, layers: Iterable[int] | None) -> list[int]:
    n = int(config.num_hidden_layers)
    if layers is None:
        return list(range(n))
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if not 0 <= x < n]
    if bad:
        raise InputError(f"layer {bad[0]} out of range; the model has layers 0..{n - 1}")
    return out
