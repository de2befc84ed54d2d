"""The architecture table: the ONE place that knows module names, tensor orientations and
on-disk key patterns. Live hooks (``intervene.hooks``) and the bake (``intervene.bake``) both
read it, so what is tried live and what is baked cannot disagree.

Vocabulary
----------
*target*   a family of residual-stream readers/writers a config can name:
           ``attention``, ``mlp``, ``experts``, ``shared_experts`` (write side: they add to the
           residual) and ``router``, ``expert_inputs`` (read side: they read the residual).
*site*     one module of one layer that a target touches, e.g. ``layers.12.attn.out``.
*tensor*   a parameter behind a site, with the axis that holds the hidden size ("H axis").

Both sides are the same maths on the H axis: every 1-D fibre of the tensor along that axis is
a vector in residual space, and the edit projects r̂ out of it (see ``intervene.maths``).
Never infer the H axis from a shape (gpt-oss has H == I): it is written here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal

import torch
from einops import reduce, repeat

from .errors import ArchitectureError

Target = Literal["attention", "mlp", "experts", "shared_experts", "router", "expert_inputs", "routed_expert_inputs"]
Side = Literal["write", "read"]  # write: the module's output is added to the residual; read: its input is it
RouterOutput = Literal["topk", "llama4"]
# where a config's router_bias goes (see ArchSpec.selection_bias)
SelectionBias = Literal["correction_bias", "router_bias", "logits"]
# how a router turns logits into (weights, indices): needed to re-choose from biased logits live
RouterChoice = Literal["softmax_topk", "softmax_topk_renorm", "deepseek_v2", "llama4", "own"]
ExpertLayout = Literal["EHI", "EIH"]  # fused in-memory experts: down [E,H,I] / gate_up [E,2I,H], or the reverse
# how the MoE block calls its experts module (what a per-expert capture needs, hooks.capture writes=True):
#   topk         experts(hidden [T,H], top_k_index [T,k], top_k_weights [T,k]) -> [T,H], the routing-weighted
#                sum of the chosen experts (their biases included); called with one slot it gives that expert's
#                gated output;
#   all_experts  experts(every expert's input stacked [E*T,H], already scaled by its router score) -> [E*T,H],
#                expert e's output in rows e*T:(e+1)*T (Llama4; the router's scores [T,E] are its first output)
ExpertsCall = Literal["topk", "all_experts"]

WRITE_TARGETS: tuple[Target, ...] = ("attention", "mlp", "experts", "shared_experts")
READ_TARGETS: tuple[Target, ...] = ("router", "expert_inputs", "routed_expert_inputs")
# routed_expert_inputs: the routed experts' gate/up only (expert_inputs without the shared expert's
# inputs and gate) -- the reference tool's per-expert read side; a subset of expert_inputs' sites
ALL_TARGETS: tuple[Target, ...] = WRITE_TARGETS + READ_TARGETS
# what each router kind returns from its forward
ROUTER_OUTPUTS: dict[RouterOutput, str] = {"topk": "(logits, weights, indices)", "llama4": "(scores, logits)"}


@dataclass(frozen=True)
class TensorRef:
    """One parameter behind a site, in memory (relative to the decoder layer)."""

    module: str  # module path relative to the layer, e.g. "mlp.experts"
    param: str  # parameter name on that module, e.g. "down_proj" or "weight"
    hidden_axis: int  # axis holding H, counted from the front (never negative)
    expert_axis: int | None = None  # fused expert tensors: axis 0 indexes experts
    is_bias: bool = False


@dataclass(frozen=True)
class Site:
    """One hook point: a module whose output (write side) or input (read side) is projected."""

    target: Target
    module: str  # module path relative to the layer
    name: str  # stable printable suffix, e.g. "attn.out" -> "layers.12.attn.out"
    side: Side
    tensors: tuple[TensorRef, ...]  # the parameters this hook is equivalent to editing
    post_norm: str | None = None  # Gemma-style norm applied to the output before the residual add
    output_index: int | None = None  # module returns a tuple: project this element


@dataclass(frozen=True)
class DiskPattern:
    """How a target's tensors are named in a checkpoint, relative to ``<prefix>.layers.N.``.

    ``regex`` may contain a group ``expert`` (per-expert layout). ``hidden_axis`` is the H axis
    of the stored tensor; ``expert_axis`` is set for fused tensors.
    """

    target: Target
    regex: str
    hidden_axis: int
    expert_axis: int | None = None
    is_bias: bool = False
    post_norm: str | None = None  # for Gemma: key (relative to the layer) of the post-norm weight

    def match(self, rest: str) -> re.Match | None:
        return re.fullmatch(self.regex, rest)


@dataclass(frozen=True)
class ArchSpec:
    """Everything intervene needs to know about one model family."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"  # in memory, from the *ForCausalLM module
    is_moe: bool = False
    # in-memory module paths, relative to a decoder layer
    attn_out: str = "self_attn.o_proj"
    attn_out_bias: bool = False
    mlp_block: str = "mlp"  # dense MLP or MoE block
    router: str | None = None
    router_output: RouterOutput = "topk"  # see ROUTER_OUTPUTS
    experts: str | None = None
    expert_layout: ExpertLayout | None = None
    expert_biases: bool = False  # gpt-oss: down_proj_bias [E,H], gate_up_proj_bias [E,2I]
    shared_expert: str | None = None
    shared_expert_gate: str | None = None  # Qwen2-MoE: Linear(H -> 1) reading the residual
    moe_block_returns_tuple: bool = False
    post_norms: dict[str, str] = field(default_factory=dict)  # target -> norm module (Gemma3)
    norm_weight_offset: float = 0.0  # Gemma RMSNorm multiplies by (offset + w)
    # per-expert on-disk names: (down, gate, up) relative to the MoE block's experts.{e}.
    disk_expert_names: tuple[str, str, str] | None = None
    disk_moe_block_aliases: tuple[str, ...] = ()  # e.g. Mixtral "block_sparse_moe"
    # (in-memory key, on-disk key) relative to the layer, for tensors a checkpoint names otherwise
    # (granitemoe: block_sparse_moe.output_linear.weight is the fused experts' down_proj)
    disk_aliases: tuple[tuple[str, str], ...] = ()
    # hybrid models (Qwen3-Next): layers whose config.layer_types[i] is "linear_attention" write through this
    linear_attn_out: str | None = None
    disk_router_aliases: tuple[str, ...] = ()
    # a config variant the fields above cannot express: config -> reason (refused by name), or None
    config_refusal: Callable[[Any], str | None] | None = None  # router leaf names on disk besides the in-memory one (phimoe "gate")
    num_experts_attr: str | None = None
    top_k_attr: str = "num_experts_per_tok"
    moe_layer_rule: Callable[[Any, int], bool] | None = None
    dense_leading_attr: str | None = None  # first_k_dense_replace
    # router_bias (expert steering). selection_bias says where the bias is added:
    #   correction_bias  the router's own choice-only bias (e_score_correction_bias): it shifts which
    #                    experts are chosen, the weights still come from the unbiased scores;
    #   router_bias      the router's Linear bias (its logits), before top-k and softmax;
    #   logits           the router logits before top-k (a -inf also drops the expert from the softmax).
    # selection_bias_tensor names the router's parameter/buffer that holds it (the same name in memory and
    # on disk, relative to the router module): a bake writes it there; None = nothing to bake into.
    selection_bias: SelectionBias | None = None
    selection_bias_tensor: str | None = None
    router_choice: RouterChoice = "own"  # "logits" kind: how the router chooses from its logits
    experts_call: ExpertsCall = "topk"  # see ExpertsCall
    # config attribute scaling every block's write before the residual add (granitemoe: residual_multiplier)
    residual_multiplier_attr: str | None = None
    notes: str = ""

    # ---- layer structure -------------------------------------------------------------
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        if not self.is_moe:
            return False
        if self.moe_layer_rule is None:
            return True
        return bool(self.moe_layer_rule(config, layer))

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.num_experts_attr)) if self.num_experts_attr else 0

    def top_k(self, config: Any) -> int:
        return int(getattr(config, self.top_k_attr, 0) or 0) if self.is_moe else 0

    def dense_leading_layers(self, config: Any) -> int:
        if self.dense_leading_attr is None:
            return 0
        return int(getattr(config, self.dense_leading_attr, 0) or 0)

    def residual_multiplier(self, config: Any) -> float:
        """The scalar each block's output is multiplied by before it is added to the residual (1.0 for most)."""
        if self.residual_multiplier_attr is None:
            return 1.0
        return float(getattr(config, self.residual_multiplier_attr))

    def attention_out(self, config: Any, layer: int) -> str:
        """The module whose output is the attention block's write to the residual at ``layer``."""
        types = getattr(config, "layer_types", None) or ()
        if self.linear_attn_out and layer < len(types) and types[layer] == "linear_attention":
            return self.linear_attn_out
        return self.attn_out

    def has_target(self, target: Target) -> bool:
        if target in ("attention", "mlp"):
            return target == "attention" or self.has_dense_mlp_anywhere
        if target in ("experts", "router", "expert_inputs", "routed_expert_inputs"):
            return self.is_moe
        if target == "shared_experts":
            return self.shared_expert is not None
        return False

    def unpack_router_output(self, output: Any, top_k: int, layer: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(router logits, indices of the chosen experts) from what the router module returned.
        Llama4 returns (scores, logits) and picks experts by top-k of the logits; the others
        return (logits, top-k weights, top-k indices). A named error for anything else."""
        expected = 2 if self.router_output == "llama4" else 3
        if not isinstance(output, (tuple, list)) or len(output) != expected:
            where = f"router of layer {layer}" if layer is not None else "router"
            got = type(output).__name__ + (f" of {len(output)}" if isinstance(output, (tuple, list)) else "")
            raise ArchitectureError(f"{where} ({self.name}) returned {got}; "
                                    f"expected {ROUTER_OUTPUTS[self.router_output]}")
        if self.router_output == "llama4":
            logits = output[1]
            return logits, logits.topk(top_k, dim=-1)[1]
        return output[0], output[2]

    def selection_bias_key(self, config: Any, layer: int) -> str | None:
        """Checkpoint key (relative to ``…layers.N.``) a router_bias bakes into; None where the
        architecture has no such tensor (or ``layer`` is not a MoE layer)."""
        if self.selection_bias_tensor is None or not self.is_moe_layer(config, layer):
            return None
        return f"{self.router}.{self.selection_bias_tensor}"

    def rechoose(self, router: Any, output: Any, bias: torch.Tensor, layer: int | None = None) -> Any:
        """The router's output as if ``bias`` [E] had been added to its logits before top-k (the
        ``logits`` kind of ``selection_bias``): same tuple layout, the logits returned biased,
        the weights recomputed with the router's own rule (``router_choice``) and its attributes."""
        logits, _ = self.unpack_router_output(output, self.top_k_of(router), layer)
        biased = (logits.to(torch.float32) + bias.to(logits.device, torch.float32)).to(logits.dtype)
        k = self.top_k_of(router)
        if self.router_choice in ("softmax_topk", "softmax_topk_renorm"):
            probs = torch.nn.functional.softmax(biased, dtype=torch.float, dim=-1)
            value, index = torch.topk(probs, k, dim=-1)
            if self.router_choice == "softmax_topk_renorm" or getattr(router, "norm_topk_prob", False):
                value = value / value.sum(dim=-1, keepdim=True)
            if self.router_choice == "softmax_topk":
                value = value.to(biased.dtype)
            return biased, value, index
        if self.router_choice == "deepseek_v2":
            scores = biased.softmax(dim=-1, dtype=torch.float32)
            if router.topk_method == "group_limited_greedy":
                groups, n = router.num_group, router.num_experts
                group_scores = reduce(scores, "t (g n) -> t g", "max", g=groups)  # experts grouped in order
                group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
                mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
                mask = repeat(mask, "t g -> t (g n)", n=n // groups)
                scores = scores.masked_fill(~mask.bool(), 0.0)
            value, index = torch.topk(scores, k=k, dim=-1, sorted=False)
            return biased, value * router.routed_scaling_factor, index
        if self.router_choice == "llama4":
            value, index = torch.topk(biased, k, dim=1)
            scores = torch.full_like(biased, float("-inf")).scatter_(1, index, value)
            return torch.sigmoid(scores.float()).to(scores.dtype), biased
        raise ArchitectureError(f"{self.name}: its router chooses experts itself (router_choice 'own'); "
                                f"router_bias goes into '{self.selection_bias_tensor}' instead")

    @staticmethod
    def top_k_of(router: Any) -> int:
        return int(router.top_k)

    @property
    def has_dense_mlp_anywhere(self) -> bool:
        # dense models, and MoE families that can have dense layers
        return (not self.is_moe) or self.moe_layer_rule is not None

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(t for t in ALL_TARGETS if self.has_target(t))

    # ---- in-memory sites -------------------------------------------------------------
    def _expert_tensors(self, kind: Literal["down", "in"]) -> tuple[TensorRef, ...]:
        """kind: 'down' (write) or 'in' (read). Fused in-memory parameters of the experts module."""
        assert self.experts is not None
        if self.expert_layout == "EHI":  # down [E,H,I], gate_up [E,2I,H]
            down_axis, in_axis = 1, 2
        else:  # "EIH": down [E,I,H], gate_up [E,H,2I]
            down_axis, in_axis = 2, 1
        if kind == "down":
            refs = [TensorRef(self.experts, "down_proj", down_axis, expert_axis=0)]
            if self.expert_biases:
                refs.append(TensorRef(self.experts, "down_proj_bias", 1, expert_axis=0, is_bias=True))
            return tuple(refs)
        return (TensorRef(self.experts, "gate_up_proj", in_axis, expert_axis=0),)

    def sites(self, config: Any, layer: int, targets: Iterable[str] = ALL_TARGETS) -> list[Site]:
        """The hook sites of ``layer`` for ``targets`` (targets absent at this layer are skipped)."""
        wanted = set(targets)
        moe = self.is_moe_layer(config, layer)
        out: list[Site] = []
        if "attention" in wanted:
            attn = self.attention_out(config, layer)
            refs = [TensorRef(attn, "weight", 0)]
            if self.attn_out_bias:
                refs.append(TensorRef(attn, "bias", 0, is_bias=True))
            out.append(Site("attention", attn, "attn.out", "write", tuple(refs),
                            post_norm=self.post_norms.get("attention")))
        if "mlp" in wanted and not moe:
            down = f"{self.mlp_block}.down_proj"
            out.append(Site("mlp", down, "mlp.out", "write", (TensorRef(down, "weight", 0),),
                            post_norm=self.post_norms.get("mlp")))
        if moe and "experts" in wanted:
            out.append(Site("experts", self.experts, "experts.out", "write", self._expert_tensors("down")))
        if moe and "shared_experts" in wanted and self.shared_expert:
            down = f"{self.shared_expert}.down_proj"
            out.append(Site("shared_experts", down, "shared_experts.out", "write",
                            (TensorRef(down, "weight", 0),)))
        if moe and "router" in wanted:
            out.append(Site("router", self.router, "router.in", "read",
                            (TensorRef(self.router, "weight", 1),)))
        if moe and "expert_inputs" in wanted:
            out.append(Site("expert_inputs", self.experts, "experts.in", "read", self._expert_tensors("in")))
            if self.shared_expert:
                out.append(Site("expert_inputs", self.shared_expert, "shared_experts.in", "read",
                                (TensorRef(f"{self.shared_expert}.gate_proj", "weight", 1),
                                 TensorRef(f"{self.shared_expert}.up_proj", "weight", 1))))
            if self.shared_expert_gate:
                out.append(Site("expert_inputs", self.shared_expert_gate, "shared_expert_gate.in", "read",
                                (TensorRef(self.shared_expert_gate, "weight", 1),)))
        elif moe and "routed_expert_inputs" in wanted:  # the same site as expert_inputs' routed one
            out.append(Site("routed_expert_inputs", self.experts, "experts.in", "read", self._expert_tensors("in")))
        return out

    # ---- on-disk patterns ------------------------------------------------------------
    def disk_patterns(self, config: Any, layer: int) -> list[DiskPattern]:
        """Every checkpoint key pattern (relative to ``…layers.N.``) that a target edits."""
        pats: list[DiskPattern] = []
        moe = self.is_moe_layer(config, layer)
        esc = re.escape
        attn = self.attention_out(config, layer)
        pats.append(DiskPattern("attention", esc(f"{attn}.weight"), 0,
                                post_norm=self._post_norm_key("attention")))
        if self.attn_out_bias:
            pats.append(DiskPattern("attention", esc(f"{attn}.bias"), 0, is_bias=True,
                                    post_norm=self._post_norm_key("attention")))
        if not moe:
            pats.append(DiskPattern("mlp", esc(f"{self.mlp_block}.down_proj.weight"), 0,
                                    post_norm=self._post_norm_key("mlp")))
            return self._with_aliases(pats)
        blocks = (self.mlp_block,) + self.disk_moe_block_aliases
        block_re = "(?:" + "|".join(esc(b) for b in blocks) + ")"
        router_leaf = "(?:" + "|".join(esc(n) for n in (self.router.split(".")[-1],) + self.disk_router_aliases) + ")"
        experts_leaf = self.experts.split(".")[-1]
        pats.append(DiskPattern("router", rf"{block_re}\.{router_leaf}\.weight", 1))
        # fused layout (in-memory names; gpt-oss and Llama4 are always saved like this)
        for ref in self._expert_tensors("down"):
            pats.append(DiskPattern("experts", rf"{block_re}\.{esc(experts_leaf)}\.{esc(ref.param)}",
                                    ref.hidden_axis, expert_axis=0, is_bias=ref.is_bias))
        pats += self._routed_input_patterns(block_re, "expert_inputs")
        # per-expert layout: down [H, I] (axis 0), gate/up [I, H] (axis 1)
        if self.disk_expert_names:
            down = self.disk_expert_names[0]
            pats.append(DiskPattern("experts", rf"{block_re}\.{esc(experts_leaf)}\.(?P<expert>\d+)\.{esc(down)}\.weight", 0))
        if self.shared_expert:
            sh = self.shared_expert.split(".")[-1]
            pats.append(DiskPattern("shared_experts", rf"{block_re}\.{esc(sh)}\.down_proj\.weight", 0))
            pats.append(DiskPattern("expert_inputs", rf"{block_re}\.{esc(sh)}\.(?:gate_proj|up_proj)\.weight", 1))
        if self.shared_expert_gate:
            sg = self.shared_expert_gate.split(".")[-1]
            pats.append(DiskPattern("expert_inputs", rf"{block_re}\.{esc(sg)}\.weight", 1))
        return self._with_aliases(pats)

    def _with_aliases(self, pats: list[DiskPattern]) -> list[DiskPattern]:
        """``pats`` plus, for each ``disk_aliases`` pair, the pattern of its in-memory key under the disk name."""
        return pats + [replace(p, regex=re.escape(disk)) for mem, disk in self.disk_aliases for p in pats if p.match(mem)]

    def _routed_input_patterns(self, block_re: str, target: Target) -> list[DiskPattern]:
        """The routed experts' gate/up keys: fused ``gate_up_proj`` and, per expert, gate/up [I, H]."""
        esc = re.escape
        experts_leaf = self.experts.split(".")[-1]
        pats = [DiskPattern(target, rf"{block_re}\.{esc(experts_leaf)}\.{esc(ref.param)}", ref.hidden_axis, expert_axis=0)
                for ref in self._expert_tensors("in")]
        if self.disk_expert_names:
            _, gate, up = self.disk_expert_names
            pats.append(DiskPattern(target, rf"{block_re}\.{esc(experts_leaf)}\.(?P<expert>\d+)\.(?:{esc(gate)}|{esc(up)})\.weight", 1))
        return pats

    def target_patterns(self, config: Any, layer: int, target: Target) -> list[DiskPattern]:
        """The checkpoint key patterns ``target`` edits at ``layer`` (``routed_expert_inputs``: the
        routed part of ``expert_inputs``; it is not listed by :meth:`disk_patterns`, whose keys match one
        pattern each)."""
        if target == "routed_expert_inputs":
            if not self.is_moe_layer(config, layer):
                return []
            blocks = (self.mlp_block,) + self.disk_moe_block_aliases
            return self._with_aliases(
                self._routed_input_patterns("(?:" + "|".join(re.escape(b) for b in blocks) + ")", target))
        return [p for p in self.disk_patterns(config, layer) if p.target == target]

    def _post_norm_key(self, target: Target) -> str | None:
        norm = self.post_norms.get(target)
        return f"{norm}.weight" if norm else None


# ---------------------------------------------------------------------------------------
# MoE-layer rules (config -> is layer i a MoE layer)

def _qwen_moe_rule(config: Any, layer: int) -> bool:
    mlp_only = list(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return layer not in mlp_only and getattr(config, "num_experts", 0) > 0 and (layer + 1) % step == 0


def _first_k_dense_rule(config: Any, layer: int) -> bool:
    k = int(getattr(config, "first_k_dense_replace", 0) or 0)
    freq = int(getattr(config, "moe_layer_freq", 1) or 1)
    return layer >= k and layer % freq == 0


def _ernie_moe_rule(config: Any, layer: int) -> bool:
    # Ernie4_5_MoeDecoderLayer; the config has already turned moe_layer_end_index -1 into the last layer
    step = int(getattr(config, "moe_layer_interval", 1) or 1)
    start = int(getattr(config, "moe_layer_start_index", 0) or 0)
    end = int(getattr(config, "moe_layer_end_index", config.num_hidden_layers - 1))
    return (layer + 1) % step == 0 and start <= layer <= end


def _ernie_biases(config: Any) -> str | None:
    if getattr(config, "use_bias", False):
        return ("config use_bias=true gives o_proj, down_proj and shared-expert down_proj biases, which the "
                "table's ernie4_5_moe entry does not edit (live and baked would differ); not supported")
    return None


def _llama4_rule(config: Any, layer: int) -> bool:
    return layer in list(getattr(config, "moe_layers", None) or [])


_DENSE = dict(is_moe=False)
_QWEN_STYLE = dict(
    is_moe=True, router="mlp.gate", experts="mlp.experts", expert_layout="EHI",
    disk_expert_names=("down_proj", "gate_proj", "up_proj"),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), **_DENSE),
    ArchSpec("qwen2", ("qwen2",), **_DENSE),
    ArchSpec("qwen3", ("qwen3",), **_DENSE),
    ArchSpec(
        "gemma3", ("gemma3_text",), **_DENSE,
        post_norms={"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
        norm_weight_offset=1.0,
        notes="o_proj/down_proj outputs pass through (1+w)-scaled RMSNorms before the residual add: "
              "edits use the rescaled direction normalize((1+w)*r), which removes r exactly.",
    ),
    ArchSpec("mistral", ("mistral",), **_DENSE),
    ArchSpec("phi3", ("phi3",), **_DENSE,
             notes="fused qkv_proj and mlp.gate_up_proj read the residual; o_proj and down_proj write it as in llama"),
    ArchSpec(
        "gemma2", ("gemma2",), **_DENSE,
        post_norms={"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
        norm_weight_offset=1.0,
        notes="post-norms as gemma3: (1+w)-scaled RMSNorms after o_proj and down_proj",
    ),
    ArchSpec(
        "mixtral", ("mixtral",), is_moe=True, router="mlp.gate", experts="mlp.experts", expert_layout="EHI",
        disk_expert_names=("w2", "w1", "w3"), disk_moe_block_aliases=("block_sparse_moe",),
        num_experts_attr="num_local_experts", selection_bias="logits", router_choice="softmax_topk_renorm",
    ),
    ArchSpec("qwen2_moe", ("qwen2_moe",), **_QWEN_STYLE, shared_expert="mlp.shared_expert",
             shared_expert_gate="mlp.shared_expert_gate", num_experts_attr="num_experts",
             moe_layer_rule=_qwen_moe_rule, selection_bias="logits", router_choice="softmax_topk"),
    ArchSpec("qwen3_moe", ("qwen3_moe",), **_QWEN_STYLE, num_experts_attr="num_experts",
             moe_layer_rule=_qwen_moe_rule, selection_bias="logits", router_choice="softmax_topk"),
    ArchSpec("qwen3_next", ("qwen3_next",), **_QWEN_STYLE, shared_expert="mlp.shared_expert",
             shared_expert_gate="mlp.shared_expert_gate", num_experts_attr="num_experts",
             moe_layer_rule=_qwen_moe_rule, linear_attn_out="linear_attn.out_proj",
             selection_bias="logits", router_choice="softmax_topk",
             notes="hybrid: Gated-DeltaNet layers (layer_types 'linear_attention') write through linear_attn.out_proj, "
                   "full-attention layers through self_attn.o_proj; MoE as qwen2_moe"),
    ArchSpec("qwen3_5_moe", ("qwen3_5_moe_text",), **_QWEN_STYLE, shared_expert="mlp.shared_expert",
             shared_expert_gate="mlp.shared_expert_gate", num_experts_attr="num_experts",
             linear_attn_out="linear_attn.out_proj",
             notes="as qwen3_next, every layer MoE; multimodal checkpoints keep the decoder under "
                   "model.language_model (the vision tower is never edited)"),
    ArchSpec(
        "granitemoe", ("granitemoe",), is_moe=True, mlp_block="block_sparse_moe", router="block_sparse_moe.router",
        experts="block_sparse_moe.experts", expert_layout="EHI", num_experts_attr="num_local_experts",
        residual_multiplier_attr="residual_multiplier",
        disk_aliases=(("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight"),
                      ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight"),
                      ("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight")),
        notes="fused on disk as input_linear [E,2I,H] / output_linear [E,H,I], router.layer; residual_multiplier "
              "scales each block's write (a scalar: projections commute with it)",
    ),
    ArchSpec("olmoe", ("olmoe",), **_QWEN_STYLE, num_experts_attr="num_experts", selection_bias="logits",
             router_choice="softmax_topk"),
    ArchSpec("deepseek_v2", ("deepseek_v2",), **_QWEN_STYLE, shared_expert="mlp.shared_experts",
             num_experts_attr="n_routed_experts", moe_layer_rule=_first_k_dense_rule,
             dense_leading_attr="first_k_dense_replace", selection_bias="logits", router_choice="deepseek_v2"),
    ArchSpec("deepseek_v3", ("deepseek_v3",), **_QWEN_STYLE, shared_expert="mlp.shared_experts",
             num_experts_attr="n_routed_experts", moe_layer_rule=_first_k_dense_rule,
             dense_leading_attr="first_k_dense_replace", selection_bias="correction_bias",
             selection_bias_tensor="e_score_correction_bias",
             notes="router adds e_score_correction_bias to choose experts, not to weight them"),
    ArchSpec("glm4_moe", ("glm4_moe",), **_QWEN_STYLE, shared_expert="mlp.shared_experts",
             num_experts_attr="n_routed_experts", moe_layer_rule=_first_k_dense_rule,
             dense_leading_attr="first_k_dense_replace", selection_bias="correction_bias",
             selection_bias_tensor="e_score_correction_bias",
             notes="GLM-4.5-Air architecture; router as DeepSeek-V3"),
    ArchSpec("ernie4_5_moe", ("ernie4_5_moe",), **_QWEN_STYLE, shared_expert="mlp.shared_experts",
             num_experts_attr="num_experts", moe_layer_rule=_ernie_moe_rule, dense_leading_attr="moe_layer_start_index",
             config_refusal=_ernie_biases,
             notes="router (mlp.gate) picks experts with moe_statics.e_score_correction_bias added, weights without; "
                   "use_bias=True checkpoints are refused by name (config_refusal)"),
    ArchSpec(
        "phimoe", ("phimoe",), is_moe=True, router="mlp.router", experts="mlp.experts", expert_layout="EHI",
        disk_expert_names=("w2", "w1", "w3"), disk_moe_block_aliases=("block_sparse_moe",),
        disk_router_aliases=("gate",), num_experts_attr="num_local_experts",
        notes="Mixtral's disk layout (block_sparse_moe.gate, experts.N.w1/w2/w3); in memory mlp.router (sparsemixer)",
    ),
    ArchSpec(
        "gpt_oss", ("gpt_oss",), is_moe=True, attn_out_bias=True, router="mlp.router", experts="mlp.experts",
        expert_layout="EIH", expert_biases=True, moe_block_returns_tuple=True,
        num_experts_attr="num_local_experts", selection_bias="router_bias", selection_bias_tensor="bias",
        notes="fused on disk too; down_proj [E,I,H] (H last); published weights are MXFP4",
    ),
    ArchSpec(
        "llama4", ("llama4_text",), is_moe=True, mlp_block="feed_forward", router="feed_forward.router",
        router_output="llama4", experts="feed_forward.experts", expert_layout="EIH",
        selection_bias="logits", router_choice="llama4", experts_call="all_experts",
        shared_expert="feed_forward.shared_expert", moe_block_returns_tuple=True,
        num_experts_attr="num_local_experts", moe_layer_rule=_llama4_rule,
        notes="fused on disk; down_proj [E,I,H]; router score scales the expert input",
    ),
)

_BY_TYPE = {mt: spec for spec in ARCHITECTURES for mt in spec.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_TYPE))


def get_arch(model_type: str) -> ArchSpec:
    """The spec for a ``config.model_type``; a named error for anything else."""
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise ArchitectureError(
            f"unsupported model_type '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


def text_config(config: Any) -> Any:
    """Multimodal wrappers (Llama4ForConditionalGeneration, Gemma3) keep the decoder in text_config."""
    if getattr(config, "model_type", None) in ("llama4", "gemma3", "qwen3_5_moe") and getattr(config, "text_config", None):
        return config.text_config
    return config


def arch_for_config(config: Any) -> ArchSpec:
    """The spec for a loaded transformers config; a named error for an unsupported type or variant."""
    tconf = text_config(config)
    spec = get_arch(tconf.model_type)
    reason = spec.config_refusal(tconf) if spec.config_refusal else None
    if reason:
        raise ArchitectureError(f"architecture '{spec.name}': {reason}")
    return spec


def get_module(root: Any, path: str) -> Any:
    """``root.a.b.c`` for ``path='a.b.c'`` with a named error when a part is missing."""
    obj = root
    for part in path.split("."):
        if part.isdigit():
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise ArchitectureError(f"module '{path}' not found on {type(root).__name__} (missing '{part}')")
    return obj


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder layers of a loaded model."""
    spec = arch_for_config(model.config)
    return get_module(model, spec.layers_path)


LAYER_KEY_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<layer>\d+)\.(?P<rest>.+)$")


def split_layer_key(key: str) -> tuple[str, int, str] | None:
    """``'model.layers.12.mlp.gate.weight'`` -> ``('model.layers', 12, 'mlp.gate.weight')``."""
    m = LAYER_KEY_RE.match(key)
    if not m:
        return None
    return m.group("prefix"), int(m.group("layer")), m.group("rest")


def site_name(layer: int, site: Site) -> str:
    return f"layers.{layer}.{site.name}"
