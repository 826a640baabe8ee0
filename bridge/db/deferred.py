"""Writes that a room's consecutive events leave to be committed together.

The inbox dispatcher hands a room's events to the handlers one at a time, in order. When more
of the room's events wait behind the current one, it may open a `Deferred` for them (the
`DEFERRED` context variable): a handler that can (Matrix → mail's queueing) then adds the
transaction it would have run, and the dispatcher commits them all in one transaction once
the group ends, before it marks any of its events done. A room with a backlog thus pays one
commit for several mails instead of one each; an idle room's event is committed at once, as
before.

Until the commit, what was added is not in the database: the later events of the group find
it in `memo` (a reply to a message queued just before looks its mail up there). The
dispatcher ends the group before any event that might read what the group wrote (a command,
a redaction), so only events of the kind the handler defers share a group. If the commit
fails, nothing of it was written: the dispatcher handles the group's events again, one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from typing import Any

from bridge.db.engine import Database
from bridge.db.steps import Steps, T

log = logging.getLogger("passerelle.db.deferred")


class Deferred:
    """Transactions described as steps, run in order in one commit; each one's result is
    handed to its callback after the commit."""

    def __init__(self) -> None:
        self._writes: list[tuple[Callable[[str], Steps[Any]], Callable[[Any], object]]] = []
        # What the deferred writes will have stored, for the group's later events to see.
        self.memo: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._writes)

    def add(self, work: Callable[[str], Steps[T]], committed: Callable[[T], object]) -> None:
        self._writes.append((work, committed))

    def discard(self) -> None:
        """Forget every write (their events are to be handled again)."""
        self._writes.clear()
        self.memo.clear()

    async def commit(self, db: Database) -> None:
        """Run every write in one transaction, then the callbacks in order, and start afresh.
        Raises, and keeps every write, when the transaction fails: nothing of it was written."""
        writes = list(self._writes)
        if not writes:
            return

        def steps(dialect: str) -> Steps[list[Any]]:
            results = []
            for work, _ in writes:
                results.append((yield from work(dialect)))
            return results

        results = await db.write(steps)
        del self._writes[: len(writes)]
        self.memo.clear()  # what it held is in the database now
        for (_, committed), result in zip(writes, results, strict=True):
            try:
                committed(result)
            except Exception:
                log.exception("after a deferred write")


DEFERRED: ContextVar[Deferred | None] = ContextVar("passerelle_deferred", default=None)
