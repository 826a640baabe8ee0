"""Leases on a real database (SQLite and PostgreSQL): acquire, renew, expiry, takeover,
fencing, and two lease keepers sharing units of work as two instances would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import text, update

from bridge.config import DatabaseConfig
from bridge.core.leases import LeaseHolder, LeaseLost, LeaseTiming
from bridge.core.tasks import TaskGroup
from bridge.db import kv
from bridge.db import leases as lease_db
from bridge.db import notify as notify_db
from bridge.db.engine import FENCE, Database, open_database
from bridge.db.schema import lease
from bridge.relay.leases import LeaseKeeper

NAME = "mailbox:liste@example.test"


@pytest.fixture
async def dbs(db_url: str) -> AsyncIterator[tuple[Database, Database]]:
    """Two connections to one database, as two instances have."""
    first = await open_database(DatabaseConfig(url=db_url, pool_size=3))
    second = await open_database(DatabaseConfig(url=db_url, pool_size=3))
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_one_holder_at_a_time_then_takeover_after_expiry(
    dbs: tuple[Database, Database],
) -> None:
    db_a, db_b = dbs
    assert await lease_db.acquire(db_a, NAME, "a", 1500) == 1
    assert await lease_db.acquire(db_b, NAME, "b", 1500) is None  # held
    assert await lease_db.free(db_b, [NAME, "mailbox:other@example.test"]) == {
        "mailbox:other@example.test"
    }
    assert await lease_db.renew(db_a, "a", 1500) == {NAME: 1}
    assert await lease_db.acquire(db_b, NAME, "b", 1500) is None  # renewed: still held
    await asyncio.sleep(1.6)
    assert await lease_db.free(db_b, [NAME]) == {NAME}
    assert await lease_db.acquire(db_b, NAME, "b", 1500) == 2  # a new epoch
    # The old holder cannot renew what it lost, nor hand it back.
    assert await lease_db.renew(db_a, "a", 1500) == {}
    await lease_db.release(db_a, "a", [NAME])
    rows = await lease_db.all_leases(db_a)
    assert [(r.name, r.owner, r.epoch) for r in rows] == [(NAME, "b", 2)]
    assert rows[0].expires_in_ms > 0


async def test_release_frees_at_once_and_the_epoch_only_grows(
    dbs: tuple[Database, Database],
) -> None:
    db_a, db_b = dbs
    assert await lease_db.acquire(db_a, NAME, "a", 60_000) == 1
    await lease_db.release(db_a, "a", [NAME])
    assert await lease_db.acquire(db_b, NAME, "b", 60_000) == 2
    # A process restarted with the same fixed ID takes its own lease back at once.
    assert await lease_db.acquire(db_a, NAME, "b", 60_000) == 3
    assert await lease_db.acquire(db_a, NAME, "a", 60_000) is None


async def test_two_instances_racing_for_free_leases_never_both_win(
    dbs: tuple[Database, Database],
) -> None:
    db_a, db_b = dbs
    names = [f"mailbox:l{i}@example.test" for i in range(20)]

    async def grab(db: Database, owner: str) -> set[str]:
        won = set()
        for name in names:
            if await lease_db.acquire(db, name, owner, 60_000) is not None:
                won.add(name)
        return won

    won_a, won_b = await asyncio.gather(grab(db_a, "a"), grab(db_b, "b"))
    assert won_a | won_b == set(names)
    assert not won_a & won_b


async def test_many_at_once_take_only_what_is_free(dbs: tuple[Database, Database]) -> None:
    db_a, db_b = dbs
    names = [f"mailbox:l{i:04d}@example.test" for i in range(1200)]  # over one chunk
    assert await lease_db.acquire(db_b, names[0], "b", 60_000) == 1  # held by b
    assert await lease_db.acquire(db_b, names[1], "b", 100) == 1  # expires at once
    await lease_db.release(db_b, "b", [names[2]])  # absent: inserted below
    await asyncio.sleep(0.2)
    taken = await lease_db.acquire_many(db_a, names, "a", 60_000)
    assert set(taken) == set(names[1:])
    assert taken[names[1]] == 2  # a takeover: a new epoch
    assert {taken[name] for name in names[2:]} == {1}
    assert await lease_db.acquire_many(db_b, names[1:], "b", 60_000) == {}
    assert await lease_db.renew(db_a, "a", 60_000) == taken
    # Its own lease, asked again under the same ID (a restarted process): a new epoch.
    assert await lease_db.acquire_many(db_b, names, "b", 60_000) == {names[0]: 2}


async def test_a_fenced_write_of_a_lost_lease_never_commits(
    dbs: tuple[Database, Database],
) -> None:
    db_a, db_b = dbs
    epoch = await lease_db.acquire(db_a, NAME, "a", 1500)
    assert epoch is not None
    holder_a = LeaseHolder(NAME, "a", epoch)
    token = FENCE.set(holder_a)
    try:
        await kv.set_value(db_a, "checkpoint", "a-1")  # held: goes through
    finally:
        FENCE.reset(token)
    await asyncio.sleep(1.6)
    epoch_b = await lease_db.acquire(db_b, NAME, "b", 60_000)
    assert epoch_b == epoch + 1
    token = FENCE.set(holder_a)  # a paused old holder wakes up and writes
    try:
        with pytest.raises(LeaseLost, match="taken over"):
            await kv.set_value(db_a, "checkpoint", "a-2")
    finally:
        FENCE.reset(token)
    token = FENCE.set(LeaseHolder(NAME, "b", epoch_b))
    try:
        await kv.set_value(db_b, "checkpoint", "b-1")
    finally:
        FENCE.reset(token)
    assert await kv.get_value(db_a, "checkpoint") == "b-1"
    # A lease that vanished altogether is lost too.
    async with db_b.begin() as conn:
        await conn.execute(lease.delete())
    token = FENCE.set(LeaseHolder(NAME, "b", epoch_b))
    try:
        with pytest.raises(LeaseLost, match="no longer exists"):
            await kv.set_value(db_b, "checkpoint", "b-2")
    finally:
        FENCE.reset(token)
    assert await kv.get_value(db_a, "checkpoint") == "b-1"


async def test_a_takeover_waits_for_the_old_holders_open_transaction(
    dbs: tuple[Database, Database],
) -> None:
    """The holder checked its lease inside a transaction that is still open when the lease
    expires: the taker's conditional write waits until that transaction ends, so the old
    holder's write lands before the new epoch, never after."""
    db_a, db_b = dbs
    epoch = await lease_db.acquire(db_a, NAME, "a", 1500)
    assert epoch is not None
    order: list[str] = []
    checked = asyncio.Event()

    async def slow_holder() -> None:
        token = FENCE.set(LeaseHolder(NAME, "a", epoch))
        try:
            async with db_a.begin() as conn:
                checked.set()
                await asyncio.sleep(2.5)  # the lease expires meanwhile
                await conn.execute(update(lease).where(lease.c.name == "none").values(epoch=0))
                order.append("old holder commits")
        finally:
            FENCE.reset(token)

    async def taker() -> None:
        await checked.wait()
        await asyncio.sleep(1.6)
        got = await lease_db.acquire(db_b, NAME, "b", 60_000)
        order.append(f"taken with epoch {got}")

    await asyncio.gather(slow_holder(), taker())
    assert order == ["old holder commits", f"taken with epoch {epoch + 1}"]


