"""Packaging: intervene declares torch as a range, so installing it keeps the user's torch.

The fast tests read pyproject.toml; the slow one asks pip itself (``pip install --dry-run``) in a
throwaway venv whose only package is a torch 2.12.0 distribution record (metadata only: resolution
needs no real wheel), and checks pip would not install a torch over it — with the old exact pin as
the negative control.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {Requirement(line).name: Requirement(line) for line in lines}


def test_torch_is_a_range_that_admits_other_installed_versions():
    spec = requirements()["torch"].specifier
    for version in ("2.6.0", "2.12.0", "2.12.1", "2.13.0", "2.14.1"):
        assert spec.contains(version), version
    assert not spec.contains("2.5.1") and not spec.contains("3.0.0")
    assert spec.contains("2.12.0+cu128")  # local version labels (CUDA builds) are kept too


def test_no_dependency_is_pinned_exactly():
    for extra in (None, "test", "search", "lens", "nnsight", "lora"):
        for name, req in requirements(extra).items():
            assert not any(s.operator in ("==", "===") for s in req.specifier), f"{name} pinned: {req}"


def test_lower_bounds_are_at_least_what_installed_transformers_needs():
    """Our floors are never below transformers' own (a lower floor would be a promise pip cannot keep)."""
    ours = requirements()
    for line in metadata.requires("transformers") or []:
        req = Requirement(line)
        if req.name not in ours or (req.marker and not req.marker.evaluate({"extra": "torch"})):
            continue
        theirs = [Version(s.version) for s in req.specifier if s.operator == ">="]
        floor = [Version(s.version) for s in ours[req.name].specifier if s.operator == ">="]
        if theirs:
            assert floor and floor[0] >= max(theirs), f"{req.name}: ours {ours[req.name]}, transformers {req}"


def test_peft_is_an_optional_extra_only():
    assert "peft" not in requirements()
    assert "peft" in requirements("lora")


def _dry_run_installs(venv: Path, project: Path) -> dict[str, str]:
    report = venv / "report.json"
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet",
                    "--report", str(report), str(project)], check=True, capture_output=True, text=True)
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_pip_install_over_another_torch_keeps_it(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    record = Path(site) / "torch-2.12.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.12.0\n")
    (record / "INSTALLER").write_text("pip\n")
    (record / "RECORD").write_text("")
    installs = _dry_run_installs(venv, ROOT)
    assert "intervene" in installs and "transformers" in installs
    assert "torch" not in installs, installs["torch"]
    # negative control: the same project with the old exact pin would replace it
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    torch_line = next(line for line in text.splitlines() if line.strip().startswith('"torch'))
    (pinned / "pyproject.toml").write_text(text.replace(torch_line, '    "torch==2.13.0",').replace(
        'readme = "README.md"\n', ""))
    (pinned / "intervene").mkdir()
    (pinned / "intervene" / "__init__.py").write_text("")
    (pinned / "intervene" / "version.py").write_text('__version__ = "0.1.0"\n')  # pyproject's dynamic version
    assert "torch" in _dry_run_installs(venv, pinned)


# ---- the pinned environment (constraints.txt, scripts/setup.sh) ----------------------------------------

def _check_constraints():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_constraints", ROOT / "scripts" / "check_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_every_package_exactly_and_setup_uses_them():
    check = _check_constraints()
    pinned = check.read_constraints(ROOT / "constraints.txt")
    assert {"transformers", "accelerate", "safetensors", "peft", "optuna", "pytest", "pip"} <= set(pinned)
    assert "torch" not in pinned and "intervene" not in pinned  # setup.sh pins torch; intervene is the checkout
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "CONSTRAINTS=${CONSTRAINTS-constraints.txt}" in setup and "check_constraints.py" in setup
    assert setup.count('"${PINNED[@]}"') == 5  # every pip install in it is constrained


def test_check_constraints_reports_every_kind_of_difference(tmp_path):
    check = _check_constraints()
    path = tmp_path / "c.txt"
    path.write_text("# comment\nFoo_Bar==1.0  # trailing\nbaz==2.0\nqux==3.0\n")
    pinned = check.read_constraints(path)
    assert pinned == {"foo-bar": "1.0", "baz": "2.0", "qux": "3.0"}
    have = {"foo-bar": "1.0", "baz": "2.1", "extra": "0.1", "torch": "9.9+cpu", "intervene": "0.1.0"}
    assert check.differences(pinned, have) == [
        "baz: 2.1 installed, constraints say 2.0",
        "extra 0.1 is installed but not in the constraints",
        "qux==3.0 is in the constraints but not installed",
    ]
    assert check.differences({"a": "1.0"}, {"a": "1.0+cpu"}) == []
    path.write_text("foo>=1\n")
    with pytest.raises(SystemExit, match="not a 'name==version' line"):
        check.read_constraints(path)


def test_this_environment_matches_the_constraints():
    """The suite runs in the environment setup.sh made: exactly the pinned versions."""
    check = _check_constraints()
    assert check.differences(check.read_constraints(ROOT / "constraints.txt"), check.installed()) == []
