"""``verify``: the baked checkpoint's logits equal the original model's logits under the live
intervention (``intervene.apply``) of the same config -- projections and ``router_bias`` alike (a
baked selection bias is compared with the live swap of the router's bias tensor).

Both models are loaded in the same dtype and run on the same left-padded batches; every
non-padding position's logits are compared. Reported: max |Δlogit| (baked − live), the size
of the intervention itself (max |live − original|, so a tolerance can be judged against it),
the logit scale, and the tolerance used.

Default tolerance (absolute, on logits; measured on SmolLM2-135M, 18 layers edited, logit scale 39):
  computed in float32, checkpoint stored in float32:
                   1e-4 · max(1, max|logit| / 10). Weight edit and activation hook are equal in
                   exact arithmetic; float32 reordering left 2e-7 on tiny models and 8.6e-5 on
                   SmolLM2, while an edit on the wrong axis or a missed tensor shows up at 1e-2+.
  computed in float32, checkpoint stored in bfloat16/float16:
                   2 · eps(stored) · max(1, max|logit|): the baked weights carry one rounding of
                   the edit that the live hook does not (SmolLM2 bf16: 0.15; tolerance 0.6).
  computed in bfloat16/float16:
                   8 · eps(dtype) · max(1, max|logit|) (eps = 2^-7 for bf16, 2^-10 for fp16): the
                   hook rounds activations, the bake rounds weights. On SmolLM2 in bf16 the model
                   itself differs from its float32 run by 1.26 and baked vs live by 1.1-1.3
                   (tolerance 2.4): reduced-precision verification only catches gross errors, so
                   the default (and recommended) verify dtype is float32.
"""

from __future__ import annotations

import gc
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm import tqdm

from ..config import load_config
from ..config.schema import InterventionConfig
from ..errors import InputError
from ..hooks.apply import apply
from ..io.checkpoint import editable_dtype, open_checkpoint
from ..io.files import write_json
from ..io.measurements import Measurements, measurements_for
from ..io.models import PromptFormat, load_model, parse_dtype, versions
from ..io.sources import resolve_model
from .compare import comparison_batches, logits_of, max_abs, max_abs_diff


@dataclass
class VerifyResult:
    max_abs_diff: float  # max |baked - live| over compared logits
    tolerance: float
    tolerance_rule: str
    passed: bool
    effect: float  # max |live - original|: how much the intervention moves the logits
    logit_scale: float  # max |live logit|
    dtype: str
    inputs: str
    n_sequences: int
    n_positions: int
    original: str
    baked: str
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        ratio = self.max_abs_diff / self.effect if self.effect > 0 else float("nan")
        return (f"{verdict}: max |baked - live| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}, {self.tolerance_rule}); "
                f"intervention effect max |live - original| = {self.effect:.3g} (diff/effect {ratio:.2g}); "
                f"max |logit| {self.logit_scale:.3g}; {self.dtype}; {self.n_sequences} sequences, "
                f"{self.n_positions} positions ({self.inputs})")


def default_tolerance(dtype: torch.dtype, logit_scale: float,
                      stored: torch.dtype | None = None) -> tuple[float, str]:
    """The tolerance for computing in ``dtype`` at a given max |logit|, for a checkpoint whose
    weights are ``stored`` in that dtype (see the module docstring). Returns (value, rule)."""
    def name(d: torch.dtype) -> str:
        return str(d).replace("torch.", "")

    if dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        return 8 * eps * max(1.0, logit_scale), f"8·eps({name(dtype)})·max(1, max|logit|)"
    if stored in (torch.bfloat16, torch.float16):
        eps = torch.finfo(stored).eps
        return 2 * eps * max(1.0, logit_scale), f"2·eps({name(stored)} weights)·max(1, max|logit|)"
    if dtype == torch.float64:
        return 1e-8 * max(1.0, logit_scale / 10), "1e-8·max(1, max|logit|/10)"
    return 1e-4 * max(1.0, logit_scale / 10), "1e-4·max(1, max|logit|/10)"


def stored_dtype(checkpoint: str | os.PathLike) -> torch.dtype | None:
    """The lowest-precision float dtype among the checkpoint's tensors (headers only)."""
    dtypes = {editable_dtype(t.dtype) for h in open_checkpoint(checkpoint).shards for t in h.tensors}
    for candidate in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        if candidate in dtypes:
            return candidate
    return None


