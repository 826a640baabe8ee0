"""When Dovecot announces new mail to any IMAP client: an observer in IDLE on each mailbox.

Dovecot tells a session in IDLE of a change only `NOTIFY_DELAY_MSECS` (500 ms, a constant of
src/lib-storage/mailbox-watch.c, not a setting) after its inotify watch fired, to announce a
burst of changes at once. No IMAP client, the bridge's or any other, can see a new mail before
that. bench/mail_to_matrix.py starts these observers next to the bridge's own IDLE sessions and
reports the relay's rate both from the first APPEND and from the first announcement.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from bridge.harness.dovecot import DovecotServer

IDLE_TIMEOUT_S = 120.0


class NoticeWatch:
    """One IDLE session per mailbox; `first[address]` is when (Unix seconds) the session first
    heard `* N EXISTS` after it entered IDLE."""

    def __init__(self, dovecot: DovecotServer, addresses: list[str], password: str) -> None:
        self.dovecot = dovecot
        self.password = password
        self.first: dict[str, float] = {}
        self._ready: dict[str, asyncio.Event] = {a: asyncio.Event() for a in addresses}

    async def _watch(self, address: str) -> None:
        async with self.dovecot.session(address, self.password) as client:
            idle = await client.idle_start(timeout=IDLE_TIMEOUT_S)
            self._ready[address].set()
            try:
                while address not in self.first:
                    push = await client.wait_server_push(timeout=IDLE_TIMEOUT_S)
                    for line in push if isinstance(push, list) else []:
                        text = line.decode() if isinstance(line, bytes) else str(line)
                        if text.rstrip().upper().endswith("EXISTS"):
                            self.first.setdefault(address, time.time())
            finally:
                client.idle_done()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(idle, 10)

    def earliest(self) -> float | None:
        return min(self.first.values()) if self.first else None


@contextlib.asynccontextmanager
async def notice_watch(
    dovecot: DovecotServer, addresses: list[str], password: str
) -> AsyncIterator[NoticeWatch]:
    """Observers in IDLE on every mailbox before the body runs; they end when each has heard
    of a new mail (or, if none came, when the body has ended)."""
    watch = NoticeWatch(dovecot, addresses, password)
    tasks = [asyncio.create_task(watch._watch(a)) for a in addresses]
    try:
        ready = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in watch._ready.values())))
        waiting: set[asyncio.Future[Any]] = {ready, *tasks}
        while not ready.done():
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task in done and task.exception() is not None:
                    ready.cancel()
                    raise RuntimeError(f"IMAP observer failed: {task.exception()!r}")
        yield watch
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
