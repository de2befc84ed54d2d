"""The baked model card: Hugging Face front matter (base_model, the source's licence, tags with
``intervene``), intervene's section, then the source card's own text; licence files copied."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from intervene.bake import bake
from intervene.bake.outputs import base_model_id, read_source_card
from intervene.config.schema import parse_config
from intervene.testing import make_measurements, save_tiny, tiny_model

SOURCE_TEXT = "# Tiny Llama\n\nUse it kindly. Licensed under the Llama 3.2 Community License.\n"
FRONT = "---\nlicense: llama3.2\nlanguage:\n- en\ntags:\n- facebook\n- llama-3\n---\n"
LICENCE_FILES = {"LICENSE": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT\n", "NOTICE": "Copyright Meta\n",
                 "USE_POLICY.md": "# Acceptable Use Policy\n", "licenses/THIRD_PARTY.txt": "MIT\n"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    src = save_tiny(tiny_model("llama"), root / "models--acme--tiny-llama" / "snapshots" / "abc123")
    for name, text in LICENCE_FILES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    make_measurements(2, path=str(root / "m.safetensors")).save(root / "m.safetensors")
    return src


def bake_with_card(src: Path, card: str | None, out: Path) -> str:
    readme = src / "README.md"
    if card is None:
        readme.unlink(missing_ok=True)
    else:
        readme.write_text(card)
    cfg = parse_config({"model": str(src), "measurements": str(src.parents[2] / "m.safetensors"),
                        "ablate": [{"layers": "0:2", "measurement": 1, "scale": 1.0}]})
    bake(cfg, output=out, progress=False)
    return (out / "README.md").read_text()


def split_front(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]), text[end + 5:]


def test_card_has_front_matter_keeps_source_text_and_licence_files(source, tmp_path):
    out = tmp_path / "out"
    card = bake_with_card(source, FRONT + SOURCE_TEXT, out)
    meta, body = split_front(card)
    assert meta["base_model"] == "acme/tiny-llama"
    assert meta["license"] == "llama3.2" and meta["language"] == ["en"]
    assert meta["tags"] == ["facebook", "llama-3", "intervene"]
    assert meta["library_name"] == "transformers"
    ours, theirs = body.index("edited with intervene"), body.index(SOURCE_TEXT.strip())
    assert ours < theirs  # intervene's section first, the source text below it, whole
    assert "license: llama3.2" not in body  # the source's front matter is not repeated as text
    for name, text in LICENCE_FILES.items():
        assert (out / name).read_text() == text, name


def test_card_without_source_card_or_licence(source, tmp_path):
    meta, body = split_front(bake_with_card(source, None, tmp_path / "out"))
    assert meta["license"] == "unknown" and meta["tags"] == ["intervene"]
    assert "source model's card" not in body


def test_card_whose_front_matter_is_not_yaml_keeps_every_word(source, tmp_path):
    broken = "---\nlicense: [unclosed\n---\n" + SOURCE_TEXT
    meta, body = split_front(bake_with_card(source, broken, tmp_path / "out"))
    assert meta["license"] == "unknown"
    assert "license: [unclosed" in body and SOURCE_TEXT.strip() in body


def test_read_source_card_and_base_model_id(tmp_path):
    (tmp_path / "README.md").write_text(FRONT + SOURCE_TEXT)
    meta, text = read_source_card(tmp_path)
    assert meta["license"] == "llama3.2" and text == SOURCE_TEXT
    plain = tmp_path / "my-model"
    plain.mkdir()
    assert base_model_id(plain) == "my-model"
    assert base_model_id(tmp_path / "models--org--name" / "snapshots" / "0f") == "org/name"
