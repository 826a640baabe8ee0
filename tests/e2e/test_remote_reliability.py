"""The remote relay loses nothing and posts nothing twice: kill -9 of the bridge mid-stream,
the remote homeserver restarting, a revoked token; and it stops relaying where it must
(encryption turned on, the bridge's account removed)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import select

from bridge.config import DatabaseConfig
from bridge.db import remote as remote_db
from bridge.db.engine import open_database
from bridge.db.schema import remote_inbox
from bridge.harness.synapse import MatrixTestClient, SynapseServer
from tests.conftest import (
    MINISTRY_BRIDGE_LOCALPART,
    SynapseSetup,
    http_json,
    user_password,
)
from tests.e2e.test_bot import replies_to
from tests.e2e.test_remote_relay import Linked, LinkFactory, body_has, sent_by

pytestmark = pytest.mark.slow


async def wait_until(probe: Any, what: str, timeout: float = 60) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


async def bodies(client: MatrixTestClient, room_id: str, sender: str) -> list[str]:
    events = await client.messages(room_id, limit=200)
    return [
        str(e["content"].get("body", ""))
        for e in events
        if e.get("sender") == sender and e.get("type") == "m.room.message"
    ]


@pytest.mark.both_databases
async def test_kill_9_mid_stream_both_ways(linked: Linked) -> None:
    """Each message exactly once, in order, though the bridge is killed while relaying."""
    ghost = linked.ghost_of(linked.bob.user_id)
    count = 15
    for n in range(count):
        await linked.bob.send_text(linked.remote_room, f"in-{n:02d}")
        await linked.alice.send_text(linked.agency_room, f"out-{n:02d}")

    async def some_relayed() -> bool:
        return bool(await bodies(linked.alice, linked.agency_room, ghost))

    await wait_until(some_relayed, "the first relayed message")
    linked.bridge.stop(kill=True)
    linked.bridge.start()

    expected_in = [f"in-{n:02d}" for n in range(count)]
    expected_out = [f"Alice Martin (Agence) : out-{n:02d}" for n in range(count)]

    async def all_in() -> list[str] | None:
        found = await bodies(linked.alice, linked.agency_room, ghost)
        return found if len(found) >= count else None

    async def all_out() -> list[str] | None:
        found = await bodies(linked.bob, linked.remote_room, linked.bridge_remote_user)
        return found if len(found) >= count else None

    await wait_until(all_in, "every remote message in the agency room")
    await wait_until(all_out, "every agency message in the remote room")
    await asyncio.sleep(2)  # anything posted twice would show by now
    assert await bodies(linked.alice, linked.agency_room, ghost) == expected_in
    assert await bodies(linked.bob, linked.remote_room, linked.bridge_remote_user) == expected_out
    # The bridge's own messages came back in its /sync and were not even stored.
    db = await open_database(DatabaseConfig(linked.bridge.database_url, 2))
    try:
        async with db.begin() as conn:
            stored = (await conn.execute(select(remote_inbox.c.event_json))).scalars().all()
    finally:
        await db.close()
    # (Its own membership is state, and is kept: its removal would matter.)
    senders = {e["sender"] for e in map(json.loads, stored) if "state_key" not in e}
    assert linked.bridge_remote_user not in senders
    assert linked.bob.user_id in senders


async def test_remote_homeserver_killed_and_restarted(
    linked: Linked, ministry_synapse: SynapseServer
) -> None:
    """Messages written while the remote server is down go when it is back; its /sync
    resumes where it was."""
    ghost = linked.ghost_of(linked.bob.user_id)
    await linked.bob.send_text(linked.remote_room, "avant la coupure")
    await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "avant la coupure"))
    ministry_synapse.stop(kill=True)  # kill -9: what it had not written is lost to it
    try:
        for n in range(3):
            await linked.alice.send_text(linked.agency_room, f"pendant {n}")
        await asyncio.sleep(3)
    finally:
        ministry_synapse.start()
    await linked.bob.send_text(linked.remote_room, "après la coupure")
    await linked.alice.wait_for_event(
        linked.agency_room, sent_by(ghost, "après la coupure"), timeout=90
    )

    async def all_out() -> list[str] | None:
        found = await bodies(linked.bob, linked.remote_room, linked.bridge_remote_user)
        return found if len(found) >= 3 else None

    found = await wait_until(all_out, "the messages written during the outage", timeout=120)
    assert found == [f"Alice Martin (Agence) : pendant {n}" for n in range(3)]
    assert await bodies(linked.alice, linked.agency_room, ghost) == [
        "avant la coupure",
        "après la coupure",
    ]


async def test_revoked_token_stops_that_remote_only(
    link_with: LinkFactory,
    ministry_synapse: SynapseServer,
    people: tuple[MatrixTestClient, MatrixTestClient],
) -> None:
    alice, bob = people
    # A login of its own, so revoking it leaves the session's shared token alone.
    user_id = ministry_synapse.user_id(MINISTRY_BRIDGE_LOCALPART)
    token = ministry_synapse.login(
        MINISTRY_BRIDGE_LOCALPART, user_password(MINISTRY_BRIDGE_LOCALPART)
    )
    linked = await link_with(account=(user_id, token))
    ghost = linked.ghost_of(bob.user_id)
    await bob.send_text(linked.remote_room, "encore valide")
    await alice.wait_for_event(linked.agency_room, sent_by(ghost, "encore valide"))
    async with MatrixTestClient(ministry_synapse.base_url, token, user_id) as session:
        await session.logout()
    await bob.send_text(linked.remote_room, "après révocation")
    notice = await alice.wait_for_event(
        linked.agency_room,
        body_has("no longer accepts the bridge's access token"),
        timeout=60,
    )
    assert notice["sender"] == linked.bot
    # The bridge itself goes on: the bot still answers, /health says why.
    question = await alice.send_text(linked.agency_room, "!passerelle status")
    await alice.wait_for_event(linked.agency_room, replies_to(question, linked.bot))
    _status, health = http_json(linked.bridge.base_url + "/health")
    assert (
        "refused" in health["remotes"]["ministere"]["stopped"]
        or health["remotes"]["ministere"]["last_error"]
    )
    await alice.send_text(linked.agency_room, "gardé pour plus tard")
    await asyncio.sleep(2)
    log = linked.bridge.log_text()
    assert log.count("remote ministere stopped") == 1, log[-3000:]
    assert token not in log


async def relayed_once_both_ways(linked: Linked, tag: str) -> None:
    """The link works before the change the test makes."""
    ghost = linked.ghost_of(linked.bob.user_id)
    await linked.bob.send_text(linked.remote_room, f"{tag} in")
    await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, f"{tag} in"))
    await linked.alice.send_text(linked.agency_room, f"{tag} out")
    await linked.bob.wait_for_event(
        linked.remote_room, sent_by(linked.bridge_remote_user, f"{tag} out")
    )


async def test_remote_room_encryption_pauses_the_link(linked: Linked) -> None:
    ghost = linked.ghost_of(linked.bob.user_id)
    await relayed_once_both_ways(linked, "avant")
    await linked.bob.send_state(
        linked.remote_room, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"}
    )
    notice = await linked.alice.wait_for_event(
        linked.agency_room, body_has("End-to-end encryption was turned on in the linked room")
    )
    assert notice["sender"] == linked.bot
    await linked.alice.send_text(linked.agency_room, "ne doit pas partir")
    await asyncio.sleep(3)
    remote = await linked.bob.messages(linked.remote_room)
    assert not [e for e in remote if body_has("ne doit pas partir")(e)]
    agency = await linked.alice.messages(linked.agency_room)
    assert not [e for e in agency if e.get("sender") == ghost and "encrypted" in str(e)]


async def test_agency_room_encryption_pauses_the_link(linked: Linked) -> None:
    await relayed_once_both_ways(linked, "avant")
    await linked.alice.send_state(
        linked.agency_room, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"}
    )
    await linked.alice.wait_for_event(
        linked.agency_room, body_has("nothing is relayed in either direction")
    )
    await linked.bob.send_text(linked.remote_room, "ne doit pas arriver")
    await linked.alice.send_text(linked.agency_room, "ne doit pas partir")
    await asyncio.sleep(4)
    agency = await linked.alice.messages(linked.agency_room)
    assert not [e for e in agency if "ne doit pas arriver" in str(e.get("content"))]
    remote = await linked.bob.messages(linked.remote_room)
    assert not [e for e in remote if body_has("ne doit pas partir")(e)]


async def test_bridge_account_removed_pauses_and_tells(linked: Linked) -> None:
    await linked.bob.request(
        "POST",
        f"/_matrix/client/v3/rooms/{linked.remote_room}/kick",
        json_body={"user_id": linked.bridge_remote_user, "reason": "test"},
    )
    notice = await linked.alice.wait_for_event(
        linked.agency_room, body_has("was removed from the linked room")
    )
    assert notice["sender"] == linked.bot


async def test_membership_is_mirrored(linked: Linked) -> None:
    ghost = linked.ghost_of(linked.bob.user_id)
    await linked.bob.send_text(linked.remote_room, "présent")
    await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "présent"))
    await linked.bob.set_displayname("Robert Durand")

    async def renamed() -> bool:
        members = await linked.alice.request(
            "GET", f"/_matrix/client/v3/rooms/{linked.agency_room}/joined_members"
        )
        info = members["joined"].get(ghost, {})
        return bool(info.get("display_name") == "Robert Durand (Ministère)")

    await wait_until(renamed, "the ghost renamed", timeout=30)
    await linked.bob.leave(linked.remote_room)

    async def left() -> bool:
        members = await linked.alice.request(
            "GET", f"/_matrix/client/v3/rooms/{linked.agency_room}/joined_members"
        )
        return ghost not in members["joined"]

    await wait_until(left, "the ghost gone", timeout=30)


async def test_a_user_of_a_third_server_is_refused(linked: Linked) -> None:
    """The remote room may federate with a server the link does not trust: its users' events
    (as the remote's /sync would hand them over) are not posted, and the room is told once a
    day. Such an event is put in the bridge's remote inbox directly: these two test servers
    do not federate with a third."""
    ghost = linked.ghost_of(linked.bob.user_id)
    await linked.bob.send_text(linked.remote_room, "premier")
    await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "premier"))
    forged = [
        {
            "type": "m.room.message",
            "event_id": f"$forged{n}",
            "sender": sender,
            "origin_server_ts": 1,
            "content": {"msgtype": "m.text", "body": f"usurpation {n}"},
        }
        for n, sender in enumerate(
            ["@eve:evil.example", "@eve:ministere.localhost.evil.example", "@eve:evil.example"]
        )
    ]
    db = await open_database(DatabaseConfig(linked.bridge.database_url, 2))
    try:
        position = await remote_db.sync_position(db, "ministere")
        assert position is not None
        await remote_db.store_batch(
            db,
            "ministere",
            [(linked.remote_room, e["event_id"], json.dumps(e)) for e in forged],
            position,
        )
    finally:
        await db.close()
    await linked.bob.send_text(linked.remote_room, "après")  # wakes the relay
    await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "après"))
    await asyncio.sleep(1)
    events = await linked.alice.messages(linked.agency_room)
    assert not [e for e in events if "usurpation" in str(e.get("content", {}).get("body"))]
    notices = [e for e in events if e.get("sender") == linked.bot and "is not relayed" in str(e)]
    told = sorted(str(e["content"]["body"]).split()[3] for e in notices)
    assert told == ["@eve:evil.example", "@eve:ministere.localhost.evil.example"], told


@pytest.mark.both_databases
async def test_agency_homeserver_killed_and_restarted(
    linked: Linked, synapse_setup: SynapseSetup
) -> None:
    """The remote side keeps talking while the agency's homeserver is down (kill -9): its
    messages wait in the remote inbox and are posted once it is back, once each, in order."""
    ghost = linked.ghost_of(linked.bob.user_id)
    await linked.bob.send_text(linked.remote_room, "avant")
    await linked.alice.wait_for_event(linked.agency_room, sent_by(ghost, "avant"))
    synapse_setup.synapse.stop(kill=True)
    try:
        for n in range(3):
            await linked.bob.send_text(linked.remote_room, f"pendant {n}")
        await asyncio.sleep(3)
    finally:
        synapse_setup.synapse.start()

    async def all_in() -> list[str] | None:
        found = await bodies(linked.alice, linked.agency_room, ghost)
        return found if len(found) >= 4 else None

    await wait_until(all_in, "the messages written during the outage", timeout=120)
    await asyncio.sleep(2)
    assert await bodies(linked.alice, linked.agency_room, ghost) == [
        "avant",
        "pendant 0",
        "pendant 1",
        "pendant 2",
    ]
