"""The IMAP connection pool against a real Dovecot: the bound, polling in turn, promotions."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage

import pytest

from bridge.core.health import ComponentHealth
from bridge.core.tasks import TaskGroup
from bridge.harness.dovecot import DovecotServer
from bridge.harness.tcp_counter import ConnectionCounter
from bridge.mail.imap_pool import ImapPool, poll_connections
from bridge.mail.imap_session import MailboxConfig
from bridge.mail.imap_watcher import ImapWatcher, MailboxStore

PASSWORD = "pool-test-Secr3t"


class Store:
    """One mailbox's MailboxStore in memory; refuses a UID stored twice or out of order."""

    def __init__(self, mailbox: str) -> None:
        self.mailbox = mailbox
        self.uids: dict[tuple[int, int], float] = {}  # (uidvalidity, uid) → stored at
        self.subjects: list[bytes] = []

    async def resume_point(self, mailbox: str, uidvalidity: int) -> int:
        assert mailbox == self.mailbox
        return max((uid for v, uid in self.uids if v == uidvalidity), default=0)

    async def store_raw(self, mailbox: str, uidvalidity: int, uid: int, raw: bytes) -> None:
        assert mailbox == self.mailbox
        assert (uidvalidity, uid) not in self.uids, f"UID {uid} stored twice"
        assert uid > await self.resume_point(mailbox, uidvalidity), "out of UID order"
        self.uids[(uidvalidity, uid)] = time.monotonic()
        self.subjects.append(raw)

    async def store_oversized(self, mailbox: str, uidvalidity: int, uid: int, size: int) -> None:
        raise AssertionError(f"UID {uid} recorded as oversized ({size}): nothing here is")

    def notify(self) -> None:
        pass


def _typed(store: Store) -> MailboxStore:
    return store  # mypy checks here that Store implements the Protocol


