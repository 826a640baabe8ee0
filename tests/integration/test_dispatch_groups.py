"""A room's backlog handled as a group (SQLite and PostgreSQL): the writes its events defer are
committed once, before any of those events is marked done; a command sees them committed; a
group that cannot commit is handled again event by event; a stop halfway marks none done."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import pytest
from sqlalchemy import select

from bridge.core.ids import EventID, RoomID, TxnID, UserID
from bridge.core.tasks import TaskGroup
from bridge.db import inbox
from bridge.db.deferred import DEFERRED, Deferred
from bridge.db.engine import Database
from bridge.db.inbox import InboxEvent, IncomingEvent
from bridge.db.schema import inbox_event
from bridge.db.schema import kv as kv_table
from bridge.db.steps import Step, Steps
from bridge.db.util import bound_insert_ignore
from bridge.matrix import dispatcher as dispatcher_module
from bridge.matrix.dispatcher import EventDispatcher
from tests.integration.test_mail_out_batching import count_commits, inbox_states, wait_until

ROOM = RoomID("!room:localhost")
OTHER = RoomID("!other:localhost")


def _write(key: str) -> Any:
    """An idempotent write, as the handlers' are (a second one for the same event is a no-op)."""

    def steps(dialect: str) -> Steps[str]:
        columns = ("key", "value")
        build = functools.partial(bound_insert_ignore, dialect, kv_table, ("key",), columns)
        yield Step(f"test.kv_insert.{dialect}", build, {"key": key, "value": "1"})
        return key

    return steps


async def _store(db: Database, bodies: list[tuple[RoomID, str]]) -> None:
    events = [
        IncomingEvent(
            event_id=EventID(f"$e{n}"),
            room_id=room,
            event_type="m.room.message",
            sender=UserID("@alice:localhost"),
            origin_ts=1_750_000_000_000 + n,
            event_json=json.dumps({"event_id": f"$e{n}", "content": {"body": body}}),
        )
        for n, (room, body) in enumerate(bodies)
    ]
    await inbox.store_transaction(db, TxnID("t1"), "digest", events, [])


