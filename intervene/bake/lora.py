"""``bake --lora``: the planned edits as a PEFT LoRA adapter instead of a new checkpoint.

A ``project`` edit is rank 1 per module, exactly. Write side (``W [H, in]``, ``W' = W − s·r̂(r̂ᵀW)``):
``B = −s·r̂``, ``A = r̂ᵀW``. Read side (``W [out, H]``, ``W' = W − s·(W r̂)r̂ᵀ``): ``B = −s·W r̂``, ``A = r̂ᵀ``.
Several edits on one module compose in config order, one rank each: with ``W' = W + B A`` so far, the
next write-side edit appends ``−s·r̂`` to B and ``r̂ᵀ(W + B A)`` to A; a read-side one appends
``−s·(W + B A) r̂`` to B and ``r̂ᵀ`` to A. Scaling is 1 (``lora_alpha = r`` per module, via PEFT's
``rank_pattern``/``alpha_pattern`` where a module has more than one rank).

Fused 3D experts ``[E, out, in]`` (table layout EHI) go through PEFT's ``target_parameters``, rank 1 per expert
(:func:`fused_lora_factors`). What an adapter cannot carry is refused by name before anything is written:
``norm_preserving`` (not low rank), bias edits (gpt-oss's o_proj bias), ``[E, in, out]`` experts, two parameters
of one module, modules PEFT's transformers-v4 mapping retargets, and any tensor that is neither an ``nn.Linear``
weight nor a fused expert parameter of the model transformers builds (routers kept as bare parameters,
per-expert checkpoint keys).
Weights are read one tensor at a time from the checkpoint (the same plan, directions and post-norm
rescaling as the full bake); the adapter is float32."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors.torch import save_file

from ..config import load_config
from ..config.schema import InterventionConfig
from ..errors import ConfigError, InputError
from ..io.checkpoint import load_tensor
from ..io.measurements import measurements_for
from ..io.models import versions
from .outputs import with_source_card
from .plan import BakePlan, TensorEdit, plan_bake, plan_summary, resolve_source
from .publish import check_output, make_temporary, mark_complete, publish

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# files that carry a licence or notice: copied next to the adapter as they are
LICENCE_PREFIXES = ("license", "licence", "notice", "copying", "use_policy", "responsible_use")


@dataclass(frozen=True)
class LoraModule:
    """One module's adapter: ``W' = W + lora_B @ lora_A``."""

    module: str  # full in-memory module path, e.g. "model.layers.3.self_attn.o_proj"
    key: str  # the checkpoint key of its weight
    lora_a: torch.Tensor = field(repr=False)  # [rank, in]; fused experts: [rank·E, in], row e·rank + j
    lora_b: torch.Tensor = field(repr=False)  # [out, rank]; fused experts: [out, rank·E], column j·E + e
    targets: tuple[str, ...] = ()
    parameter: str | None = None  # fused 3D experts: the parameter PEFT targets (``target_parameters``)
    num_experts: int = 1

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0]) // self.num_experts


@dataclass
class LoraResult:
    plan: BakePlan
    output: Path | None  # None for a dry run
    modules: list[str]
    ranks: dict[str, int]
    seconds: float = 0.0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output) if self.output else None, "dry_run": self.dry_run,
                "modules": self.modules, "ranks": self.ranks, "seconds": self.seconds,
                "edit": plan_summary(self.plan)}

    def summary(self) -> str:
        n = sum(self.ranks.values())
        head = (f"LoRA adapter: {len(self.modules)} modules, total rank {n} "
                f"(max {max(self.ranks.values(), default=0)} per module)")
        if self.dry_run:
            return self.plan.describe() + "\n" + head + " — dry run, nothing written"
        return f"{head} in {self.seconds:.1f}s -> {self.output}"


def lora_factors(weight: torch.Tensor, ops: list[TensorEdit]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [k, in], B [out, k]) with ``weight + B @ A`` equal to ``ops`` applied in order (float32)."""
    w = weight.to(torch.float32)
    out_dim, in_dim = w.shape
    a = torch.zeros(0, in_dim)
    b = torch.zeros(out_dim, 0)
    for op in ops:
        r = op.direction.to(torch.float32)
        if op.hidden_axis == 0:  # write side: rows of W live in H
            new_a = r @ w + (r @ b) @ a
            new_b = -op.scale * r
        else:  # read side: columns live in H
            new_a = r
            new_b = -op.scale * (w @ r + b @ (a @ r))
        a = torch.cat([a, new_a[None, :]], 0)
        b = torch.cat([b, new_b[:, None]], 1)
    return a.contiguous(), b.contiguous()


