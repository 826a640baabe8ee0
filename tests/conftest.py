"""Shared fixtures: real Synapse, PostgreSQL, the bridge as a subprocess or in-process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import Config, load_config, parse_config
from bridge.harness.dns import DnsServer
from bridge.harness.dovecot import DovecotServer
from bridge.harness.mailauth import CLIENT_IP, AuthRig, DkimKey
from bridge.harness.ports import free_port
from bridge.harness.postfix import PostfixServer
from bridge.harness.postgres import PostgresServer
from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.registration import atomic_write, dump_yaml, generate_registration

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def subprocess_env() -> dict[str, str]:
    """The environment for `python -m bridge` in a test: this checkout's code on the path."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PASSERELLE_")} | {
        "PYTHONPATH": str(ROOT)
    }


@dataclass
class CliRun:
    """What a `passerelle` command returned, printed on stdout (bytes) and on stderr."""

    returncode: int
    stdout: bytes
    stderr: str


def run_cli(*args: str | Path) -> CliRun:
    """`python -m bridge ARGS` run in this process, for the offline commands (inspect-*):
    their imports are paid once per session instead of once per test (about 1.5 s each).
    PASSERELLE_ variables are hidden as `subprocess_env` hides them. An exception escapes
    (where the program would print a traceback), and the test fails on it."""
    from bridge.cli import main

    written = io.BytesIO()
    out = io.TextIOWrapper(written, encoding="utf-8", write_through=True)
    err = io.StringIO()
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PASSERELLE_")}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(arg) for arg in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.environ.update(hidden)
    out.flush()
    return CliRun(code, written.getvalue(), err.getvalue())


