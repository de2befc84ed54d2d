"""``intervene eval BAKED --reference SOURCE`` on the real organism (issue 18's acceptance): the
first-token KL it reports equals one computed here independently (plain transformers, one prompt at
a time, no intervene code on the scoring path) to 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.slow
def test_eval_baked_against_its_source_equals_an_independent_first_token_kl(tmp_path, organism):
    import transformers

    from intervene.bake import bake
    from intervene.cli import main
    from intervene.config.schema import load_config
    from intervene.io.prompts import load_prompts

    baked = bake(load_config(CONFIGS / "organism.yaml"), tmp_path / "baked", progress=False).output
    report_path = tmp_path / "r.json"
    assert main(["eval", str(baked), "--reference", str(organism), "--limit", "8", "--max-new-tokens", "8",
                 "--no-progress", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())

    harmless = load_prompts("builtin:harmless:eval", limit=8)
    tokenizer = transformers.AutoTokenizer.from_pretrained(organism)
    source = transformers.AutoModelForCausalLM.from_pretrained(organism, dtype=torch.float32).eval()
    edited = transformers.AutoModelForCausalLM.from_pretrained(baked, dtype=torch.float32).eval()
    kls = []
    for prompt in harmless:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            p = torch.log_softmax(source(input_ids=ids).logits[0, -1].double(), -1)
            q = torch.log_softmax(edited(input_ids=ids).logits[0, -1].double(), -1)
        kls.append(float((p.exp() * (p - q)).sum()))
    expected = sum(kls) / len(kls)
    assert abs(report["kl_divergence"] - expected) <= 1e-4, (report["kl_divergence"], expected)
    assert expected > 0.01  # the bake changed the model: not a 0 == 0 comparison
    assert report["reference"] == str(organism) and report["kl_divergence_answer"] > 0
    assert report["baseline"]["harmful"]["refusals"] > report["harmful"]["refusals"]
