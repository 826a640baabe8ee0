"""The servers of `mail_to_matrix.py`: Dovecot with a mailbox per link, Synapse (SQLite or
PostgreSQL) with the bridge's registration, the bridge, and phase 4's DNS when asked."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import auth_phase
from bench.auth_phase import AuthSetup
from bench.mail_out_servers import bridge_database
from bridge.harness.dovecot import DovecotServer
from bridge.harness.ports import free_port
from bridge.harness.postgres import PostgresServer
from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.registration import atomic_write, dump_yaml, generate_registration
from tests.conftest import BridgeProcess, bridge_config_dict

PASSWORD = "bench-password"
ALLOW = "achats.gouv.fr"
# The agency MTA that delivered the bench's mails, pinned in the bridge's mail.trust: its
# results authenticate the sender as a real delivery's would (see make_mail).
AUTHSERV_ID = "mx.bench.test"


# --- the servers ------------------------------------------------------------------------------


@dataclass
class Servers:
    folder: Path
    dovecot: DovecotServer
    synapse: SynapseServer
    bridge: BridgeProcess
    single: str
    multi: list[str]
    alice_token: str
    alice_id: str
    auth: AuthSetup | None = None  # phase 4's DNS, mailboxes and room (None: skipped)

    @property
    def bot(self) -> str:
        return self.bridge.config.bot_mxid


def start_servers(
    folder: Path,
    links: int,
    stack: contextlib.ExitStack,
    *,
    diagnose: bool = False,
    auth: bool = False,
    synapse_db: str = "sqlite",
    database: str = "sqlite",
) -> Servers:
    dovecot = DovecotServer(folder / "dovecot")
    single = dovecot.add_user("single", PASSWORD)
    multi = [dovecot.add_user(f"multi{i:02d}", PASSWORD) for i in range(links)]
    kinds = auth_phase.KINDS if auth else ()
    auth_mailboxes = {kind: dovecot.add_user(f"auth{kind}", PASSWORD) for kind in kinds}
    dovecot.start()
    stack.callback(dovecot.stop)
    trust: dict[str, Any] = {"authserv_id": [AUTHSERV_ID]}
    setup = None
    if auth:
        setup = AuthSetup.start(ALLOW, auth_mailboxes)
        stack.callback(setup.stop)
        trust = setup.trust_config(AUTHSERV_ID)

    synapse_port, bridge_port = free_port(), free_port()
    database_url = bridge_database(folder, database, stack)
    loggers = {"aiosqlite": "WARNING", "asyncio": "WARNING"}
    if diagnose:
        # mautrix logs every homeserver request with its duration at DEBUG.
        loggers["passerelle.matrix.http"] = "DEBUG"
    mailboxes = {
        address: {
            "host": "127.0.0.1",
            "port": dovecot.imap_port,
            "tls": "none",
            "user": address,
            "password": PASSWORD,
        }
        for address in [single, *multi, *auth_mailboxes.values()]
    }
    raw = bridge_config_dict(
        synapse_port,
        bridge_port,
        database_url,
        mail={
            "mailboxes": mailboxes,
            "poll_interval": 2,
            "trust": trust,
        },
        logging={"level": "INFO", "loggers": loggers},
    )
    raw["appservice"]["as_token"] = raw["appservice"]["hs_token"] = "generate"
    config_path = folder / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    registration = folder / "registration.yaml"
    generate_registration(config_path, registration, env={})

    synapse_database = "sqlite"
    if synapse_db == "postgresql":
        # The machine's PostgreSQL if it answers (else a throw-away cluster), a database of
        # this run's own: other runs may share the server.
        postgres = PostgresServer.obtain(folder / "postgres")
        stack.callback(postgres.stop)
        name = f"bench_synapse_{uuid.uuid4().hex[:12]}"
        synapse_database = postgres.create_database(name, synapse=True)
        stack.callback(postgres.drop_database, name)
    synapse = SynapseServer(
        data_dir=folder / "synapse",
        port=synapse_port,
        app_service_config_files=[registration],
        database=synapse_database,
    )
    synapse.data_dir.mkdir()
    stack.callback(synapse.stop)
    synapse.start()
    alice_id = synapse.register_user("benchalice", "pw-benchalice")
    token = synapse.login("benchalice", "pw-benchalice")

    if setup is not None:
        asyncio.run(link_off_room(synapse, token, alice_id, setup, config_path))

    bridge = BridgeProcess(config_path, database_url, folder / "bridge.log")
    stack.callback(bridge.stop)
    bridge.start()
    return Servers(folder, dovecot, synapse, bridge, single, multi, token, alice_id, setup)


async def link_off_room(
    synapse: SynapseServer, token: str, user_id: str, setup: AuthSetup, config_path: Path
) -> None:
    async with MatrixTestClient(synapse.base_url, token, user_id) as client:
        await setup.link_off_room(client, config_path)
