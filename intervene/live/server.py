"""Generation on a serving engine (vLLM, or any OpenAI-compatible server): :class:`ServerBackend` implements
:class:`~intervene.live.generate.GenerationBackend` by rendering each prompt with the model's chat template
here, in process (the same token ids as :class:`~intervene.live.generate.TransformersBackend` feeds its model),
and sending the ids to ``/v1/completions``, greedy (``temperature`` 0). Log-probabilities over the whole
vocabulary (first-token KL, the refusal score, teacher-forced answers) come from the server only where it
returns the whole distribution; otherwise from ``logprob_backend`` (in process), and ``kl_source`` says which.
:class:`ServerClient` is the HTTP (stdlib only): every failure -- unreachable, unknown model, context too
long, timeout, a reply that is not JSON -- is one :class:`~intervene.errors.InputError` line naming the URL.
:func:`served_adapter` loads a LoRA adapter directory through vLLM's runtime API for the duration of a block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch

from ..config.schema import InterventionConfig
from ..errors import ConfigError, InputError
from ..runner import RunOptions
from .evaluate import EvalReport, Intervention, evaluate
from .generate import GenerationBackend, PromptFormat, TransformersBackend, decode_answers

KLSource = Literal["server", "in_process"]
DEFAULT_TIMEOUT = 600.0  # seconds for one request (a batch of greedy answers on a CPU server takes minutes)
ADAPTER_PREFIX = "intervene-"
# (config, output directory, model spec, measurements) -> writes the exact rank-1 adapter there
# (intervene.bake.lora.bake_lora's writer; passed in, since live/ does not import bake/)
AdapterWriter = Callable[[InterventionConfig, Path, str, Any], Any]


@dataclass(frozen=True)
class ServerOptions:
    """Where generation runs: the server's base ``url`` (e.g. ``http://127.0.0.1:8000``), the served model's
    name (None: the first of ``/v1/models``), the request ``timeout`` (seconds)."""

    url: str
    model: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    write_adapter: AdapterWriter | None = field(default=None, repr=False, compare=False)
    adapter_dir: str | None = None  # where adapters are written for the server to read (None: the temp dir)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model}


@dataclass
class ServerClient:
    """JSON over HTTP to one server; every failure is a one-line :class:`InputError` naming the URL."""

    url: str
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"--server {self.url}: not an http:// or https:// URL")

    def request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """GET ``path`` (``body`` None) or POST ``body`` as JSON; the reply parsed (plain text kept as str)."""
        where = f"{self.url}{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(where, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as reply:
                raw = reply.read().decode("utf-8", errors="replace")
                kind = reply.headers.get_content_type()
        except urllib.error.HTTPError as e:
            raise InputError(f"server {where}: HTTP {e.code}: {_error_text(e)}") from None
        except (socket.timeout, TimeoutError):
            raise InputError(f"server {where}: no answer within {self.timeout:g} s (timeout)") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise InputError(f"server {where}: no answer within {self.timeout:g} s (timeout)") from None
            raise InputError(f"server {where}: unreachable ({reason}); is the server running?") from None
        except (ConnectionError, OSError) as e:
            raise InputError(f"server {where}: connection failed ({e})") from None
        if kind != "application/json":
            return raw  # vLLM answers the adapter API in plain text
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise InputError(f"server {where}: the reply is not JSON ({_clip(raw)})") from None

    def json(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`request` that must answer a JSON object."""
        out = self.request(path, body)
        if not isinstance(out, dict):
            raise InputError(f"server {self.url}{path}: the reply is not JSON ({_clip(str(out))})")
        return out

    def models(self) -> list[str]:
        """The served model ids (``/v1/models``)."""
        data = self.json("/v1/models").get("data")
        if not isinstance(data, list):
            raise InputError(f"server {self.url}/v1/models: no 'data' list in the reply")
        return [str(m.get("id")) for m in data if isinstance(m, dict)]

    def model_name(self, name: str | None) -> str:
        """``name`` checked against ``/v1/models``, or the first served model when None."""
        served = self.models()
        if name is None:
            if not served:
                raise InputError(f"server {self.url}: serves no model (/v1/models is empty)")
            return served[0]
        if name not in served:
            raise InputError(f"server {self.url}: model '{name}' unknown; it serves: {', '.join(served) or 'none'} "
                             "(--server-model)")
        return name


