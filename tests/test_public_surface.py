"""The line between what users import and what may change (issue 27 item 2): the package root holds
only public modules, everything else lives under elastic._internal, what `elastic` exports comes from
public modules, and no module reaches into another module's private names."""

from __future__ import annotations

import ast
import importlib
import pathlib

import elastic

PKG = pathlib.Path(elastic.__file__).parent
PUBLIC_MODULES = {"__init__", "callbacks", "cli", "config", "context", "errors", "policy", "result", "sampler",
                  "train_state", "trainer"}
PUBLIC_PACKAGES = {"_internal", "chaos", "testing"}  # chaos and testing: test tooling users run


def test_the_package_root_holds_only_public_modules():
    modules = {p.stem for p in PKG.glob("*.py")}
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert modules == PUBLIC_MODULES, "a new root module is public API: put plumbing under elastic/_internal/"
    assert packages == PUBLIC_PACKAGES


def test_every_export_comes_from_a_public_module_and_resolves():
    for name in elastic.__all__:
        obj = getattr(elastic, name)
        home = elastic._WHERE[name]
        assert "._internal" not in home, f"elastic.{name} is exported from {home}: export it from a public module"
        assert getattr(importlib.import_module(home), name) is obj


def test_policy_api_is_public():
    from elastic import policy
    for name in policy.__all__:
        assert getattr(policy, name) is not None
    assert elastic.DefaultPolicy is policy.DefaultPolicy


def _private_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("elastic"):
            for alias in node.names:
                if alias.name.startswith("_") and alias.name != "_internal":
                    yield f"{path.relative_to(PKG.parent)}:{node.lineno} imports {alias.name} from {node.module}"


def test_no_module_imports_another_modules_private_names():
    found = [hit for path in sorted(PKG.rglob("*.py")) for hit in _private_imports(path)]
    assert not found, "\n".join(found)
