"""The webhook relay against a real database: a posted request is recorded while its room's next
one is sent, without losing its thread root, its order or its once-only delivery."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from sqlalchemy import select

from bridge.config import Config, DatabaseConfig, HookSettings, parse_config
from bridge.core.ids import EventID, RoomID, UserID
from bridge.core.tasks import TaskGroup
from bridge.db import rooms
from bridge.db import webhooks as webhook_db
from bridge.db.engine import Database, open_database
from bridge.db.schema import webhook_inbox, webhook_thread
from bridge.matrix.client import MatrixClient
from bridge.matrix.ghosts import GhostManager
from bridge.relay.hooks_in import HooksRelay

ROOM = RoomID("!ci:example.org")
HOOK = HookSettings(name="ci", room_id=ROOM, secret="whsec_" + "A" * 44)


class FakeClient:
    """Sends as the homeserver answers them: one event per transaction ID, the same event for
    the same ID again. Anything else the relay would call fails the test."""

    def __init__(self) -> None:
        self.sends: list[tuple[str, dict[str, Any]]] = []
        self.events: dict[str, EventID] = {}
        self.gate = asyncio.Event()  # cleared: sends wait
        self.gate.set()

    async def send_event(
        self,
        room_id: RoomID,
        event_type: str,
        content: dict[str, Any],
        txn_id: str,
        *,
        as_user: UserID | None = None,
    ) -> EventID:
        assert room_id == ROOM
        assert event_type == "m.room.message"
        await self.gate.wait()
        self.sends.append((txn_id, content))
        return self.events.setdefault(txn_id, EventID(f"$event{len(self.events)}"))


class FakeGhosts:
    async def ensure_user(self, mxid: UserID, name: str, room_id: RoomID, **_: Any) -> UserID:
        return mxid


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    try:
        await rooms.save_room(
            database,
            ROOM,
            bot_membership="join",
            is_direct=False,
            encrypted=False,
            invited_by=None,
        )
        yield database
    finally:
        await database.close()


def config() -> Config:
    return parse_config(
        {
            "homeserver": {"address": "https://matrix.example.org", "domain": "example.org"},
            "appservice": {"as_token": "as-" + "x" * 40, "hs_token": "hs-" + "y" * 40},
        },
        env={},
    )


@contextlib.asynccontextmanager
async def running(db: Database, client: FakeClient) -> AsyncIterator[HooksRelay]:
    tasks = TaskGroup()
    relay = HooksRelay(
        config(),
        db,
        cast(MatrixClient, client),
        cast(GhostManager, FakeGhosts()),
        tasks,
        max_attempts=3,
        hooks={"ci": HOOK},
    )
    tasks.spawn(relay.run(), name="relay")
    try:
        yield relay
    finally:
        await tasks.close()


async def store(relay: HooksRelay, webhook_id: str, text: str, thread: str | None = None) -> None:
    body: dict[str, Any] = {"text": text}
    if thread is not None:
        body["thread"] = thread
    assert await relay.store("ci", webhook_id, json.dumps(body))
    relay.stored()


async def states(db: Database) -> dict[str, tuple[str, str | None]]:
    async with db.begin() as conn:
        rows = (await conn.execute(select(webhook_inbox))).all()
    return {r.webhook_id: (r.state, r.event_id) for r in rows}


async def test_reply_sent_before_its_root_is_committed(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The root's record is held until the reply has been sent: the reply finds the root in
    memory, and both are recorded in order once the commit goes through."""
    client = FakeClient()
    release = asyncio.Event()
    recorded: list[int] = []
    real_record = webhook_db.record_posted

    async def held(db: Database, item_id: int, event_id: EventID, **kw: Any) -> None:
        await release.wait()
        await real_record(db, item_id, event_id, **kw)
        recorded.append(item_id)

    monkeypatch.setattr(webhook_db, "record_posted", held)
    async with running(db, client) as relay:
        await store(relay, "w1", "build 1 failed", thread="pipeline-7")
        await store(relay, "w2", "build 2 failed", thread="pipeline-7")
        async with asyncio.timeout(10):
            while len(client.sends) < 2:
                await asyncio.sleep(0.01)
        assert not recorded  # the reply went out while the root's record was still waiting
        (_, root), (_, reply) = client.sends
        assert "m.relates_to" not in root
        assert reply["m.relates_to"]["event_id"] == client.events[client.sends[0][0]]
        release.set()
        async with asyncio.timeout(10):
            await relay.wait_idle()
    assert len(recorded) == 2
    assert recorded == sorted(recorded)
    assert await states(db) == {
        "w1": ("done", "$event0"),
        "w2": ("done", "$event1"),
    }
    async with db.begin() as conn:
        roots = (await conn.execute(select(webhook_thread.c.root_event_id))).scalars().all()
    assert roots == ["$event0"]


