"""``intervene chat``: the REPL driven through a fake stdin (tiny model, tiny tokenizer)."""

from __future__ import annotations

import io
import sys

import pytest

from intervene.live.chat import chat, reply
from intervene.cli import main
from intervene.config.schema import parse_config
from intervene.hooks.apply import apply
from intervene.testing import make_measurements, tiny_model, tiny_tokenizer


@pytest.fixture()
def parts():
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    meas = make_measurements(2, seed=7, path="m.safetensors", harmless_first=True)
    cfg = parse_config({"ablate": [{"layers": "0:2", "measurement": 1, "scale": 1.0}]})
    return model, tokenizer, (lambda: apply(model, cfg, meas))


def test_repl_toggle_reset_quit(parts):
    model, tokenizer, intervention = parts
    stdin = io.StringIO("Hello there\n/toggle\nHello there\n/reset\n\n/bogus\nWhat now?\n/quit\nnever read\n")
    stdout = io.StringIO()
    entered = []

    def counting():
        entered.append(1)
        return intervention()

    turns = chat(model, tokenizer, intervention=counting, input=stdin, output=stdout, max_new_tokens=6)
    out = stdout.getvalue()
    assert turns == 3 and len(entered) == 1  # on for the first turn only
    user = {"role": "user", "content": "Hello there"}
    with intervention():
        first = reply(model, tokenizer, [user], 6)
    second = reply(model, tokenizer, [user, {"role": "assistant", "content": first}, user], 6)  # history kept
    third = reply(model, tokenizer, [{"role": "user", "content": "What now?"}], 6)  # after /reset, still off
    expected = (f"intervened> {first}\n[intervention off]\nmodel> {second}\n[conversation reset]\n"
                "[unknown command /bogus; ")
    assert out.startswith(expected)
    assert out.endswith(f"model> {third}\n")
    assert "never read" not in out and "you> " not in out  # not a terminal: no prompt
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_side_by_side_keeps_two_conversations(parts):
    model, tokenizer, intervention = parts
    stdout = io.StringIO()
    turns = chat(model, tokenizer, intervention=intervention, side_by_side=True,
                 input=io.StringIO("Hi\n/toggle\n"), output=stdout, max_new_tokens=5)
    base = reply(model, tokenizer, [{"role": "user", "content": "Hi"}], 5)
    with intervention():
        new = reply(model, tokenizer, [{"role": "user", "content": "Hi"}], 5)
    assert turns == 1 and base != new
    assert stdout.getvalue() == f"baseline> {base}\nintervened> {new}\n[side by side shows both; /toggle has no effect]\n"


def test_streaming_writes_the_same_text(parts):
    model, tokenizer, intervention = parts
    stdout = io.StringIO()
    chat(model, tokenizer, input=io.StringIO("Hi\n"), output=stdout, max_new_tokens=5, stream=True)
    assert stdout.getvalue().replace("\n", "") == "model> " + reply(model, tokenizer, [{"role": "user", "content": "Hi"}],
                                                                    5).replace("\n", "")


def test_chat_cli_unattended(tmp_path, monkeypatch, capsys):
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    make_measurements(2, seed=7, path="m.safetensors", harmless_first=True).save(tmp_path / "m.safetensors")
    (tmp_path / "c.yaml").write_text("measurements: m.safetensors\nablate: [{layers: '0:2', measurement: 1}]\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    rc = main(["chat", str(tmp_path / "model"), "--config", str(tmp_path / "c.yaml"), "--side-by-side",
               "--max-new-tokens", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("baseline> ") == 1 and out.count("intervened> ") == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert main(["chat", str(tmp_path / "model"), "--side-by-side"]) == 2
    assert "--side-by-side needs --config" in capsys.readouterr().err
