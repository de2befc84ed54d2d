"""The bake plan: config + checkpoint headers -> the list of tensor edits, before any byte is written.
The edits come from :func:`intervene.config.resolve.bind` (the same projections and router biases the
live hooks use) and the on-disk key patterns of :mod:`intervene.arch`; every problem the checkpoint can have (a missing
key, a missing expert, quantized storage) is found here, so a failing bake writes nothing."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import maths
from ..arch import ArchSpec, DiskPattern, Target, split_layer_key
from ..config.resolve import Bound, LayerEdit, bind
from ..config.schema import InterventionConfig, Method
from ..errors import CheckpointError, InputError
from ..io.checkpoint import Checkpoint, TensorInfo, editable_dtype, gguf_message, load_tensor, open_checkpoint
from ..io.files import sha256_file
from ..io.measurements import Measurements
from ..io.sources import (
    check_supported,
    resolve_model,  # 'smollm2', 'organism' and hub ids
)
from ..text import format_ranges

# decoder-layer key prefixes, most specific first (multimodal wrappers keep the text decoder
# under language_model; their vision towers also have "...layers.N" keys, which are never edited)
LAYER_PREFIXES = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                  "language_model.layers", "model.model.layers", "transformer.layers")

# storage suffixes of quantized tensors: MXFP4 (gpt-oss), FP8 block scales (DeepSeek-V3), GPTQ/AWQ
QUANT_SUFFIXES = ("_blocks", "_scales", ".weight_scale_inv", ".weight_scale", ".qweight", ".qzeros",
                  ".scales", ".g_idx", ".weight_packed", ".absmax")


@dataclass(frozen=True)
class TensorEdit:
    """One projection applied to one checkpoint tensor."""

    key: str
    shard: str  # file name inside the checkpoint directory
    layer: int
    target: Target | Literal["router_bias"]
    hidden_axis: int
    expert_axis: int | None  # fused expert tensors: the axis indexing experts
    experts: tuple[int, ...] | None  # fused: edit only these slices along expert_axis (None = all)
    expert: int | None  # per-expert key: this key's expert id
    is_bias: bool
    direction: torch.Tensor = field(repr=False)  # unit float32 [H] actually projected (post-norm rescaled)
    scale: float = 1.0
    method: Method = "project"
    post_norm_key: str | None = None  # Gemma3: the norm whose weight rescaled the direction
    dtype: str = ""
    shape: tuple[int, ...] = ()
    add: torch.Tensor | None = field(default=None, repr=False)  # router_bias: float32 [E] added (maths.add_selection_bias)


@dataclass
class BakePlan:
    """What a bake will do: which tensors of which shards get which edits, in order."""

    source: Path
    checkpoint: Checkpoint
    bound: Bound  # the config bound to the checkpoint's config.json
    layer_prefix: str
    edits: dict[str, list[TensorEdit]]  # key -> edits in config order
    measurements_path: str | None = None
    measurements_sha256: str | None = None
    skipped_layers: list[int] = field(default_factory=list)  # layers >= num_hidden_layers (MTP), copied

    # ---- summaries -------------------------------------------------------------------
    def edits_in_shard(self, shard: str) -> dict[str, list[TensorEdit]]:
        return {k: v for k, v in self.edits.items() if v[0].shard == shard}

    @property
    def total_bytes(self) -> int:
        return self.checkpoint.total_bytes

    @property
    def edited_bytes(self) -> int:
        return sum(self.checkpoint.info(k).nbytes for k in self.edits)

    @property
    def config(self) -> InterventionConfig:
        return self.bound.config

    @property
    def spec(self) -> ArchSpec:
        return self.bound.spec

    @property
    def model_config(self) -> Any:
        return self.bound.model_config

    @property
    def layer_edits(self) -> tuple[LayerEdit, ...]:
        """The projections."""
        return self.bound.projections

    @property
    def layers(self) -> list[int]:
        return self.bound.layers

    @property
    def targets(self) -> list[str]:
        return list(dict.fromkeys([e.target for e in self.bound.projections]
                                  + (["router_bias"] if self.bound.router_biases else [])))

    def rows(self) -> list[dict[str, Any]]:
        """One row per (key, edit): what ``--dry-run`` prints."""
        out = []
        for key, ops in self.edits.items():
            for op in ops:
                out.append(dict(key=key, shard=op.shard, shape=list(op.shape), dtype=op.dtype, hidden_axis=op.hidden_axis,
                                layer=op.layer, target=op.target,
                                experts=_experts_text(op), scale=op.scale,
                                method="add" if op.add is not None else op.method,
                                post_norm=op.post_norm_key))
        return out

    def describe(self) -> str:
        rows = self.rows()
        head = ("key", "shape", "dtype", "H axis", "layer", "target", "experts", "scale", "method")
        table = [head] + [(r["key"], "x".join(map(str, r["shape"])), r["dtype"], str(r["hidden_axis"]), str(r["layer"]),
                           r["target"] + (f" (post-norm {r['post_norm']})" if r["post_norm"] else ""),
                           r["experts"], f"{r['scale']:g}", r["method"]) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        mb = 1024 * 1024
        lines.append(
            f"{len(self.edits)} tensors to edit ({self.edited_bytes / mb:.1f} MiB of {self.total_bytes / mb:.1f} MiB) "
            f"in {len({r['shard'] for r in rows})} of {len(self.checkpoint.shards)} shard(s); "
            f"layers {format_ranges(self.layers)}; source {self.source}"
        )
        return "\n".join(lines)


def _experts_text(op: TensorEdit) -> str:
    if op.add is not None:  # router_bias: expert:bias
        return ",".join(f"{e}:{float(op.add[e]):g}" for e in op.experts or ())
    if op.expert is not None:
        return str(op.expert)
    if op.expert_axis is None:
        return "-"
    return "all" if op.experts is None else ",".join(map(str, op.experts))


def resolve_source(model: str | os.PathLike | None) -> Path:
    """The checkpoint directory to bake from (a local safetensors directory)."""
    if model is None:
        raise InputError("no model to bake: set 'model' in the config or pass --model DIR")
    p = Path(model).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        raise CheckpointError(gguf_message(p))
    if p.exists():
        return p
    src = resolve_model(str(model))
    if src.gguf_file:
        raise CheckpointError(gguf_message(Path(src.path) / src.gguf_file))
    if src.is_hub:
        raise CheckpointError(f"bake needs a local checkpoint directory, got hub id '{model}'; download it first "
                              f"(e.g. huggingface-cli download {model} --local-dir DIR) and bake DIR")
    return Path(src.path)


def read_model_config(source: Path) -> Any:
    """The transformers config of the checkpoint (text config for multimodal wrappers)."""
    from transformers import AutoConfig

    if not (source / "config.json").exists():
        raise CheckpointError(f"{source} has no config.json")
    check_supported(source)  # unsupported model_type: our message with the supported list
    try:
        return AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read {source / 'config.json'}: {str(e).splitlines()[0]}") from None


# ---- planning -----------------------------------------------------------------------------

def layer_prefix(checkpoint: Checkpoint, spec: ArchSpec) -> str:
    """The key prefix of the text decoder's layers, e.g. ``model.layers``."""
    found: dict[str, int] = {}
    attn_re = re.compile(re.escape(f"{spec.attn_out}.weight"))
    for key in checkpoint.weight_map:
        parts = split_layer_key(key)
        if parts and attn_re.fullmatch(parts[2]):
            found[parts[0]] = found.get(parts[0], 0) + 1
    for prefix in LAYER_PREFIXES:
        if prefix in found:
            return prefix
    if len(found) == 1:
        return next(iter(found))
    if not found:
        raise CheckpointError(f"{checkpoint.path}: no decoder layer keys like '<prefix>.layers.N.{spec.attn_out}.weight' found")
    raise CheckpointError(f"{checkpoint.path}: several layer stacks ({', '.join(sorted(found))}); cannot tell which is the text decoder")


