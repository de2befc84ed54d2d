"""The generation seam and the metrics (issue 28): the in-process backend equals direct
``model.generate`` / log-softmax computations; each metric equals an independent computation; a
search takes a third objective (perplexity) and its trials carry three values."""

from __future__ import annotations

import math

import pytest
import torch

from intervene.arch import arch_for_config, text_config
from intervene.hooks.apply import apply
from intervene.io.measurements import Measurements
from intervene.io.models import format_prompts
from intervene.live.generate import GenerationBackend, PromptFormat, TransformersBackend
from intervene.live.metrics import (REFUSAL_MARKERS, AnswerKL, FirstTokenKL, Perplexity, RefusalMass, Refusals,
                                    RefusalScore, refusal_token_ids)
from intervene.testing import edited_weight, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["How do I bake bread?", "Write a poem", "Name a planet", "Hi"]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = None  # random weights: fixed-length outputs
    return model, tokenizer


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(format_prompts(tokenizer, [prompt])[0], return_tensors="pt", add_special_tokens=False).input_ids


def perturbed(model):
    noise = lambda w: w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))  # noqa: E731
    return edited_weight(model.model.layers[0].mlp.down_proj.weight, noise)


def test_backend_generation_equals_direct_model_generate(tiny):
    model, tokenizer = tiny
    backend: GenerationBackend = TransformersBackend(model, tokenizer, PromptFormat(), batch_size=3, progress=False)
    ids = backend.generate_ids(PROMPTS, 5)
    for prompt, got in zip(PROMPTS, ids):
        one = prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            out = model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=5,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert got == out[0, one.shape[1]:].tolist()
    texts = backend.generate(PROMPTS, 5)
    assert texts == [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]
    # the system prompt reaches the rendered text
    system = TransformersBackend(model, tokenizer, PromptFormat(system_prompt="Be brief."), progress=False)
    assert system.prompt_format.render(tokenizer, PROMPTS[:1]) == format_prompts(tokenizer, PROMPTS[:1], "Be brief.")


def test_backend_log_probs_equal_direct_log_softmax(tiny):
    model, tokenizer = tiny
    backend = TransformersBackend(model, tokenizer, batch_size=3, progress=False)
    first = backend.first_token_logprobs(PROMPTS)
    assert first.shape == (len(PROMPTS), model.config.vocab_size) and first.dtype == torch.float32
    answers = [[5, 6, 7], [8], [], [9, 10]]
    teacher = list(backend.answer_logprobs(PROMPTS, answers))
    for i, (prompt, answer) in enumerate(zip(PROMPTS, answers)):
        one = prompt_ids(tokenizer, prompt)
        full = torch.cat([one, torch.tensor([answer], dtype=one.dtype)], dim=1) if answer else one
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=full).logits[0].double(), -1)
        torch.testing.assert_close(first[i].double(), lp[one.shape[1] - 1], atol=1e-5, rtol=0)
        n = one.shape[1]
        assert teacher[i].shape == (len(answer), model.config.vocab_size)
        torch.testing.assert_close(teacher[i].double(), lp[n - 1:n - 1 + len(answer)], atol=1e-5, rtol=0)
    tokens = tokenizer.encode("Bread rises.", add_special_tokens=False)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].double(), -1)
    expected = torch.tensor([float(lp[t, tokens[t + 1]]) for t in range(len(tokens) - 1)], dtype=torch.float64)
    torch.testing.assert_close(backend.token_logprobs(tokens).double(), expected, atol=1e-5, rtol=0)


def test_backend_context_is_entered_around_each_forward(tiny):
    model, tokenizer = tiny
    plain = TransformersBackend(model, tokenizer, batch_size=2, progress=False)
    inside = TransformersBackend(model, tokenizer, batch_size=2, progress=False, context=lambda: perturbed(model))
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    got = inside.first_token_logprobs(PROMPTS)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)  # left after each forward
    with perturbed(model):
        want = plain.first_token_logprobs(PROMPTS)
        want_ids = plain.generate_ids(PROMPTS, 4)
    assert torch.equal(got, want) and not torch.allclose(got, plain.first_token_logprobs(PROMPTS), atol=1e-4)
    assert inside.generate_ids(PROMPTS, 4) == want_ids


def test_metrics_have_names_and_directions():
    assert [(m.name, m.direction) for m in (Refusals(), RefusalScore(()), RefusalMass(()), FirstTokenKL(),
                                            AnswerKL(), Perplexity())] == [
        ("refusals", "minimize"), ("refusal_score", "minimize"), ("refusal_proxy", "minimize"),
        ("kl_divergence", "minimize"), ("kl_divergence_answer", "minimize"), ("perplexity", "minimize")]


def test_refusal_counts_equal_an_independent_count():
    outputs = ["I'm sorry, I can't.", "Sure, here it is: mix flour and water.", "",
               "la la la la la la la la la la la la", "Here is a long answer that goes on and then I cannot continue",
               "Bread needs flour, water, salt and yeast."]
    counts = Refusals().compute(outputs)
    lowered = [o.lower() for o in outputs]
    words = [o.split() for o in outputs]
    repeat = [1 - len({tuple(w[i:i + 4]) for i in range(len(w) - 3)}) / (len(w) - 3) if len(w) >= 5 else 0.0
              for w in words]
    degenerate = [not o.strip() or r >= 0.4 for o, r in zip(outputs, repeat)]
    refused = [not d and any(m.lower() in low for m in REFUSAL_MARKERS) for d, low in zip(degenerate, lowered)]
    assert (counts.refusals, counts.degenerate, counts.complied, counts.total) == (
        sum(refused), sum(degenerate), len(outputs) - sum(refused) - sum(degenerate), len(outputs)) == (2, 2, 2, 6)
    assert counts.delayed_refusals == 1 and counts.rate == pytest.approx(2 / 6)

    class Everything:  # a judge calling every non-degenerate answer a refusal
        def classify(self, prompts, answers):
            return ["refused"] * len(answers)

        def describe(self):
            return {}

    judged = Refusals(Everything()).compute(outputs, prompts=["p"] * len(outputs))
    assert (judged.refusals, judged.degenerate, judged.complied) == (4, 2, 0)


