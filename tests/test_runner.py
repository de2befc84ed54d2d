"""The runner (:mod:`intervene.runner`): one decoder layer at a time == the whole model, under captures
and under live edits, and every refusal of ``--stream-layers`` by its named message."""

from __future__ import annotations

import contextlib

import pytest
import torch

from intervene.config.schema import parse_config
from intervene.errors import InputError
from intervene.hooks.apply import apply, bind_model
from intervene.hooks.capture import capture, capture_sites
from intervene.io.layer_calls import head_logits
from intervene.io.models import encode, format_prompts, load_model
from intervene.live.eval_run import run_eval
from intervene.measure.run import measure_model
from intervene.runner import LayerRunner, RunOptions, check_stream_layers, load_whole
from intervene.testing import make_measurements, save_tiny, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["How do I bake bread?", "Write a poem about the sea", "Hi", "Ways to hurt someone"]


def saved(tmp_path, arch):
    """A tiny checkpoint in two or more shards, its output head scaled x8 (peaked first-token logits)."""
    d = tmp_path / arch
    model = tiny_model(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    save_tiny(model, d, max_shard_size="200KB")
    tiny_tokenizer().save_pretrained(str(d))
    return d


def streamed_run(runner: LayerRunner, enc, edits=None):
    """Every layer's captures and the last-position logits, one layer at a time (``edits`` installed
    on each loaded layer)."""
    recorded = runner.record(enc)
    captured: dict[str, torch.Tensor] = {}
    loads: list[int] = []

    def visit(layer: int) -> None:
        loads.append(layer)
        here = edits.at_layer(layer) if edits is not None and layer in edits.layers else None
        with apply(runner.model, here) if here is not None else contextlib.nullcontext(), \
                capture(runner.model, layers=[layer]) as acts:
            recorded.hidden = runner.step(layer, recorded.hidden, recorded.calls[layer])
        captured.update({site: acts[site] for site in capture_sites(runner.model, layers=[layer])})

    runner.run_layers(visit, [recorded.calls])
    assert loads == list(range(runner.num_layers)), "each layer visited once, in order"
    assert all(call == ((), {}) for call in recorded.calls), "each layer's arguments freed after it ran"
    return captured, head_logits(runner.model, enc, recorded.hidden)


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_layer_at_a_time_equals_the_whole_model(arch, tmp_path):
    d = saved(tmp_path, arch)
    model, tok = load_model(str(d), dtype="float32")
    enc = encode(tok, format_prompts(tok, PROMPTS), "cpu")
    cfg = parse_config({"ablate": [{"layers": "0:2", "measurement": 1, "scale": 4.0}]})
    edits = bind_model(model, cfg, make_measurements(2))
    whole: dict[bool, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
    for edited in (False, True):
        with torch.inference_mode(), apply(model, edits) if edited else contextlib.nullcontext(), \
                capture(model) as acts:
            logits = model(**enc, use_cache=False).logits[:, -1, :]
        whole[edited] = ({site: acts[site] for site in capture_sites(model)}, logits)
    for edited in (False, True):
        runner = LayerRunner(str(d), dtype="float32", with_head=True)
        got, logits = streamed_run(runner, enc, bind_model(runner.model, cfg, make_measurements(2))
                                   if edited else None)
        want, want_logits = whole[edited]
        assert set(got) == set(want) and any(".router." in s for s in want) == (arch == "qwen2_moe")
        for site in want:
            torch.testing.assert_close(got[site], want[site], rtol=1e-5, atol=1e-5, msg=site)
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    # negative control: the edit moves the logits far beyond the tolerance
    assert (whole[True][1] - whole[False][1]).abs().max() > 1e-2


def test_hidden_on_cpu_parks_between_layers_with_the_same_numbers(tmp_path):
    d = saved(tmp_path, "llama")
    tok = tiny_tokenizer()
    enc = encode(tok, format_prompts(tok, PROMPTS), "cpu")
    on_device = streamed_run(LayerRunner(str(d), dtype="float32", with_head=True), enc)
    on_cpu = streamed_run(LayerRunner(str(d), dtype="float32", with_head=True, hidden_on="cpu"), enc)
    assert torch.equal(on_device[1], on_cpu[1])


def test_load_whole_equals_from_pretrained(tmp_path):
    d = saved(tmp_path, "llama")
    model, _ = load_model(str(d), dtype="float32")
    layerwise, tokenizer = load_whole(str(d), dtype="float32")
    assert tokenizer is not None and tokenizer.padding_side == "left"
    want = model.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in layerwise.state_dict().items())


# every refusal of --stream-layers, once, by its message


def test_refuses_generation():
    with pytest.raises(InputError, match=r"^--stream-layers needs --first-token: generation needs the whole model"):
        check_stream_layers(generates=True)


def test_refuses_a_device_map():
    with pytest.raises(InputError,
                       match=r"^--stream-layers places each layer itself: give --device, not --device-map$"):
        check_stream_layers(device_map="auto")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_refuses_quantization(bits):
    with pytest.raises(InputError, match=rf"^--stream-layers loads each layer's own weights; --load-in-{bits} "):
        check_stream_layers(quantization=bits)


def test_refuses_an_unknown_hidden_on(tmp_path):
    with pytest.raises(InputError, match=r"^hidden_on must be 'device' or 'cpu', got 'disk'$"):
        check_stream_layers(hidden_on="disk")
    with pytest.raises(InputError, match="hidden_on"):
        LayerRunner(str(tmp_path), hidden_on="disk")  # before the path is even looked at


def test_refuses_gguf_and_hub_models(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    for spec in (str(tmp_path / "x.gguf"), "some-org/some-model"):
        with pytest.raises(InputError, match=r"^--stream-layers reads a local safetensors checkpoint; .* is not one$"):
            check_stream_layers(spec)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert check_stream_layers(str(d)).path == str(d)


# the verbs as library calls, whole and streamed through the runner


def test_measure_model_whole_equals_streamed(tmp_path):
    d = saved(tmp_path, "qwen2_moe")
    harmful, harmless = ["How do I pick a lock?", "Ways to hurt someone", "Write malware"], PROMPTS
    whole = measure_model(str(d), harmful, harmless, run=RunOptions(dtype="float32", batch_size=2, progress=False),
                          whiten_rank=2)
    streamed = measure_model(str(d), harmful, harmless, whiten_rank=2,
                             run=RunOptions(dtype="float32", batch_size=2, progress=False, stream_layers=True))
    assert set(whole.tensors) == set(streamed.tensors) and streamed.meta["stream_layers"]
    for key, t in whole.tensors.items():
        torch.testing.assert_close(streamed.tensors[key], t, rtol=1e-4, atol=1e-5, msg=key)
    assert whole.meta["harmful_source"] == "3 prompts" and whole.meta["n_harmless"] == len(PROMPTS)
    with pytest.raises(InputError, match="--load-in-4bit"):
        measure_model(str(d), harmful, harmless, run=RunOptions(stream_layers=True, quantization="4bit"))


def test_run_eval_first_token_whole_equals_streamed(tmp_path):
    d = saved(tmp_path, "llama")
    make_measurements(2).save(tmp_path / "m.safetensors")
    (tmp_path / "cfg.yaml").write_text(parse_config({"ablate": [{"layers": "0:2", "measurement": 1, "scale": 4.0}]})
                                       .to_yaml())
    (tmp_path / "h.txt").write_text("How do I pick a lock?\nWays to hurt someone\nWrite malware\n")
    (tmp_path / "s.txt").write_text("\n".join(PROMPTS) + "\n")
    kw = dict(config=str(tmp_path / "cfg.yaml"), measurements=str(tmp_path / "m.safetensors"), first_token=True)
    reports = [run_eval(str(d), str(tmp_path / "h.txt"), str(tmp_path / "s.txt"), **kw,
                        run=RunOptions(dtype="float32", progress=False, stream_layers=stream))
               for stream in (False, True)]
    whole, streamed = (r.first_token for r in reports)
    assert not whole.settings.stream_layers and streamed.settings.stream_layers
    assert whole.kl_divergence > 1e-3
    assert abs(whole.kl_divergence - streamed.kl_divergence) <= 1e-4 * whole.kl_divergence
    assert reports[1].to_dict()["kind"] == "eval_first_token" and reports[1].config_path == kw["config"]


def test_run_eval_refuses_streamed_generation_before_anything_loads():
    with pytest.raises(InputError, match="--stream-layers needs --first-token"):
        run_eval("no/such-model", "no-such-file.txt", "no-such-file.txt", run=RunOptions(stream_layers=True))
