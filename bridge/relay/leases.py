"""Runs each unit of work (a mailbox watch, a remote's /sync, a queue worker) only while this
instance holds its lease; renews, takes free leases, hands back a surplus, and carries the
wake-ups and "changed" signals between instances."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from bridge.core.leases import (
    LeaseHolder,
    LeaseTiming,
    fair_share,
    must_stop,
    next_tick,
    surplus,
)
from bridge.core.tasks import SCOPE, TaskGroup, wait_for
from bridge.db import leases as lease_db
from bridge.db import notify as notify_db
from bridge.db.engine import FENCE, Database

log = logging.getLogger("passerelle.leases")

Start = Callable[[], Coroutine[Any, Any, Any]]
# Without notifications (SQLite, or the listening connection down) everyone looks this often.
POLL_INTERVAL = 30.0
# Presence rows of instances gone this long are deleted.
FORGET_AFTER_MS = 24 * 3600 * 1000


@dataclass(eq=False)
class _Unit:
    name: str
    start: Start
    restartable: bool
    notify: Callable[[], None] | None
    holder: LeaseHolder | None = None
    task: asyncio.Task[Any] | None = None
    scope: set[asyncio.Task[Any]] = field(default_factory=set)


class LeaseKeeper:
    """With leases off (one instance), `hold` starts a unit at once and `wake` calls its
    notify: the same calls either way. With leases on, a unit runs from the moment its lease
    is acquired until it is dropped, handed back, or lost; a unit that is not `restartable`
    (its worker keeps state across a stop) makes a lost lease fatal: `on_fatal` is told, and
    the instance should exit and be restarted clean."""

    def __init__(
        self,
        db: Database,
        tasks: TaskGroup,
        *,
        owner: str,
        timing: LeaseTiming,
        enabled: bool,
        on_fatal: Callable[[str], None],
    ) -> None:
        self.db = db
        self.tasks = tasks
        self.owner = owner
        self.timing = timing
        self.enabled = enabled
        self.on_fatal = on_fatal
        self.presence = f"{lease_db.INSTANCE_PREFIX}{owner}"
        self._units: dict[str, _Unit] = {}
        self._changed: dict[str, Callable[[], Any]] = {}
        self._kick = asyncio.Event()
        self._renew_sent = time.monotonic()
        self._outgoing: list[str] = []
        self._send_wake = asyncio.Event()
        self._last_poll = time.monotonic()
        self.takeovers = 0  # leases acquired (for status and tests)

    @classmethod
    def alone(cls, db: Database, tasks: TaskGroup) -> LeaseKeeper:
        """Without leases: every unit runs here."""

        def never(why: str) -> None:
            raise AssertionError(why)

        return cls(db, tasks, owner="alone", timing=LeaseTiming(), enabled=False, on_fatal=never)

    @property
    def _ttl_ms(self) -> int:
        return int(self.timing.ttl * 1000)

    # --- what the bridge registers -----------------------------------------------------

    def hold(
        self,
        name: str,
        start: Start,
        *,
        restartable: bool = True,
        notify: Callable[[], None] | None = None,
    ) -> None:
        """Run `start()` whenever this instance holds lease `name` (at once without leases)."""
        if name in self._units:
            return
        unit = self._units[name] = _Unit(name, start, restartable, notify)
        if not self.enabled:
            self._launch(unit, None)
        else:
            self._kick.set()

    async def drop(self, name: str) -> None:
        """The unit is no longer wanted (a link removed): stop it and hand its lease back."""
        unit = self._units.pop(name, None)
        if unit is None:
            return
        await self._stop(unit)
        if self.enabled and unit.holder is not None:
            await lease_db.release(self.db, self.owner, [name])

    def running(self, name: str) -> bool:
        unit = self._units.get(name)
        return unit is not None and unit.task is not None

    def held(self) -> list[str]:
        return sorted(name for name, unit in self._units.items() if unit.task is not None)

    def report(self) -> dict[str, Any]:
        """For /health and `status`: this instance and the leases it holds."""
        return {"id": self.owner, "leases": self.held()}

    def on_changed(self, kind: str, callback: Callable[[], Any]) -> None:
        """`callback` (sync or async) runs when another instance says `kind` changed."""
        self._changed[kind] = callback

    def wake(self, name: str) -> None:
        """Work for unit `name` was stored: its holder looks now (here, or through a
        notification to the other instances)."""
        unit = self._units.get(name)
        if unit is not None and unit.task is not None:
            if unit.notify is not None:
                unit.notify()
            return
        if self.enabled:
            self._post(f"wake {name}")

    def changed(self, kind: str) -> None:
        """Shared state of `kind` (links, hooks) changed here: the others re-read it."""
        if self.enabled:
            self._post(f"changed {kind}")

    # --- running ----------------------------------------------------------------------

    async def start(self) -> None:
        """Take what is free before the bridge says it is ready (a lone instance starts its
        work at once)."""
        if not self.enabled:
            return
        log.info(
            "instance %s: leases of %.0f s, renewed every %.0f s",
            self.owner,
            self.timing.ttl,
            self.timing.renew_every,
        )
        await lease_db.acquire(self.db, self.presence, self.owner, self._ttl_ms)
        self._renew_sent = time.monotonic()
        await self._take_free()

    async def run(self) -> None:
        if not self.enabled:
            return
        if notify_db.supported(self.db):
            self.tasks.spawn(
                notify_db.listen(self.db, self._received, self._resync), name="lease-listen"
            )
            self.tasks.spawn(self._send_loop(), name="lease-notify")
        with contextlib.suppress(Exception):
            await lease_db.forget_instances(self.db, FORGET_AFTER_MS)
        while True:
            delay = next_tick(time.monotonic(), self._renew_sent, self.timing)
            with contextlib.suppress(TimeoutError):
                await wait_for(self._kick.wait(), delay)
            self._kick.clear()
            try:
                await self.tick()
            except Exception:
                log.exception("lease round failed")

    async def tick(self) -> None:
        """One round: renew, stop what was lost, take what is free, hand back a surplus."""
        sent = time.monotonic()
        try:
            renewed = await lease_db.renew(self.db, self.owner, self._ttl_ms)
        except Exception as e:
            log.warning("cannot renew leases: %s", e)
            if must_stop(time.monotonic(), self._renew_sent, self.timing):
                for unit in list(self._units.values()):
                    if unit.holder is not None:
                        await self._lost(unit, "not renewed in time")
            return
        self._renew_sent = sent
        for unit in list(self._units.values()):
            if unit.holder is not None and renewed.get(unit.name) != unit.holder.epoch:
                await self._lost(unit, "taken over or expired")
        mine = {unit.name for unit in self._units.values() if unit.holder is not None}
        stale = set(renewed) - mine - {self.presence}
        if stale:  # left by an earlier process with this ID, or by a unit dropped meanwhile
            await lease_db.release(self.db, self.owner, stale)
        if self.presence not in renewed:
            await lease_db.acquire(self.db, self.presence, self.owner, self._ttl_ms)
        await self._take_free()
        if time.monotonic() - self._last_poll >= POLL_INTERVAL:
            await self._resync_now()

    async def close(self) -> None:
        """Stop every unit, then hand every lease back (a clean stop: no one waits)."""
        for unit in list(self._units.values()):
            await self._stop(unit)
        self._units.clear()
        if self.enabled:
            try:
                await self._flush()
                held = await lease_db.renew(self.db, self.owner, self._ttl_ms)
                await lease_db.release(self.db, self.owner, set(held) | {self.presence})
            except Exception as e:
                log.warning("could not hand the leases back (they expire by themselves): %s", e)

    # --- inside -----------------------------------------------------------------------

    async def _take_free(self) -> None:
        wanted = [unit.name for unit in self._units.values() if unit.holder is None]
        held = [unit for unit in self._units.values() if unit.holder is not None]
        free = list(await lease_db.free(self.db, wanted)) if wanted else []
        # Counted after the free ones: a dead instance's presence expires with its leases, so
        # leases found expired here come with their instance no longer counted.
        instances = max(1, await lease_db.live_instances(self.db))
        extra = surplus(len(held), len(self._units), instances)
        if extra:
            # Hand back restartable units over the fair share: another instance takes them.
            spare = [unit for unit in held if unit.restartable][:extra]
            for unit in spare:
                log.info("handing %s over to another instance", unit.name)
                await self._stop(unit)
                unit.holder = None
            if spare:
                await lease_db.release(self.db, self.owner, [unit.name for unit in spare])
            return
        if not free:
            return
        random.shuffle(free)  # instances starting together do not race for the same ones
        # Alone: everything. Otherwise up to a fair share; the others take the rest.
        share = fair_share(len(self._units), instances)
        room = len(free) if instances == 1 else max(0, share - len(held))
        taken = await lease_db.acquire_many(self.db, free[:room], self.owner, self._ttl_ms)
        for name, epoch in sorted(taken.items()):
            candidate = self._units.get(name)
            if candidate is None or candidate.holder is not None:
                # Dropped while we acquired: the next round hands it back as stale.
                continue
            self.takeovers += 1
            if len(taken) <= 20:
                log.info("took lease %s (epoch %d)", name, epoch)
            self._launch(candidate, LeaseHolder(name, self.owner, epoch))
        if len(taken) > 20:
            log.info("took %d leases (%s, …)", len(taken), ", ".join(sorted(taken)[:5]))

    def _launch(self, unit: _Unit, holder: LeaseHolder | None) -> None:
        unit.holder = holder
        unit.scope = set()
        context = contextvars.copy_context()
        context.run(FENCE.set, holder)
        context.run(SCOPE.set, unit.scope)
        unit.task = context.run(self.tasks.spawn, unit.start(), unit.name)
        if unit.notify is not None:
            unit.notify()  # what was stored before it ran

    async def _stop(self, unit: _Unit) -> None:
        tasks = [task for task in (unit.task, *unit.scope) if task is not None]
        unit.task = None
        unit.scope = set()
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not current), return_exceptions=True)

    async def _lost(self, unit: _Unit, why: str) -> None:
        log.error("lease %s lost (%s): its work stops here", unit.name, why)
        await self._stop(unit)
        unit.holder = None
        if not unit.restartable:
            self._units.pop(unit.name, None)
            self.on_fatal(f"lease {unit.name} lost ({why})")

    # --- between instances ------------------------------------------------------------

    def _post(self, message: str) -> None:
        payload = f"{self.owner} {message}"
        if payload not in self._outgoing:
            self._outgoing.append(payload)
        self._send_wake.set()

    async def _send_loop(self) -> None:
        while True:
            await self._send_wake.wait()
            self._send_wake.clear()
            try:
                await self._flush()
            except Exception as e:
                log.warning("cannot notify the other instances: %s", e)
                await asyncio.sleep(1.0)

    async def _flush(self) -> None:
        payloads, self._outgoing = self._outgoing, []
        await notify_db.send(self.db, payloads)

    def _received(self, payload: str) -> None:
        owner, _, message = payload.partition(" ")
        if owner == self.owner:
            return
        verb, _, arg = message.partition(" ")
        if verb == "wake":
            unit = self._units.get(arg)
            if unit is not None and unit.task is not None and unit.notify is not None:
                unit.notify()
        elif verb == "changed" and arg in self._changed:
            self.tasks.spawn(self._call_changed(arg), name=f"changed:{arg}")

    async def _call_changed(self, kind: str) -> None:
        result = self._changed[kind]()
        if asyncio.iscoroutine(result):
            await result

    def _resync(self) -> None:
        self.tasks.spawn(self._resync_now(), name="lease-resync")

    async def _resync_now(self) -> None:
        """Look at everything again: what another instance said while we were not listening."""
        self._last_poll = time.monotonic()
        for kind in list(self._changed):
            try:
                await self._call_changed(kind)
            except Exception:
                log.exception("re-reading %s failed", kind)
        for unit in list(self._units.values()):
            if unit.task is not None and unit.notify is not None:
                unit.notify()