def plan_bake(config: InterventionConfig | Bound, source: str | os.PathLike,
              measurements: Measurements | str | os.PathLike | None = None) -> BakePlan:
    """Match every resolved edit to checkpoint keys. Raises before anything is written. ``config``: a
    config (bound here to the checkpoint's config.json with ``measurements``) or a :class:`Bound`."""
    source = Path(source)
    checkpoint = open_checkpoint(source)
    full_config = read_model_config(source)
    bound = config if isinstance(config, Bound) else bind(config, measurements, full_config)
    spec, model_config = bound.spec, bound.model_config
    prefix = layer_prefix(checkpoint, spec)
    num_layers = int(model_config.num_hidden_layers)

    keys_by_layer: dict[int, list[str]] = {}
    skipped: set[int] = set()
    for key in checkpoint.weight_map:
        parts = split_layer_key(key)
        if parts and parts[0] == prefix:
            if parts[1] >= num_layers:
                skipped.add(parts[1])
            keys_by_layer.setdefault(parts[1], []).append(key)

    quant = _quantization_note(full_config)
    edits: dict[str, list[TensorEdit]] = {}
    _plan_router_bias(checkpoint, spec, model_config, prefix, bound.router_biases, edits)
    for le in bound.projections:
        if not spec.sites(model_config, le.layer, [le.target]):
            continue  # target absent at this layer (e.g. experts on a dense leading layer): live skips it too
        patterns = spec.target_patterns(model_config, le.layer, le.target)
        layer_keys = keys_by_layer.get(le.layer, [])
        rests = {key: split_layer_key(key)[2] for key in layer_keys}
        _refuse_quantized(checkpoint, patterns, rests, le, quant)
        matched = _match(patterns, rests)
        _check_complete(checkpoint, spec, model_config, prefix, le, patterns, matched)
        for key, pat, m in matched:
            expert = int(m.group("expert")) if "expert" in pat.regex and m.groupdict().get("expert") is not None else None
            if expert is not None and le.experts is not None and expert not in le.experts:
                continue
            info = checkpoint.info(key)
            if editable_dtype(info.dtype) is None:
                raise CheckpointError(
                    f"{checkpoint.path}: '{key}' is stored as {info.dtype} (quantized or integer){quant}; intervene edits "
                    "float weights only: dequantize the checkpoint to bf16/fp32 first, then bake the dequantized copy"
                )
            _check_shape(checkpoint, key, info, pat, model_config)
            direction = le.direction
            post_norm_key = None
            if pat.post_norm:
                post_norm_key = f"{prefix}.{le.layer}.{pat.post_norm}"
                if post_norm_key not in checkpoint.weight_map:
                    raise CheckpointError(f"{checkpoint.path}: layer {le.layer} needs the post-norm weight "
                                          f"'{post_norm_key}' to bake '{le.target}', but the checkpoint lacks it")
                norm_w = load_tensor(source / checkpoint.weight_map[post_norm_key], post_norm_key)
                direction = maths.post_norm_direction(le.direction, norm_w, spec.norm_weight_offset)
            edits.setdefault(key, []).append(TensorEdit(
                key=key, shard=checkpoint.weight_map[key], layer=le.layer, target=le.target,
                hidden_axis=pat.hidden_axis, expert_axis=pat.expert_axis,
                experts=le.experts if pat.expert_axis is not None else None, expert=expert, is_bias=pat.is_bias,
                direction=direction.to(torch.float32).contiguous(), scale=le.scale, method=le.method,
                post_norm_key=post_norm_key, dtype=info.dtype, shape=info.shape,
            ))
    meas_path = bound.measurements.path if bound.measurements is not None else None
    sha = sha256_file(meas_path) if meas_path and Path(meas_path).is_file() else None
    return BakePlan(source=source, checkpoint=checkpoint, bound=bound,
                    layer_prefix=prefix, edits=edits, measurements_path=meas_path,
                    measurements_sha256=sha, skipped_layers=sorted(skipped))


