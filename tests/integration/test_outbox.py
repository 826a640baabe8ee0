"""OutboxWorker with an in-memory store and a real aiosmtpd sink: retries, give-up, concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import email
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.core.health import ComponentHealth
from bridge.harness.ports import free_port
from bridge.mail.outbox import OutboxItem, OutboxStore, OutboxWorker
from bridge.mail.smtp import SendResult, SmtpConfig, SmtpSender
from tests.integration.test_smtp import FROM, TO, ScriptedHandler, make_message, start_sink, up

T0 = 1_750_000_000.0
DAY = 86400.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Row:
    id: int
    raw: bytes
    mail_from: str
    recipients: tuple[str, ...]
    next_attempt_at: float
    attempts: int = 0
    first_tried_at: float | None = None
    state: str = "queued"  # queued, sent, failed
    result: SendResult | None = None


class MemoryStore:
    """An OutboxStore in memory that records every call and refuses what should not happen.

    Refusals raise AssertionError (the worker logs and retries store failures, so they are
    also collected in ``unexpected``, which every test checks is empty).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.rows: dict[int, Row] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.handed_out: set[int] = set()  # returned by due(), no outcome recorded yet
        self.unexpected: list[str] = []
        self.fail_next: dict[str, int] = {}  # method name -> how many calls fail

    def add(self, raw: bytes, recipients: tuple[str, ...] = (TO,), at: float | None = None) -> int:
        item_id = len(self.rows) + 1
        now = self.clock() if at is None else at
        self.rows[item_id] = Row(item_id, raw, FROM, recipients, now)
        return item_id

    def _refuse(self, text: str) -> None:
        self.unexpected.append(text)
        raise AssertionError(text)

    def _maybe_fail(self, name: str) -> None:
        if self.fail_next.get(name):
            self.fail_next[name] -= 1
            raise ConnectionError(f"database unavailable ({name})")

    def _outcome(self, item_id: int, name: str) -> Row:
        row = self.rows.get(item_id)
        if row is None or item_id not in self.handed_out or row.state != "queued":
            self._refuse(f"{name}({item_id}) for an item not handed out or not queued")
        assert row is not None
        self._maybe_fail(name)
        self.handed_out.discard(item_id)
        return row

    async def due(self, now: float, limit: int, exclude: set[int]) -> list[OutboxItem]:
        self.calls.append(("due", now, limit, frozenset(exclude)))
        if limit < 1:
            self._refuse(f"due() with limit {limit}")
        self._maybe_fail("due")
        rows = sorted(
            (r for r in self.rows.values() if r.state == "queued" and r.next_attempt_at <= now),
            key=lambda r: (r.next_attempt_at, r.id),
        )
        for row in rows:
            if row.id in self.handed_out and row.id not in exclude:
                self._refuse(f"item {row.id} is in flight but not excluded")
        picked = [r for r in rows if r.id not in exclude][:limit]
        self.handed_out.update(r.id for r in picked)
        return [
            OutboxItem(
                r.id,
                r.raw,
                r.mail_from,
                r.recipients,
                r.attempts,
                r.first_tried_at,
                r.next_attempt_at,
            )
            for r in picked
        ]

    async def mark_sent(self, item_id: int, result: SendResult) -> None:
        self.calls.append(("mark_sent", item_id, result))
        row = self._outcome(item_id, "mark_sent")
        if not result.accepted:
            self._refuse(f"mark_sent({item_id}) with a result not accepted")
        row.state, row.result = "sent", result

    async def mark_retry(self, item_id: int, result: SendResult, next_attempt_at: float) -> None:
        self.calls.append(("mark_retry", item_id, result, next_attempt_at))
        row = self._outcome(item_id, "mark_retry")
        if result.accepted or result.permanent:
            self._refuse(f"mark_retry({item_id}) with {result}")
        if next_attempt_at <= self.clock() - 1e-6:
            self._refuse(f"mark_retry({item_id}) in the past")
        row.attempts += 1
        if row.first_tried_at is None:
            row.first_tried_at = self.clock()
        row.next_attempt_at = next_attempt_at
        row.result = result

    async def mark_failed(self, item_id: int, result: SendResult) -> None:
        self.calls.append(("mark_failed", item_id, result))
        row = self._outcome(item_id, "mark_failed")
        if result.accepted:
            self._refuse(f"mark_failed({item_id}) with an accepted result")
        row.attempts += 1
        row.state, row.result = "failed", result

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


