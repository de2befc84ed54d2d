"""The benchmark scripts still run against today's API (tiny model, seconds): vs_heretic's intervene side and its
report when an opponent fails. benchmarks/ is not a package; the scripts are loaded from their files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from intervene.testing import tiny_model, tiny_tokenizer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def test_vs_heretic_judges_intervene_and_reports_a_failing_opponent(tmp_path):
    tokenizer = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    fake = tmp_path / "heretic-venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "python").write_text("#!/bin/sh\nexit 0\n")  # a "heretic" that prints its components, then dies
    (fake / "python").chmod(0o755)
    (fake / "heretic").write_text("#!/bin/sh\necho '* Abliterable components:'\n"
                                  "echo '  * attn.o_proj: 2 modules total'\n"
                                  "echo \"AttributeError: 'Linear' object has no attribute 'base_layer'\"\nexit 1\n")
    (fake / "heretic").chmod(0o755)
    vs = load_script("vs_heretic")
    out = tmp_path / "r.json"
    assert vs.main(["--model", str(tmp_path / "model"), "--trials", "2", "--startup-trials", "2", "--limit", "4",
                    "--eval-limit", "3", "--max-new-tokens", "2", "--search-new-tokens", "2", "--batch-size", "4",
                    "--work", str(tmp_path / "work"), "--heretic-python", str(fake / "python"),
                    "--skip-senbonzakura", "--no-progress", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["baseline"]["total"] == 3 and set(doc["baseline"]) == {"refusals", "total", "kl", "degenerate"}
    (run,) = doc["runs"]
    assert run["tool"] == "intervene" and run["trials"] == 2 and run["members"]
    for m in run["members"]:  # every front member judged on the 3 eval harmful prompts, classes included
        assert m["eval_total"] == 3 and 0 <= m["eval_degenerate"] <= m["eval_refusals"] <= 3 and m["eval_kl"] >= 0
    (failed,) = [s for s in doc["skipped"] if s.startswith("heretic")]
    assert "heretic: failed (RuntimeError" in failed and "attn.o_proj (2)" in failed
    assert "AttributeError: 'Linear' object has no attribute 'base_layer'" in failed
