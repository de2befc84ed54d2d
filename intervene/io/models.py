"""Loading models and tokenizers (after :mod:`intervene.io.sources` has said where they are and that
the architecture is supported), and turning prompts into chat-formatted, left-padded batches."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import safetensors
import torch
from safetensors import SafetensorError

from ..arch import arch_for_config
from ..errors import InputError
from ..version import __version__
from .checkpoint import INDEX_NAME, SINGLE_NAME, open_checkpoint
from .sources import ModelSource, load_model_config, resolve_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


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
    if src.gguf_file and not getattr(tok, "chat_template", None):
        # transformers' GGUF tokenizer loader drops the file's chat template; llama.cpp uses it
        tok.chat_template = gguf_chat_template(os.path.join(src.path, src.gguf_file))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def gguf_chat_template(path: str | os.PathLike) -> str | None:
    """The ``tokenizer.chat_template`` string a GGUF file carries, or None."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return gguf_field(reader, "tokenizer.chat_template") if "tokenizer.chat_template" in reader.fields else None


def gguf_field(reader: Any, key: str) -> Any:
    """One metadata value of an open ``gguf.GGUFReader``: a string decoded, else the scalar."""
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode("utf-8") if f.types and f.types[0].name == "STRING" else value[0]


TokenizerNeed = Literal["required", "optional", "none"]
Quantization = Literal["4bit", "8bit"]  # bitsandbytes on load: --load-in-4bit / --load-in-8bit


def quantization_config(quantization: Quantization, dtype: Any = torch.float32) -> Any:
    """The transformers ``BitsAndBytesConfig`` for ``--load-in-4bit`` (NF4, double quantization, compute
    in ``dtype``) or ``--load-in-8bit``; a named error when bitsandbytes is not installed or cannot
    load (the seeds' memory advice for measuring: quantize the model, not the measurements)."""
    flag = f"--load-in-{quantization}"
    if quantization not in ("4bit", "8bit"):
        raise InputError(f"unknown quantization '{quantization}'; valid: 4bit, 8bit")
    try:
        import bitsandbytes  # noqa: F401  (optional extra: pip install 'intervene[quant]')
    except Exception as e:  # ImportError, or a broken native library raising at import
        raise InputError(f"{flag} needs bitsandbytes, which cannot be imported here ({_first_line(e)}); "
                         "install it with pip install 'intervene[quant]', or load unquantized (--dtype bfloat16)") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float32 if dtype in (None, "auto") else dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def _probe_quantized(model: Any, quantization: Quantization, where: str) -> None:
    """One two-token forward: bitsandbytes kernels that cannot run here (no CUDA and a CPU backend that
    does not take this model's shapes, e.g. 4-bit in_features not a multiple of the block size) fail
    now, as one named error, not in the middle of a measurement."""
    try:
        with torch.no_grad():
            model(torch.zeros((1, 2), dtype=torch.long, device=model.device))
    except Exception as e:  # bitsandbytes raises RuntimeError, ValueError, NotImplementedError ...
        device = "CUDA" if torch.cuda.is_available() else "CPU only, no CUDA"
        raise InputError(f"--load-in-{quantization}: bitsandbytes cannot run {where} on this machine ({device}): "
                         f"{_first_line(e)}; load it unquantized (--dtype bfloat16) or use a CUDA GPU") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def load_model(spec: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
               device_map: str | dict | None = None, tokenizer: TokenizerNeed = "required",
               quantization: Quantization | None = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode. Checks the architecture is supported and the
    safetensors headers are sound first. ``dtype="auto"`` (the default) keeps the checkpoint's own
    dtype (a bf16 model is not doubled to float32; GGUF, dequantized on load, gives float32); the
    measurements, moments and KL are accumulated in float32/float64 whatever it is. ``tokenizer``:
    ``"optional"`` gives None where the checkpoint has none (tiny test checkpoints), ``"none"`` does
    not load one. ``quantization``: bitsandbytes 4-bit or 8-bit weights (:func:`quantization_config`)."""
    from transformers import AutoModelForCausalLM

    src = resolve_model(spec)
    config = load_model_config(spec)
    arch_for_config(config)  # named error for unsupported model types, before loading weights
    check_safetensors(src)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if src.gguf_file and kwargs["dtype"] == "auto":
        kwargs["dtype"] = torch.float32
    if quantization is not None:
        if src.gguf_file:
            raise InputError(f"--load-in-{quantization} quantizes safetensors weights; {src.display} is a GGUF file")
        kwargs["quantization_config"] = quantization_config(quantization, kwargs["dtype"])
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError, ImportError) as e:
        how = f" with --load-in-{quantization} (bitsandbytes)" if quantization else ""
        raise InputError(f"cannot load model from {src.display}{how}: {_first_line(e)}") from None
    model.eval()
    model.requires_grad_(False)
    if quantization is not None:
        _probe_quantized(model, quantization, src.display)
    if tokenizer == "none":
        return model, None
    try:
        return model, load_tokenizer(spec)
    except (OSError, ValueError, TypeError):
        if tokenizer == "optional":
            return model, None
        raise


def check_safetensors(src: ModelSource) -> None:
    """A local safetensors checkpoint's index and shard headers are consistent (headers only, no
    tensor data): a missing or truncated shard, a corrupt header, or an index naming an absent
    file or key is a CheckpointError naming it, not a safetensors traceback from the middle of
    loading. Other sources (GGUF, hub, .bin) are left to transformers."""
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


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt becomes model text: the chat template (with the generation prompt) and an
    optional system prompt, or the raw prompt text (``chat_template=False``)."""

    system_prompt: str | None = None
    chat_template: bool = True

    def render(self, tokenizer: Any, prompts: Sequence[str]) -> list[str]:
        return format_prompts(tokenizer, prompts, self.system_prompt, self.chat_template)


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

    out = {"intervene": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        out["safetensors"] = safetensors.__version__
    except Exception:  # pragma: no cover - safetensors is a hard dependency
        pass
    return out


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


__all__ = [
    "load_model", "load_tokenizer", "parse_dtype", "format_prompts", "PromptFormat", "encode", "batches", "versions",
    "model_device",
]
