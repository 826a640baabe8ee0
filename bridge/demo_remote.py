"""The demo's other ministry: a second Synapse, the bridge's account on it, a linked room."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bridge.config import Config
from bridge.demo import DEMO_USER, reply_to
from bridge.harness.ports import free_port
from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.registration import atomic_write

MINISTRY_SERVER_NAME = "ministere.localhost"
REMOTE = "ministere"
BRIDGE_ACCOUNT = "passerelle-agence"  # an ordinary account: the ministry runs no appservice
TOKEN_FILE = "ministere-token"  # relative to the config's folder; config.yaml names it
DISPLAY_SUFFIX = "(Ministère)"
AGENCY_SUFFIX = "(Agence)"
AGENCY_NAME = "Demo Claire"
MINISTRY_NAME = "Demo Bruno"
AGENCY_ROOM_NAME = "Coordination (agence)"
MINISTRY_ROOM_NAME = "Coordination (ministère)"

Predicate = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class RemoteDemo:
    """What the summary tells about the ministry side once a message went each way."""

    user_id: str  # the demo user on the ministry's homeserver
    agency_room: str
    remote_room: str
    ghost: str  # the ministry user's ghost on the agency homeserver
    ghost_name: str  # its display name in the agency room
    relayed_as: str  # how the agency reply reads in the ministry room


def ministry_server(folder: Path) -> SynapseServer:
    """The ministry's homeserver: no appservice, no federation with the agency's."""
    return SynapseServer(
        data_dir=folder / "synapse-ministere", server_name=MINISTRY_SERVER_NAME, port=free_port()
    )


def bridge_account(folder: Path, ministry: SynapseServer, password: str) -> str:
    """Register the bridge's account there (once) and keep a working token for it in
    TOKEN_FILE (mode 0600): the one from a previous run when Synapse still accepts it."""
    user_id = ministry.register_user(BRIDGE_ACCOUNT, password)
    path = folder / TOKEN_FILE
    if path.exists() and ministry.whoami(path.read_text(encoding="utf-8").strip()) == user_id:
        return user_id
    atomic_write(path, ministry.login(BRIDGE_ACCOUNT, password) + "\n")
    return user_id


def remote_section(ministry: SynapseServer, account: str) -> dict[str, Any]:
    """The config's `remotes:` section for the demo's ministry."""
    return {
        REMOTE: {
            "address": ministry.base_url,
            "server_name": ministry.server_name,
            "user_id": account,
            "access_token_file": TOKEN_FILE,
            "display_suffix": DISPLAY_SUFFIX,
            "agency_suffix": AGENCY_SUFFIX,
        }
    }


async def set_displayname(client: MatrixTestClient, name: str) -> None:
    """Set it only when it differs: each change is a member event in every room."""
    path = f"/_matrix/client/v3/profile/{quote(client.user_id, safe='')}/displayname"
    current = await client.request("GET", path)
    if current.get("displayname") != name:
        await client.set_displayname(name)


def _sent_by(sender: str, marker: str, prefix: str = "") -> Predicate:
    def match(event: dict[str, Any]) -> bool:
        body = str(event.get("content", {}).get("body", ""))
        return (
            event.get("sender") == sender
            and event.get("type") == "m.room.message"
            and body.startswith(prefix)
            and marker in body
        )

    return match


async def _link_rooms(
    folder: Path, config: Config, agency: MatrixTestClient, minister: MatrixTestClient
) -> tuple[str, str]:
    """A room on each side, linked with link-remote (made once, kept in the state folder)."""
    saved = folder / "remote-rooms"
    if saved.exists():
        agency_room, remote_room = saved.read_text(encoding="utf-8").split()
        return agency_room, remote_room
    bot = config.bot_mxid
    account = config.remotes[REMOTE].user_id
    remote_room = await minister.create_room(invite=[account], name=MINISTRY_ROOM_NAME)
    agency_room = await agency.create_room(invite=[bot], name=AGENCY_ROOM_NAME)
    await agency.wait_for_membership(agency_room, bot, "join", timeout=30)
    await agency.wait_for_event(  # the bot's greeting, before it is asked anything
        agency_room,
        lambda e: e.get("sender") == bot and e.get("type") == "m.room.message",
        timeout=30,
    )
    question = await agency.send_text(
        agency_room, f"{config.appservice.command_prefix} link-remote {REMOTE} {remote_room}"
    )
    answer = await agency.wait_for_event(agency_room, reply_to(question, bot), timeout=30)
    if "Linked" not in answer["content"].get("body", ""):
        raise RuntimeError(f"link-remote failed: {answer['content'].get('body')}")
    atomic_write(saved, f"{agency_room}\n{remote_room}\n")
    return agency_room, remote_room


async def link_remote_room(
    folder: Path,
    config: Config,
    agency: MatrixTestClient,
    ministry: SynapseServer,
    password: str,
) -> RemoteDemo:
    """The ministry's demo user, the linked rooms, and a message relayed each way: the ministry
    user's arrives from their ghost, the agency user's reply from the bridge's account."""
    user_id = await asyncio.to_thread(ministry.register_user, DEMO_USER, password)
    token = await asyncio.to_thread(ministry.login, DEMO_USER, password)
    async with MatrixTestClient(ministry.base_url, token, user_id) as minister:
        await set_displayname(minister, MINISTRY_NAME)
        agency_room, remote_room = await _link_rooms(folder, config, agency, minister)
        marker = secrets.token_hex(4)
        ghost = config.remote_ghost_mxid(REMOTE, user_id)
        await minister.send_text(remote_room, f"Bonjour de la part du ministère ({marker}).")
        await agency.wait_for_event(agency_room, _sent_by(ghost, marker), timeout=30)
        members = await agency.request(
            "GET", f"/_matrix/client/v3/rooms/{quote(agency_room, safe='')}/joined_members"
        )
        await agency.send_text(agency_room, f"Bien reçu ({marker}), merci !")
        prefix = f"{AGENCY_NAME} {AGENCY_SUFFIX} : "
        relayed = await minister.wait_for_event(
            remote_room, _sent_by(config.remotes[REMOTE].user_id, marker, prefix), timeout=30
        )
    return RemoteDemo(
        user_id=user_id,
        agency_room=agency_room,
        remote_room=remote_room,
        ghost=ghost,
        ghost_name=str(members["joined"][ghost].get("display_name") or ghost),
        relayed_as=str(relayed["content"]["body"]),
    )
