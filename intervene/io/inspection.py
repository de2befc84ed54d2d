"""``intervene inspect``: what the architecture table detects in a checkpoint, from headers only.
Reads ``config.json`` and the header of each ``.safetensors`` file through the one checked reader
(:mod:`intervene.io.checkpoint`: names, dtypes, shapes, byte offsets), never tensor data, so it
answers in seconds for a checkpoint of any size. A GGUF file is described from its metadata and
tensor table."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..arch import ROUTER_OUTPUTS, ArchSpec, arch_for_config, split_layer_key, text_config
from ..errors import CheckpointError, InputError
from ..text import format_ranges
from .checkpoint import INDEX_NAME, SINGLE_NAME, SafetensorsHeader, open_checkpoint, read_header
from .sources import check_supported, load_model_config, resolve_model

EXPERT_TARGETS = ("experts", "expert_inputs")


@dataclass(frozen=True)
class TensorSummary:
    """One tensor as inspect reports it, from a safetensors header or a GGUF tensor table."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str


@dataclass
class LayerLayout:
    """How one decoder layer's expert tensors are stored on disk."""

    layer: int
    moe: bool
    layout: str  # dense | per-expert | fused | mixed | quantized | missing
    experts_on_disk: int | None = None
    hidden_axes: dict[str, int] = field(default_factory=dict)  # "down", "gate/up" -> H axis of the stored tensor
    shapes: dict[str, list[int]] = field(default_factory=dict)  # same keys -> one example shape
    problems: list[str] = field(default_factory=list)  # stated axis does not hold hidden_size, ...

    def describe(self) -> str:
        if not self.moe:
            return "dense"
        if self.layout in ("missing", "quantized"):
            return self.layout + (f" ({'; '.join(self.problems)})" if self.problems else "")
        axes = ", ".join(f"{k} {self.shapes[k]} H axis {v}" for k, v in sorted(self.hidden_axes.items()))
        n = f"{self.experts_on_disk} experts" if self.experts_on_disk is not None else "? experts"
        bad = f"; PROBLEM: {'; '.join(self.problems)}" if self.problems else ""
        return f"{self.layout}, {n}: {axes}{bad}"


@dataclass
class InspectReport:
    source: str
    format: str  # safetensors | gguf
    model_type: str
    arch: str
    architectures: list[str]
    hidden_size: int
    num_layers: int
    moe_layers: list[int]
    dense_layers: list[int]
    dense_leading_layers: int
    num_experts: int
    top_k: int
    router: str | None
    router_output: str | None
    experts_module: str | None
    expert_layout_in_memory: str | None
    shared_experts: str | None
    n_shared_experts: int | None
    layers_prefix_on_disk: str | None
    layouts: list[LayerLayout]
    dtypes: dict[str, int]  # dtype -> number of tensors
    total_size: int  # bytes of tensor data
    n_tensors: int
    n_files: int
    quantized: dict[str, int]  # kind (mxfp4, fp8, gguf:<type>) -> number of tensors
    quantization_config: dict[str, Any] | None
    notes: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def _shared(self) -> str:
        if not self.shared_experts:
            return "none"
        return f"'{self.shared_experts}'" + (f" x{self.n_shared_experts}" if self.n_shared_experts else "")

    def text(self) -> str:
        lines = [
            f"model:            {self.source} ({self.format}, {self.n_files} file(s), {self.n_tensors} tensors, "
            f"{_human(self.total_size)})",
            f"architecture:     {self.arch} (model_type {self.model_type}; {', '.join(self.architectures) or '?'})",
            f"hidden size:      {self.hidden_size}",
            f"decoder layers:   {self.num_layers}" + (f" under '{self.layers_prefix_on_disk}' on disk"
                                                       if self.layers_prefix_on_disk else ""),
        ]
        if self.moe_layers:
            lines += [
                f"MoE layers:       {format_ranges(self.moe_layers, empty='-')} ({len(self.moe_layers)})",
                f"dense layers:     {format_ranges(self.dense_layers, empty='-') if self.dense_layers else 'none'}"
                + (f" (first_k_dense_replace = {self.dense_leading_layers})" if self.dense_leading_layers else ""),
                f"experts:          {self.num_experts} per MoE layer, top-{self.top_k}; module '{self.experts_module}' "
                f"({self.expert_layout_in_memory} in memory)",
                f"router:           '{self.router}' returns {ROUTER_OUTPUTS[self.router_output or 'topk']}",
                f"shared experts:   {self._shared()}",
                "experts on disk:",
            ]
            for layers, desc in _group([(lay.layer, lay.describe()) for lay in self.layouts if lay.moe]):
                lines.append(f"  layers {format_ranges(layers, empty='-'):<12s} {desc}")
        else:
            lines.append("MoE:              no (dense model)")
        lines.append("dtypes:           " + ", ".join(f"{k} x{v}" for k, v in sorted(self.dtypes.items())))
        if self.quantized or self.quantization_config:
            q = ", ".join(f"{k} x{v}" for k, v in sorted(self.quantized.items())) or "none detected in tensors"
            method = (self.quantization_config or {}).get("quant_method")
            lines.append(f"quantized:        {q}" + (f" (config quant_method: {method})" if method else "")
                         + " - dequantize before baking")
        else:
            lines.append("quantized:        no")
        if self.notes:
            lines.append(f"notes:            {self.notes}")
        return "\n".join(lines)


