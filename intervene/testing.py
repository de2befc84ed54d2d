"""Tiny randomly initialised models for every supported architecture (seconds, exact).

Random init leaves some tensors all-zero (routers, e_score_correction_bias, biases); those
are filled with noise so that every edit is visible in the logits. Sizes are chosen so that
H, I and 2I differ (an edit on the wrong axis fails loudly); ``hidden_equals_intermediate=True``
builds the gpt-oss case H == I where only the architecture table can tell the axes apart.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from unittest import mock

import torch

from . import bake
from .cli import main
from .io import measurements
from .io.measurements import Measurements
from .io.models import load_model
from .io.prompts import load_prompts
from .live.tryout import prepare, try_config
from .measure import collect
from .measure.collect import measure
from .runner import RunOptions

if TYPE_CHECKING:
    from .io.measurements import Measurements

COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)

# (config class, model class, extra kwargs) by architecture name (see intervene.arch)
TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=96, num_hidden_layers=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(intermediate_size=96, num_hidden_layers=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=96, num_hidden_layers=2, head_dim=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, intermediate_size=96, num_hidden_layers=2, sliding_window=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(intermediate_size=96, num_hidden_layers=2, head_dim=16, sliding_window=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(intermediate_size=96, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, intermediate_size=96, num_hidden_layers=2, sliding_window=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                       mlp_only_layers=[])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2, num_experts=8,
                       num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], head_dim=16,
                       norm_topk_prob=True)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(intermediate_size=96, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                        mlp_only_layers=[], head_dim=16, layer_types=["linear_attention", "full_attention"],
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                        linear_value_head_dim=16)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_hidden_layers=2,
                         num_experts=8, num_experts_per_tok=2, head_dim=16,
                         layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                   eos_token_id=None, pad_token_id=None)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                         kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                         kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         n_group=2, topk_group=1)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(head_dim=16, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                      n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                      n_group=1, topk_group=1, attention_bias=True, use_qk_norm=False, partial_rotary_factor=0.5)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                     dict(head_dim=16, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                          num_experts=8, num_experts_per_tok=2, moe_num_shared_experts=1, moe_layer_start_index=1,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=16, intermediate_size=24, num_hidden_layers=2, num_local_experts=8,
                     num_experts_per_tok=2, sliding_window=8, max_position_embeddings=131072)),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(head_dim=16, intermediate_size=24, intermediate_size_mlp=96, num_hidden_layers=3,
                    num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                    attention_chunk_size=16)),
}
ARCH_NAMES = tuple(TINY)
DENSE_ARCH_NAMES = ("llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "gemma2")
MOE_ARCH_NAMES = tuple(n for n in TINY if n not in DENSE_ARCH_NAMES)


def tiny_config(arch: str, **overrides: Any) -> Any:
    import transformers

    if arch not in TINY:
        raise KeyError(f"no tiny config for '{arch}'; known: {', '.join(TINY)}")
    config_cls, _, extra = TINY[arch]
    kwargs = dict(COMMON)
    kwargs.update(extra)
    kwargs.update(overrides)
    if arch == "llama4":
        kwargs.setdefault("max_position_embeddings", 128)
    return getattr(transformers, config_cls)(**kwargs)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               hidden_equals_intermediate: bool = False, **overrides: Any) -> Any:
    """A randomly initialised tiny model in eval mode, with no all-zero parameters or buffers."""
    import transformers

    if hidden_equals_intermediate:
        overrides.setdefault("intermediate_size", COMMON["hidden_size"])
        if "moe_intermediate_size" in TINY[arch][2]:
            overrides.setdefault("moe_intermediate_size", COMMON["hidden_size"])
    config = tiny_config(arch, **overrides)
    _, model_cls, _ = TINY[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    fill_zeros_with_noise(model, seed)
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def fill_zeros_with_noise(model: torch.nn.Module, seed: int = 0) -> None:
    """Routers, biases and e_score_correction_bias start at zero; give them small noise."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() == 0 or "inv_freq" in name:
                continue
            if bool((t == 0).all()):
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * 0.2)
            elif "norm" in name and bool((t == t.flatten()[0]).all()):
                # constant norm weights (ones/zeros): perturb so per-channel scaling matters
                t.add_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * 0.1)


def save_tiny(model: Any, path: str | os.PathLike, max_shard_size: str = "200KB",
              save_original_format: bool = True) -> Path:
    """Save as a sharded checkpoint (per-expert on disk by default; fused with
    ``save_original_format=False``)."""
    path = Path(path)
    model.save_pretrained(str(path), max_shard_size=max_shard_size, save_original_format=save_original_format)
    return path


def save_reference_refuse(model: Any, path: str | os.PathLike, seed: int = 7) -> Path:
    """A ``.refuse`` measurements file in the reference tool's format for ``model``'s sizes: hidden states
    0..L, ``harmful_i`` (random, shifted by 0.5), ``harmless_i`` (random), ``refuse_i = harmful_i - harmless_i``."""
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    data: dict[str, Any] = {"layers": layers}
    for i in range(layers + 1):
        data[f"harmful_{i}"] = torch.randn(hidden, generator=g) + 0.5
        data[f"harmless_{i}"] = torch.randn(hidden, generator=g)
        data[f"refuse_{i}"] = data[f"harmful_{i}"] - data[f"harmless_{i}"]
    torch.save(data, path)
    return Path(path)