def _error_text(e: urllib.error.HTTPError) -> str:
    raw = e.read().decode("utf-8", errors="replace")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        return _clip(raw) or str(e.reason)
    message = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(message, dict):
        message = message.get("message", message)
    if isinstance(body, dict) and "detail" in body:  # FastAPI's own errors
        message = body["detail"]
    return _clip(str(message))


def _clip(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


@dataclass
class ServerBackend:
    """:class:`~intervene.live.generate.GenerationBackend` on a server: greedy answers from ``/v1/completions``
    for ``model_name`` (a served model or a loaded adapter's name), prompts rendered here with ``prompt_format``
    and sent as token ids, ``batch_size`` prompts a request. Log-probability methods go to ``logprob_backend``
    (in process) unless the server returns the whole vocabulary (``full_logprobs``: the server was started with
    ``--max-logprobs`` at least the vocabulary size, ``vocab_size`` wide); ``kl_source`` says where they came from."""

    url: str
    model_name: str
    tokenizer: Any
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    logprob_backend: GenerationBackend | None = None
    batch_size: int = 16
    timeout: float = DEFAULT_TIMEOUT
    full_logprobs: bool = False
    vocab_size: int | None = None  # the model's (its logits' width); None: the tokenizer's length

    def __post_init__(self) -> None:
        self.client = ServerClient(self.url, self.timeout)

    @property
    def kl_source(self) -> KLSource:
        return "server" if self.full_logprobs else "in_process"

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """The rendered prompts' token ids, as the in-process backend feeds them (no special tokens added)."""
        texts = self.prompt_format.render(self.tokenizer, prompts)
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def completions(self, prompts: Sequence[str], max_tokens: int, logprobs: int | None = None) -> list[dict[str, Any]]:
        """One choice per prompt, in order (greedy)."""
        choices: list[dict[str, Any]] = []
        ids = self.prompt_ids(prompts)
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            body: dict[str, Any] = {"model": self.model_name, "prompt": chunk, "max_tokens": max_tokens,
                                    "temperature": 0.0, "top_p": 1.0, "n": 1, "stream": False,
                                    "skip_special_tokens": False, "return_token_ids": True}
            if logprobs is not None:  # keyed "token_id:N" (two tokens may decode to one text)
                body |= {"logprobs": logprobs, "return_tokens_as_token_ids": True}
            reply = self.client.json("/v1/completions", body)
            got = reply.get("choices")
            if not isinstance(got, list) or len(got) != len(chunk):
                raise InputError(f"server {self.client.url}/v1/completions: expected {len(chunk)} choices, got "
                                 f"{len(got) if isinstance(got, list) else 'none'}")
            choices += sorted(got, key=lambda c: int(c.get("index", 0)))
        return choices

    def probe_full_logprobs(self) -> bool:
        """Whether the server returns the whole next-token distribution (``logprobs`` = the vocabulary size; vLLM
        refuses more than its ``--max-logprobs``, 20 by default, with HTTP 400); sets :attr:`full_logprobs`."""
        vocab = self.vocab_size or len(self.tokenizer)
        first = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        body = {"model": self.model_name, "prompt": [[int(first)]], "max_tokens": 1, "temperature": 0.0,
                "logprobs": vocab, "return_tokens_as_token_ids": True}
        try:
            reply = self.client.json("/v1/completions", body)
        except InputError as e:
            if "HTTP 400" not in str(e):
                raise
            self.full_logprobs = False
            return False
        choice = (reply.get("choices") or [{}])[0]
        top = ((choice.get("logprobs") or {}).get("top_logprobs") or [{}])[0]
        self.full_logprobs = len(top) >= vocab
        return self.full_logprobs

    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int, desc: str = "generating") -> list[list[int]]:
        out = []
        stops = _stop_ids(self.tokenizer)
        for choice in self.completions(prompts, max_new_tokens):
            ids = choice.get("token_ids")
            if ids is None:  # a server without vLLM's token-id extension: the text, re-tokenised
                ids = self.tokenizer(choice.get("text", ""), add_special_tokens=False)["input_ids"]
            ids = [int(i) for i in ids]
            if choice.get("finish_reason") == "stop" and choice.get("stop_reason") is None and stops and \
                    (not ids or ids[-1] not in stops):
                ids.append(min(stops))  # stopped at the end token without listing it: as generate keeps it
            cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
            out.append(ids[:cut])
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int, desc: str = "generating") -> list[str]:
        return decode_answers(self.tokenizer, self.generate_ids(prompts, max_new_tokens, desc))

    def _in_process(self, what: str) -> GenerationBackend:
        if self.logprob_backend is None:
            raise InputError(f"server {self.client.url}: {what} needs the whole next-token distribution, which this "
                             "server does not return (start it with --max-logprobs at least the vocabulary size), and "
                             "no in-process model was given")
        return self.logprob_backend

    def first_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        if not self.full_logprobs:
            return self._in_process("first-token KL").first_token_logprobs(prompts)
        vocab = self.vocab_size or len(self.tokenizer)
        rows = torch.full((len(prompts), vocab), float("-inf"))
        for row, choice in enumerate(self.completions(prompts, 1, logprobs=vocab)):
            top = ((choice.get("logprobs") or {}).get("top_logprobs") or [{}])[0]
            for token, lp in top.items():
                rows[row, _token_id(self.tokenizer, token)] = float(lp)
        return torch.log_softmax(rows, dim=-1)  # the server's top-V renormalised (it is the whole vocabulary)

    def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        return self._in_process("teacher-forced answer KL").answer_logprobs(prompts, answers)

    def token_logprobs(self, token_ids: Sequence[int]) -> torch.Tensor:
        return self._in_process("perplexity").token_logprobs(token_ids)