def fused_lora_factors(weight: torch.Tensor, ops: list[TensorEdit]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's packing for a fused ``[E, out, in]`` expert parameter: per expert the factors of
    :func:`lora_factors` (an op outside its expert subset contributes a zero rank), as
    ``lora_A [k·E, in]`` (row ``e·k + j``) and ``lora_B [out, k·E]`` (column ``j·E + e``)."""
    per_a, per_b = [], []
    for e in range(weight.shape[0]):
        ops_e = [op if op.experts is None or e in op.experts else replace(op, scale=0.0) for op in ops]
        # the slice drops the expert axis: H is axis 0 (out, write side) or 1 (in, read side) of [out, in]
        a, b = lora_factors(weight[e], [replace(op, hidden_axis=op.hidden_axis - 1) for op in ops_e])
        per_a.append(a)
        per_b.append(b)
    a = rearrange(torch.stack(per_a), "e k i -> (e k) i")  # row e·k + j
    b = rearrange(torch.stack(per_b, dim=-1), "o k e -> o (k e)")  # column j·E + e
    return a.contiguous(), b.contiguous()


def _meta_model(plan: BakePlan) -> Any:
    """The model transformers builds for the checkpoint, on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(plan.source))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_lora(plan: BakePlan) -> dict[str, str]:
    """Named refusals for what an adapter cannot carry; returns checkpoint key -> module path."""
    where = plan.config.source or "config"
    if plan.config.method != "project":
        raise ConfigError(f"{where}: method '{plan.config.method}' is not low rank (every weight column is "
                          "rescaled), so --lora cannot express it; use method 'project' or bake the full checkpoint")
    model = _meta_model(plan)
    modules = dict(model.named_modules())
    retargeted = _peft_retargets(model)
    out: dict[str, str] = {}
    for key, ops in plan.edits.items():
        op = ops[0]
        what = f"'{key}' (layer {op.layer}, target '{op.target}')"
        if op.is_bias:
            raise ConfigError(f"{where}: --lora cannot edit the bias {what}: a LoRA adapter changes weights only; "
                              f"drop target '{op.target}' or bake the full checkpoint")
        module_path, _, param = key.rpartition(".")
        module = modules.get(module_path)
        fused = getattr(module, param, None) if len(op.shape) == 3 and op.expert_axis == 0 else None
        if isinstance(fused, torch.Tensor) and tuple(fused.shape) == op.shape:
            # PEFT reads a 3D parameter as [E, out, in] unless the module says is_transposed; the table says
            # which layout it really is (EHI: down [E,H,I] and gate_up [E,2I,H], both [E, out, in])
            transposed = plan.spec.expert_layout != "EHI" or getattr(module, "is_transposed", False)
            if transposed or retargeted:
                why = (f"stores its experts [E, in, out] (table layout {plan.spec.expert_layout})" if transposed
                       else f"belongs to a '{model.config.model_type}' model, whose expert targets PEFT "
                            f"{next(iter(retargeted.values()))} rewrites for transformers-v4 compatibility")
                raise ConfigError(f"{where}: --lora cannot express {what}: '{module_path}' {why}; only "
                                  "[E, out, in] fused experts are targeted exactly (PEFT target_parameters): drop "
                                  f"target '{op.target}' or bake the full checkpoint")
            out[key] = module_path
            continue
        if param != "weight" or not isinstance(module, torch.nn.Linear) or tuple(module.weight.shape) != op.shape:
            kind = ("absent" if module is None else
                    f"a {type(module).__name__}" + (" (fused 3D experts)" if len(op.shape) == 3 else ""))
            raise ConfigError(
                f"{where}: --lora cannot express {what}: in {type(model).__name__} '{module_path}' is {kind}, "
                "not an nn.Linear with that weight; LoRA output covers Linear modules (attention, dense mlp, shared "
                f"experts): drop target '{op.target}' or bake the full checkpoint")
        if module_path.rpartition(".")[2] in retargeted:
            raise ConfigError(
                f"{where}: --lora cannot carry {what}: PEFT {retargeted[module_path.rpartition('.')[2]]} retargets "
                f"every '*.{module_path.rpartition('.')[2]}' module of a '{model.config.model_type}' model to the fused "
                f"experts (its transformers-v4 compatibility mapping), so the adapter would edit the wrong tensor; "
                f"drop target '{op.target}' or bake the full checkpoint")
        out[key] = module_path
    return out