def random_ids(batch: int = 3, seq: int = 9, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def make_measurements(num_layers: int, hidden: int = 64, seed: int = 1, path: str | None = None,
                      harmless_first: bool = False) -> Measurements:
    """Measurements of random means: per layer ``harmful_mean`` and ``harmless_mean`` drawn from
    ``randn(hidden)`` with one seeded generator, and ``direction`` = their difference.
    ``harmless_first`` draws each layer's harmless mean before its harmful one."""
    gen = torch.Generator().manual_seed(seed)
    order = ("harmless", "harmful") if harmless_first else ("harmful", "harmless")
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        for name in order:
            tensors[f"{name}_mean.{layer}"] = torch.randn(hidden, generator=gen)
        tensors[f"direction.{layer}"] = tensors[f"harmful_mean.{layer}"] - tensors[f"harmless_mean.{layer}"]
    return Measurements(tensors=tensors, path=path)



@contextmanager
def edited_weight(weight: torch.nn.Parameter, edit: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """``edit(weight)`` in place (under no_grad) for the block's duration; the weight is restored on exit.
    A cheap "intervened model" for tests that need a model which differs from its baseline."""
    saved = weight.detach().clone()
    with torch.no_grad():
        edit(weight)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)

def tiny_tokenizer() -> Any:
    """A character-level fast tokenizer (101 ids, fits the tiny models' vocab of 128) with a
    ChatML-like chat template, left padding and a pad token: prompt-level tests in milliseconds,
    without any download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + ["<unk>"] + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.padding_side = "left"
    return tok


class Gate:
    """A hook that stops a run at a named point until a signal ends it: on its ``nth`` call (or, given
    ``key``, on the first call whose first argument equals it) it writes ``paused at NAME`` to the
    FIFO ``fifo`` and blocks in ``signal.pause()``. The interrupt tests wait for that line (a blocking
    read, :class:`GateWatch`) before they send their signal, so the signal lands at the named point
    however busy the machine is: nothing is timed. Picklable, so bake workers get it too (each worker
    process counts its own calls)."""

    def __init__(self, name: str, fifo: str, nth: int = 1, key: str | None = None) -> None:
        self.name, self.fifo, self.nth, self.key = name, fifo, nth, key
        self.calls = 0

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        hit = (bool(args) and args[0] == self.key) if self.key is not None else self.calls == self.nth
        if not hit:
            return
        fd = os.open(self.fifo, os.O_WRONLY)  # does not block: the watching test holds the read end
        try:
            os.write(fd, f"paused at {self.name}\n".encode())
        finally:
            os.close(fd)
        while True:  # until a signal's handler raises (SIGINT) or the signal ends the process
            signal.pause()


GATE_POINTS = ("tensor", "batch", "save")


def main_with_gates(argv: list[str], fifo: str, **gates: int | str) -> int:
    """``intervene.cli.main(argv)`` with :class:`Gate` hooks injected for the duration, at the points
    named by the keywords (the value: the ``nth`` call, or a tensor key): ``tensor`` -- after a tensor a
    bake writes (``bake(on_tensor=...)``, in worker processes too); ``batch`` -- after a batch
    ``measure`` runs (``on_batch``); ``save`` -- between writing a measurements file and renaming it
    into place (``save_measurements(before_publish=...)``). Run it in a subprocess: :func:`gated_cli`."""
    # Ctrl-C must raise here however the test runner was started: a shell starts background jobs
    # with SIGINT ignored, and Python then installs no handler of its own (the gate would never end)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    unknown = set(gates) - set(GATE_POINTS)
    if unknown:
        raise ValueError(f"unknown gate point(s) {sorted(unknown)}; known: {GATE_POINTS}")

    def gate(point: str) -> Gate:
        at = gates[point]
        return Gate(point, fifo, key=at) if isinstance(at, str) else Gate(point, fifo, nth=at)

    with ExitStack() as stack:
        if "tensor" in gates:
            stack.enter_context(mock.patch.object(bake, "bake", functools.partial(bake.bake, on_tensor=gate("tensor"))))
        if "batch" in gates:
            stack.enter_context(mock.patch.object(collect, "measure",
                                                  functools.partial(collect.measure, on_batch=gate("batch"))))
        if "save" in gates:
            stack.enter_context(mock.patch.object(measurements, "save_measurements", functools.partial(
                measurements.save_measurements, before_publish=gate("save"))))
        return main(argv)


def gated_cli(argv: list[Any], fifo: str | os.PathLike, **gates: int | str) -> list[str]:
    """The command line of a Python process running :func:`main_with_gates` on ``argv`` (``gates`` are
    its keyword arguments), in place of ``python -m intervene ARGV``."""
    code = ("import sys; from intervene.testing import main_with_gates; "
            f"sys.exit(main_with_gates(sys.argv[1:], {str(fifo)!r}, **{gates!r}))")
    return [sys.executable, "-c", code, *map(str, argv)]


class GateWatch:
    """The test's side of :class:`Gate`: a FIFO in a private directory (``.fifo`` goes to
    :func:`gated_cli`), held open for reading and writing so that a read waits for a gate's line
    rather than seeing end-of-file. :meth:`wait` blocks until a process reports ``paused at NAME``,
    or fails as soon as the process ends without reaching it. Use as a context manager."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="intervene-gate-"))
        self.fifo = self.dir / "gate.fifo"
        os.mkfifo(self.fifo)
        self._read = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(self.fifo, os.O_WRONLY)  # a writer always exists: no end-of-file
        self._seen = b""

    def wait(self, proc: Any, name: str, describe: Callable[[], str] = lambda: "") -> None:
        """Block until ``paused at name`` arrives; ``proc`` (a ``subprocess.Popen``) ending first is a
        test failure that quotes ``describe()`` (e.g. the process's stderr)."""
        marker = f"paused at {name}\n".encode()
        pidfd = os.pidfd_open(proc.pid)
        try:
            while marker not in self._seen:
                ready, _, _ = select.select([self._read, pidfd], [], [])
                if self._read in ready:
                    self._seen += os.read(self._read, 4096)
                elif proc.poll() is not None:
                    raise AssertionError(f"the run ended (rc {proc.returncode}) before it paused at {name}: "
                                         f"{describe()}")
        finally:
            os.close(pidfd)
        self._seen = self._seen.replace(marker, b"", 1)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._keep)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "GateWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_for_exit(pids: set[int], guard: float = 600.0) -> set[int]:
    """Block until every process in ``pids`` has ended (pidfds: no polling); return those still alive
    when ``guard`` seconds pass -- a hang guard only, far beyond any expected wait."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue  # already gone (and reaped)
    try:
        pending = set(fds)
        end = time.monotonic() + guard
        while pending and time.monotonic() < end:
            ready, _, _ = select.select(list(pending), [], [], max(0.0, end - time.monotonic()))
            pending -= set(ready)
        return {fds[fd] for fd in pending}
    finally:
        for fd in fds:
            os.close(fd)


class _SayHook:
    """lm_head forward hook: logits one-hot on the next character of ``text`` (cycled), one per call."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.ids = [tokenizer.convert_tokens_to_ids(c) for c in text]
        self.step = 0

    def __call__(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(output, -1e4)
        forced[..., self.ids[self.step % len(self.ids)]] = 1e4
        self.step += 1
        return forced


def saying(model: Any, tokenizer: Any, text: str) -> Any:
    """Context manager: the (tiny, character-tokenised) model says ``text`` over and over, whatever it
    is asked -- one character per lm_head call (prefill and each decoding step), so a batch of N
    generated tokens starts the cycle afresh when ``len(text)`` divides N. Removed on exit."""
    @contextlib.contextmanager
    def installed() -> Any:
        handle = model.lm_head.register_forward_hook(_SayHook(tokenizer, text))
        try:
            yield
        finally:
            handle.remove()

    return installed()


# ---- shipped organism configs (the slow tests) ----------------------------------------------------

def stale_layers(config: Any, fresh: "Measurements", shipped: "Measurements", min_cos: float) -> dict[int, float]:
    """Layers (the two around each entry's fractional ``measurement``) whose shipped refusal direction has cos
    <= ``min_cos`` with the freshly measured one: ``{layer: cos}``, empty when the shipped file is current."""
    layers = sorted({f(float(e.measurement)) for e in config.ablate for f in (math.floor, math.ceil)})
    cos = {layer: torch.nn.functional.cosine_similarity(fresh.direction(layer), shipped.direction(layer), dim=0).item()
           for layer in layers}
    return {layer: c for layer, c in cos.items() if c <= min_cos}


def measured_on_train(model_dir: str | os.PathLike) -> tuple[Any, Any, "Measurements"]:
    """(model, tokenizer, measurements): the model loaded and measured afresh on the built-in TRAIN split,
    as the shipped organism configs' measurement files were."""
    model, tokenizer = load_model(str(model_dir))
    fresh = measure(model, tokenizer, load_prompts("builtin:harmful:train"), load_prompts("builtin:harmless:train"),
                    run=RunOptions(progress=False))
    return model, tokenizer, fresh


def score_on_eval(config: Any, model: Any, tokenizer: Any, measurements: "Measurements",
                  max_new_tokens: int = 48) -> Any:
    """``try`` the config on the built-in EVAL split with the given (loaded) model and measurements: the
    evaluate report (``.harmful``, ``.harmless``, ``.baseline``, ``.kl_divergence``, ``.completions``)."""
    prepared = prepare(config, measurements=measurements, model=model, tokenizer=tokenizer)
    return try_config(config, measurements=measurements, harmful="builtin:harmful:eval",
                      harmless="builtin:harmless:eval", max_new_tokens=max_new_tokens, progress=False,
                      prepared=prepared).evaluation
