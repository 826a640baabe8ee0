"""Ghosts joining rooms on the real Synapse: a public room takes a join; in an invite-only room
the bot invites the ghost, and after the first refusal the next ghosts are invited first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from bridge.config import DatabaseConfig
from bridge.core.health import ComponentHealth
from bridge.core.ids import RoomID, UserID
from bridge.db.engine import open_database
from bridge.matrix.client import MatrixClient
from bridge.matrix.ghosts import GhostManager
from tests.conftest import SynapseSetup, UserFactory


class CountingClient(MatrixClient):
    """The bridge's client, noting the path of each request it makes (and whether it failed)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[tuple[str, bool]] = []

    async def request(self, method: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        step = str(path).rsplit("/", 1)[-1]
        try:
            result = await super().request(method, path, *args, **kwargs)
        except Exception:
            self.calls.append((step, False))
            raise
        self.calls.append((step, True))
        return result


def memberships(calls: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    return [(step, ok) for step, ok in calls if step in ("join", "invite")]


async def test_ghosts_join_invite_only_and_public_rooms(
    synapse_setup: SynapseSetup, make_user: UserFactory, tmp_path: Path
) -> None:
    config = synapse_setup.config
    alice = await make_user("ghostjoinalice")
    private = await alice.create_room(invite=[config.bot_mxid], name="invite only")
    public = await alice.create_room(public=True, name="public")
    db = await open_database(
        DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'ghosts.db'}", pool_size=2)
    )
    try:
        async with aiohttp.ClientSession() as session:
            client = CountingClient(config, session, ComponentHealth("homeserver"))
            await client.join(RoomID(private))  # the bot accepts alice's invite
            ghosts = GhostManager(config, client, db)

            async def ensure(address: str, room: str) -> UserID:
                client.calls.clear()
                return await ghosts.ensure(address, address.split("@")[0], RoomID(room))

            first = await ensure("agent.one@example.org", private)
            # Refused (invite only), then the bot's invite and the ghost's join.
            assert memberships(client.calls) == [("join", False), ("invite", True), ("join", True)]
            second = await ensure("agent.two@example.org", private)
            # The room is known to be invite-only: no refused join first.
            assert memberships(client.calls) == [("invite", True), ("join", True)]
            assert await ensure("agent.two@example.org", private) == second
            assert memberships(client.calls) == []  # already in
            await ensure("agent.one@example.org", public)
            assert memberships(client.calls) == [("join", True)]

            # Another instance (or this one restarted) learns the room is invite-only from a
            # new ghost, then meets a ghost the first instance joined: the invite is refused
            # (a member already) and the join goes through, which the homeserver allows.
            other = GhostManager(config, client, db)
            client.calls.clear()
            third = await other.ensure("agent.three@example.org", "three", RoomID(private))
            assert memberships(client.calls) == [("join", False), ("invite", True), ("join", True)]
            client.calls.clear()
            assert await other.ensure("agent.one@example.org", "one", RoomID(private)) == first
            assert memberships(client.calls) == [("invite", False), ("join", True)]

        joined = await alice.joined_members(private)
        assert {first, second, third, config.bot_mxid} <= set(joined)
        assert first in await alice.joined_members(public)
    finally:
        await db.close()