# ---- safetensors headers ---------------------------------------------------------------------

def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorSummary], dict[str, str]]:
    """(tensors in header order, metadata) of one .safetensors file, from the checked header reader
    :func:`intervene.io.checkpoint.read_header`; reads no tensor data (and needs none on disk)."""
    header = read_header(path, require_data=False)
    return _summaries(header), header.metadata


def _summaries(header: SafetensorsHeader) -> dict[str, TensorSummary]:
    infos = header.by_key()
    return {key: TensorSummary(infos[key].dtype, infos[key].shape, infos[key].nbytes, header.path.name)
            for key, _ in header.raw_entries}


def checkpoint_tensors(directory: str | os.PathLike) -> tuple[dict[str, TensorSummary], int, int | None]:
    """(tensors, number of files, total_size from the index if it has one) of a checkpoint dir.
    A directory with an index or a ``model.safetensors`` is read by :func:`open_checkpoint` (index
    and headers checked); otherwise every ``*.safetensors`` file in it is."""
    directory = Path(directory)
    if (directory / INDEX_NAME).exists() or (directory / SINGLE_NAME).exists():
        ckpt = open_checkpoint(directory, require_data=False)
        headers = ckpt.shards
        total_size = ((ckpt.index or {}).get("metadata") or {}).get("total_size")
    else:
        headers = tuple(read_header(f, require_data=False) for f in sorted(directory.glob("*.safetensors")))
        total_size = None
    tensors: dict[str, TensorSummary] = {}
    for header in headers:
        tensors.update(_summaries(header))
    return tensors, len(headers), int(total_size) if total_size is not None else None


# ---- config ----------------------------------------------------------------------------------

def inspect_model(model_spec: str | os.PathLike) -> InspectReport:
    """Describe a local checkpoint directory or GGUF file (config and headers only)."""
    src = resolve_model(model_spec)
    if src.is_hub:
        raise InputError(f"inspect reads local files only; '{model_spec}' looks like a hub id "
                         "(download it first, e.g. huggingface-cli download)")
    check_supported(model_spec)
    config = load_model_config(model_spec)
    spec = arch_for_config(config)
    tconf = text_config(config)
    if src.gguf_file:
        return _report(src.display, "gguf", config, spec, tconf, *_gguf_tensors(Path(src.path) / src.gguf_file))
    tensors, n_files, total = checkpoint_tensors(src.path)
    if not tensors:
        raise CheckpointError(f"{src.path} has no .safetensors files (only safetensors checkpoints can be inspected "
                              "and baked; convert .bin weights with save_pretrained first)")
    return _report(src.display, "safetensors", config, spec, tconf, tensors, n_files, total)