def _typed(store: MemoryStore) -> OutboxStore:
    return store  # mypy checks that MemoryStore implements the Protocol


def make_worker(
    store: MemoryStore, port: int, **kwargs: Any
) -> tuple[OutboxWorker, ComponentHealth]:
    health = ComponentHealth("smtp")
    sender = SmtpSender(SmtpConfig("127.0.0.1", port, "none", timeout=5.0), health)
    kwargs.setdefault("give_up_after", 5 * DAY)
    return OutboxWorker(_typed(store), sender, clock=store.clock, **kwargs), health


@contextlib.asynccontextmanager
async def running(worker: OutboxWorker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert worker.in_flight == 0


async def wait_until(condition: Callable[[], bool], budget: float = 10.0) -> None:
    deadline = time.monotonic() + budget
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def message_ids(handler: ScriptedHandler) -> list[str]:
    return [str(email.message_from_bytes(m.content)["Message-ID"]) for m in handler.messages]


# --- with an injected clock ---------------------------------------------------------------------


async def test_tempfail_is_retried_at_the_scheduled_time(
    sink: int, handler: ScriptedHandler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="passerelle")
    clock = FakeClock()
    store = MemoryStore(clock)
    worker, health = make_worker(store, sink)
    handler.data_replies = ["451 4.3.0 try later"]
    item = store.add(make_message("retry me"))

    assert await worker.drain_once() == 1
    [(_, retried, result, next_at)] = store.named("mark_retry")
    assert retried == item
    assert (result.permanent, result.code) == (False, 451)
    assert 27 <= next_at - T0 <= 33  # 30 s ± 10 %
    assert (store.rows[item].attempts, store.rows[item].first_tried_at) == (1, T0)
    assert not up(health)
    assert any(
        f"outbox item {item}" in r.getMessage() and "451 4.3.0 try later" in r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING
    )

    clock.now = next_at - 1  # not yet
    assert await worker.drain_once() == 0
    assert handler.connections == 1

    clock.now = next_at
    assert await worker.drain_once() == 1
    assert [call[1] for call in store.named("mark_sent")] == [item]
    assert store.rows[item].state == "sent"
    assert len(handler.messages) == 1
    assert handler.connections == 2
    assert up(health)

    clock.now += DAY
    assert await worker.drain_once() == 0
    assert len(handler.messages) == 1
    assert store.unexpected == []


async def test_5xx_fails_at_once_and_is_never_retried(sink: int, handler: ScriptedHandler) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    worker, _ = make_worker(store, sink)
    handler.rcpt_replies[TO] = "550 5.1.1 no such user"
    item = store.add(make_message("bounce"))
    keep = store.add(make_message("fine"), recipients=("other@lists.test",))

    assert await worker.drain_once() == 2
    [(_, failed, result)] = store.named("mark_failed")
    assert failed == item
    assert (result.permanent, result.code) == (True, 550)
    assert "no such user" in result.message
    assert store.named("mark_retry") == []
    assert [call[1] for call in store.named("mark_sent")] == [keep]

    for _ in range(3):
        clock.now += DAY
        assert await worker.drain_once() == 0
    assert handler.connections == 2
    assert store.unexpected == []


async def test_gives_up_after_give_up_after_with_only_4xx(
    sink: int, handler: ScriptedHandler
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    give_up = 3600.0
    worker, _ = make_worker(store, sink, give_up_after=give_up)
    handler.data_replies = ["451 4.3.0 try later"] * 100
    item = store.add(make_message("never"))

    attempts = 0
    while store.rows[item].state == "queued":
        clock.now = store.rows[item].next_attempt_at
        assert await worker.drain_once() == 1
        attempts += 1
        assert attempts < 20
    retries = store.named("mark_retry")
    # Tries at 0 s, then after 30 s, 1, 2, 5, 10 and 30 min (≈ 48 min, ± 10 %); the next
    # (1 h later) is brought forward to the give-up time, where the last try is made.
    assert len(retries) == 7
    assert retries[-1][3] == T0 + give_up
    assert all(call[3] <= T0 + give_up for call in retries)
    [(_, failed, result)] = store.named("mark_failed")
    assert failed == item
    assert result.message.startswith("gave up after 8 attempts")
    assert "451 4.3.0 try later" in result.message
    assert len(result.message) <= 300
    assert handler.messages == []
    assert handler.connections == attempts == 8

    clock.now += DAY
    assert await worker.drain_once() == 0
    assert store.unexpected == []


async def test_store_failure_while_recording_does_not_resend(
    sink: int, handler: ScriptedHandler
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    worker, _ = make_worker(store, sink)
    store.fail_next["mark_sent"] = 1
    item = store.add(make_message("record me"))
    assert await worker.drain_once() == 1  # waits ≈ 1 s for the store to work again
    assert len(store.named("mark_sent")) == 2
    assert store.rows[item].state == "sent"
    assert len(handler.messages) == 1
    assert store.unexpected == []


# --- run() in real time -------------------------------------------------------------------------


async def test_smtp_down_for_a_while(handler: ScriptedHandler) -> None:
    port = free_port()  # the sink is not started yet: nothing listens
    store = MemoryStore(time.time)
    worker, health = make_worker(store, port, retry_schedule=lambda attempt: 0.1)
    async with running(worker):
        item = store.add(make_message("patience"))
        worker.notify()
        await wait_until(lambda: len(store.named("mark_retry")) >= 3)
        assert not up(health)
        assert "connection refused" in (health.last_error or "")
        controller, _ = start_sink(handler, port)
        try:
            await wait_until(lambda: store.rows[item].state == "sent")
            assert message_ids(handler) == [
                str(email.message_from_bytes(store.rows[item].raw)["Message-ID"])
            ]
            assert up(health)
            retries = len(store.named("mark_retry"))
            dues = len(store.named("due"))
            # Every look at the store follows a retry that came due (or the first notify).
            assert dues <= 2 * retries + 4
            await asyncio.sleep(0.3)
            assert len(store.named("due")) == dues  # nothing due, nothing scheduled: asleep
        finally:
            controller.stop()
    assert store.unexpected == []


async def test_idle_worker_sleeps_until_notified(sink: int, handler: ScriptedHandler) -> None:
    store = MemoryStore(time.time)
    worker, _ = make_worker(store, sink)
    async with running(worker):
        await asyncio.sleep(0.3)
        assert len(store.named("due")) == 1  # one look at start, then asleep (poll: 60 s)
        item = store.add(make_message("wake up"))
        started = time.monotonic()
        worker.notify()
        await wait_until(lambda: store.rows[item].state == "sent", budget=2)
        print(f"notify → sent: {time.monotonic() - started:.3f} s")
        await asyncio.sleep(0.1)
        assert len(store.named("due")) <= 3
    assert len(handler.messages) == 1
    assert store.unexpected == []


async def test_concurrency_limit(sink: int, handler: ScriptedHandler) -> None:
    handler.data_delay = 0.02  # keep sessions open long enough to overlap
    store = MemoryStore(time.time)
    worker, _ = make_worker(store, sink, concurrency=4)
    items = [store.add(make_message(f"bulk {n}")) for n in range(50)]
    started = time.monotonic()
    async with running(worker):
        worker.notify()
        await wait_until(lambda: all(store.rows[i].state == "sent" for i in items))
    print(f"50 mails, 4 in flight: {time.monotonic() - started:.3f} s")
    assert handler.max_active == 4
    assert handler.connections == 50
    sent = [call[1] for call in store.named("mark_sent")]
    assert sorted(sent) == items
    expected = sorted(
        str(email.message_from_bytes(store.rows[i].raw)["Message-ID"]) for i in items
    )
    assert sorted(message_ids(handler)) == expected
    assert all(call[2] <= 4 for call in store.named("due"))
    assert store.unexpected == []


class GatedStore(MemoryStore):
    """After recording a retry, makes the worker look at the store while the retried item is
    still in flight, and holds that look until the item's task has finished."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.worker: OutboxWorker | None = None
        self.gate: asyncio.Event | None = None
        self.looking = asyncio.Event()

    async def due(self, now: float, limit: int, exclude: set[int]) -> list[OutboxItem]:
        if self.gate is not None and not self.gate.is_set():
            self.looking.set()
            await self.gate.wait()
        return await super().due(now, limit, exclude)

    async def mark_retry(self, item_id: int, result: SendResult, next_attempt_at: float) -> None:
        await super().mark_retry(item_id, result, next_attempt_at)
        if self.gate is None:
            await asyncio.sleep(next_attempt_at - self.clock() + 0.02)  # the retry is due
            self.gate = asyncio.Event()
            assert self.worker is not None
            self.worker.notify()
            await self.looking.wait()  # that look at the store began: the item excluded


async def test_a_retry_due_during_a_look_at_the_store_is_not_forgotten(
    sink: int, handler: ScriptedHandler
) -> None:
    """Regression (a CI run, 2026-12-07): the retry's time was set while run() was reading the
    store, the item still in flight and so excluded from that read; the read then counted the
    retry as covered, and the mail waited for the next poll (a minute) instead of its time."""
    handler.data_replies = ["451 4.3.0 try later"]  # then accepted
    store = GatedStore(time.time)
    worker, _ = make_worker(store, sink, retry_schedule=lambda attempt: 0.05)
    store.worker = worker
    item = store.add(make_message("retried on time"))
    async with running(worker):
        worker.notify()
        await wait_until(lambda: store.gate is not None and worker.in_flight == 0, budget=5)
        assert store.gate is not None
        store.gate.set()  # the look ends after the retry's time, without the item
        await wait_until(lambda: store.rows[item].state == "sent", budget=3)
    assert [call[1] for call in store.named("mark_retry")] == [item]
    assert len(handler.messages) == 1
    assert store.unexpected == []


class HeldRecordStore(MemoryStore):
    """mark_sent waits for ``release`` (an outcome commit that takes its time)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.release = asyncio.Event()
        self.held = 0

    async def mark_sent(self, item_id: int, result: SendResult) -> None:
        self.held += 1
        await self.release.wait()
        await super().mark_sent(item_id, result)


async def test_the_next_mail_goes_while_the_last_outcome_is_recorded(
    sink: int, handler: ScriptedHandler
) -> None:
    """A slot is free once the server has answered: with one slot, three mails are sent while
    the first outcome's record still waits, and none is sent twice."""
    store = HeldRecordStore(time.time)
    worker, _ = make_worker(store, sink, concurrency=1)
    items = [store.add(make_message(f"next {n}")) for n in range(3)]
    async with running(worker):
        worker.notify()
        await wait_until(lambda: len(handler.messages) == 3 and store.held == 3, budget=5)
        assert all(store.rows[i].state == "queued" for i in items)
        assert worker.in_flight == 3
        for call in store.named("due"):
            assert call[2] <= 1  # never more sessions than the slots
        store.release.set()
        await wait_until(lambda: all(store.rows[i].state == "sent" for i in items), budget=5)
        await asyncio.sleep(0.1)
    assert handler.max_active == 1
    assert sorted(message_ids(handler)) == sorted(
        str(email.message_from_bytes(store.rows[i].raw)["Message-ID"]) for i in items
    )
    assert store.unexpected == []


async def test_outcomes_that_cannot_be_recorded_stop_the_sending(
    sink: int, handler: ScriptedHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that does not record outcomes holds at most RECORDING_LIMIT sent mails: the
    rest wait, unsent, until the records go through."""
    monkeypatch.setattr("bridge.mail.outbox.RECORDING_LIMIT", 2)
    store = HeldRecordStore(time.time)
    worker, _ = make_worker(store, sink, concurrency=1)
    items = [store.add(make_message(f"held {n}")) for n in range(6)]
    async with running(worker):
        worker.notify()
        await wait_until(lambda: store.held == 2, budget=5)
        await asyncio.sleep(0.3)
        assert len(handler.messages) == 2
        store.release.set()
        await wait_until(lambda: all(store.rows[i].state == "sent" for i in items), budget=5)
    assert len(handler.messages) == 6
    assert store.unexpected == []
