"""The servers of `matrix_to_mail.py`: Dovecot (the list's mailbox), the SMTP sink, Postfix,
Synapse with the bridge's registration and a probe appservice's, and the bridge."""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml
from aiohttp import web

from bench.measure import CpuMeter, family_cpu, process_cpu
from bench.rooms import MARKER_RE
from bench.smtp_sink import SinkProcess
from bridge.harness.dovecot import DovecotServer
from bridge.harness.ports import free_port
from bridge.harness.postfix import PostfixServer
from bridge.harness.postgres import PostgresServer
from bridge.harness.synapse import SynapseServer
from bridge.registration import atomic_write, dump_yaml, generate_registration
from tests.conftest import BridgeProcess, bridge_config_dict

PASSWORD = "bench-password"
FROM_ADDRESS = "passerelle@example.test"
APP_PREFIX = "/_matrix/app/v1"


# --- the probe appservice (in this process) ------------------------------------------------------


class ProbeAppservice:
    """A second appservice whose namespace takes every room: Synapse pushes it the same
    events as the bridge, and it notes when each bench message arrived."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.as_token = secrets.token_hex(32)
        self.hs_token = secrets.token_hex(32)
        self.arrived: dict[tuple[str, int], float] = {}
        self.transactions = 0
        self._runner: web.AppRunner | None = None

    def write_registration(self, path: Path) -> None:
        registration = {
            "id": "bench-probe",
            "url": f"http://127.0.0.1:{self.port}",
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": "benchprobe",
            "rate_limited": False,
            "namespaces": {
                "users": [],
                "aliases": [],
                "rooms": [{"regex": "!.*", "exclusive": False}],
            },
        }
        atomic_write(path, dump_yaml(registration))

    async def _transaction(self, request: web.Request) -> web.Response:
        arrived = time.time()
        if request.headers.get("Authorization") != f"Bearer {self.hs_token}":
            return web.json_response({"errcode": "M_FORBIDDEN"}, status=403)
        body = await request.json()
        self.transactions += 1
        for event in body.get("events") or []:
            text = str((event.get("content") or {}).get("body", ""))
            if match := MARKER_RE.search(text):
                self.arrived.setdefault((match.group(1), int(match.group(2))), arrived)
        return web.json_response({})

    async def _other(self, request: web.Request) -> web.Response:
        if request.method == "POST" and request.path.endswith("/ping"):
            return web.json_response({})
        return web.json_response({"errcode": "M_NOT_FOUND"}, status=404)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put(APP_PREFIX + "/transactions/{txn_id}", self._transaction)
        app.router.add_route("*", "/{tail:.*}", self._other)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# --- the servers ---------------------------------------------------------------------------------


@dataclass
class Servers:
    folder: Path
    dovecot: DovecotServer
    sink: SinkProcess
    postfix: PostfixServer | None
    synapse: SynapseServer
    bridge: BridgeProcess
    probe: ProbeAppservice
    list_address: str
    archive_address: str
    alice_id: str
    alice_token: str
    config_path: Path

    @property
    def bot(self) -> str:
        return self.bridge.config.bot_mxid

    def restart_bridge(self, smtp_port: int) -> None:
        """The same bridge (config, database, registration) sending to another SMTP port."""
        self.bridge.stop()
        # As written by generate_registration (with the tokens it generated).
        settings = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        settings["mail"]["smtp"]["port"] = smtp_port
        atomic_write(self.config_path, dump_yaml(settings))
        self.bridge.start()


def bridge_database(folder: Path, kind: str, stack: contextlib.ExitStack) -> str:
    """The bridge's database URL: an SQLite file, or a fresh database on the machine's
    PostgreSQL (or a throw-away cluster: bridge/harness/postgres.py), dropped at the end."""
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{folder / 'passerelle.db'}"
    server = PostgresServer.obtain(folder / "pg")
    stack.callback(server.stop)
    name = f"passerelle_bench_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    stack.callback(server.drop_database, name)
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


def start_servers(
    folder: Path, stack: contextlib.ExitStack, *, diagnose: bool, database: str, postfix: bool
) -> Servers:
    """Every server, each stopped by `stack` however the run ends."""
    dovecot = DovecotServer(folder / "dovecot")
    list_address = dovecot.add_user("list", PASSWORD)
    # Postfix delivers the list's mail here (a virtual alias): not to the mailbox the bridge
    # watches, which would read every mail of the Postfix phases back.
    archive_address = dovecot.add_user("archive", PASSWORD)
    stack.callback(dovecot.stop)
    dovecot.start()

    sink = SinkProcess(folder / "sink.log")
    stack.callback(sink.stop)
    sink.start()

    postfix_server: PostfixServer | None = None
    if postfix:
        postfix_server = PostfixServer(
            folder / "postfix",
            lmtp_port=dovecot.lmtp_port,
            domain=dovecot.domain,
            aliases={list_address: [archive_address]},
        )
        stack.callback(postfix_server.stop)
        postfix_server.start()

    homeserver_port, bridge_port = free_port(), free_port()
    loggers = {"aiosqlite": "WARNING", "asyncio": "WARNING"}
    if diagnose:
        loggers["sqlalchemy.engine.Engine"] = "INFO"  # every statement, BEGIN and COMMIT
    database = bridge_database(folder, database, stack)
    mailbox = {"host": "127.0.0.1", "port": dovecot.imap_port, "tls": "none"}
    settings = bridge_config_dict(
        homeserver_port,
        bridge_port,
        database,
        mail={
            "mailboxes": {list_address: mailbox | {"user": list_address, "password": PASSWORD}},
            "smtp": {"host": "127.0.0.1", "port": sink.port, "tls": "none"},
            "from_address": FROM_ADDRESS,
        },
        logging={"level": "INFO", "loggers": loggers},
    )
    settings["appservice"]["as_token"] = settings["appservice"]["hs_token"] = "generate"
    config_path = folder / "config.yaml"
    atomic_write(config_path, dump_yaml(settings))
    bridge_registration = folder / "registration.yaml"
    generate_registration(config_path, bridge_registration, env={})
    probe = ProbeAppservice(free_port())
    probe_registration = folder / "probe-registration.yaml"
    probe.write_registration(probe_registration)

    synapse = SynapseServer(
        data_dir=folder / "synapse",
        port=homeserver_port,
        app_service_config_files=[bridge_registration, probe_registration],
    )
    synapse.data_dir.mkdir()
    stack.callback(synapse.stop)
    synapse.start()

    bridge = BridgeProcess(config_path, database, folder / "bridge.log")
    stack.callback(bridge.stop)
    bridge.start()

    alice_id = synapse.register_user("benchalice", "pw-benchalice")
    alice_token = synapse.login("benchalice", "pw-benchalice")
    return Servers(
        folder,
        dovecot,
        sink,
        postfix_server,
        synapse,
        bridge,
        probe,
        list_address,
        archive_address,
        alice_id,
        alice_token,
        config_path,
    )


@dataclass
class SinkCpuMeter(CpuMeter):
    """CpuMeter of bench/mail_to_matrix.py, with the SMTP sink's process counted apart."""

    sink_pid: int | None = None
    postfix_pid_file: Path | None = None

    def _sample(self) -> dict[str, float]:
        postfix = family_cpu(self.postfix_pid_file) if self.postfix_pid_file else 0.0
        return super()._sample() | {"sink": process_cpu(self.sink_pid), "postfix": postfix}

    def stop(self) -> dict[str, float]:
        used = super().stop()
        used["others"] = round(used["others"] - used["sink"] - used["postfix"], 2)
        return used
