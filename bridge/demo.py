"""`passerelle demo`: a local Synapse with the bridge registered, a demo user, a live check."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from bridge.config import ConfigError, load_config, read_yaml_file
from bridge.harness.ports import free_port
from bridge.registration import atomic_write, dump_yaml, generate_registration

DEMO_USER = "demo"
SERVER_NAME = "localhost"


def _write_demo_config(folder: Path, synapse_port: int, bridge_port: int) -> Path:
    """Create or refresh the demo config: new ports each run, the same tokens and database."""
    path = folder / "config.yaml"
    user: Any = read_yaml_file(path) if path.exists() else None
    if not isinstance(user, dict):
        user = {}
    user.setdefault("homeserver", {}).update(
        {"address": f"http://127.0.0.1:{synapse_port}", "domain": SERVER_NAME}
    )
    user.setdefault("appservice", {}).update(
        {
            "address": f"http://127.0.0.1:{bridge_port}",
            "hostname": "127.0.0.1",
            "port": bridge_port,
        }
    )
    user["database"] = {"url": f"sqlite+aiosqlite:///{(folder / 'passerelle.db').resolve()}"}
    user["permissions"] = {SERVER_NAME: "admin"}
    atomic_write(path, dump_yaml(user))
    return path


def _password(folder: Path) -> str:
    path = folder / "demo-password"
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    password = secrets.token_urlsafe(12)
    atomic_write(path, password + "\n")
    return password


async def _check_bot_answers(base_url: str, token: str, user_id: str, bot: str) -> str:
    from bridge.harness.synapse import MatrixTestClient

    async with MatrixTestClient(base_url, token, user_id) as client:
        room_id = await client.create_room(invite=[bot], is_direct=True, name="Passerelle demo")
        await client.wait_for_membership(room_id, bot, "join", timeout=30)
        question = await client.send_text(room_id, "help")
        answer = await client.wait_for_event(
            room_id,
            lambda e: (
                e.get("sender") == bot
                and e.get("content", {})
                .get("m.relates_to", {})
                .get("m.in_reply_to", {})
                .get("event_id")
                == question
            ),
            timeout=30,
        )
        return str(answer["content"].get("body", ""))


async def _serve(folder: Path, config_path: Path, synapse: Any, check_only: bool) -> int:
    from bridge.app import Bridge

    config = load_config(config_path)
    bridge = Bridge(config)
    await bridge.start()
    try:
        password = _password(folder)
        user_id = await asyncio.to_thread(synapse.register_user, DEMO_USER, password, True)
        token = await asyncio.to_thread(synapse.login, DEMO_USER, password)
        answer = await _check_bot_answers(synapse.base_url, token, user_id, config.bot_mxid)
        print("\nPasserelle demo is running.")
        print(f"  Homeserver:  {synapse.base_url}  (server name {SERVER_NAME})")
        print(f"  Log in as:   {user_id}  password: {password}")
        print(f"  Bridge bot:  {config.bot_mxid}  (health: {config.appservice.address}/health)")
        print(f"  Config:      {config_path}")
        print("\nA direct chat 'Passerelle demo' was opened; the bot answered “help” with:\n")
        print("    " + answer.replace("\n", "\n    "))
        print(
            "\nUse any Matrix client with the homeserver URL above (e.g. Element's 'custom "
            "server'), invite the bot to a room and write “!passerelle help”."
        )
        if check_only:
            return 0
        print("\nCtrl-C stops Synapse and the bridge.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await bridge.stop()


def run_demo(folder: Path, *, check_only: bool = False) -> int:
    try:
        from bridge.harness.synapse import SynapseServer
    except ImportError:
        print(
            "passerelle demo needs Synapse: pip install -e '.[demo]' (or run `make demo`)",
            file=sys.stderr,
        )
        return 2
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    synapse_port, bridge_port = free_port(), free_port()
    config_path = _write_demo_config(folder, synapse_port, bridge_port)
    registration = folder / "registration.yaml"
    try:
        generate_registration(config_path, registration)
    except ConfigError as e:
        print(f"passerelle demo: config error: {e}", file=sys.stderr)
        return 10
    synapse = SynapseServer(
        data_dir=folder / "synapse",
        server_name=SERVER_NAME,
        port=synapse_port,
        app_service_config_files=[registration],
    )
    synapse.data_dir.mkdir(exist_ok=True)
    print(f"Starting Synapse on {synapse.base_url} …")
    synapse.start()
    try:
        return asyncio.run(_serve(folder, config_path, synapse, check_only))
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(Exception):
            synapse.stop()