def _token_id(tokenizer: Any, token: str) -> int:
    """A token of vLLM's ``return_tokens_as_token_ids`` form (``token_id:123``), or its text."""
    if token.startswith("token_id:"):
        return int(token.split(":", 1)[1])
    return int(tokenizer.convert_tokens_to_ids(token))


def _stop_ids(tokenizer: Any) -> set[int]:
    eos = tokenizer.eos_token_id
    return {int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])}


@contextlib.contextmanager
def served_adapter(client: ServerClient, directory: str | Path, name: str) -> Iterator[str]:
    """The LoRA adapter in ``directory`` loaded on the server as ``name`` (vLLM's runtime API: the server runs with
    ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``) for the block, unloaded after it."""
    try:
        client.request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(directory).resolve())})
    except InputError as e:
        raise InputError(f"{e} (loading adapter '{name}': is the server started with --enable-lora and "
                         "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, and --max-lora-rank at least the adapter's rank?)") from None
    try:
        yield name
    except BaseException:
        with contextlib.suppress(InputError):  # the first error is the one to report
            client.request("/v1/unload_lora_adapter", {"lora_name": name})
        raise
    client.request("/v1/unload_lora_adapter", {"lora_name": name})


def check_servable(config: InterventionConfig) -> None:
    """What a LoRA adapter cannot express, refused by name before anything is written (the adapter writer refuses
    the rest: bias edits, modules that are not Linear)."""
    where = config.source or "config"
    if config.method != "project":
        raise ConfigError(f"{where}: --server runs a config as a LoRA adapter, and method '{config.method}' is not low "
                          "rank (every weight column is rescaled); use method 'project' or run it in process")
    if config.router_bias:
        raise ConfigError(f"{where}: --server runs a config as a LoRA adapter, which cannot carry 'router_bias' (a "
                          "router's selection bias, not a weight); drop it or run it in process")