def _plan_router_bias(checkpoint: Checkpoint, spec: ArchSpec, model_config: Any, prefix: str,
                      vectors: dict[int, torch.Tensor], edits: dict[str, list[TensorEdit]]) -> None:
    """``Bound.router_biases`` -> additions to the router's selection-bias tensor
    (``ArchSpec.selection_bias_tensor``). Refuses (before anything is written) where the architecture or
    the checkpoint has no such tensor: an approximation is never baked."""
    if not vectors:
        return
    if spec.selection_bias_tensor is None:
        raise CheckpointError(
            f"{checkpoint.path}: 'router_bias' cannot be baked into architecture '{spec.name}': its router has no "
            "selection-bias tensor (live, router_bias is added to its router logits); `intervene try`, "
            "route, chat, search and intervene.apply() still run it live -- remove 'router_bias' to bake the rest"
        )
    for layer, vec in sorted(vectors.items()):
        key = f"{prefix}.{layer}.{spec.selection_bias_key(model_config, layer)}"
        if key not in checkpoint.weight_map:
            raise CheckpointError(
                f"{checkpoint.path}: 'router_bias' at layer {layer} needs '{key}' ({spec.name}'s selection bias), "
                "which the checkpoint lacks; `intervene try`/intervene.apply() still run it live"
            )
        info = checkpoint.info(key)
        if editable_dtype(info.dtype) is None or tuple(info.shape) != (vec.numel(),):
            raise CheckpointError(f"{checkpoint.path}: '{key}' is {info.dtype} {list(info.shape)}; router_bias needs a "
                                  f"float tensor of shape [{vec.numel()}] (one entry per expert)")
        edits.setdefault(key, []).append(TensorEdit(
            key=key, shard=checkpoint.weight_map[key], layer=layer, target="router_bias", hidden_axis=0,
            expert_axis=None, experts=tuple(int(e) for e in torch.nonzero(vec).flatten()), expert=None, is_bias=True,
            direction=torch.zeros(0), scale=1.0, dtype=info.dtype, shape=info.shape, add=vec.contiguous()))


