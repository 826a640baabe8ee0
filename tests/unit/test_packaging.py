"""Every third-party module the bridge imports comes from a dependency pyproject declares.

A fresh machine gets only what pyproject.toml names: a module that happens to be installed
here (pulled in by Synapse, say) but is not declared breaks `pip install passerelle`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The harness and the demo run only with the `demo`/`test` extras (Synapse and its PyYAML).
EXTRAS_ONLY = ("harness", "demo.py")


def _requirement_name(spec: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", spec)
    assert name is not None, spec
    return name.group(0).lower().replace("_", "-").replace(".", "-")


def _imported_top_level(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_imports_are_declared_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_requirement_name(spec) for spec in project["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    undeclared: dict[str, list[str]] = {}
    for path in sorted((ROOT / "bridge").rglob("*.py")):
        relative = path.relative_to(ROOT / "bridge")
        if relative.parts[0] in EXTRAS_ONLY:
            continue
        for module in _imported_top_level(path):
            if module in sys.stdlib_module_names or module in ("bridge", "__future__"):
                continue
            dists = {_requirement_name(d) for d in providers.get(module, [])}
            assert dists, f"{relative} imports {module}, which no installed package provides"
            if not dists & declared:
                undeclared.setdefault(module, []).append(str(relative))
    assert not undeclared, f"imported but not in pyproject dependencies: {undeclared}"


def test_the_check_sees_imports() -> None:
    """The walk above finds real imports (it would pass vacuously otherwise)."""
    found = _imported_top_level(ROOT / "bridge" / "core" / "html.py")
    assert "nh3" in found