def message(to: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "agent@agency.example"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@agency.example>"
    msg.set_content("Bonjour.\n")
    return msg.as_bytes().replace(b"\n", b"\r\n")


async def wait_until(predicate: Callable[[], bool], budget: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > budget:
            raise AssertionError(f"not within {budget} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


class Rig:
    """Mailboxes on the real Dovecot, reached through a connection counter, in one pool."""

    def __init__(self, dovecot: DovecotServer, counter: ConnectionCounter) -> None:
        self.dovecot = dovecot
        self.counter = counter
        self.tasks = TaskGroup()
        self.stores: dict[str, Store] = {}
        self.health: dict[str, ComponentHealth] = {}

    def user(self) -> str:
        return self.dovecot.add_user(f"p{uuid.uuid4().hex[:12]}", PASSWORD)

    def watcher(self, address: str, folder: str = "INBOX") -> ImapWatcher:
        store = self.stores[address] = Store(address)
        health = self.health[address] = ComponentHealth(f"imap:{address}")
        config = MailboxConfig(
            host=self.counter.host,
            port=self.counter.port,
            tls="none",
            user=address,
            password=PASSWORD,
            folder=folder,
        )
        return ImapWatcher(
            address, config, _typed(store), health, max_size=1_000_000, connect_timeout=10
        )

    def pool(self, max_connections: int, poll_interval: float) -> ImapPool:
        return ImapPool(
            self.tasks.spawn, max_connections=max_connections, poll_interval=poll_interval
        )

    async def deliver(self, address: str, subject: str) -> float:
        """APPEND straight to Dovecot (not through the counter); return when it was done."""
        await self.dovecot.append(address, PASSWORD, message(address, subject))
        return time.monotonic()


@pytest.fixture
async def rig(dovecot: DovecotServer) -> AsyncIterator[Rig]:
    counter = ConnectionCounter(dovecot.host, dovecot.imap_port)
    await counter.start()
    rig = Rig(dovecot, counter)
    try:
        yield rig
    finally:
        await rig.tasks.close()
        await counter.stop()


def test_poll_connections_share() -> None:
    assert [poll_connections(n) for n in (1, 2, 3, 4, 8, 100)] == [1, 1, 1, 1, 2, 25]


@pytest.mark.parametrize(("max_connections", "poll_interval"), [(0, 1.0), (2, 0.0), (2, -1.0)])
def test_pool_refuses_nonsense_sizes(max_connections: int, poll_interval: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        ImapPool(
            lambda coro, name: None, max_connections=max_connections, poll_interval=poll_interval
        )  # type: ignore[arg-type,return-value]


async def test_five_mailboxes_on_two_connections(rig: Rig) -> None:
    """Pool of 2, 5 mailboxes: one keeps IDLE, four are polled over the other connection; mail
    into each is stored once, polled ones within the poll interval, and Dovecot never sees
    more than 2 connections."""
    poll_interval = 1.5
    pool = rig.pool(2, poll_interval)
    addresses = [rig.user() for _ in range(5)]
    for address in addresses:
        pool.add(address, rig.watcher(address))
    stats = pool.stats()
    assert (stats.idle, stats.polled) == (1, 4)
    # Every polled mailbox has been looked at once (its empty INBOX), and the IDLE one is in IDLE.
    await wait_until(lambda: len(pool.stats().per_mailbox_polls) == 4, 10, "first polls")
    await wait_until(lambda: all(h.reachable for h in rig.health.values()), 10, "reachable")

    for round_ in range(2):
        sent = {a: await rig.deliver(a, f"round {round_} to {a}") for a in addresses}
        await wait_until(
            lambda n=round_ + 1: all(len(rig.stores[a].uids) == n for a in addresses),  # type: ignore[misc]
            2 * poll_interval + 5,
            f"round {round_} stored in every mailbox",
        )
        for address in addresses:
            stored_at = max(rig.stores[address].uids.values())
            # A polled mailbox is checked every poll_interval: at most that, plus one check.
            assert stored_at - sent[address] < poll_interval + 1.0, address
    first_latency = max(rig.stores[addresses[0]].uids.values()) - sent[addresses[0]]
    assert first_latency < 1.2  # IDLE: Dovecot's 0.5 s announcement, not a poll
    assert rig.counter.peak <= 2
    assert pool.stats().peak <= 2
    # Polling means connecting again and again: many more connections made than open at once.
    assert rig.counter.accepted >= 1 + 4 * 2
    assert all(store.subjects for store in rig.stores.values())


async def test_polling_takes_turns_and_a_failing_mailbox_starves_nobody(rig: Rig) -> None:
    poll_interval = 0.4
    pool = rig.pool(2, poll_interval)
    good = [rig.user() for _ in range(4)]
    broken = rig.user()
    pool.add(good[0], rig.watcher(good[0]))  # the first keeps a connection of its own
    pool.add(broken, rig.watcher(broken, folder="Missing"))
    for address in good[1:]:
        pool.add(address, rig.watcher(address))
    # The broken mailbox fails at each try (its folder is missing) and is tried less and less
    # often. (Not a wrong password: Dovecot then delays every login from this address.)
    await asyncio.sleep(4.0)
    polls = pool.stats().per_mailbox_polls
    assert set(polls) == {broken, *good[1:]}
    # Round-robin: every polled mailbox is checked, none twice before the others once more.
    checked = [polls[address] for address in good[1:]]
    assert min(checked) >= 3
    assert max(checked) - min(checked) <= 1, polls
    assert 1 <= polls[broken] <= 3, polls
    assert rig.health[broken].reachable is False
    assert "cannot open folder 'Missing'" in (rig.health[broken].last_error or "")
    for address in good:
        await rig.deliver(address, "after the failures")
    await wait_until(
        lambda: all(rig.stores[a].uids for a in good), poll_interval * 4 + 3, "good mailboxes"
    )
    assert rig.counter.peak <= 2


async def test_removing_and_adding_moves_mailboxes_between_idle_and_polling(rig: Rig) -> None:
    pool = rig.pool(2, 60.0)  # polls so rare that only IDLE can bring mail in this test
    a, b, c = (rig.user() for _ in range(3))
    for address in (a, b, c):
        pool.add(address, rig.watcher(address))
    assert (pool.stats().idle, pool.stats().polled) == (1, 2)
    await wait_until(lambda: len(pool.stats().per_mailbox_polls) == 2, 10, "first polls")

    pool.remove(a)  # two mailboxes on two connections: both IDLE now
    assert (pool.stats().idle, pool.stats().polled) == (2, 0)
    assert a not in pool
    assert pool.keys() == [b, c]
    await wait_until(lambda: rig.counter.open == 2, 10, "two IDLE connections")
    await asyncio.sleep(0.3)  # into IDLE
    sent = await rig.deliver(c, "now by IDLE")
    await wait_until(lambda: bool(rig.stores[c].uids), 5, "mail seen through IDLE")
    assert max(rig.stores[c].uids.values()) - sent < 5  # not the 60 s poll

    d = rig.user()
    pool.add(d, rig.watcher(d))  # three again: c gives its connection back and is polled
    assert (pool.stats().idle, pool.stats().polled) == (1, 2)
    await wait_until(lambda: d in pool.stats().per_mailbox_polls, 10, "the new one polled")
    await wait_until(lambda: c in pool.stats().per_mailbox_polls, 10, "c polled")
    assert rig.counter.peak <= 2
    pool.close()
    await wait_until(lambda: rig.counter.open == 0, 10, "every connection closed")
    assert pool.keys() == []


class _Idle:
    """A watcher that never connects: the pool's bookkeeping alone, at scale."""

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def sync_once(self) -> int:
        return 0


async def test_ten_thousand_mailboxes_are_added_in_linear_time() -> None:
    tasks = TaskGroup()
    pool = ImapPool(tasks.spawn, max_connections=100, poll_interval=3600)
    try:
        started = time.monotonic()
        for n in range(10_000):
            pool.add(f"list{n}@example.test", _Idle())
        elapsed = time.monotonic() - started
        stats = pool.stats()
        assert (stats.idle, stats.polled) == (75, 9_925)
        assert elapsed < 10.0  # about 0.1 s here; quadratic (a queue scan per add) took minutes
        # Back to 100 mailboxes: every one has a connection of its own, nobody is polled.
        for n in range(100, 10_000):
            pool.remove(f"list{n}@example.test")
        assert (pool.stats().idle, pool.stats().polled) == (100, 0)
    finally:
        pool.close()
        await tasks.close()


async def test_removing_mailboxes_one_by_one_costs_the_connections_not_the_mailboxes() -> None:
    """Removing the connected mailboxes first (each removal promotes the next one) walked
    every mailbox at each removal: 10,000 took 8 s, now 0.3 s."""
    tasks = TaskGroup()
    pool = ImapPool(tasks.spawn, max_connections=20, poll_interval=3600)
    try:
        keys = [f"list{n}@example.test" for n in range(10_000)]
        for key in keys:
            pool.add(key, _Idle())
        started = time.monotonic()
        for n, key in enumerate(keys):
            pool.remove(key)
            if n == 100:
                stats = pool.stats()
                # Still the first ones on connections of their own, the rest polled.
                assert (stats.idle, stats.polled) == (15, 10_000 - 101 - 15)
        elapsed = time.monotonic() - started
        assert pool.keys() == []
        assert elapsed < 4.0
    finally:
        pool.close()
        await tasks.close()