def _peft_retargets(model: Any) -> dict[str, str]:
    """Module leaf names that PEFT, loading an adapter on this model, remaps to fused expert parameters
    (peft.utils.transformers_weight_conversion: on qwen2_moe- and mixtral-style model types a target
    'x.down_proj' becomes the experts' 'down_proj' parameter, shared experts and dense MLPs included).
    Leaf name -> PEFT version, read from PEFT's own table; a named error when PEFT is missing."""
    try:
        import peft
        from peft.utils import transformers_weight_conversion as conv
    except ImportError:
        raise InputError("--lora needs PEFT to check the adapter loads as written: pip install 'intervene[lora]'") from None
    base = conv._MODEL_TO_CONVERSION_PATTERN.get(getattr(model.config, "model_type", None))
    names = conv._MOE_TARGET_MODULE_MAPPING.get(base, {}) if base else {}
    return {name: peft.__version__ for name in names}


def build_modules(plan: BakePlan, module_of: dict[str, str]) -> list[LoraModule]:
    """Read each edited weight once (streamed) and factor its edits."""
    mods = []
    for key, ops in plan.edits.items():
        weight = load_tensor(plan.source / ops[0].shard, key)
        targets = tuple(dict.fromkeys(op.target for op in ops))
        if weight.ndim == 3:
            a, b = fused_lora_factors(weight, ops)
            mods.append(LoraModule(module_of[key], key, a, b, targets, parameter=key.rpartition(".")[2],
                                   num_experts=int(weight.shape[0])))
        else:
            a, b = lora_factors(weight, ops)
            mods.append(LoraModule(module_of[key], key, a, b, targets))
    names = [m.module for m in mods]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # one adapter per module: PEFT keys its factors by module, not by parameter
        raise ConfigError(f"{plan.config.source or 'config'}: --lora cannot edit two parameters of '{twice[0]}' "
                          "(e.g. targets experts and expert_inputs on fused experts) in one adapter: bake them as "
                          "two adapters or bake the full checkpoint")
    return mods


def adapter_config(plan: BakePlan, modules: list[LoraModule]) -> dict[str, Any]:
    """PEFT's LoraConfig as JSON: rank 1 and alpha 1 by default, rank_pattern/alpha_pattern for the rest."""
    # PEFT matches rank_pattern against the module's name, or for target_parameters the parameter's
    ranks = {m.module if m.parameter is None else f"{m.module}.{m.parameter}": m.rank for m in modules}
    base = min(ranks.values(), default=1)
    patterns = {name: r for name, r in ranks.items() if r != base}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(plan.source),
        "r": base, "lora_alpha": base, "rank_pattern": patterns, "alpha_pattern": dict(patterns),
        "target_modules": sorted(m.module for m in modules if m.parameter is None) or None,
        "target_parameters": sorted(f"{m.module}.{m.parameter}" for m in modules if m.parameter is not None) or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }


def lora_card(plan: BakePlan, modules: list[LoraModule], versions: dict[str, str]) -> str:
    s = plan_summary(plan)
    name = plan.config.name or plan.source.name
    lines = [
        f"# {name} — intervene LoRA adapter",
        "",
        f"A PEFT LoRA adapter for `{plan.source}` ({s['architecture']}) that applies intervene's directional edit "
        f"(intervene {versions.get('intervene', '?')}): {len(modules)} modules, rank "
        f"{max((m.rank for m in modules), default=0)} at most (one per projection), float32.",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, THIS_DIR)   # edited; model.disable_adapter() for the original",
        "```",
        "",
        f"| layers | {', '.join(map(str, s['layers']))} |",
        "|---|---|",
        f"| targets | {', '.join(s['targets'])} |",
        f"| scale | {', '.join(f'{x:g}' for x in s['scales'])} |",
        f"| measurements | `{s['measurements']}` (sha256 {s['measurements_sha256']}) |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))} |",
        "",
        "Check it against the live edit with `intervene verify CONFIG THIS_DIR`.",
        "",
        "## Config",
        "",
        "```yaml",
        plan.config.to_yaml().rstrip(),
        "```",
        "",
    ]
    return with_source_card(plan.source, "\n".join(lines), "peft", relation="adapter")


def bake_lora(config: InterventionConfig | str | os.PathLike, output: str | os.PathLike | None = None,
              overwrite: bool = False, dry_run: bool = False, *, model: str | os.PathLike | None = None,
              measurements: Any = None) -> LoraResult:
    """Write ``config`` as a PEFT LoRA adapter directory at ``output`` (``adapter_config.json``,
    ``adapter_model.safetensors``, a model card, the source's licence files). Every refusal happens
    before anything is written; the directory appears complete or not at all."""
    cfg = config if isinstance(config, InterventionConfig) else load_config(config, model=model)
    source = resolve_source(model if model is not None else cfg.model)
    plan = plan_bake(cfg, source, measurements_for(measurements, cfg.measurements, cfg.source))
    module_of = check_lora(plan)
    out = output if output is not None else cfg.output
    if dry_run:
        if out is not None:
            check_output(source, Path(out), overwrite)
        shapes = {module_of[k]: len(ops) for k, ops in plan.edits.items()}
        return LoraResult(plan, None, sorted(shapes), shapes, dry_run=True)
    if out is None:
        raise InputError("no output directory: pass --output DIR or set 'output' in the config")
    output = Path(os.path.abspath(out))
    start = time.perf_counter()
    modules = build_modules(plan, module_of)
    tmp = make_temporary(plan.source, output, overwrite)
    try:
        vers = versions()
        tensors: dict[str, torch.Tensor] = {}
        for m in modules:
            tensors[f"base_model.model.{m.module}.lora_A.weight"] = m.lora_a
            tensors[f"base_model.model.{m.module}.lora_B.weight"] = m.lora_b
        meta = {"format": "pt", "intervene": json.dumps({"edit": plan_summary(plan), "config": cfg.to_dict(),
                                                         "versions": vers}, sort_keys=True, default=str)}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(plan, modules), indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(lora_card(plan, modules, vers))
        _copy_licences(plan.source, tmp)
        mark_complete(tmp)
        publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ranks = {m.module: m.rank for m in modules}
    return LoraResult(plan, output, sorted(ranks), ranks, seconds=time.perf_counter() - start)


def _copy_licences(source: Path, directory: Path) -> None:
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir() or any(p.startswith(".") for p in rel.parts):
            continue
        if any(p.lower().startswith(LICENCE_PREFIXES) or p.lower() == "licenses" for p in rel.parts):
            dest = directory / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def write_adapter(config: InterventionConfig, output: Path, model: str, measurements: Any = None) -> LoraResult:
    """The :data:`intervene.live.server.AdapterWriter` for a served config or search trial: ``config``'s exact
    adapter at ``output`` (a new directory), the weights read from ``model``'s checkpoint."""
    return bake_lora(config, output, model=model, measurements=measurements)