def _keeper(db: Database, owner: str, fatal: list[str], tasks: TaskGroup) -> LeaseKeeper:
    return LeaseKeeper(
        db,
        tasks,
        owner=owner,
        timing=LeaseTiming(ttl=1.2, renew_every=0.3),
        enabled=True,
        on_fatal=fatal.append,
    )


async def _until(check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_two_keepers_split_the_units_and_the_survivor_takes_over(
    dbs: tuple[Database, Database],
) -> None:
    db_a, db_b = dbs
    tasks_a, tasks_b = TaskGroup(), TaskGroup()
    fatal: list[str] = []
    keeper_a = _keeper(db_a, "a", fatal, tasks_a)
    keeper_b = _keeper(db_b, "b", fatal, tasks_b)
    running: dict[str, list[str]] = {"a": [], "b": []}
    names = [f"mailbox:l{i}@example.test" for i in range(6)]

    def unit(owner: str, name: str) -> Callable[[], asyncio.Future[None]]:
        async def work() -> None:
            running[owner].append(name)
            try:
                await asyncio.Event().wait()
            finally:
                running[owner].remove(name)

        return work  # type: ignore[return-value]

    try:
        for keeper, owner in ((keeper_a, "a"), (keeper_b, "b")):
            for name in names:
                keeper.hold(name, unit(owner, name))
        await keeper_a.start()
        await _until(lambda: len(running["a"]) == len(names), 1)  # alone: it takes everything
        tasks_a.spawn(keeper_a.run(), name="keeper-a")
        await keeper_b.start()
        tasks_b.spawn(keeper_b.run(), name="keeper-b")
        # A second instance came: the first hands back down to its share, the second takes it.
        await _until(lambda: len(running["a"]) == 3 and len(running["b"]) == 3, 5)
        assert not set(running["a"]) & set(running["b"])
        # "a" dies without a word (SIGKILL): nothing released, nothing renewed.
        for task in list(tasks_a._tasks):
            task.cancel()
        await asyncio.sleep(0.05)
        waited = await _until(lambda: len(running["b"]) == 6, 5)
        assert waited <= 1.2 + 0.3 + 1.0  # ttl + one renewal round (+ slack for this machine)
        assert fatal == []
    finally:
        await keeper_b.close()
        await tasks_a.close()
        await tasks_b.close()
    assert running["b"] == []
    assert await lease_db.free(db_a, names) == set(names)  # a clean stop hands them back


async def test_a_lost_lease_stops_the_unit_and_all_it_spawned(
    dbs: tuple[Database, Database],
) -> None:
    db_a, db_b = dbs
    tasks = TaskGroup()
    fatal: list[str] = []
    keeper = _keeper(db_a, "a", fatal, tasks)
    children: list[asyncio.Task[None]] = []
    wrote: list[str] = []

    async def worker() -> None:
        async def child() -> None:
            while True:
                await kv.set_value(db_a, "progress", "child")  # fenced: it is the unit's
                wrote.append("child")
                await asyncio.sleep(0.05)

        children.append(tasks.spawn(child(), name="child"))
        await asyncio.Event().wait()

    keeper.hold("worker:dispatcher", worker, restartable=False)
    try:
        await keeper.start()
        await _until(lambda: len(wrote) >= 2, 5)
        # Another instance took the lease (this one was paused past its expiry).
        async with db_b.begin() as conn:
            await conn.execute(
                update(lease)
                .where(lease.c.name == "worker:dispatcher")
                .values(owner="b", epoch=lease.c.epoch + 1)
            )
        await keeper.tick()
        assert fatal == ["lease worker:dispatcher lost (taken over or expired)"]
        assert children[0].done()
        assert not keeper.running("worker:dispatcher")
        await asyncio.sleep(0.2)
        count = len(wrote)
        await asyncio.sleep(0.2)
        assert len(wrote) == count
    finally:
        await keeper.close()
        await tasks.close()


async def test_a_keeper_that_cannot_renew_stops_its_work_before_expiry(
    dbs: tuple[Database, Database],
) -> None:
    db_a, _ = dbs
    tasks = TaskGroup()
    fatal: list[str] = []
    keeper = _keeper(db_a, "a", fatal, tasks)
    stopped_at: list[float] = []

    async def watch() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped_at.append(time.monotonic())

    keeper.hold(NAME, watch)
    await keeper.start()
    last_renewal = time.monotonic()
    tasks.spawn(keeper.run(), name="keeper")

    async def unreachable(*_args: object) -> dict[str, int]:
        raise OSError("connection refused")

    original = lease_db.renew
    lease_db.renew = unreachable  # type: ignore[assignment]
    try:
        await _until(lambda: bool(stopped_at), 5)
    finally:
        lease_db.renew = original
        await keeper.close()
        await tasks.close()
    # Stopped before the lease could expire (at most ttl after the last renewal).
    assert stopped_at[0] - last_renewal < 1.2
    assert fatal == []  # a mailbox watch is restartable: no reason to exit


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_without_leases_units_run_at_once_and_wake_locally(
    dbs: tuple[Database, Database],
) -> None:
    db_a, _ = dbs
    tasks = TaskGroup()
    keeper = LeaseKeeper.alone(db_a, tasks)
    woken: list[str] = []
    keeper.hold("worker:outbox", asyncio.Event().wait, notify=lambda: woken.append("outbox"))
    assert keeper.running("worker:outbox")
    keeper.wake("worker:outbox")
    keeper.wake("worker:unknown")  # nothing to wake: nothing happens
    keeper.changed("links")
    assert woken == ["outbox", "outbox"]  # once when started, once woken
    await keeper.close()
    await tasks.close()
    assert await lease_db.all_leases(db_a) == []


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_wake_ups_and_changes_reach_the_other_instance(
    dbs: tuple[Database, Database],
) -> None:
    db_a, db_b = dbs
    tasks_a, tasks_b = TaskGroup(), TaskGroup()
    fatal: list[str] = []
    keeper_a = _keeper(db_a, "a", fatal, tasks_a)
    keeper_b = _keeper(db_b, "b", fatal, tasks_b)
    woken: list[str] = []
    changed: list[str] = []
    keeper_a.hold("worker:outbox", asyncio.Event().wait, notify=lambda: woken.append("a"))
    keeper_b.hold("worker:outbox", asyncio.Event().wait, notify=lambda: woken.append("b"))
    keeper_a.on_changed("links", lambda: changed.append("a"))
    keeper_b.on_changed("links", lambda: changed.append("b"))
    try:
        await keeper_a.start()
        tasks_a.spawn(keeper_a.run(), name="keeper-a")
        await keeper_b.start()
        tasks_b.spawn(keeper_b.run(), name="keeper-b")
        assert keeper_a.running("worker:outbox")
        assert not keeper_b.running("worker:outbox")
        await _until(lambda: changed.count("a") >= 1 and changed.count("b") >= 1, 5)
        woken.clear()
        changed.clear()
        keeper_b.wake("worker:outbox")  # stored on b, held by a
        keeper_b.changed("links")
        waited = await _until(lambda: woken == ["a"] and changed == ["a"], 2)
        assert waited < 1.0  # a notification, not the 30 s poll
        # Hostile or foreign payloads on the channel change nothing and break nothing.
        await notify_db.send(
            db_b,
            [
                "",
                "b",
                "b wake",
                "b wake worker:unknown",
                "b changed",
                "b changed nothing",
                "b explode now",
                "x" * 9000,
                "b wake worker:unknown\x00",
                "b wake \udcff",
                "a wake worker:outbox",
            ],
        )
        await asyncio.sleep(0.5)
        assert woken == ["a"]  # the last one claims to come from a itself: ignored
        assert changed == ["a"]
        # The listening connection is cut (a database restart, a proxy): it listens again, and
        # what it may have missed meanwhile is looked at (every unit woken, everything re-read).
        async with db_b.begin() as conn:
            cut = (
                await conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                    )
                )
            ).scalar()
        assert cut == 2  # a's and b's
        await _until(lambda: len(woken) >= 2 and len(changed) >= 3, 10)
        woken.clear()
        keeper_b.wake("worker:outbox")
        await _until(lambda: woken == ["a"], 5)
    finally:
        await keeper_a.close()
        await keeper_b.close()
        await tasks_a.close()
        await tasks_b.close()
