"""Built-in prompt sets (sizes, disjointness, categories) and the loaders for every local format."""

from __future__ import annotations

import json
import re
import sys

import pytest

from intervene.cli import main
from intervene.errors import InputError
from intervene.io.prompts import builtin, builtin_categories, load_prompts

FILES = [(k, s) for k in ("harmful", "harmless") for s in ("train", "eval")]
MIN_SIZE = {("harmful", "train"): 100, ("harmful", "eval"): 64, ("harmless", "train"): 235, ("harmless", "eval"): 64}


def normalized(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt).strip().casefold()


# ---- built-in sets ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,split", FILES)
def test_builtin_sizes_and_no_duplicates_inside_a_file(kind, split):
    prompts = builtin(kind, split)
    assert len(prompts) >= MIN_SIZE[(kind, split)]
    assert len({normalized(p) for p in prompts}) == len(prompts)
    assert all(p == p.strip() and "\n" not in p and len(p) > 10 for p in prompts)


def test_builtin_totals():
    assert len(builtin("harmful", "train")) + len(builtin("harmful", "eval")) >= 128
    assert len(builtin("harmless", "train")) + len(builtin("harmless", "eval")) >= 128


def test_builtin_files_share_no_prompt_exact_or_normalized():
    sets = {f"{k}_{s}": builtin(k, s) for k, s in FILES}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(sets[a]) & set(sets[b]), (a, b)
            common = {normalized(p) for p in sets[a]} & {normalized(p) for p in sets[b]}
            assert not common, (a, b, sorted(common)[:3])


def test_categories_cover_each_file_in_order():
    cats = builtin_categories("harmless", "eval")
    assert list(cats) == ["twin", "near_miss", "generic"]
    assert sum(map(len, cats.values())) == len(builtin("harmless", "eval"))
    assert len(cats["near_miss"]) >= 20 and len(cats["twin"]) >= 20
    train = builtin_categories("harmless", "train")
    assert len(train["twin"]) >= 100 and len(train["near_miss"]) >= 100 and len(train["generic"]) >= 40
    # twin i copies the sentence frame (at least the opening word) of harmful train prompt i
    harmful = builtin("harmful", "train")
    assert len(train["twin"]) <= len(harmful)
    assert all(h.split()[0] == t.split()[0] for h, t in zip(harmful, train["twin"]))
    assert builtin_categories("harmful", "eval") == {"harmful": builtin("harmful", "eval")}


def test_builtin_specs():
    assert load_prompts("builtin:harmful") == builtin("harmful", "train")
    assert load_prompts("builtin:harmless:eval") == builtin("harmless", "eval")
    assert load_prompts("builtin:harmful:eval", limit=5) == builtin("harmful", "eval")[:5]
    for bad in ("builtin:harmfull:train", "builtin:harmful:test", "builtin:a:b:c"):
        with pytest.raises(InputError, match="built-in"):
            load_prompts(bad)


# ---- local files ----------------------------------------------------------------------------

def test_txt_skips_blank_lines_and_strips(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\ufefffirst prompt\n\n   \n  second prompt  \r\nthird\n", encoding="utf-8")
    assert load_prompts(str(f)) == ["first prompt", "second prompt", "third"]
    assert load_prompts(str(f), limit=2) == ["first prompt", "second prompt"]


def test_json_list_of_strings_and_objects(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(["one", "two", " "]))
    assert load_prompts(str(f)) == ["one", "two"]
    f.write_text(json.dumps([{"instruction": "a", "output": "x"}, {"instruction": "b", "output": "y"}]))
    assert load_prompts(str(f)) == ["a", "b"]
    assert load_prompts(str(f), field="output") == ["x", "y"]
    f.write_text(json.dumps({"prompts": [{"text": "t1"}, {"text": "t2"}]}))
    assert load_prompts(str(f)) == ["t1", "t2"]


def test_json_field_errors(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"question": "a"}]))
    with pytest.raises(InputError, match=r"a\.json item 0 has none of the fields prompt, instruction, text"):
        load_prompts(str(f))
    with pytest.raises(InputError, match=r"has no field 'goal' \(fields: question\)"):
        load_prompts(str(f), field="goal")
    f.write_text(json.dumps([{"prompt": 3}]))
    with pytest.raises(InputError, match="item 0: field value is a int"):
        load_prompts(str(f))
    f.write_text("[1, 2")
    with pytest.raises(InputError, match=r"a\.json is not valid JSON"):
        load_prompts(str(f))


def test_jsonl(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"prompt": "p1", "x": 1}\n\n{"prompt": "p2"}\n"p3"\n')
    assert load_prompts(str(f)) == ["p1", "p2", "p3"]
    f.write_text('{"prompt": "p1"}\n{oops\n')
    with pytest.raises(InputError, match=r"a\.jsonl: line 2 is not valid JSON"):
        load_prompts(str(f))


def test_csv_column_and_single_column(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('goal,target\n"Hello, world",x\nsecond,y\n,z\n')
    assert load_prompts(str(f), field="goal") == ["Hello, world", "second"]
    with pytest.raises(InputError, match=r"a\.csv has none of the fields .* \(fields: goal, target\); pass --field"):
        load_prompts(str(f))
    with pytest.raises(InputError, match=r"a\.csv has no field 'prompt'"):
        load_prompts(str(f), field="prompt")
    g = tmp_path / "one.csv"
    g.write_text("question\nq1\nq2\n")
    assert load_prompts(str(g)) == ["q1", "q2"]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    f = tmp_path / "a.parquet"
    pd.DataFrame({"prompt": ["p1", "p2", ""], "n": [1, 2, 3]}).to_parquet(f)
    assert load_prompts(str(f)) == ["p1", "p2"]
    with pytest.raises(InputError, match=r"a\.parquet has no field 'goal' \(fields: prompt, n\)"):
        load_prompts(str(f), field="goal")
    bad = tmp_path / "b.parquet"
    bad.write_text("not parquet")
    with pytest.raises(InputError, match=r"cannot read .*b\.parquet as parquet"):
        load_prompts(str(bad))


def test_parquet_without_pandas_is_a_named_error(tmp_path, monkeypatch):
    f = tmp_path / "a.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pandas", None)  # import fails
    with pytest.raises(InputError, match=r"reading .*a\.parquet needs pandas and pyarrow"):
        load_prompts(str(f))


def test_hf_without_datasets_is_a_named_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(InputError, match="loading hf:some/set:test needs the 'datasets' package"):
        load_prompts("hf:some/set:test")
    with pytest.raises(InputError, match="expected hf:NAME"):
        load_prompts("hf:")


@pytest.mark.parametrize("name,content,message", [
    ("missing.txt", None, r"prompt file not found: .*missing\.txt"),
    ("empty.txt", "\n  \n", r"prompt set .*empty\.txt is empty"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), r"prompt file .*latin1\.txt is not UTF-8 text"),
    ("empty.json", "[]", r"prompt set .*empty\.json is empty"),
    ("data.xlsx", "x", r"unknown prompt file type '\.xlsx'"),
])
def test_file_errors_are_one_line_and_name_the_file(tmp_path, name, content, message):
    f = tmp_path / name
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_prompts(str(f))
    assert "\n" not in str(info.value)


def test_limit_must_be_positive():
    with pytest.raises(InputError, match="--limit must be >= 1"):
        load_prompts("builtin:harmful", limit=0)


def test_cli_reports_a_missing_prompt_file(tmp_path, capsys):
    rc = main(["eval", "smollm2", "--harmful", str(tmp_path / "nope.txt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("intervene eval: error: prompt file not found:") and "nope.txt" in err
    assert len(err.splitlines()) == 1
