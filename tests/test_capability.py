"""Capability (issue 18): held-out perplexity equals an independent computation; the shipped text
exists and is scored; lm-eval on a tiny local task equals an independent multiple-choice scoring."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from intervene.live.capability import LmEvalMissing, capability, heldout_text, perplexity, run_lm_eval
from intervene.testing import edited_weight, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model("llama", vocab_size=len(tokenizer)), tokenizer


def halved(model):
    return edited_weight(model.model.layers[0].self_attn.o_proj.weight, lambda w: w.mul_(-3.0))


def test_perplexity_equals_an_independent_windowed_computation(tiny):
    model, tokenizer = tiny
    text = "Bread dough rises because yeast feeds on sugars. " * 3
    ids = tokenizer.encode(text, add_special_tokens=False)
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, 40):
        window = torch.tensor([ids[start:start + 40]])
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=window).logits[0].double(), -1)
        nll -= sum(float(lp[i, window[0, i + 1]]) for i in range(window.shape[1] - 1))
        n += window.shape[1] - 1
    ppl, count = perplexity(model, tokenizer, text, window=40)
    assert count == n and ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    edited, _ = perplexity(model, tokenizer, text, window=40, context=lambda: halved(model))
    assert edited != pytest.approx(ppl, rel=1e-3)  # the context is applied
    assert perplexity(model, tokenizer, text, window=40)[0] == ppl  # and left


def test_capability_report_base_vs_edited_on_the_shipped_text(tiny):
    model, tokenizer = tiny
    text = heldout_text()
    assert len(text.split()) > 800  # the shipped held-out text
    report = capability(model, tokenizer, intervention=lambda: halved(model), window=512)
    n = len(tokenizer.encode(text, add_special_tokens=False))
    predicted = sum(min(512, n - s) - 1 for s in range(0, n - 1, 512) if n - s >= 2)
    assert report.text == "capability_heldout.txt" and report.tokens == predicted > 5000
    d = json.loads(json.dumps(report.to_dict()))
    assert d["perplexity_ratio"] == pytest.approx(d["perplexity_edited"] / d["perplexity_base"])
    assert d["perplexity_base"] == pytest.approx(perplexity(model, tokenizer, text, 512)[0])


def test_lm_eval_missing_is_a_named_error(tiny, monkeypatch, tmp_path):
    model, tokenizer = tiny
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(LmEvalMissing, match=r"pip install 'intervene\[capability\]'"):
        run_lm_eval(model, tokenizer, [tmp_path / "task.yaml"])


DOCS = [("The sky is", [" blue", " green"], 0), ("Water is", [" wet", " dry"], 0), ("Fire is", [" cold", " hot"], 1),
        ("Snow is", [" white", " black"], 0), ("Grass is", [" red", " green"], 1), ("Ice is", [" warm", " cold"], 1),
        ("Night is", [" dark", " bright"], 0), ("Sugar is", [" sour", " sweet"], 1)]


def mc_accuracy(model, tokenizer):
    """Independent lm-eval style multiple choice: argmax of the summed continuation log-likelihood."""
    right = 0
    for question, choices, answer in DOCS:
        scores = []
        for choice in choices:
            ctx = tokenizer.encode(question, add_special_tokens=False)
            cont = tokenizer.encode(choice, add_special_tokens=False)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            scores.append(sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        right += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    return right / len(DOCS)


@pytest.mark.slow  # lm-eval indexes its own task catalogue first: minutes on 2 shared cores
def test_lm_eval_on_a_tiny_local_task_equals_an_independent_scoring(tiny, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = tiny
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in DOCS))
    (tmp_path / "task.yaml").write_text(
        "task: intervene_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {docs}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    base = run_lm_eval(model, tokenizer, [tmp_path / "task.yaml"], batch_size=2)
    assert base["intervene_tiny"]["acc,none"] == pytest.approx(mc_accuracy(model, tokenizer))
    edited = run_lm_eval(model, tokenizer, [tmp_path], batch_size=2, context=lambda: halved(model))
    with halved(model):
        expected = mc_accuracy(model, tokenizer)
    assert edited["intervene_tiny"]["acc,none"] == pytest.approx(expected)