def _report(source: str, fmt: str, config: Any, spec: ArchSpec, tconf: Any, tensors: dict[str, TensorSummary],
            n_files: int, total_size: int | None) -> InspectReport:
    num_layers = int(tconf.num_hidden_layers)
    hidden = int(tconf.hidden_size)
    moe = [i for i in range(num_layers) if spec.is_moe_layer(tconf, i)]
    by_layer: dict[int, dict[str, TensorSummary]] = {}
    prefixes: Counter[str] = Counter()
    for key, info in tensors.items():
        split = split_layer_key(key)
        if split is None:
            continue
        prefix, layer, rest = split
        prefixes[prefix] += 1
        by_layer.setdefault(layer, {})[rest] = info
    if fmt == "gguf":
        layouts = [_gguf_layout(i, i in moe, by_layer.get(i, {})) for i in range(num_layers)]
    else:
        layouts = [_layer_layout(spec, tconf, i, i in moe, by_layer.get(i, {}), hidden) for i in range(num_layers)]
    quant = _quantized(tensors, fmt)
    qconf = getattr(config, "quantization_config", None)
    if qconf is not None and not isinstance(qconf, dict):
        qconf = qconf.to_dict() if hasattr(qconf, "to_dict") else dict(vars(qconf))
    shared_count = None
    if spec.shared_expert:
        shared_count = int(getattr(tconf, "n_shared_experts", None) or 1)
    return InspectReport(
        source=source, format=fmt, model_type=tconf.model_type, arch=spec.name,
        architectures=list(getattr(config, "architectures", None) or []), hidden_size=hidden, num_layers=num_layers,
        moe_layers=moe, dense_layers=[i for i in range(num_layers) if i not in moe] if spec.is_moe else [],
        dense_leading_layers=spec.dense_leading_layers(tconf), num_experts=spec.num_experts(tconf),
        top_k=spec.top_k(tconf), router=spec.router, router_output=spec.router_output if spec.is_moe else None,
        experts_module=spec.experts, expert_layout_in_memory=_memory_layout(spec),
        shared_experts=spec.shared_expert, n_shared_experts=shared_count,
        layers_prefix_on_disk=prefixes.most_common(1)[0][0] if prefixes else None, layouts=layouts,
        dtypes=dict(Counter(t.dtype for t in tensors.values())),
        total_size=int(total_size if total_size is not None else sum(t.nbytes for t in tensors.values())),
        n_tensors=len(tensors), n_files=n_files, quantized=quant, quantization_config=qconf, notes=spec.notes,
    )


def _memory_layout(spec: ArchSpec) -> str | None:
    if spec.expert_layout == "EHI":
        return "fused down_proj [E,H,I], gate_up_proj [E,2I,H]"
    if spec.expert_layout == "EIH":
        return "fused down_proj [E,I,H], gate_up_proj [E,H,2I]"
    return None


