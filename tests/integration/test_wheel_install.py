"""The built wheel installs and runs on its own, as a user gets it, far from this checkout.

`python -m build` makes the sdist from a copy of the source tree and the wheel from that sdist
(so a file missing from either shows up); the wheel goes into a new virtualenv, and the
`passerelle` command of that virtualenv is run from a folder outside the source tree, without
PYTHONPATH: --help, generate-registration, check-config, then `run` against a SQLite file with
the homeserver down until /health answers, then SIGTERM. The database must have the tables of
the migrations shipped in the installed package. Then `run` again inside a mount namespace where
only its state directory is writable, as the systemd unit has it.

Dependencies: a user's `pip install passerelle-….whl` also installs ~30 dependencies, which
takes about 35 s on two cores even from a local index: too slow for every CI run. By default
the virtualenv is made with --system-site-packages and the wheel installed with --no-deps, so
the dependencies come from this machine's environment while the code, its data files and the
console script come from the wheel alone (checked below: `bridge` resolves inside the
virtualenv). That the dependencies pyproject declares are enough is checked by
tests/unit/test_packaging.py; set PASSERELLE_WHEEL_FULL_DEPS=1 to run this test with an
isolated virtualenv and a full dependency install, as a user does.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge import __version__
from bridge.db.schema import metadata
from bridge.harness.ports import free_port
from bridge.registration import dump_yaml
from tests.conftest import http_json

# Building is about 20 s of CPU; on a machine shared with other work it can take a minute or two.
pytestmark = [pytest.mark.packaging, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
FULL_DEPS = os.environ.get("PASSERELLE_WHEEL_FULL_DEPS") == "1"
# Not part of the sdist, or produced by earlier runs: left out of the copy that is built.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".ci",
    "__pycache__",
    "*.egg-info",
    "build",
    "dist",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "demo-data",
    "*.db",
    "*.db-*",
    "tests",
    "bench",
)


@dataclass
class Installed:
    wheel: Path
    sdist: Path
    venv: Path

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "passerelle"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def _env() -> dict[str, str]:
    """The caller's environment minus anything that would point Python at this checkout."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PASSERELLE_", "PYTHON")) and k != "VIRTUAL_ENV"
    }


def _run(
    argv: list[str | Path], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=_env(),
        check=False,
    )
    assert result.returncode == 0, f"{argv}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    if importlib.util.find_spec("build") is None:
        pytest.fail("the `build` package is missing: scripts/bootstrap.sh installs it")
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    dist = base / "dist"
    _run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=base, timeout=300)
    (wheel,) = dist.glob("passerelle-*.whl")
    (sdist,) = dist.glob("passerelle-*.tar.gz")
    venv = base / "venv"
    venv_args: list[str | Path] = [sys.executable, "-m", "venv", "--without-pip"]
    install: list[str | Path] = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    install += ["install", "--quiet", "--disable-pip-version-check"]
    if not FULL_DEPS:
        venv_args.append("--system-site-packages")
        # This machine's editable install of the same name and version is outside the venv:
        # install over it in the venv, without looking at dependencies.
        install += ["--no-deps", "--ignore-installed"]
    _run([*venv_args, venv], cwd=base)
    _run([*install, wheel], cwd=base, timeout=300)
    return Installed(wheel, sdist, venv)


def _package_data() -> set[str]:
    """The data files pyproject ships, as paths inside the wheel (bridge/…)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["bridge"]
    found = {
        str(path.relative_to(ROOT))
        for pattern in patterns
        for path in (ROOT / "bridge").glob(pattern)
        if "__pycache__" not in path.parts
    }
    assert found
    return found


def test_the_wheel_holds_every_module_and_data_file(installed: Installed) -> None:
    assert installed.wheel.name == f"passerelle-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        metadata_text = wheel.read(f"passerelle-{__version__}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"passerelle-{__version__}.dist-info/entry_points.txt")
    modules = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "bridge").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert not (modules | _package_data()) - names
    assert "passerelle = bridge.cli:main" in entry_points.decode()
    assert "License-Expression: AGPL-3.0-or-later" in metadata_text
    # Nothing from outside the package (tests, benches) got in.
    assert {name.split("/")[0] for name in names} == {
        "bridge",
        f"passerelle-{__version__}.dist-info",
    }


def test_the_sdist_holds_the_deployment_examples(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    expected = {
        "README.md",
        "pyproject.toml",
        "MANIFEST.in",
        "registration.yaml.example",
        "config/example-config.yaml",
        "contrib/systemd/passerelle.service",
    }
    assert not (expected | _package_data()) - names


def _wait_for_health(url: str, process: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            status, body = http_json(url, timeout=2)
        except OSError:
            time.sleep(0.1)
            continue
        assert status == 200, body
        assert isinstance(body, dict)
        return body
    raise AssertionError("no /health within 30 s:\n" + log.read_text(errors="replace")[-3000:])


def _write_config(path: Path, *, tokens: bool = False) -> int:
    """A config with a homeserver that is down and a SQLite file in the working directory
    (tokens left to generate-registration unless `tokens`); returns the bridge's port."""
    bridge_port = free_port()
    config: dict[str, Any] = {
        # Nothing listens there: the bridge starts anyway and reports "degraded".
        "homeserver": {"address": f"http://127.0.0.1:{free_port()}", "domain": "localhost"},
        "appservice": {
            "address": f"http://127.0.0.1:{bridge_port}",
            "hostname": "127.0.0.1",
            "port": bridge_port,
        },
        # Relative: the working directory, as in the systemd unit.
        "database": {"url": "sqlite+aiosqlite:///passerelle.db"},
        "permissions": {"localhost": "user"},
    }
    if tokens:
        config["appservice"] |= {
            "as_token": secrets.token_hex(32),
            "hs_token": secrets.token_hex(32),
        }
    path.write_text(dump_yaml(config), encoding="utf-8")
    return bridge_port