def run_program(*args: str | Path) -> CliRun:
    """`python -m bridge ARGS` as a program, for the check that `run_cli` gives the same."""
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", *map(str, args)],
        capture_output=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    return CliRun(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


def http_json(url: str, timeout: float = 5) -> tuple[int, Any]:
    """GET a URL on loopback; (status, parsed JSON or None)."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# --- Which end-to-end tests run on both databases -----------------------------------------------

ALL_DATABASES = os.environ.get("PASSERELLE_ALL_DATABASES") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """An end-to-end test runs on PostgreSQL only when it is marked `both_databases`: its point
    is what the database does across a crash, a restart or concurrent writers. The queries
    themselves run on both databases in the integration tier, so the other end-to-end tests
    would only repeat Synapse round-trips (CI time). PASSERELLE_ALL_DATABASES=1 runs them all."""
    if ALL_DATABASES:
        return

    def database(item: pytest.Item) -> Any:
        callspec = getattr(item, "callspec", None)
        return callspec.params.get("db_url") if callspec is not None else None

    def test_of(item: pytest.Item) -> str:
        return item.nodeid.split("[", 1)[0]

    # A test parametrised on PostgreSQL alone (its point is PostgreSQL) always runs.
    on_sqlite = {test_of(item) for item in items if database(item) == "sqlite"}
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        end_to_end = "tests/e2e/" in item.nodeid or item.nodeid.startswith("e2e/")
        if (
            database(item) == "postgresql"
            and end_to_end
            and test_of(item) in on_sqlite
            and item.get_closest_marker("both_databases") is None
        ):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# --- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer.obtain(tmp_path_factory.mktemp("pg"))
    try:
        yield server
    finally:
        server.stop()


def _asyncpg_url(libpq_url: str) -> str:
    return libpq_url.replace("postgresql://", "postgresql+asyncpg://", 1)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty bridge database of each supported kind."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'passerelle.db'}"
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    name = f"passerelle_test_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    try:
        yield _asyncpg_url(url)
    finally:
        server.drop_database(name)


# --- Bridge configuration ----------------------------------------------------------------------


def bridge_config_dict(
    homeserver_port: int, bridge_port: int, database_url: str, **sections: dict[str, Any]
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "homeserver": {
            "address": f"http://127.0.0.1:{homeserver_port}",
            "domain": "localhost",
            "request_timeout": 10,
        },
        "appservice": {
            "address": f"http://127.0.0.1:{bridge_port}",
            "hostname": "127.0.0.1",
            "port": bridge_port,
            "as_token": "as-" + uuid.uuid4().hex + uuid.uuid4().hex,
            "hs_token": "hs-" + uuid.uuid4().hex + uuid.uuid4().hex,
        },
        "database": {"url": database_url},
        "permissions": {"localhost": "user", "@admin:localhost": "admin"},
        "logging": {"level": "DEBUG", "loggers": {"aiosqlite": "INFO", "asyncio": "INFO"}},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


@dataclass
class InProcessBridge:
    bridge: Bridge
    config: Config
    base_url: str

    @property
    def hs_token(self) -> str:
        return self.config.appservice.hs_token


@pytest.fixture
async def offline_bridge(db_url: str) -> AsyncIterator[InProcessBridge]:
    """The bridge in this process, its homeserver unreachable: for API-level tests."""
    port = free_port()
    config = parse_config(bridge_config_dict(free_port(), port, db_url), env={})
    bridge = Bridge(config)
    await bridge.start()
    try:
        yield InProcessBridge(bridge, config, f"http://127.0.0.1:{port}")
    finally:
        await bridge.stop()


# --- Synapse with the bridge registered --------------------------------------------------------


@dataclass
class SynapseSetup:
    folder: Path
    config_path: Path
    config: Config
    synapse: SynapseServer
    users: list[MatrixTestClient] = field(default_factory=list)


@pytest.fixture(scope="session")
def synapse_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseSetup]:
    folder = tmp_path_factory.mktemp("synapse-bridge")
    synapse_port, bridge_port = free_port(), free_port()
    raw = bridge_config_dict(
        synapse_port, bridge_port, f"sqlite+aiosqlite:///{folder / 'unused.db'}"
    )
    raw["appservice"]["as_token"] = raw["appservice"]["hs_token"] = "generate"
    config_path = folder / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    registration = folder / "registration.yaml"
    generate_registration(config_path, registration, env={})
    synapse = SynapseServer(
        data_dir=folder / "synapse",
        port=synapse_port,
        app_service_config_files=[registration],
    )
    synapse.data_dir.mkdir()
    synapse.start()
    try:
        yield SynapseSetup(folder, config_path, load_config(config_path, env={}), synapse)
    finally:
        synapse.stop()


class BridgeProcess:
    """`passerelle run` as a real subprocess, with its own database."""

    def __init__(self, config_path: Path, database_url: str, log_path: Path) -> None:
        self.config_path = config_path
        self.database_url = database_url
        self.log_path = log_path
        self.config = load_config(config_path, env={})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config.appservice.port}"

    def start(self, *, wait_homeserver: bool = True, timeout: float = 30) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PASSERELLE_")} | {
            "PASSERELLE_DATABASE__URL": self.database_url,
            # This checkout's code, whatever an editable install elsewhere points at.
            "PYTHONPATH": str(ROOT),
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.log_path.parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = http_json(self.base_url + "/health", timeout=2)
            except OSError:
                status, body = 0, None
            if status in (200, 503) and (
                not wait_homeserver or (body or {}).get("homeserver", {}).get("reachable")
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"bridge not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@pytest.fixture
def bridge_process(
    synapse_setup: SynapseSetup, db_url: str, tmp_path: Path
) -> Iterator[BridgeProcess]:
    """A `passerelle run` process registered on the session's Synapse (not started yet)."""
    proc = BridgeProcess(synapse_setup.config_path, db_url, tmp_path / "bridge.log")
    try:
        yield proc
    finally:
        proc.stop()


UserFactory = Callable[..., Awaitable[MatrixTestClient]]


def user_password(localpart: str) -> str:
    """The password make_user and make_ministry_user give a user (to log in a second time)."""
    return "pw-" + localpart


async def _user_factory(synapse: SynapseServer) -> AsyncIterator[UserFactory]:
    clients: list[MatrixTestClient] = []

    async def make(prefix: str = "user", localpart: str | None = None) -> MatrixTestClient:
        name = localpart or f"{prefix}{uuid.uuid4().hex[:8]}"
        user_id = synapse.register_user(name, user_password(name))
        token = synapse.login(name, user_password(name))
        client = MatrixTestClient(synapse.base_url, token, user_id)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.close()


@pytest.fixture
async def make_user(synapse_setup: SynapseSetup) -> AsyncIterator[UserFactory]:
    """Register a fresh human user on Synapse and return a logged-in client for them."""
    async for make in _user_factory(synapse_setup.synapse):
        yield make


# --- the ministry's homeserver: a second Synapse, reached only through its client API ------------

MINISTRY_SERVER_NAME = "ministere.localhost"
MINISTRY_BRIDGE_LOCALPART = "passerelle-agence"


@pytest.fixture(scope="session")
def ministry_synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """An external homeserver with no appservice; it does not federate with synapse_setup (the
    harness exposes no federation listener and whitelists no domain)."""
    folder = tmp_path_factory.mktemp("synapse-ministry")
    synapse = SynapseServer(
        data_dir=folder / "synapse", server_name=MINISTRY_SERVER_NAME, port=free_port()
    )
    synapse.start()
    try:
        yield synapse
    finally:
        synapse.stop()


@pytest.fixture
async def make_ministry_user(ministry_synapse: SynapseServer) -> AsyncIterator[UserFactory]:
    """Register a fresh person on the ministry's homeserver; a logged-in client for them."""
    async for make in _user_factory(ministry_synapse):
        yield make


@pytest.fixture(scope="session")
def ministry_bridge_account(ministry_synapse: SynapseServer) -> tuple[str, str]:
    """(user_id, access_token) of the ordinary account the bridge uses on the ministry's
    homeserver; its password is user_password(MINISTRY_BRIDGE_LOCALPART)."""
    password = user_password(MINISTRY_BRIDGE_LOCALPART)
    user_id = ministry_synapse.register_user(MINISTRY_BRIDGE_LOCALPART, password)
    return user_id, ministry_synapse.login(MINISTRY_BRIDGE_LOCALPART, password)


# --- mail servers shared by the integration and end-to-end tests ------------------------------


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    server = DovecotServer(tmp_path_factory.mktemp("dovecot"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postfix(
    tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotServer
) -> Iterator[PostfixServer]:
    server = PostfixServer(tmp_path_factory.mktemp("postfix"), lmtp_port=dovecot.lmtp_port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- the mail-authentication rig: Postfix with the real opendkim and opendmarc (issue 10) ------

AUTHSERV_ID = "mx.agency.test"
# Signing domains with a key published as rig._domainkey.<domain>.
DKIM_DOMAINS = ("presidence.gouv.fr", "other.example", "gouv.fr", "achats.gouv.fr")
# SPF and DMARC. Test mail claims to come from CLIENT_IP (see AuthRig.send); relay.test, the
# usual envelope sender, lists no host, so SPF only passes for a presidence.gouv.fr sender.
AUTH_RECORDS = {
    "presidence.gouv.fr": [f"v=spf1 ip4:{CLIENT_IP} -all"],
    "_dmarc.presidence.gouv.fr": ["v=DMARC1; p=reject"],
    "_dmarc.achats.gouv.fr": ["v=DMARC1; p=reject"],
    "other.example": ["v=spf1 -all"],
    "_dmarc.other.example": ["v=DMARC1; p=reject"],
    "relay.test": ["v=spf1 -all"],
}


@pytest.fixture(scope="session")
def dkim_keys() -> dict[str, DkimKey]:
    """One fresh 2048-bit RSA key per signing domain (never written to the repository)."""
    return {domain: DkimKey.generate(domain) for domain in DKIM_DOMAINS}


@pytest.fixture(scope="session")
def auth_rig(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: DovecotServer,
    dkim_keys: dict[str, DkimKey],
) -> Iterator[AuthRig]:
    """DNS on 127.53.x.y:53, opendkim + opendmarc, and a Postfix of its own using them,
    delivering example.test to the session Dovecot. Separate from the `postfix` fixture, which
    stays milter-free."""
    started = time.monotonic()
    rig = AuthRig.build(
        tmp_path_factory.mktemp("auth-rig"),
        lmtp_port=dovecot.lmtp_port,
        authserv_id=AUTHSERV_ID,
        keys=dkim_keys,
        records=AUTH_RECORDS,
    )
    rig.start()
    print(f"\nauth rig started in {time.monotonic() - started:.2f} s (DNS on {rig.dns.address})")
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture(scope="session")
def auth_postfix(auth_rig: AuthRig) -> PostfixServer:
    return auth_rig.postfix


@pytest.fixture(scope="session")
def auth_dns(auth_rig: AuthRig) -> DnsServer:
    return auth_rig.dns
