"""PostgreSQL for tests and the demo: the machine's server if it answers, else a throw-away one."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from bridge.harness.ports import free_port

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
# initdb, pg_ctl and postgres refuse to run as root.
_AS_POSTGRES: list[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _pg_tool(name: str) -> str:
    """Path of a PostgreSQL server tool (initdb, pg_ctl), on PATH or in Debian's versioned dir."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if not candidates:
        raise RuntimeError(f"{name} not found (PATH or {_PG_BIN_GLOB})")
    return str(candidates[-1])


def _answers(host: str, port: int, user: str) -> bool:
    """Whether a server at host:port accepts ``user`` without a password."""
    try:
        result = subprocess.run(
            [
                "psql",
                "-h",
                host,
                "-p",
                str(port),
                "-U",
                user,
                "-d",
                "postgres",
                "-XAtqc",
                "SELECT 1",
            ],
            capture_output=True,
            timeout=10,
            env={**os.environ, "PGCONNECT_TIMEOUT": "3", "PGPASSWORD": ""},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == b"1"


def _local_clusters() -> list[tuple[str, str, int, str]]:
    """(version, name, port, status) of the Debian clusters ``pg_lsclusters`` knows."""
    if not shutil.which("pg_lsclusters"):
        return []
    result = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
    )
    clusters = []
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2].isdigit():
            clusters.append((fields[0], fields[1], int(fields[2]), fields[3]))
    return clusters


def _discard_cluster(runtime: Path, data_dir: Path) -> None:
    """Stop a throw-away cluster (fast shutdown) and delete it."""
    if (data_dir / "postmaster.pid").exists():
        subprocess.run(
            [*_AS_POSTGRES, _pg_tool("pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
            cwd=runtime,
        )
    shutil.rmtree(runtime, ignore_errors=True)


@dataclass
class PostgresServer:
    """A PostgreSQL server reachable over TCP as a superuser with trust authentication."""

    host: str
    port: int
    user: str
    _finalizer: weakref.finalize[[Path, Path], PostgresServer] | None = field(
        default=None, repr=False, kw_only=True
    )
    _debian_cluster: tuple[str, str] | None = field(default=None, repr=False, kw_only=True)

    @classmethod
    def obtain(cls, base_dir: Path, *, fresh: bool = False, timeout: float = 30) -> PostgresServer:
        """Find or start a server, in this order (``fresh=True``: go straight to 3).

        1. the machine's server on 127.0.0.1:5432 (user postgres, trust), if it answers;
        2. a Debian cluster started with ``pg_ctlcluster --skip-systemctl-redirect VER main
           start`` (stopped again by ``stop()``);
        3. a throw-away cluster: ``initdb`` as user postgres in a directory under /tmp (linked as
           ``base_dir/runtime``), started with ``pg_ctl`` on a free port, stopped and deleted by
           ``stop()``.
        """
        host, user = "127.0.0.1", "postgres"
        if fresh:
            return cls._throwaway(Path(base_dir), timeout)
        if _answers(host, 5432, user):
            return cls(host, 5432, user)
        for version, name, port, status in _local_clusters():
            if status.startswith("online"):
                if _answers(host, port, user):
                    return cls(host, port, user)
                continue
            if name != "main":
                continue
            started = subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"],
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            if started.returncode == 0 and cls._wait(host, port, user, timeout):
                return cls(host, port, user, _debian_cluster=(version, name))
        return cls._throwaway(Path(base_dir), timeout)

    @staticmethod
    def _wait(host: str, port: int, user: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not _answers(host, port, user):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    @classmethod
    def _throwaway(cls, base_dir: Path, timeout: float) -> PostgresServer:
        # The cluster lives outside base_dir: pg_ctl and the server run as postgres and need
        # every ancestor searchable, which pytest's 0700 /tmp/pytest-of-root is not (and every
        # new pytest session resets it to 0700).
        runtime = Path(tempfile.mkdtemp(prefix="passerelle-pg-"))
        runtime.chmod(0o755)
        base_dir = base_dir.resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        link = base_dir / "runtime"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(runtime)
        data_dir = runtime / "pgdata"
        data_dir.mkdir(mode=0o700)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(data_dir, owner.pw_uid, owner.pw_gid)
        port = free_port()
        server = cls("127.0.0.1", port, "postgres")
        server._finalizer = weakref.finalize(server, _discard_cluster, runtime, data_dir)
        initdb = subprocess.run(
            [
                *_AS_POSTGRES,
                _pg_tool("initdb"),
                "-D",
                str(data_dir),
                "-E",
                "UTF8",
                "--locale=C",
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=runtime,
        )
        if initdb.returncode != 0:
            server.stop()
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data_dir} -c fsync=off"
        log = data_dir / "server.log"
        started = subprocess.run(
            [
                *_AS_POSTGRES,
                _pg_tool("pg_ctl"),
                "-D",
                str(data_dir),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            check=False,
            cwd=runtime,
        )
        if started.returncode != 0 or not cls._wait(server.host, port, server.user, timeout):
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            server.stop()
            raise RuntimeError(f"pg_ctl start failed:\n{started.stdout}\n{started.stderr}\n{tail}")
        return server

    def stop(self) -> None:
        """Stop the server if ``obtain()`` started it; leave a server that was already running.

        A throw-away cluster is also deleted (it would be anyway when this object is collected).
        """
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        elif self._debian_cluster is not None:
            version, name = self._debian_cluster
            subprocess.run(
                [
                    "pg_ctlcluster",
                    "--skip-systemctl-redirect",
                    version,
                    name,
                    "stop",
                    "-m",
                    "fast",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
            self._debian_cluster = None

    # -- databases ------------------------------------------------------------------------------

    def url(self, database: str) -> str:
        """libpq URL of ``database`` on this server."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL statement with psql (autocommit); return its unaligned output."""
        result = subprocess.run(
            [
                "psql",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed on {sql!r}: {result.stderr.strip()}")
        return result.stdout

    @staticmethod
    def _quote(name: str) -> str:
        if not _NAME_RE.match(name):
            raise ValueError(f"unsupported database name: {name!r}")
        return f'"{name}"'

    def create_database(self, name: str, *, synapse: bool = False) -> str:
        """(Re)create database ``name`` and return its URL.

        ``synapse=True`` gives what Synapse insists on: UTF8 with C collation and ctype, from
        template0.
        """
        quoted = self._quote(name)
        self.drop_database(name)
        options = ""
        if synapse:
            options = " ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        self.psql(f"CREATE DATABASE {quoted}{options}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its sessions."""
        self.psql(f"DROP DATABASE IF EXISTS {self._quote(name)} WITH (FORCE)")
