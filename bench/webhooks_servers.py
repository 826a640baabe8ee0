"""The servers of `webhooks.py` (Synapse, the bridge with its hooks and their rooms) and its CPU
accounting (with py-spy attached per phase when asked)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import Profiler, machine_cpu, process_cpu
from bridge.config import read_yaml_file
from bridge.harness.ports import free_port
from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.registration import atomic_write, dump_yaml, generate_registration
from tests.conftest import BridgeProcess, bridge_config_dict

# The hooks' signing key (Standard Webhooks), and the secret the bridge's config holds.
KEY = os.urandom(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()


# --- CPU accounting ---------------------------------------------------------------------------


@dataclass
class CpuMeter:
    """CPU seconds spent by Synapse, the bridge, this script and everything else in a phase."""

    synapse_pid: int | None
    bridge_pid: int | None
    profiler: Profiler = field(default_factory=lambda: Profiler(None))
    _start: dict[str, float] = field(default_factory=dict)

    def _sample(self) -> dict[str, float]:
        times = os.times()
        return {
            "synapse": process_cpu(self.synapse_pid),
            "bridge": process_cpu(self.bridge_pid),
            "bench": times.user + times.system,
            "machine": machine_cpu(),
            "wall": time.monotonic(),
        }

    def start(self, phase: str = "") -> None:
        """Also attaches py-spy to Synapse and the bridge for the phase, with --profile."""
        if phase:
            self.profiler.start(f"{phase}-synapse", self.synapse_pid)
            self.profiler.start(f"{phase}-bridge", self.bridge_pid)
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        self.profiler.stop()
        used = {k: round(end[k] - self._start[k], 2) for k in end}
        used["others"] = round(
            used["machine"] - used["synapse"] - used["bridge"] - used["bench"], 2
        )
        return used


def per_message(cpu: dict[str, float], count: int) -> dict[str, float]:
    return {k: round(1000 * v / count, 2) for k, v in cpu.items() if k != "wall"}


# --- the servers ------------------------------------------------------------------------------


@dataclass
class Servers:
    synapse: SynapseServer
    bridge: BridgeProcess
    alice_token: str
    alice_id: str
    rooms: dict[str, str]  # phase name -> room ID (hook phases: the hook of the same name; names
    # are also the marker tags, so a-z and 0-9 only)


def start_servers(
    folder: Path,
    plain: Sequence[str],
    bot_rooms: Sequence[str],
    hooks: Sequence[str],
    stack: contextlib.ExitStack,
    *,
    diagnose: bool = False,
    outgoing: Mapping[str, str] | None = None,
    egress: Sequence[str] = (),
) -> Servers:
    """`plain`: rooms of Alice alone; `bot_rooms`: rooms of Alice, the bot and Bob (three
    members like a hook's room: Alice, the bot, the ghost; and not a direct chat, where the bot
    would take every message for a command); `hooks`: a hook each, its room with the bot;
    `outgoing`: an outbound hook each (name → URL, allowed by `egress`), its room like a
    bot room."""
    outgoing = outgoing or {}
    synapse_port, bridge_port = free_port(), free_port()
    database_url = f"sqlite+aiosqlite:///{folder / 'passerelle.db'}"
    raw = bridge_config_dict(
        synapse_port,
        bridge_port,
        database_url,
        logging={
            "level": "INFO",
            "loggers": {
                "aiosqlite": "WARNING",
                "asyncio": "WARNING",
                # --diagnose: every homeserver request with its duration, every hook posted.
                **(
                    {"passerelle.matrix.http": "DEBUG", "passerelle.webhooks.relay": "DEBUG"}
                    if diagnose
                    else {}
                ),
            },
        },
    )
    raw["appservice"]["as_token"] = raw["appservice"]["hs_token"] = "generate"
    config_path = folder / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    registration = folder / "registration.yaml"
    generate_registration(config_path, registration, env={})

    synapse = SynapseServer(
        data_dir=folder / "synapse", port=synapse_port, app_service_config_files=[registration]
    )
    synapse.data_dir.mkdir()
    stack.callback(synapse.stop)
    synapse.start()
    alice_id = synapse.register_user("benchalice", "pw-benchalice")
    token = synapse.login("benchalice", "pw-benchalice")
    bob_id = synapse.register_user("benchbob", "pw-benchbob")
    bob_token = synapse.login("benchbob", "pw-benchbob")

    # Hooks name their room in the config: the rooms exist, the bot invited, before it starts
    # (as tests/e2e/test_webhooks_in.py does). The bot's ID does not depend on the hooks.
    bot = BridgeProcess(config_path, database_url, folder / "unused.log").config.bot_mxid

    async def make_rooms() -> dict[str, str]:
        async with MatrixTestClient(synapse.base_url, token, alice_id) as alice:
            rooms = {name: await alice.create_room(name=name) for name in plain}
            for name in hooks:
                rooms[name] = await alice.create_room(invite=[bot], name=name)
            async with MatrixTestClient(synapse.base_url, bob_token, bob_id) as bob:
                for name in [*bot_rooms, *outgoing]:
                    rooms[name] = await alice.create_room(invite=[bot, bob_id], name=name)
                    await bob.join(rooms[name])
            return rooms

    rooms = asyncio.run(make_rooms())
    # The registration was made from the file (with its generated tokens): add to the file.
    raw = read_yaml_file(config_path)
    raw["webhooks"] = {
        "hooks": {name: {"room": rooms[name], "secret": SECRET} for name in hooks},
        "outgoing": {
            name: {"room": rooms[name], "url": url, "secret": SECRET}
            for name, url in outgoing.items()
        },
        "egress": list(egress),
    }
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, database_url, folder / "bridge.log")
    stack.callback(bridge.stop)
    bridge.start()
    return Servers(synapse, bridge, token, alice_id, rooms)
