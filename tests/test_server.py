"""Generation on a server (intervene.live.server). Fast tests: every failure of a server is one InputError line
naming the URL (against a small local http.server that answers errors, and a port nobody listens on), through the
library and the CLI (exit 2, no report written); the backend's answers and log-probs against a scripted reply;
what an adapter cannot carry is refused by name. The real server (vLLM on the organism) is in
tests/test_server_vllm.py (slow)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from intervene.cli import main
from intervene.config.schema import RouterBiasEntry, parse_config
from intervene.errors import ConfigError, InputError
from intervene.live.evaluate import evaluate
from intervene.live.generate import PromptFormat, TransformersBackend
from intervene.live.server import ServerBackend, ServerClient, ServerOptions, served_config
from intervene.runner import RunOptions
from intervene.search.study import SpaceOptions, search
from intervene.testing import make_measurements, save_tiny, tiny_model, tiny_tokenizer

MODEL = "served-model"
Reply = Callable[[str, dict[str, Any] | None], tuple[int, str, bytes]]  # (path, body) -> (status, type, bytes)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _answer(self, body: dict[str, Any] | None) -> None:
        status, kind, data = self.server.reply(self.path, body)  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(None)

    def do_POST(self) -> None:
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj).encode()


MODELS = _json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})


@pytest.fixture
def serve() -> Iterator[Callable[[Reply], str]]:
    """serve(reply) -> the URL of a local HTTP server answering every request with ``reply``."""
    servers: list[ThreadingHTTPServer] = []

    def start(reply: Reply) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.reply = reply  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(err: pytest.ExceptionInfo, url: str, *words: str) -> None:
    text = str(err.value)
    assert "\n" not in text and url in text, text
    for word in words:
        assert word in text, text


# ---- each failure mode: one line naming the URL ---------------------------------------------------

def test_unreachable_port_names_the_url() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(InputError) as err:
        ServerClient(url, timeout=5).models()
    _one_line(err, url, "unreachable")


def test_unknown_model_names_what_is_served(serve) -> None:
    url = serve(lambda path, body: MODELS)
    with pytest.raises(InputError) as err:
        ServerClient(url).model_name("other")
    _one_line(err, url, "'other' unknown", MODEL)
    assert ServerClient(url).model_name(None) == MODEL


def test_model_unknown_to_the_completions_endpoint(serve) -> None:
    url = serve(lambda path, body: _json(404, {"error": {"message": "The model `x` does not exist.", "code": 404}}))
    backend = ServerBackend(url, "x", tiny_tokenizer(), PromptFormat(chat_template=False))
    with pytest.raises(InputError) as err:
        backend.generate(["hello"], 4)
    _one_line(err, url + "/v1/completions", "HTTP 404", "does not exist")


def test_context_too_long(serve) -> None:
    message = "This model's maximum context length is 1024 tokens. However, you requested 5000 tokens."
    url = serve(lambda path, body: _json(400, {"error": {"message": message, "type": "BadRequestError"}}))
    with pytest.raises(InputError) as err:
        ServerBackend(url, MODEL, tiny_tokenizer(), PromptFormat(chat_template=False)).generate(["hello"], 4000)
    _one_line(err, url, "HTTP 400", "maximum context length")


def test_timeout(serve) -> None:
    release = threading.Event()

    def hang(path: str, body: Any) -> tuple[int, str, bytes]:
        release.wait(30)  # answers only after the client gave up (the test releases it)
        return MODELS

    url = serve(hang)
    try:
        with pytest.raises(InputError) as err:
            ServerClient(url, timeout=0.3).models()
    finally:
        release.set()
    _one_line(err, url, "timeout", "0.3 s")


@pytest.mark.parametrize("reply", [(200, "text/html", b"<html>gateway</html>"),
                                   (200, "application/json", b"{not json"),
                                   (502, "text/html", b"<html>bad gateway</html>")])
def test_not_json(serve, reply) -> None:
    url = serve(lambda path, body: reply)
    with pytest.raises(InputError) as err:
        ServerClient(url).models()
    _one_line(err, url)
    assert ("not JSON" in str(err.value)) or ("HTTP 502" in str(err.value))


def test_not_a_url() -> None:
    with pytest.raises(InputError, match="not an http"):
        ServerClient("127.0.0.1:8000")


# ---- the CLI: exit 2, one line, no report ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("server_tiny") / "model"
    save_tiny(tiny_model("llama", seed=1), path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("verb", ["eval", "try", "search"])
def test_cli_unreachable_writes_nothing(verb, tiny_dir, tmp_path, capsys) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    make_measurements(2).save(tmp_path / "m.safetensors")
    if verb == "eval":
        args = ["eval", str(tiny_dir), "--json", str(tmp_path / "r.json")]
    elif verb == "try":
        config = tmp_path / "cfg.yaml"
        config.write_text(f"model: {tiny_dir}\nmeasurements: {tmp_path / 'm.safetensors'}\ntargets: [attention]\n"
                          "ablate:\n  - layers: '0:1'\n    measurement: 0\n")
        args = ["try", str(config), "--json", str(tmp_path / "r.json")]
    else:
        args = ["search", str(tiny_dir), "-m", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "study"),
                "--trials", "1", "--full-eval-top", "0"]
    code = main(args + ["--harmful", str(prompts), "--harmless", str(prompts), "--no-chat-template",
                        "--server", url, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].count(url) == 1 and "unreachable" in err[-1]
    assert not (tmp_path / "r.json").exists()
    assert not (tmp_path / "study" / "front.json").exists()


def test_cli_server_model_needs_server(tiny_dir, capsys) -> None:
    assert main(["eval", str(tiny_dir), "--server-model", "x"]) == 2
    assert "--server-model needs --server" in capsys.readouterr().err


# ---- the backend against a scripted server ------------------------------------------------------------

def test_backend_sends_the_rendered_ids_and_cuts_at_the_end_token(serve) -> None:
    tok = tiny_tokenizer()
    seen: list[dict[str, Any]] = []
    eos = tok.eos_token_id

    def reply(path: str, body: Any) -> tuple[int, str, bytes]:
        seen.append(body)
        choices = [{"index": i, "text": "", "finish_reason": "stop", "stop_reason": None,
                    "token_ids": [5, 6, eos, 7][: 2 + i]} for i in range(len(body["prompt"]))]
        return _json(200, {"choices": list(reversed(choices))})  # out of order: sorted by index

    url = serve(reply)
    fmt = PromptFormat(chat_template=False)
    backend = ServerBackend(url, MODEL, tok, fmt, batch_size=2)
    ids = backend.generate_ids(["a b", "c", "d e f"], 8)
    # choice 0 stopped without listing the end token: appended; 1 and 2 cut after it
    assert ids == [[5, 6, eos], [5, 6, eos], [5, 6, eos]]
    assert [len(b["prompt"]) for b in seen] == [2, 1]
    expected = [tok(t, add_special_tokens=False)["input_ids"] for t in fmt.render(tok, ["a b", "c", "d e f"])]
    assert [p for b in seen for p in b["prompt"]] == expected
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 8 and b["model"] == MODEL for b in seen)


def test_log_probs_in_process_unless_the_server_returns_the_vocabulary(serve) -> None:
    tok, model = tiny_tokenizer(), tiny_model("llama", seed=2)
    fmt = PromptFormat(chat_template=False)
    in_process = TransformersBackend(model, tok, fmt, progress=False)
    expected = in_process.first_token_logprobs(["a b", "c"])

    def reply(path: str, body: Any) -> tuple[int, str, bytes]:  # the whole vocabulary, as token_id:N
        rows = in_process.first_token_logprobs(["a b", "c"])
        return _json(200, {"choices": [{"index": i, "text": "", "logprobs": {"top_logprobs": [
            {f"token_id:{t}": float(rows[i, t]) for t in range(rows.shape[1])}]}} for i in range(2)]})

    url = serve(reply)
    served = ServerBackend(url, MODEL, tok, fmt, in_process)
    assert served.kl_source == "in_process"
    assert torch.equal(served.first_token_logprobs(["a b", "c"]), expected)
    full = ServerBackend(url, MODEL, tok, fmt, None, full_logprobs=True, vocab_size=expected.shape[1])
    assert full.kl_source == "server"
    torch.testing.assert_close(full.first_token_logprobs(["a b", "c"]), expected, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="whole next-token distribution"):
        ServerBackend(url, MODEL, tok, fmt).first_token_logprobs(["a"])


@pytest.mark.parametrize("max_logprobs, full", [(20, False), (None, True)])
def test_probe_full_logprobs(serve, max_logprobs, full) -> None:
    """vLLM answers HTTP 400 above its --max-logprobs; a server that returns the whole vocabulary is used."""
    tok = tiny_tokenizer()

    def reply(path: str, body: Any) -> tuple[int, str, bytes]:
        if max_logprobs is not None and body["logprobs"] > max_logprobs:
            return _json(400, {"error": {"message": f"Requested sample logprobs of {body['logprobs']}, which is "
                                                    f"greater than max allowed: {max_logprobs}"}})
        return _json(200, {"choices": [{"index": 0, "text": "", "logprobs": {"top_logprobs": [
            {f"token_id:{t}": -5.0 for t in range(body["logprobs"])}]}}]})

    backend = ServerBackend(serve(reply), MODEL, tok, PromptFormat(chat_template=False), vocab_size=50)
    assert backend.probe_full_logprobs() is full and backend.kl_source == ("server" if full else "in_process")


def test_report_keys_only_in_server_mode(serve) -> None:
    tok, model = tiny_tokenizer(), tiny_model("llama", seed=2)
    fmt = PromptFormat(chat_template=False)
    plain = evaluate(model, tok, ["a b"], ["c"], max_new_tokens=3, prompt_format=fmt,
                     run=RunOptions(progress=False)).to_dict()
    assert "kl_source" not in plain and "server" not in plain
    generated = TransformersBackend(model, tok, fmt, progress=False).generate_ids(["a b", "c"], 3)

    def reply(path: str, body: Any) -> tuple[int, str, bytes]:
        index = {tuple(generated_prompt): i for i, generated_prompt in enumerate(
            tok(fmt.render(tok, ["a b", "c"]), add_special_tokens=False)["input_ids"])}
        return _json(200, {"choices": [{"index": j, "text": "", "finish_reason": "length",
                                        "token_ids": generated[index[tuple(p)]]} for j, p in enumerate(body["prompt"])]})

    url = serve(reply)
    backend = ServerBackend(url, MODEL, tok, fmt, TransformersBackend(model, tok, fmt, progress=False))
    served = evaluate(None, tok, ["a b"], ["c"], max_new_tokens=3, prompt_format=fmt, run=RunOptions(progress=False),
                      backends=(backend, backend), server={"url": url}).to_dict()
    assert served["kl_source"] == "in_process" and served["server"] == {"url": url}
    # same answers, same numbers: only the two keys differ
    assert {k: v for k, v in served.items() if k not in ("kl_source", "server", "versions")} == \
        {k: v for k, v in plain.items() if k != "versions"}


# ---- what an adapter cannot carry -----------------------------------------------------------------

def _config(**extra: Any):
    return parse_config({"model": "x", "measurements": "m.safetensors", "targets": ["attention"],
                         "ablate": [{"layers": "0:1", "measurement": 0}]} | extra, where="cfg.yaml")


def test_served_config_refuses_what_an_adapter_cannot_carry() -> None:
    options = ServerOptions(f"http://127.0.0.1:{_free_port()}", write_adapter=lambda *a: None)
    with pytest.raises(ConfigError, match="norm_preserving.* not low rank"):
        with served_config(options, _config(method="norm_preserving"), "x"):
            pass
    biased = _config()
    biased.router_bias = [RouterBiasEntry(layers=[0], experts=[1], bias=-1.0)]
    with pytest.raises(ConfigError, match="router_bias"):
        with served_config(options, biased, "x"):
            pass


@pytest.mark.parametrize("space, match", [(SpaceOptions(), "norm_preserving"),
                                          (SpaceOptions(methods=("project",), router_bias=True), "--router-bias")])
def test_search_refuses_an_unservable_space(space, match, tmp_path) -> None:
    with pytest.raises(InputError, match=match):
        search("organism", str(tmp_path / "m.safetensors"), tmp_path / "out", space=space,
               server=ServerOptions("http://127.0.0.1:1"))