def _layer_layout(spec: ArchSpec, config: Any, layer: int, moe: bool, keys: dict[str, TensorSummary],
                  hidden: int) -> LayerLayout:
    if not moe:
        return LayerLayout(layer, False, "dense")
    patterns = [p for p in spec.disk_patterns(config, layer) if p.target in EXPERT_TARGETS]
    per_expert: set[int] = set()
    fused_experts: set[int] = set()
    axes: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    problems: list[str] = []
    for rest, info in sorted(keys.items()):
        for pat in patterns:
            m = pat.match(rest)
            if m is None:
                continue
            is_per_expert = "expert" in m.groupdict()
            part = ("down" if pat.target == "experts" else "gate/up") + ("_bias" if pat.is_bias else "")
            axes.setdefault(part, pat.hidden_axis)
            shapes.setdefault(part, list(info.shape))
            if is_per_expert:
                per_expert.add(int(m.group("expert")))
            elif pat.expert_axis is not None and len(info.shape) > pat.expert_axis:
                fused_experts.add(int(info.shape[pat.expert_axis]))
            if len(info.shape) <= pat.hidden_axis or info.shape[pat.hidden_axis] != hidden:
                problems.append(f"{rest} {list(info.shape)}: axis {pat.hidden_axis} is not hidden size {hidden}")
            break
    quant_keys = [r for r in keys if _quant_kind(r, keys[r].dtype) and "expert" in r]
    if per_expert and fused_experts:
        layout = "mixed"
    elif per_expert:
        layout = "per-expert"
    elif fused_experts:
        layout = "fused"
    elif quant_keys:
        kinds = sorted({_quant_kind(r, keys[r].dtype) for r in quant_keys})
        return LayerLayout(layer, True, "quantized",
                           problems=[f"{', '.join(kinds)} expert tensors, e.g. {quant_keys[0]}"])
    else:
        return LayerLayout(layer, True, "missing", problems=["no expert tensors found for this layer"])
    count = len(per_expert) if per_expert else max(fused_experts)
    return LayerLayout(layer, True, layout, count, axes, shapes, problems[:3])


def _quant_kind(key: str, dtype: str) -> str | None:
    if key.endswith(("_blocks", "_scales")) and dtype.upper() in ("U8", "UINT8"):
        return "mxfp4"
    if key.endswith("weight_scale_inv") or dtype.upper().startswith("F8"):
        return "fp8"
    return None


def _quantized(tensors: dict[str, TensorSummary], fmt: str) -> dict[str, int]:
    if fmt == "gguf":
        kinds = Counter(f"gguf:{t.dtype}" for t in tensors.values() if t.dtype not in ("F32", "F16", "BF16"))
    else:
        kinds = Counter(k for k in (_quant_kind(name, t.dtype) for name, t in tensors.items()) if k)
    return dict(kinds)


# ---- GGUF --------------------------------------------------------------------------------------

def _gguf_tensors(path: Path) -> tuple[dict[str, TensorSummary], int, int]:
    """Tensor table of a GGUF file (memory-mapped; only the table is parsed)."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise InputError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    reader = GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        # llama.cpp names: blk.N.ffn_down_exps.weight -> layers.N.<rest> for grouping
        name = t.name.replace("blk.", "layers.", 1) if t.name.startswith("blk.") else t.name
        shape = tuple(int(x) for x in reversed(list(t.shape)))  # GGUF lists dims fastest-first
        tensors[name] = TensorSummary(t.tensor_type.name, shape, int(t.n_bytes), path.name)
    return tensors, 1, path.stat().st_size


def _gguf_layout(layer: int, moe: bool, keys: dict[str, TensorSummary]) -> LayerLayout:
    if not moe:
        return LayerLayout(layer, False, "dense")
    exps = {k: v for k, v in keys.items() if "_exps" in k}
    if not exps:
        return LayerLayout(layer, True, "missing", problems=["no *_exps tensors in this GGUF layer"])
    down = next((v for k, v in exps.items() if "down" in k), next(iter(exps.values())))
    return LayerLayout(layer, True, "fused", int(down.shape[0]), {}, {"gguf": list(down.shape)},
                       ["GGUF stores experts fused (llama.cpp *_exps); baking needs a safetensors checkpoint"])


# ---- formatting ------------------------------------------------------------------------------

def _group(items: list[tuple[int, str]]) -> list[tuple[list[int], str]]:
    groups: dict[str, list[int]] = {}
    for layer, desc in items:
        groups.setdefault(desc, []).append(layer)
    return sorted(((v, k) for k, v in groups.items()), key=lambda g: g[0][0])


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
