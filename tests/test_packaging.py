"""Packaging: elastic declares version ranges and leaves the user's own torch and Ray in place."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def _requirements() -> dict[str, Requirement]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {Requirement(r).name: Requirement(r) for r in doc["project"]["dependencies"]}


def test_core_dependencies_are_ranges_not_pins():
    reqs = _requirements()
    for name in ("torch", "ray"):
        spec = reqs[name].specifier
        assert all(s.operator != "==" for s in spec), f"{name} is pinned ({spec}): declare a range"
        # The versions this machine tests, and the oldest one each range admits, both satisfy it.
        assert spec.contains(Version("2.13.0" if name == "torch" else "2.60.0"))
    assert reqs["torch"].specifier.contains(Version("2.11.0")), "the GPU check runs on torch 2.11"


def test_installing_keeps_the_torch_and_ray_already_installed():
    """A resolve of `pip install -e .[test]` in this venv (torch 2.13 already installed) would
    install elastic and nothing else that matters: no torch, no Ray."""
    import torch

    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "-e", f"{ROOT}[test]"],
        capture_output=True, text=True, timeout=100)
    assert report.returncode == 0, report.stderr[-2000:]
    doc = json.loads(report.stdout[report.stdout.index("{"):])
    would = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in doc["install"]}
    assert "torch" not in would and "ray" not in would, f"would replace: {would} (torch here: {torch.__version__})"


def test_the_product_never_imports_its_test_support():
    """elastic.testing (the doubles tests and benchmarks share) stays out of every product path:
    no module of elastic outside it imports it, at the top or inside a function."""
    import ast

    offenders = []
    for path in sorted((ROOT / "elastic").rglob("*.py")):
        if "testing" in path.relative_to(ROOT / "elastic").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
            else:
                continue
            if any(n == "elastic.testing" or n.startswith("elastic.testing.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"the product imports its test support: {offenders}"