def _match(patterns: list[DiskPattern], rests: dict[str, str]) -> list[tuple[str, DiskPattern, re.Match]]:
    out = []
    for key, rest in rests.items():
        for pat in patterns:
            m = pat.match(rest)
            if m:
                out.append((key, pat, m))
                break
    return out


def _quantization_note(full_config: Any) -> str:
    qc = getattr(full_config, "quantization_config", None)
    if not qc:
        return ""
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return f" (config.json quantization_config: {method or 'present'})"


def _refuse_quantized(checkpoint: Checkpoint, patterns: list[DiskPattern], rests: dict[str, str],
                      le: LayerEdit, quant: str) -> None:
    """A key to edit stored as quantized blocks + scales (MXFP4, FP8, GPTQ) -> named error."""
    for key, rest in rests.items():
        for suffix in QUANT_SUFFIXES:
            if not rest.endswith(suffix):
                continue
            base = rest[: -len(suffix)]
            if any(p.match(base) or p.match(base + ".weight") for p in patterns):
                kind = {"_blocks": "MXFP4 blocks", "_scales": "MXFP4 scales", ".weight_scale_inv": "FP8 block scales",
                        ".weight_scale": "FP8 scales"}.get(suffix, "quantized storage")
                raise CheckpointError(
                    f"{checkpoint.path}: layer {le.layer} target '{le.target}' is quantized ('{key}', {kind}){quant}; "
                    "quantized weights cannot be edited in place: bake with --dequantize edited (or all) for FP8 / MXFP4, "
                    "or dequantize the checkpoint to bf16/fp32 first and bake the dequantized copy"
                )


def _check_complete(checkpoint: Checkpoint, spec: ArchSpec, model_config: Any, prefix: str, le: LayerEdit,
                    patterns: list[DiskPattern], matched: list[tuple[str, DiskPattern, re.Match]]) -> None:
    """The target exists at this layer in the architecture, so the checkpoint must have its keys
    (and every expert of a per-expert layout)."""
    if not matched:
        expected = " or ".join(f"{prefix}.{le.layer}.{p.regex}" for p in patterns)
        raise CheckpointError(
            f"{checkpoint.path}: layer {le.layer} target '{le.target}': no key matches the expected pattern {expected}"
        )
    per_expert = [(key, pat, m) for key, pat, m in matched if m.groupdict().get("expert") is not None]
    if not per_expert:
        return
    counts: dict[int, int] = {}
    for _, _, m in per_expert:
        e = int(m.group("expert"))
        counts[e] = counts.get(e, 0) + 1
    n_experts = spec.num_experts(model_config)
    wanted = le.experts if le.experts is not None else range(n_experts)
    full = max(counts.values())
    for e in wanted:
        if counts.get(e, 0) < full:
            expected = per_expert[0][1].regex.replace(r"(?P<expert>\d+)", str(e))
            raise CheckpointError(
                f"{checkpoint.path}: layer {le.layer} target '{le.target}': expert {e} is missing "
                f"(expected keys matching {prefix}.{le.layer}.{expected})"
            )


def _check_shape(checkpoint: Checkpoint, key: str, info: TensorInfo, pat: DiskPattern, model_config: Any) -> None:
    hidden = int(model_config.hidden_size)
    if pat.hidden_axis >= len(info.shape) or info.shape[pat.hidden_axis] != hidden:
        raise CheckpointError(
            f"{checkpoint.path}: '{key}' has shape {list(info.shape)}, expected hidden size {hidden} on axis "
            f"{pat.hidden_axis}; the checkpoint does not match its config.json or the architecture table"
        )


def plan_summary(plan: BakePlan) -> dict[str, Any]:
    """JSON-able description of the edit (for metadata and the model card)."""
    cfg = plan.config
    scales = sorted({e.scale for e in plan.bound.projections})
    return {
        "source": str(plan.source),
        "architecture": plan.spec.name,
        "method": cfg.method,
        "layers": plan.layers,
        "targets": plan.targets,
        "scales": scales,
        "experts": cfg.experts if not isinstance(cfg.experts, dict) else {str(k): v for k, v in cfg.experts.items()},
        "tensors_edited": len(plan.edits),
        "router_bias": [e.to_dict() for e in cfg.router_bias] or None,
        "measurements": plan.measurements_path,
        "measurements_sha256": plan.measurements_sha256,
    }
