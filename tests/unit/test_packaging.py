"""What installing the wheel gives a fresh machine, checked from pyproject.toml.

Every third-party module the bridge imports comes from a dependency pyproject declares: a module
that happens to be installed here (pulled in by Synapse, say) but is not declared breaks the
install of the wheel. Every file the package reads at run time is package data. (The wheel
itself is built and installed by tests/integration/test_wheel_install.py.)
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


# --- package data ------------------------------------------------------------------------------


def _package_data_patterns() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns: list[str] = pyproject["tool"]["setuptools"]["package-data"]["bridge"]
    return patterns


def _data_files() -> set[Path]:
    """Every file under bridge/ that is not Python source or a cache."""
    return {
        path
        for path in (ROOT / "bridge").rglob("*")
        if path.is_file()
        and path.suffix not in (".py", ".pyc")
        and "__pycache__" not in path.parts
    }


def test_package_data_lists_every_data_file_of_the_package() -> None:
    """A file the code reads at run time (example config, migrations' template, OpenAPI
    document, …) that pyproject does not list is silently left out of the wheel."""
    covered: set[Path] = set()
    for pattern in _package_data_patterns():
        matched = set((ROOT / "bridge").glob(pattern))
        assert matched, f"package-data pattern {pattern!r} matches no file"
        covered |= matched
    data = _data_files()
    assert {p.name for p in data} >= {"example-config.yaml", "provisioning-openapi.yaml"}
    missing = sorted(str(p.relative_to(ROOT)) for p in data - covered)
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_files_read_at_run_time_are_package_data() -> None:
    """The paths the code opens next to its own modules are among the packaged files."""
    from bridge.config.base import EXAMPLE_CONFIG
    from bridge.db.engine import MIGRATIONS
    from bridge.web.provisioning import OPENAPI_DOCUMENT

    covered = {p for pattern in _package_data_patterns() for p in (ROOT / "bridge").glob(pattern)}
    for path in (EXAMPLE_CONFIG, OPENAPI_DOCUMENT, MIGRATIONS / "env.py"):
        assert path.resolve() in {p.resolve() for p in covered}, path
    versions = set((MIGRATIONS / "versions").glob("[0-9]*.py"))
    assert versions
    assert versions <= covered


def test_packaged_examples_are_the_repository_ones() -> None:
    """The wheel's copies of the examples say the same as the ones the README links to."""
    for packaged, documented in (
        ("bridge/example-config.yaml", "config/example-config.yaml"),
        ("bridge/registration.yaml.example", "registration.yaml.example"),
    ):
        assert (ROOT / packaged).read_bytes() == (ROOT / documented).read_bytes(), packaged


def test_build_backend_can_write_the_license_expression() -> None:
    """`license = "AGPL-3.0-or-later"` (an SPDX expression, PEP 639) needs setuptools 77: an
    older one rejects the pyproject, and `python -m build` fails on a machine that has it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert isinstance(pyproject["project"]["license"], str)
    requires = pyproject["build-system"]["requires"]
    setuptools = [r for r in requires if _requirement_name(r) == "setuptools"]
    assert setuptools
    found = re.search(r">=\s*(\d+)", setuptools[0])
    assert found is not None, setuptools
    assert int(found.group(1)) >= 77
