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
    assert "torch" in _dry_run_installs(venv, pinned)
