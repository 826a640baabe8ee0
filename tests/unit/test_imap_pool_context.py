"""The IMAP pool runs each mailbox's work in the context the mailbox was added in (with
several instances: its lease's fence and its unit's task scope), and its own shared tasks in
none of them. A regression test for the merge of the pool with leases: a poller started while
one mailbox was added ran every polled mailbox's writes under that one mailbox's lease."""

from __future__ import annotations

import asyncio
import contextvars

from bridge.core.tasks import SCOPE, TaskGroup
from bridge.mail.imap_pool import ImapPool

WHOSE: contextvars.ContextVar[str | None] = contextvars.ContextVar("whose", default=None)


class Watcher:
    """Stands for an ImapWatcher: records in which context each of its calls ran."""

    def __init__(self, seen: list[tuple[str, str, str | None]], key: str) -> None:
        self.seen, self.key = seen, key

    async def run(self) -> None:
        self.seen.append(("run", self.key, WHOSE.get()))
        await asyncio.Event().wait()

    async def sync_once(self) -> int:
        self.seen.append(("poll", self.key, WHOSE.get()))
        return 0


async def test_each_mailbox_works_in_its_own_context_and_the_pool_in_none() -> None:
    tasks = TaskGroup()
    seen: list[tuple[str, str, str | None]] = []
    pool = ImapPool(tasks.spawn, max_connections=1, poll_interval=0.05)
    scopes: dict[str, set[asyncio.Task[object]]] = {}
    try:
        for key in ("a", "b", "c"):  # one connection: "a" keeps it, "b" and "c" are polled
            scope: set[asyncio.Task[object]] = set()
            scopes[key] = scope
            context = contextvars.copy_context()
            context.run(WHOSE.set, key)
            context.run(SCOPE.set, scope)  # type: ignore[arg-type]
            context.run(pool.add, key, Watcher(seen, key))
        for _ in range(200):
            polled = {key for kind, key, _ in seen if kind == "poll"}
            if {"b", "c"} <= polled:
                break
            await asyncio.sleep(0.02)
        assert {(kind, key, whose) for kind, key, whose in seen} >= {
            ("poll", "b", "b"),
            ("poll", "c", "c"),
        }
        assert all(key == whose for _, key, whose in seen), seen
        # The pool's connections and pollers belong to no mailbox's unit: losing one
        # mailbox's lease cancels that unit's tasks, never the pollers the others share.
        assert all(not scope for scope in scopes.values()), scopes
    finally:
        pool.close()
        await tasks.close()
