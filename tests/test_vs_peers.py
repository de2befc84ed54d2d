"""benchmarks/vs_peers.py's pure parts, fast and offline, no peer venv needed: the menu driver replayed on
transcripts heretic 1.4.0 and abliterix 1.12.2 really printed (tests/data/vs_peers/), the progress read from
a failing log, the edited-tensor diff on small safetensors checkpoints, the front and the JSON / Markdown
assembly, the peers' config files (valid TOML with the settings they must carry; checked against the peer's
own settings class where its venv exists, skipped otherwise), and one end-to-end run on a tiny model
with a stand-in tool that speaks the peers' menus (tests/data/vs_peers/fake_tool.py)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
DATA = Path(__file__).resolve().parent / "data" / "vs_peers"
sys.path.insert(0, str(BENCHMARKS))

from peers import abliterix, heretic  # noqa: E402
from peers.menu import MenuDriver, MenuError, front_trials, last_error, last_menu, read_progress  # noqa: E402
from peers.records import (  # noqa: E402
    EvalScore,
    Member,
    OpponentRun,
    Progress,
    mark_front,
    markdown_table,
    results_doc,
    summarize_names,
    text_report,
)
from peers.tensors import diff_checkpoints  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = re.compile(r"(Enter number: |Path to the folder:+ ?)")


def replay(transcript: str, save_root: Path) -> tuple[MenuDriver, list[str]]:
    """Feeds a captured transcript to a driver prompt by prompt, as the process printed it."""
    driver, answers = MenuDriver(save_root), []
    ends = [m.end() for m in PROMPTS.finditer(transcript)]
    for end in ends:
        for cut in (end - 3, end):  # half a prompt first: no answer until the prompt is complete
            reply = driver.answer(transcript[:cut])
            if cut < end:
                assert reply is None
            elif reply is not None:
                answers.append(reply)
    return driver, answers


@pytest.mark.parametrize("tool", ["heretic", "abliterix"])
def test_driver_saves_every_front_trial_then_exits_on_a_real_transcript(tool, tmp_path):
    transcript = (DATA / f"{tool}_menus.log").read_text()
    menu = last_menu(transcript, "Which trial do you want to use?")
    front = front_trials(menu)
    assert front, "the transcript lists its front"
    driver, answers = replay(transcript, tmp_path)
    # per front trial: its number, "Save the model", a folder, back to the trial menu; then "Exit program"
    assert [s.trial for s in driver.saved] == [t.trial for t in front]
    assert [s.dir for s in driver.saved] == [str(tmp_path / f"trial_{t.trial:04d}") for t in front]
    exit_number = next(str(n) for n, title in menu if title == "Exit program")
    assert answers[-1] == exit_number and len(answers) == 4 * len(front) + 1
    for trial in front:
        assert trial.total > 0 and 0 <= trial.refusals <= trial.total and trial.kl >= 0


def test_driver_refuses_a_menu_it_does_not_know(tmp_path):
    with pytest.raises(MenuError, match="unexpected menu"):
        MenuDriver(tmp_path).answer("Pick a colour\n[1] red\n[2] blue\nEnter number: ")
    with pytest.raises(MenuError, match="no trial to save"):
        MenuDriver(tmp_path).answer("Path to the folder:: ")


def test_menu_lines_and_trial_titles_parse():
    text = ("Which trial do you want to use?\n[1] [Trial   7] Refusals:  3/144, KL divergence: 0.1234\n"
            "[2] [Trial  12] Refusals: 10/144, KL divergence: 1.5e-02\n[3] Run additional trials\n[4] Exit program\n"
            "Enter number: ")
    menu = last_menu(text, "Which trial do you want to use?")
    assert [n for n, _ in menu] == [1, 2, 3, 4]
    trials = front_trials(menu)
    assert [(t.choice, t.trial, t.refusals, t.total) for t in trials] == [(1, 7, 3, 144), (2, 12, 10, 144)]
    assert trials[1].kl == pytest.approx(0.015)


@pytest.mark.parametrize("tool", ["heretic", "abliterix"])
def test_progress_of_a_finished_run(tool):
    progress = read_progress((DATA / f"{tool}_menus.log").read_text(), "x.log")
    assert progress.trials_started == progress.trials_finished == 2
    assert progress.components and all(re.fullmatch(r"[\w.]+ \(\d+( per layer)?\)", c) for c in progress.components)


def test_progress_and_error_of_a_failed_run():
    # abliterix 1.12.2 on a tiny random Glm4Moe (intervene.testing.tiny_model("glm4_moe")): dies in its first trial
    log = (DATA / "abliterix_moe_failure.log").read_text()
    progress = read_progress(log, "abliterix.log")
    assert progress.trials_started == 1 and progress.trials_finished == 0
    assert progress.stage == "Running trial 1 of 2..."
    assert progress.components == [f"{c} (1 per layer)" for c in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                  "attn.o_proj", "mlp.down_proj")] + \
        ["MoE: ? fused experts, 2 router layers"]
    assert last_error(log) == "AttributeError: 'Linear' object has no attribute 'base_layer'"
    assert last_error("all fine\n") == ""


# ---- the edited-tensor diff ---------------------------------------------------------------------

def checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_diff_names_exactly_the_changed_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.{name}.weight": torch.randn(4, 4, generator=g)
            for i in range(3) for name in ("self_attn.o_proj", "mlp.down_proj")}
    base["model.embed_tokens.weight"] = torch.randn(8, 4, generator=g)
    original = checkpoint(tmp_path / "a", base)
    edited = dict(base)
    edited["model.layers.1.self_attn.o_proj.weight"] = base["model.layers.1.self_attn.o_proj.weight"] * 0.5
    edited["model.layers.2.mlp.down_proj.weight"] = base["model.layers.2.mlp.down_proj.weight"].to(torch.bfloat16)
    edited["model.layers.0.mlp.down_proj.weight"] = (base["model.layers.0.mlp.down_proj.weight"] + 1).to(torch.bfloat16)
    edited["lm_head.weight"] = torch.ones(8, 4)
    del edited["model.embed_tokens.weight"]
    diff = diff_checkpoints(original, checkpoint(tmp_path / "b", edited))
    # halved: relative change 0.5; bf16 rounding alone: no change; bf16 and shifted: changed
    assert diff.changed_names == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    assert diff.changed["model.layers.1.self_attn.o_proj.weight"] == pytest.approx(0.5)
    assert diff.retyped == ["model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    assert diff.added == ["lm_head.weight"] and diff.missing == ["model.embed_tokens.weight"]
    assert diff_checkpoints(original, original).changed == {}  # negative control


def test_summarize_names_folds_layer_and_expert_numbers():
    names = [f"model.layers.{i}.self_attn.o_proj.weight" for i in (3, 4, 5, 9)] + \
            [f"model.layers.{i}.mlp.experts.{e}.down_proj.weight" for i in (18, 19) for e in (0, 1, 2)] + \
            ["lm_head.weight"]
    assert summarize_names(names) == ["model.layers.{3-5,9}.self_attn.o_proj.weight",
                                      "model.layers.{18-19}.mlp.experts.{0-2}.down_proj.weight", "lm_head.weight"]
    assert summarize_names([]) == []


# ---- front, JSON, Markdown ----------------------------------------------------------------------

def score(not_complied: int, kl: float, degenerate: int = 0) -> EvalScore:
    return EvalScore(not_complied - degenerate, degenerate, 10 - not_complied, 10, kl, 2 * kl, 10.0 + kl, 1.0 + kl)


def test_front_and_documents():
    members = [Member(0, 5, 20, 0.1, score(2, 0.30)), Member(1, 9, 20, 0.05, score(4, 0.10, degenerate=1)),
               Member(2, 8, 20, 0.07, score(4, 0.20)), Member(3, detail="no checkpoint saved")]
    members[0].edited_tensors = ["model.layers.3.self_attn.o_proj.weight"]
    members[1].edited_tensors = ["model.layers.4.self_attn.o_proj.weight", "model.layers.3.self_attn.o_proj.weight"]
    mark_front(members)
    assert [m.on_eval_front for m in members] == [True, True, False, False]  # 2 is dominated by 1; 3 not judged
    ok = OpponentRun("heretic", "1.4.0", "ok", 16, wall_s=1800.0, trial_loop_s=1200.0, members=members)
    assert ok.trials_per_hour == pytest.approx(32.0) and ok.trial_loop_per_hour == pytest.approx(48.0)
    failed = OpponentRun("abliterix", "1.12.2", "failed", 16, error="exit status 1: search not finished: KeyError: 'x'",
                         progress=Progress("Running trial 1 of 16...", 1, 0, ["attn.o_proj (1 per layer)"], "a.log"))
    skipped = OpponentRun("senbonzakura", "-", "skipped", 16, error="not installed")
    runs = [ok, failed, skipped]
    header = {"command": "python benchmarks/vs_peers.py", "date": "2026-12-06 08:00 UTC", "machine": "2 CPU cores",
              "load_average": {"start": [1.5, 1, 1], "end": [2.25, 2, 2]}, "n_eval": "10 / 10", "max_new_tokens": 48}
    baseline = score(10, 0.0)
    text = text_report(runs, {"trials": 16}, baseline)
    doc = json.loads(json.dumps(results_doc(runs, {"trials": 16}, baseline, header, text)))
    first, second, third = doc["opponents"]
    assert first["edited_tensors"] == [f"model.layers.{i}.self_attn.o_proj.weight" for i in (3, 4)]
    assert first["edited_summary"] == ["model.layers.{3-4}.self_attn.o_proj.weight"]
    assert first["members"][1]["eval"]["not_complied"] == 4 and first["members"][3]["eval"] is None
    assert second["status"] == "failed" and second["progress"]["trials_started"] == 1 and second["members"] == []
    assert third["status"] == "skipped" and third["trials_per_hour"] is None
    assert doc["load_average"]["start"][0] == 1.5 and doc["baseline"]["total"] == 10
    table = markdown_table(runs, header)
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]  # after the head and its rule
    assert len(rows) == 3 and all(row.count(" | ") == 6 for row in rows)
    assert "2/10 @ KL 0.300" in rows[0] and "4/10 (1 degen.) @ KL 0.100" in rows[0] and "@ KL 0.200" not in rows[0]
    assert "**failed**" in rows[1] and "Running trial 1 of 16" in rows[1] and "**skipped**" in rows[2]
    assert "load average 1.50 at the start, 2.25 at the end" in table
    assert "FAILED: exit status 1" in text and "got to: Running trial 1 of 16..." in text


def test_mark_front_ignores_nan_free_ties():
    a, b = Member(0, eval=score(1, 0.1)), Member(1, eval=score(1, 0.1))
    mark_front([a, b])
    assert a.on_eval_front and b.on_eval_front and not math.isnan(a.eval.first_token_kl)


# ---- the peers' config files ---------------------------------------------------------------------

def setup_for(tmp_path: Path, trials: int = 16, startup: int = 6):
    from peers.base import Setup

    files = {f"{kind}_{split}": tmp_path / f"{kind}_{split}.txt" for kind in ("harmful", "harmless")
             for split in ("train", "eval")}
    return Setup(tmp_path / "model", files, tmp_path, trials, startup, 7, 24, 16, 1, 60.0, judge=None)


def test_heretic_config_is_toml_with_the_common_settings(tmp_path):
    cfg = tomllib.loads(heretic.heretic_config(setup_for(tmp_path, trials=2), 'say "hi"\n'))
    assert cfg["n_trials"] == 2 and cfg["n_startup_trials"] == 2 and cfg["seed"] == 7  # start-up capped by trials
    assert cfg["max_response_length"] == 24 and cfg["system_prompt"] == 'say "hi"\n' and cfg["dtypes"] == ["float32"]
    assert cfg["bad_prompts"]["dataset"].endswith("harmful_train.txt")
    assert cfg["bad_evaluation_prompts"]["dataset"].endswith("harmful_train.txt")  # its objective on train prompts


def test_abliterix_config_is_toml_with_the_common_settings(tmp_path):
    datasets = {key: tmp_path / key for key in ("harmful_train", "harmless_train")}
    cfg = tomllib.loads(abliterix.abliterix_config(setup_for(tmp_path), datasets, "sys"))
    assert cfg["seed"] == 7 and cfg["optimization"]["sampler_seed"] == 7
    assert cfg["optimization"]["num_trials"] == 16 and cfg["optimization"]["num_warmup_trials"] == 6
    assert cfg["inference"] == {"batch_size": 16, "max_gen_tokens": 24}
    assert cfg["model"]["model_id"] == str(tmp_path / "model") and cfg["model"]["device_map"] == "cpu"
    assert cfg["detection"]["llm_judge"] is False
    for section, key in abliterix.PROMPT_SETS.items():
        assert cfg[section] == {"dataset": str(tmp_path / key), "split": "train", "column": "text"}


@pytest.mark.slow  # imports abliterix in its venv: half a minute on 2 shared cores
def test_abliterix_accepts_the_config_and_reads_the_datasets(tmp_path):
    python = abliterix.DEFAULT_PYTHON
    if not python.exists():
        pytest.skip(f"abliterix's venv is absent ({python}); scripts/peer_venvs.sh abliterix makes it")
    setup = setup_for(tmp_path)
    for key, path in setup.files.items():
        path.write_text(f"{key} one\n\n{key} two\n")
    datasets = abliterix.Abliterix(python).write_datasets(setup, tmp_path)
    (tmp_path / "abliterix.toml").write_text(abliterix.abliterix_config(setup, datasets, "sys"))
    check = ("import sys; sys.argv = ['abliterix']\nfrom abliterix.settings import AbliterixConfig\n"
             "from abliterix.data import load_prompt_dataset\nc = AbliterixConfig()\n"
             "print(c.optimization.num_trials, c.seed, [m.user for m in load_prompt_dataset(c, c.target_prompts)])")
    out = subprocess.run([str(python), "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "16 7 ['harmful_train one', 'harmful_train two']"


# ---- end to end, with a stand-in tool -------------------------------------------------------------

def fake_venv(tmp_path: Path, script: str) -> Path:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    tool = bin_dir / script
    runner = f"import runpy\nrunpy.run_path({str(DATA / 'fake_tool.py')!r}, run_name='__main__')\n"
    tool.write_text(f"#!{sys.executable}\n{runner}")
    tool.chmod(0o755)
    return bin_dir / "python"


def tiny_checkpoint(tmp_path: Path) -> Path:
    from intervene.testing import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("fail", [False, True])
def test_vs_peers_end_to_end_with_a_stand_in_tool(tmp_path, monkeypatch, fail):
    import vs_peers

    model = tiny_checkpoint(tmp_path)
    edit = "model.layers.1.self_attn.o_proj.weight"
    monkeypatch.setenv("FAKE_TOOL_MODEL", str(model))
    monkeypatch.setenv("FAKE_TOOL_EDIT", edit)
    if fail:
        monkeypatch.setenv("FAKE_TOOL_FAIL", "1")
    out = tmp_path / "r.json"
    assert vs_peers.main(["--model", str(model), "--opponents", "heretic", "abliterix", "--trials", "2",
                          "--limit", "4", "--eval-limit", "3", "--max-new-tokens", "3", "--search-new-tokens", "2",
                          "--batch-size", "4", "--work", str(tmp_path / "work"),
                          "--heretic-python", str(fake_venv(tmp_path, "heretic")),
                          "--abliterix-python", str(tmp_path / "absent" / "python"), "--json", str(out),
                          "--markdown", str(tmp_path / "r.md")]) == 0
    doc = json.loads(out.read_text())
    assert doc["baseline"]["total"] == 3 and doc["settings"]["trials"] == 2 and len(doc["load_average"]["end"]) == 3
    run, absent = doc["opponents"]
    assert absent["name"] == "abliterix" and absent["status"] == "skipped" and "absent" in absent["error"]
    if fail:
        assert run["status"] == "failed"
        assert "AttributeError: 'Linear' object has no attribute 'base_layer'" in run["error"]
        assert run["progress"]["trials_started"] == 1 and run["progress"]["components"][0] == "attn.o_proj (2)"
        return
    assert run["status"] == "ok" and [m["trial"] for m in run["members"]] == [1, 2]
    assert run["edited_tensors"] == [edit]  # read from the saved checkpoints: the one tensor the stand-in scaled
    for m in run["members"]:
        e = m["eval"]
        assert e["total"] == 3 and e["refused"] + e["degenerate"] + e["complied"] == 3
        assert e["first_token_kl"] > 0 and e["answer_kl"] > 0 and e["perplexity_ratio"] != 1.0
    assert not list((tmp_path / "work" / "heretic").glob("trial_*"))  # judged checkpoints are deleted
    assert "| heretic |" in (tmp_path / "r.md").read_text()


def test_vs_heretic_wrapper_maps_its_flags():
    sys.path.insert(0, str(BENCHMARKS))
    import vs_heretic

    assert vs_heretic.translate(["--trials", "4", "--skip-senbonzakura", "--no-progress"]) == \
        ["--trials", "4", "--opponents", "intervene", "heretic", "--work", "bench-vs-heretic"]
    assert vs_heretic.translate(["--skip-intervene", "--work", "w"]) == ["--work", "w", "--opponents", "heretic",
                                                                         "senbonzakura"]
