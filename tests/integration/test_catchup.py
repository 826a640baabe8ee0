"""Reading rooms back after an outage: only the tail newer than what is stored, once."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import aiohttp
from sqlalchemy import select

from bridge.config import DatabaseConfig
from bridge.core.health import ComponentHealth
from bridge.core.ids import EventID, RoomID, UserID
from bridge.db import rooms
from bridge.db.engine import open_database
from bridge.db.inbox import IncomingEvent, store_caught_up
from bridge.db.schema import inbox_event
from bridge.matrix.catchup import CatchUp
from bridge.matrix.client import MatrixClient
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory
from tests.e2e.test_bot import open_dm


async def test_catch_up_takes_only_the_unseen_tail(
    synapse_setup: SynapseSetup, make_user: UserFactory, db_url: str, tmp_path: Path
) -> None:
    # A bridge with a database of its own gets the bot into the room, then stops.
    bridge = BridgeProcess(
        synapse_setup.config_path,
        f"sqlite+aiosqlite:///{tmp_path / 'joined.db'}",
        tmp_path / "bridge.log",
    )
    bridge.start()
    try:
        bot = synapse_setup.config.bot_mxid
        alice = await make_user("alice")
        room_id = RoomID(await open_dm(alice, bot))
    finally:
        bridge.stop()
    seen = await alice.send_text(room_id, "already handled")
    missed = [await alice.send_text(room_id, f"never pushed {n}") for n in range(3)]
    quoted = urllib.parse.quote(room_id)
    seen_event = await alice.request("GET", f"/_matrix/client/v3/rooms/{quoted}/event/{seen}")

    # A bridge database that stored everything up to `seen`, and nothing after it.
    db = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    try:
        await rooms.save_room(
            db, room_id, bot_membership="join", is_direct=True, encrypted=False, invited_by=None
        )
        await store_caught_up(
            db,
            [
                IncomingEvent(
                    event_id=EventID(seen),
                    room_id=room_id,
                    event_type="m.room.message",
                    sender=UserID(alice.user_id),
                    origin_ts=seen_event["origin_server_ts"],
                    event_json=json.dumps(seen_event),
                )
            ],
        )
        async with aiohttp.ClientSession() as session:
            client = MatrixClient(synapse_setup.config, session, ComponentHealth("homeserver"))
            catch_up = CatchUp(db, client)
            assert await catch_up.run() == 3
            assert await catch_up.run() == 0  # nothing twice
        async with db.begin() as conn:
            stored = (
                await conn.execute(select(inbox_event.c.event_id).order_by(inbox_event.c.seq))
            ).scalars()
            assert list(stored) == [seen, *missed]  # in the order they happened
    finally:
        await db.close()