async def _keys(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return {str(k) for k in (await conn.execute(select(kv_table.c.key))).scalars()}


def _groupable(item: InboxEvent) -> bool:
    return not str(item.event.get("content", {}).get("body", "")).startswith("!")


class Handler:
    """Writes one kv row per event: deferred to the group when there is one, else at once.
    Records which events were handled in a group, and when each write was committed."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.handled: list[tuple[str, bool]] = []  # (event, in a group)
        self.committed: set[str] = set()
        self.seen_by_commands: dict[str, set[str]] = {}

    async def __call__(self, item: InboxEvent) -> None:
        group = DEFERRED.get()
        self.handled.append((item.event_id, group is not None))
        if not _groupable(item):  # a command: reads what came before
            self.seen_by_commands[item.event_id] = await _keys(self.db)
            return
        if group is not None:
            group.add(_write(item.event_id), self.committed.add)
        else:
            self.committed.add(await self.db.write(_write(item.event_id)))


async def _run_until_idle(db: Database, handler: Handler, count: int) -> None:
    tasks = TaskGroup()
    dispatcher = EventDispatcher(db, handler, tasks, max_attempts=3, groupable=_groupable)
    tasks.spawn(dispatcher.run(), name="dispatcher")
    try:
        await wait_until(lambda: _done(db, count))
        await asyncio.wait_for(dispatcher.wait_idle(), 15)
    finally:
        await tasks.close()


async def _done(db: Database, count: int) -> bool:
    states = await inbox_states(db)
    return len(states) == count and set(states.values()) == {"done"}


async def test_a_rooms_backlog_commits_its_writes_together_before_any_is_done(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_module, "GROUP_LIMIT", 8)
    handler = Handler(db)
    marked: list[int] = []
    real_mark = inbox.mark_events_done

    async def mark_done(database: Database, seqs: list[int]) -> None:
        # Every event marked done has its write committed already.
        ids = {f"$e{seq - first}" for seq in seqs}
        assert ids <= handler.committed, ids - handler.committed
        marked.extend(seqs)
        await real_mark(database, seqs)

    monkeypatch.setattr(inbox, "mark_events_done", mark_done)
    await _store(db, [(ROOM, f"message {n}") for n in range(20)])
    async with db.engine.connect() as conn:
        first = min((await conn.execute(select(inbox_event.c.seq))).scalars())
    commits = count_commits(db)
    await _run_until_idle(db, handler, 20)

    assert [event for event, _ in handler.handled] == [f"$e{n}" for n in range(20)]
    assert await _keys(db) == {f"$e{n}" for n in range(20)}
    assert sorted(marked) == list(range(first, first + 20))
    # 20 writes in groups of at most 8: three commits for them, not twenty.
    grouped = [event for event, in_group in handler.handled if in_group]
    assert len(grouped) == 20
    assert len(commits) < 20


async def test_a_command_behind_messages_sees_their_writes_committed(db: Database) -> None:
    handler = Handler(db)
    bodies = [(ROOM, "one"), (ROOM, "two"), (ROOM, "!passerelle links"), (ROOM, "three")]
    bodies += [(OTHER, "elsewhere")]
    await _store(db, bodies)
    await _run_until_idle(db, handler, len(bodies))
    assert handler.seen_by_commands["$e2"] >= {"$e0", "$e1"}
    assert await _keys(db) == {"$e0", "$e1", "$e3", "$e4"}


async def test_a_group_that_cannot_commit_is_handled_again_event_by_event(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_commit = Deferred.commit
    failures = []

    async def failing_once(self: Deferred, database: Database) -> None:
        if len(self) > 1 and not failures:
            failures.append(len(self))
            raise ConnectionError("the database went away")
        await real_commit(self, database)

    monkeypatch.setattr(Deferred, "commit", failing_once)
    handler = Handler(db)
    await _store(db, [(ROOM, f"message {n}") for n in range(6)])
    await _run_until_idle(db, handler, 6)

    assert failures
    assert failures[0] > 1
    assert await _keys(db) == {f"$e{n}" for n in range(6)}
    again = [event for event, in_group in handler.handled if not in_group]
    assert len(again) == failures[0]  # the failed group's events, each handled alone
    assert set(again) <= {f"$e{n}" for n in range(6)}


async def test_a_stop_in_the_middle_of_a_group_marks_none_of_it_done(db: Database) -> None:
    blocked = asyncio.Event()
    handler = Handler(db)

    async def handle(item: InboxEvent) -> None:
        if item.event_id == "$e3":
            blocked.set()
            await asyncio.Event().wait()  # never: the bridge stops here
        await handler(item)

    await _store(db, [(ROOM, f"message {n}") for n in range(5)])
    tasks = TaskGroup()
    dispatcher = EventDispatcher(db, handle, tasks, max_attempts=3, groupable=_groupable)
    tasks.spawn(dispatcher.run(), name="dispatcher")
    try:
        await asyncio.wait_for(blocked.wait(), 15)
        await asyncio.sleep(0.1)  # anything that would be marked done is, by now
    finally:
        await tasks.close()
    assert set((await inbox_states(db)).values()) == {"pending"}
    assert await _keys(db) == set()
    assert handler.committed == set()
    # Nor waiting to be marked done (the writer stopping at the same moment hides that).
    assert dispatcher._settled == []


async def test_an_event_that_fails_does_not_hold_back_the_writes_before_it(db: Database) -> None:
    """The room's earlier events' writes are committed as soon as one event fails, not after
    its retries (a homeserver outage can last): the retry finds them in the database."""
    handler = Handler(db)
    seen_at_retry: list[set[str]] = []
    attempts = {"$e3": 0}

    async def handle(item: InboxEvent) -> None:
        if item.event_id == "$e3":
            attempts["$e3"] += 1
            if attempts["$e3"] == 1:
                await handler(item)  # deferred, then the failure
                raise ConnectionError("the homeserver is away")
            seen_at_retry.append(await _keys(db))
        await handler(item)

    await _store(db, [(ROOM, f"message {n}") for n in range(6)])
    tasks = TaskGroup()
    dispatcher = EventDispatcher(db, handle, tasks, max_attempts=3, groupable=_groupable)
    dispatcher.retry_initial = 0.01
    tasks.spawn(dispatcher.run(), name="dispatcher")
    try:
        await wait_until(lambda: _done(db, 6))
    finally:
        await tasks.close()
    assert seen_at_retry == [{"$e0", "$e1", "$e2", "$e3"}]
    assert await _keys(db) == {f"$e{n}" for n in range(6)}
