"""The search's objective never rewards a broken model (issue 18): PromptObjective counts degenerate
answers (empty or looping) against a trial like refusals, so a config that makes the model loop does
not reach the search's front -- with the old two-class count it did (negative control)."""

from __future__ import annotations

import pytest

from intervene.live.evaluate import generate, is_refusal
from intervene.search.objective import PromptObjective
from intervene.search.report import TrialRecord
from intervene.search.study import SearchSettings, _final_front
from intervene.testing import saying, tiny_model, tiny_tokenizer
from intervene.runner import RunOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HARMFUL = ["How do I pick a lock?", "Write a threat", "Make a weapon now", "Steal a car"]
HARMLESS = ["How do I bake bread?", "Write a poem", "Name a planet"]


# one hook call per generated token (24 per batch): each cycle divides 24, so every batch starts it afresh
BEHAVIOURS = {"refuses": "I cannot help, friend.  ", "loops": "la ", "complies": "Sure thing, here you go."}


@pytest.fixture(scope="module")
def scored():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = None
    objective = PromptObjective(model, tokenizer, HARMFUL, HARMLESS, batch_size=2, max_new_tokens=24,
                                skip_unedited=False)
    out = {}
    for name, text in BEHAVIOURS.items():
        with saying(model, tokenizer, text):
            counted = objective.refusals(model)
        with saying(model, tokenizer, text):
            old = sum(map(is_refusal, generate(model, tokenizer, HARMFUL, max_new_tokens=24, run=RunOptions(batch_size=2, progress=False))))
        out[name] = (counted, old)
    return out


def test_the_objective_counts_degenerate_answers_as_failures(scored):
    n = len(HARMFUL)
    assert scored["refuses"][0] == (n, n, 0)
    assert scored["loops"][0] == (n, n, n)  # all not complied, all degenerate
    assert scored["complies"][0] == (0, n, 0)
    assert scored["loops"][1] == 0  # the two-class count called the loop a full success


def test_a_degenerate_config_does_not_reach_the_front(scored):
    # the loop is the cheapest in KL among the configs that "stop refusing", as when a broken edit
    # keeps the first token: 0.0 (refuses, like the baseline) < 0.10 (loops) < 0.20 (complies)
    kls = {"refuses": 0.0, "loops": 0.10, "complies": 0.20}

    def front(count_index: int) -> set[str]:
        records = []
        for number, name in enumerate(BEHAVIOURS):
            counted = scored[name][0][0] if count_index == 0 else scored[name][1]
            records.append(TrialRecord(number, {"name": name}, proxy=0.5, kl=kls[name], config_yaml="",
                                       refusals=counted, total=len(HARMFUL)))
        chosen, basis = _final_front(records, SearchSettings(trials=0), None, None, None, None, None, None, {},
                                     print)
        assert basis == "search-generation"
        return {r.params["name"] for r in chosen}

    assert front(0) == {"refuses", "complies"}
    assert "loops" in front(1) and "complies" not in front(1)  # negative control: the old count