def verify(config: InterventionConfig | str | os.PathLike, baked: str | os.PathLike, *,
           model: str | os.PathLike | None = None, measurements: Measurements | str | os.PathLike | None = None,
           prompts: Sequence[str] | str | None = None, random_tokens: int | None = None,
           tolerance: float | None = None, dtype: str | torch.dtype | None = "float32",
           device_map: str | dict | None = None, batch_size: int = 8, system_prompt: str | None = None,
           chat_template: bool | None = None, sequential: bool = False, limit: int | None = None,
           progress: bool = True) -> VerifyResult:
    """Compare the baked checkpoint with the live-hooked original on prompts (or random token ids).

    ``prompts``: a prompt-set spec (``intervene.io.prompts.load_prompts``) or a list of strings;
    default: the first ``limit`` (8) prompts of the built-in harmful and harmless eval sets.
    ``random_tokens=N``: N random sequences of 16 token ids instead (for models without a
    tokenizer). ``sequential``: load the two models one after the other (the original's logits
    are kept on the CPU meanwhile) instead of side by side.
    """
    cfg = config if isinstance(config, InterventionConfig) else load_config(config, model=model)
    original_spec = str(model if model is not None else (cfg.model or ""))
    if not original_spec:
        raise InputError("no original model: set 'model' in the config or pass --model")
    baked = Path(baked)
    adapter = (baked / "adapter_config.json").is_file()  # a `bake --lora` output: PEFT on the original
    if not adapter and not (baked / "config.json").exists():
        raise InputError(f"baked checkpoint {baked} has no config.json (nor adapter_config.json)")

    def load_baked() -> Any:
        if not adapter:
            return load_model(baked, torch_dtype, device_map, tokenizer="none")[0]
        try:
            from peft import PeftModel
        except ImportError:
            raise InputError(f"{baked} is a LoRA adapter; verifying it needs PEFT: pip install 'intervene[lora]'") from None
        base_model, _ = load_model(original_spec, torch_dtype, device_map, tokenizer="none")
        return PeftModel.from_pretrained(base_model, str(baked)).eval()
    meas = measurements_for(measurements, cfg.measurements, cfg.source)
    torch_dtype = parse_dtype(dtype or cfg.dtype)
    if torch_dtype == "auto":
        raise InputError("verify needs an explicit dtype (float32, bfloat16 or float16), not 'auto'")
    use_template = cfg.chat_template if chat_template is None else chat_template

    # tiny test checkpoints have no tokenizer: verify then runs on random token ids
    model_a, tokenizer = load_model(original_spec, torch_dtype, device_map, tokenizer="optional")
    inputs, description = comparison_batches(model_a, tokenizer, prompts, random_tokens, limit,
                                             PromptFormat(system_prompt or cfg.system_prompt, use_template), batch_size)
    base: list[torch.Tensor] = []
    live: list[torch.Tensor] = []
    for batch in _bar(inputs, "original", progress):
        base.append(logits_of(model_a, batch))
    model_b = None
    diff = effect = scale = 0.0
    positions = 0
    with apply(model_a, cfg, meas):
        if not sequential:
            model_b = load_baked()
        for i, batch in enumerate(_bar(inputs, "live vs baked" if model_b is not None else "live", progress)):
            lv = logits_of(model_a, batch)
            effect = max(effect, max_abs_diff(lv, base[i], batch))
            scale = max(scale, max_abs(lv, batch))
            if model_b is not None:
                diff = max(diff, max_abs_diff(logits_of(model_b, batch), lv, batch))
            else:
                live.append(lv)
            positions += int(batch["attention_mask"].sum())
    if model_b is None:
        del model_a
        _free_memory()
        model_b = load_baked()
        for i, batch in enumerate(_bar(inputs, "baked", progress)):
            diff = max(diff, max_abs_diff(logits_of(model_b, batch), live[i], batch))
    rule = "given"
    if tolerance is None:
        tolerance, rule = default_tolerance(torch_dtype, scale, stored_dtype(resolve_model(original_spec).path if adapter else baked))
    elif not (tolerance > 0 and math.isfinite(tolerance)):
        raise InputError(f"--tolerance must be a finite number > 0, got {tolerance}")
    return VerifyResult(
        max_abs_diff=diff, tolerance=float(tolerance), tolerance_rule=rule, passed=bool(diff <= tolerance),
        effect=effect, logit_scale=scale, dtype=str(torch_dtype).replace("torch.", ""), inputs=description,
        n_sequences=sum(int(b["input_ids"].shape[0]) for b in inputs), n_positions=positions,
        original=original_spec, baked=str(baked), config=cfg.to_dict(), versions=versions(),
    )


def save_result(result: VerifyResult, path: str | os.PathLike) -> None:
    write_json(path, result.to_dict())


# ---- helpers -------------------------------------------------------------------------------

def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bar(items: list[Any], desc: str, enabled: bool) -> Iterator[Any]:
    return iter(tqdm(items, desc=desc, unit="batch", file=sys.stderr, disable=not enabled, leave=False))