@contextlib.contextmanager
def served_config(options: ServerOptions, config: InterventionConfig, model_spec: str,
                  measurements: Any = None) -> Iterator[str]:
    """``config`` written as its exact rank-1 LoRA adapter (``options.write_adapter``) into a temporary directory,
    loaded on the server for the block (its name yielded), unloaded and deleted after."""
    check_servable(config)
    if options.write_adapter is None:
        raise InputError(f"server {options.url}: a config runs there as a LoRA adapter, and no adapter writer was "
                         "given (ServerOptions(write_adapter=intervene.bake.lora.write_adapter))")
    where = Path(tempfile.mkdtemp(prefix=ADAPTER_PREFIX, dir=options.adapter_dir))
    try:
        directory = where / "adapter"
        options.write_adapter(config, directory, model_spec, measurements)
        written = json.loads((directory / "adapter_config.json").read_text())
        if written.get("target_parameters"):
            raise ConfigError(
                f"{config.source or 'config'}: --server cannot serve edits of fused expert tensors "
                f"({written['target_parameters'][0]}, ...): intervene writes them as PEFT target_parameters, which "
                "vLLM's LoRA loader does not read; drop the expert targets or run the config in process")
        digest = hashlib.sha256((directory / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
        with served_adapter(ServerClient(options.url, options.timeout), directory, ADAPTER_PREFIX + digest) as name:
            yield name
    finally:
        shutil.rmtree(where, ignore_errors=True)


def served_evaluate(server: ServerOptions, model: Any, tokenizer: Any, model_spec: str, harmful: Sequence[str],
                    harmless: Sequence[str], *, config: InterventionConfig | None = None, measurements: Any = None,
                    intervention: Intervention | None = None, served_model: str | None = None,
                    max_new_tokens: int = 48, batch_size: int = 16, n_samples: int = 4,
                    prompt_format: PromptFormat | None = None, judge: Any = None, full_answer_kl: bool = True,
                    progress: bool = True) -> EvalReport:
    """:func:`~intervene.live.evaluate.evaluate` with the greedy answers from ``server``: the base model as served
    (``served_model``, else ``server.model``, else the first served), and ``config`` as its exact LoRA adapter;
    the log-probs from ``model`` here (``intervention``: the same config live) unless the server returns them all.
    ``model_spec``: the checkpoint the adapter's weights are read from (the one the server serves)."""
    fmt = prompt_format or PromptFormat()
    name = served_model or ServerClient(server.url, server.timeout).model_name(server.model)

    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int(embeddings.weight.shape[0]) if embeddings is not None else len(tokenizer)
    full = None

    def backend(served: str, context: Intervention | None) -> ServerBackend:
        in_process = TransformersBackend(model, tokenizer, fmt, batch_size, progress, context,
                                         answer_batch_size=min(batch_size, 8))
        return ServerBackend(server.url, served, tokenizer, fmt, in_process, batch_size, server.timeout,
                             full_logprobs=bool(full), vocab_size=vocab)

    full = backend(name, None).probe_full_logprobs()  # the whole distribution from the server, or in process
    base = backend(name, None)
    with served_config(server, config, model_spec, measurements) if config is not None \
            else contextlib.nullcontext(None) as adapter:
        new = backend(adapter, intervention) if adapter is not None else base
        return evaluate(None, tokenizer, harmful, harmless, max_new_tokens=max_new_tokens, n_samples=n_samples,
                        prompt_format=fmt, run=RunOptions(batch_size=batch_size, progress=progress),
                        config=config.to_dict() if config is not None else None, judge=judge,
                        full_answer_kl=full_answer_kl, backends=(base, new),
                        server=server.to_dict() | {"model": name, "adapter": adapter})


__all__ = ["KLSource", "AdapterWriter", "ServerOptions", "ServerClient", "ServerBackend", "served_adapter",
           "check_servable", "served_config", "served_evaluate", "DEFAULT_TIMEOUT", "ADAPTER_PREFIX"]