async def test_failed_record_is_sent_again_with_the_same_transaction(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request posted but not recorded (the commit failed, or the bridge died in between) is
    still pending: it is sent again with the same transaction ID, so the homeserver answers
    with the event it already made: one event per request, in order."""
    client = FakeClient()
    real_record = webhook_db.record_posted
    failures = 1

    async def flaky(db: Database, item_id: int, event_id: EventID, **kw: Any) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError("disk I/O error")
        await real_record(db, item_id, event_id, **kw)

    monkeypatch.setattr(webhook_db, "record_posted", flaky)
    async with running(db, client) as relay:
        for n in range(3):
            await store(relay, f"w{n}", f"build {n} failed")
        async with asyncio.timeout(10):
            while (await states(db)).get("w0", ("pending",))[0] != "done":
                await asyncio.sleep(0.05)
            await relay.wait_idle()
    txns = [txn for txn, _ in client.sends]
    assert len(txns) == 4
    assert txns.count(txns[0]) == 2
    assert list(dict.fromkeys(txns)) == list(client.events)  # first sends in arrival order
    assert await states(db) == {f"w{n}": ("done", f"$event{n}") for n in range(3)}


async def test_requests_kept_before_start_go_first(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests kept before the relay started (a restart) are found by its first sweep; new
    ones, which store() queues itself once the room is swept, come after them, in order; and
    once swept, a new request does not make the relay read the inbox again."""
    client = FakeClient()
    for n in range(3):
        assert await webhook_db.store(db, "ci", f"old{n}", json.dumps({"text": f"old {n}"}))
    sweeps = 0
    real_pending = webhook_db.pending

    async def counted(*args: Any, **kw: Any) -> list[webhook_db.HookInboxItem]:
        nonlocal sweeps
        sweeps += 1
        return await real_pending(*args, **kw)

    monkeypatch.setattr(webhook_db, "pending", counted)
    async with running(db, client) as relay:
        for n in range(3):  # at once: maybe before the first sweep, maybe after
            await store(relay, f"new{n}", f"new {n}")
        async with asyncio.timeout(10):
            while len(client.sends) < 6:
                await asyncio.sleep(0.01)
            await relay.wait_idle()
        before = sweeps
        for n in range(3, 6):
            assert await relay.store("ci", f"new{n}", json.dumps({"text": f"new {n}"}))
            relay.stored()
        async with asyncio.timeout(10):
            while len(client.sends) < 9:
                await asyncio.sleep(0.01)
            await relay.wait_idle()
        assert sweeps == before
    bodies = [content["body"] for _, content in client.sends]
    assert bodies == [f"old {n}" for n in range(3)] + [f"new {n}" for n in range(6)]
    assert {state for state, _ in (await states(db)).values()} == {"done"}


async def test_request_a_sweep_queued_first_is_not_queued_again(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several connections (PostgreSQL) a sweep may read a request between its commit
    and store() going on: store() must not queue it a second time."""
    client = FakeClient()
    async with running(db, client) as relay:
        await store(relay, "w0", "first")  # the first sweep makes the room ready
        async with asyncio.timeout(10):
            while not client.sends:
                await asyncio.sleep(0.01)
            await relay.wait_idle()
        real_store = webhook_db.store

        async def raced(*args: Any) -> webhook_db.HookInboxItem | None:
            item = await real_store(*args)
            assert item is not None
            relay.notify()  # a sweep reads it before store() goes on
            async with asyncio.timeout(10):
                while item.id not in relay._in_flight:
                    await asyncio.sleep(0.01)
            return item

        monkeypatch.setattr(webhook_db, "store", raced)
        client.gate.clear()  # the sweep's queueing cannot finish before store() goes on
        await store(relay, "w1", "second")
        client.gate.set()
        async with asyncio.timeout(10):
            while len(client.sends) < 2:
                await asyncio.sleep(0.01)
            await relay.wait_idle()
        await asyncio.sleep(0.2)
    assert [content["body"] for _, content in client.sends] == ["first", "second"]


class JoiningClient:
    """The homeserver as the relay's start-up join sees it: joins succeed; `encrypted` rooms
    have m.room.encryption state."""

    def __init__(self, encrypted: set[str]) -> None:
        self.encrypted = encrypted
        self.joined: list[RoomID] = []

    async def join(self, room_id: RoomID) -> None:
        self.joined.append(room_id)

    async def get_state(self, room_id: RoomID, event_type: str) -> dict[str, Any] | None:
        assert event_type == "m.room.encryption"
        return {"algorithm": "m.megolm.v1.aes-sha2"} if room_id in self.encrypted else None

    async def member_count(self, room_id: RoomID) -> int:
        return 3


async def test_a_room_joined_at_start_is_usable_without_the_pushed_join(db: Database) -> None:
    """Regression (CI, PostgreSQL): the bot joined a hook's room at start-up, the homeserver
    went down before pushing the join back, and after a restart the hook waited for a join
    event that never came. The join the relay makes itself is recorded at once."""
    plain, secret = RoomID("!plain:example.org"), RoomID("!secret:example.org")
    await rooms.set_membership(db, ROOM, "leave")  # known to the bridge, left since
    hooks = {
        "a": HookSettings("a", plain, HOOK.secret),
        "b": HookSettings("b", secret, HOOK.secret),
        "ci": HOOK,
    }
    client = JoiningClient({secret})
    relay = HooksRelay(
        config(),
        db,
        cast(MatrixClient, client),
        cast(GhostManager, FakeGhosts()),
        TaskGroup(),
        max_attempts=3,
        hooks=hooks,
    )
    await relay._join_rooms()
    assert sorted(client.joined) == sorted([plain, secret, ROOM])
    found = {r: await rooms.get_room(db, r) for r in (plain, secret, ROOM)}
    assert {r: (room.bot_membership, room.encrypted) for r, room in found.items() if room} == {
        plain: ("join", False),
        secret: ("join", True),  # joined, but never posted in: the relay waits
        ROOM: ("join", False),
    }