def test_first_token_metrics_equal_an_independent_computation(tiny):
    _, tokenizer = tiny
    logits = torch.randn(5, 101, generator=torch.Generator().manual_seed(1))
    base = torch.log_softmax(logits, -1)
    new = torch.log_softmax(logits + torch.randn(5, 101, generator=torch.Generator().manual_seed(2)), -1)
    ids = refusal_token_ids(tokenizer)
    p, q = base.double().exp(), new.double().exp()
    mass = [float(sum(p[i, t] for t in ids)) for i in range(5)]
    assert RefusalScore.of(tokenizer).compute(base) == pytest.approx(sum(math.log(m) for m in mass) / 5, rel=1e-6)
    assert RefusalMass.of(tokenizer).compute(base) == pytest.approx(sum(mass) / 5, rel=1e-6)
    kl = sum(float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(5)) / 5
    assert FirstTokenKL().compute(base, new) == pytest.approx(kl, rel=1e-6) and kl > 0.1
    assert FirstTokenKL().compute(base, base) == 0.0


def test_answer_kl_and_perplexity_equal_an_independent_computation(tiny):
    model, tokenizer = tiny
    base = TransformersBackend(model, tokenizer, batch_size=3, progress=False)
    new = TransformersBackend(model, tokenizer, batch_size=3, progress=False, context=lambda: perturbed(model))
    answers = base.generate_ids(PROMPTS, 4)
    expected = []
    for prompt, answer in zip(PROMPTS, answers):
        ids = torch.cat([prompt_ids(tokenizer, prompt), torch.tensor([answer])], dim=1)
        with torch.no_grad():
            b = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            with perturbed(model):
                n = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        rows = range(ids.shape[1] - len(answer) - 1, ids.shape[1] - 1)
        expected.append(sum(float((b[r].exp() * (b[r] - n[r])).sum()) for r in rows) / len(answer))
    assert AnswerKL().compute(base, new, PROMPTS, answers) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert AnswerKL().compute(base, base, PROMPTS, answers) == pytest.approx(0, abs=1e-9)  # negative control

    text = "Bread dough rises because yeast feeds on sugars. " * 2
    tokens = tokenizer.encode(text, add_special_tokens=False)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, 30):
        window = tokens[start:start + 30]
        if len(window) < 2:
            continue
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].double(), -1)
        nll -= sum(float(lp[i, window[i + 1]]) for i in range(len(window) - 1))
        count += len(window) - 1
    ppl, n = Perplexity(30).measure(base, text)
    assert n == count and ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_a_search_takes_a_third_objective(tiny, tmp_path):
    import optuna

    from intervene.search.objective import DEFAULT_METRICS, PromptObjective, TextPerplexity
    from intervene.search.space import SearchSpace
    from intervene.search.study import STUDY_NAME, SearchSettings, run_search

    model, tokenizer = tiny
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    r = torch.randn(hidden, generator=torch.Generator().manual_seed(4))
    r = r / r.norm()
    meas = Measurements(tensors={**{f"direction.{i}": (1.0 + i) * r for i in range(layers)},
                                 **{f"harmless_mean.{i}": torch.ones(hidden) for i in range(layers)}}, meta={})
    space = SearchSpace.default(arch_for_config(model.config), text_config(model.config), meas)
    text = "Bread dough rises because yeast feeds on sugars."
    objective = PromptObjective(model, tokenizer, PROMPTS[:2], PROMPTS[2:], batch_size=2, max_new_tokens=4,
                                metrics=(*DEFAULT_METRICS, TextPerplexity(tokenizer, text, window=16)))
    result = run_search(model, meas, space, objective, tmp_path,
                        SearchSettings(trials=3, seed=0, startup_trials=3, full_eval_top=0, generate_front=False),
                        progress=False)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [d.name for d in study.directions] == ["MINIMIZE"] * 3
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 3 and all(len(t.values) == 3 for t in trials)
    assert result.baseline["perplexity"] == pytest.approx(Perplexity(16).compute(
        TransformersBackend(model, tokenizer, progress=False), text), rel=1e-6)
    for t, rec in zip(trials, result.records):
        with apply(model, rec.config(), meas):
            ppl = Perplexity(16).compute(TransformersBackend(model, tokenizer, progress=False), text)
            proxy, kl, _ = objective.cheap(model)
        assert t.values == pytest.approx([proxy, kl, ppl], rel=1e-5)
        assert rec.extra == {"perplexity": t.values[2]} and (rec.proxy, rec.kl) == (t.values[0], t.values[1])
    # a different metric list is a different objective: its study cannot be resumed with the default one
    assert objective.describe()["metrics"][2]["name"] == "perplexity"
    assert "metrics" not in PromptObjective(model, tokenizer, PROMPTS[:2], PROMPTS[2:], batch_size=2).describe()
