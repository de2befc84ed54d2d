"""abliterix, from its own venv, offline. Its prompt sources are datasets, never plain text files (a Hub id,
a ``load_dataset`` directory or a ``save_to_disk`` directory), so each local prompt file is first written
as a ``save_to_disk`` dataset (one ``text`` column, split ``train``) by the venv's own ``datasets``. Its
settings go in ``abliterix.toml`` in the work directory (its default config path): the local model,
float32 on the CPU, a fixed batch size (no batch-size probing), ``max_gen_tokens`` = the common search
length, the common trial and start-up budget, ``seed`` and ``optimization.sampler_seed``, the organism's
system prompt, and the TRAIN prompts as its evaluation prompts too (its search objective, like every
other opponent's). Everything else is abliterix's default (LoRA steering, full row-norm preservation, its
keyword refusal detector; the LLM judge stays off). Its non-interactive mode exports one trial only, so
the notebook-mode menus are driven instead (:mod:`peers.menu`), saving its whole front."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .base import OpponentFailure, Setup, package_version, venv_missing
from .driven import run_driven
from .heretic import default_system_prompt, toml_str
from .records import OpponentRun

DEFAULT_PYTHON = Path("~/.cache/intervene/venv-abliterix/bin/python").expanduser()
PROMPT_SETS = {"benign_prompts": "harmless_train", "target_prompts": "harmful_train",
               # its search scores trials on these: the train prompts, as for every opponent
               "benign_eval_prompts": "harmless_train", "target_eval_prompts": "harmful_train"}

# run by the venv's python: argv = (out_dir, prompt_file) pairs
WRITE_DATASETS = """import sys
from datasets import Dataset, NamedSplit
for out, src in zip(sys.argv[1::2], sys.argv[2::2]):
    lines = [l.strip() for l in open(src, encoding="utf-8") if l.strip()]
    Dataset.from_dict({"text": lines}, split=NamedSplit("train")).save_to_disk(out)
"""


def abliterix_config(setup: Setup, datasets: dict[str, Path], system_prompt: str) -> str:
    sources = "".join(f"\n[{section}]\ndataset = {toml_str(str(datasets[key]))}\nsplit = \"train\"\ncolumn = \"text\"\n"
                      for section, key in PROMPT_SETS.items())
    return (
        f"seed = {setup.seed}\n"
        f"system_prompt = {toml_str(system_prompt)}\n"
        "\n[model]\n"
        f"model_id = {toml_str(str(setup.model_dir))}\n"
        "dtype_fallback_order = [\"float32\"]\n"
        "device_map = \"cpu\"\n"
        "trust_remote_code = false\n"
        "\n[inference]\n"
        f"batch_size = {setup.batch_size}\n"
        f"max_gen_tokens = {setup.search_new_tokens}\n"
        "\n[optimization]\n"
        f"num_trials = {setup.trials}\n"
        f"num_warmup_trials = {min(setup.startup_trials, setup.trials)}\n"
        "checkpoint_dir = \"checkpoints\"\n"
        f"sampler_seed = {setup.seed}\n"
        "\n[detection]\n"
        "llm_judge = false\n"
        + sources
    )


@dataclass
class Abliterix:
    python: Path = DEFAULT_PYTHON
    name: str = "abliterix"

    def unavailable(self) -> str | None:
        return venv_missing(self.python, "scripts/peer_venvs.sh abliterix")

    def version(self) -> str:
        return package_version(self.python, "abliterix")

    def write_datasets(self, setup: Setup, out: Path) -> dict[str, Path]:
        keys = sorted(set(PROMPT_SETS.values()))
        dirs = {key: out / "datasets" / key for key in keys}
        args = [str(p) for key in keys for p in (dirs[key], setup.files[key].resolve())]
        proc = subprocess.run([str(self.python), "-c", WRITE_DATASETS, *args], capture_output=True, text=True,
                              env=setup.child_env())
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise OpponentFailure(f"writing its prompt datasets failed: {tail[0]}")
        return dirs

    def run(self, setup: Setup) -> OpponentRun:
        out = setup.fresh_dir(self.name)
        datasets = self.write_datasets(setup, out)
        (out / "abliterix.toml").write_text(
            abliterix_config(setup, datasets, default_system_prompt(setup.judge.tokenizer)))
        script = self.python.parent / "abliterix"
        cmd = [str(script)] if script.exists() else [str(self.python), "-m", "abliterix.cli"]
        env = setup.child_env(COLAB_GPU="1", COLUMNS="250", TERM="dumb")  # notebook mode: numbered menus on stdin
        return run_driven(setup, self.name, self.version(), cmd, out, env)


__all__ = ["DEFAULT_PYTHON", "PROMPT_SETS", "abliterix_config", "Abliterix"]