def _serve_until_healthy(
    argv: list[str | Path], work: Path, port: int, env: dict[str, str]
) -> dict[str, object]:
    """Start the bridge, wait for /health, stop it with SIGTERM (it must exit 0); /health's
    answer."""
    log = work / "passerelle.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(a) for a in argv], stdout=output, stderr=subprocess.STDOUT, cwd=work, env=env
        )
        try:
            health = _wait_for_health(f"http://127.0.0.1:{port}/health", process, log)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text(errors="replace")[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return health


def test_the_installed_command_configures_and_runs_the_bridge(
    installed: Installed, tmp_path: Path
) -> None:
    work = tmp_path / "deployment"  # far from the source tree: nothing to import from here
    work.mkdir()
    # Where the installed interpreter finds the code, the migrations and their newest revision.
    found = _run(
        [
            installed.python,
            "-c",
            "import bridge\n"
            "from alembic.script import ScriptDirectory\n"
            "from bridge.db.engine import MIGRATIONS\n"
            "head = ScriptDirectory(str(MIGRATIONS)).get_current_head()\n"
            "print(bridge.__file__, MIGRATIONS, head)",
        ],
        cwd=work,
    ).stdout.split()
    package, migrations, head = Path(found[0]).parent, Path(found[1]), found[2]
    assert package.is_relative_to(installed.venv), found
    assert migrations.is_relative_to(installed.venv), found
    for data in _package_data():
        assert (package.parent / data).is_file(), data
    # The README's way to find the examples in the installed package.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found_line = re.search(r"^examples=\$\(/opt/passerelle/bin/python (.*)\)$", readme, re.M)
    assert found_line is not None
    examples = _run([installed.python, *shlex.split(found_line.group(1))], cwd=work).stdout
    assert Path(examples.strip()) == package
    for example in ("example-config.yaml", "registration.yaml.example"):
        assert (package / example).is_file()

    usage = _run([installed.command, "--help"], cwd=work).stdout
    for command in ("run", "generate-registration", "check-config"):
        assert command in usage
    version = _run([installed.command, "--version"], cwd=work).stdout
    assert version.strip() == f"passerelle {__version__}"

    bridge_port = _write_config(work / "config.yaml")
    config_file = work / "config.yaml"
    generated = _run(
        [installed.command, "generate-registration", "-c", config_file, "-r", "registration.yaml"],
        cwd=work,
    ).stdout
    assert "Generated appservice.as_token and appservice.hs_token" in generated
    registration = (work / "registration.yaml").read_text(encoding="utf-8")
    assert f"url: http://127.0.0.1:{bridge_port}" in registration
    assert "generate" not in config_file.read_text(encoding="utf-8")
    checked = _run([installed.command, "check-config", "-c", "config.yaml"], cwd=work).stdout
    assert (
        checked.strip() == "config.yaml: ok (bot @passerelle:localhost, database sqlite+aiosqlite)"
    )

    health = _serve_until_healthy(
        [installed.command, "run", "-c", config_file], work, bridge_port, _env()
    )
    assert health["status"] == "degraded"
    assert health["version"] == __version__
    assert health["database"] == {"dialect": "sqlite", "ok": True, "error": None}

    with sqlite3.connect(work / "passerelle.db") as db:
        tables = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        (version,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    assert version == head
    assert set(metadata.tables) <= tables


# ProtectSystem=strict with StateDirectory= and WorkingDirectory=, as far as a mount namespace
# can show it: every file system read-only but the API ones (/proc, /sys, /dev), a fresh /var/tmp
# as TMPDIR (PrivateTmp), and the state folder bound writable again.
SANDBOX = r"""
set -eu
mount --make-rprivate /
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r target; do
    case "$target" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/mnt/*) continue ;; esac
    mount -o remount,bind,ro "$target" 2>/dev/null || true
done
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount --bind "$STATE" "$STATE"
mount -o remount,bind,rw "$STATE"
for probe in /etc "$VENV" "$(dirname "$STATE")"; do
    if [ -w "$probe" ]; then  # access(2): EROFS on a read-only mount, and no file made
        echo "sandbox: $probe is still writable" >&2
        exit 99
    fi
done
cd "$STATE"
exec "$@"
"""


def test_the_bridge_runs_with_only_its_state_directory_writable(
    installed: Installed, tmp_path: Path
) -> None:
    """The systemd unit's file-system policy: a bridge that writes anywhere but its working
    directory (a cache in $HOME, a file in the virtualenv, a socket in /run) fails there.
    Not the whole sandbox: system call filters, capabilities and address families need systemd
    (tests/unit/test_systemd_unit.py checks the unit's settings)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a mount namespace")
    state = tmp_path / "state"
    state.mkdir()
    port = _write_config(state / "config.yaml", tokens=True)
    env = _env() | {
        "STATE": str(state),
        "VENV": str(installed.venv),
        "HOME": str(state),
        "TMPDIR": "/var/tmp",
    }
    sandboxed: list[str | Path] = ["unshare", "--mount", "--propagation", "private"]
    sandboxed += ["sh", "-c", SANDBOX, "sandbox", installed.command, "run", "-c", "config.yaml"]
    health = _serve_until_healthy(sandboxed, state, port, env)
    assert health["status"] == "degraded"
    assert health["database"] == {"dialect": "sqlite", "ok": True, "error": None}
    with sqlite3.connect(state / "passerelle.db") as db:
        (version,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    assert version
