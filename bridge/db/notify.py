"""PostgreSQL LISTEN/NOTIFY between bridge instances: one channel, short text payloads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from bridge.core.backoff import Backoff
from bridge.db.engine import Database

log = logging.getLogger("passerelle.db.notify")

CHANNEL = "passerelle"
MAX_PAYLOAD = 7900  # PostgreSQL refuses payloads of 8000 bytes or more


def supported(db: Database) -> bool:
    return db.dialect == "postgresql"


def _storable(payload: str) -> str:
    """PostgreSQL takes no NUL and at most 7999 bytes: never a refused batch."""
    clean = payload.replace("\x00", "").encode("utf-8", "replace")[:MAX_PAYLOAD]
    return clean.decode("utf-8", "ignore")


async def send(db: Database, payloads: list[str]) -> None:
    """NOTIFY each payload (PostgreSQL; nothing elsewhere). Delivered to every listening
    instance, this one included, once committed."""
    if not supported(db) or not payloads:
        return
    # Not db.begin(): a notification settles nothing and is never fenced.
    async with db.engine.begin() as conn:
        for payload in payloads:
            await conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": CHANNEL, "payload": _storable(payload)},
            )


async def listen(
    db: Database, on_message: Callable[[str], None], on_ready: Callable[[], None]
) -> None:
    """LISTEN on one pooled connection until cancelled, reconnecting with backoff. on_ready
    is called after each (re)connection: what was sent meanwhile was missed, look again."""
    backoff = Backoff(initial=1.0, maximum=30.0)

    def ready() -> None:
        backoff.reset()
        on_ready()

    while True:
        try:
            await _listen_once(db, on_message, ready)
            log.warning("the notification connection closed; listening again")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            delay = backoff.next_delay()
            log.warning("cannot listen for other instances (%s); again in %.0f s", e, delay)
            await asyncio.sleep(delay)


async def _listen_once(
    db: Database, on_message: Callable[[str], None], on_ready: Callable[[], None]
) -> None:
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        closed = asyncio.Event()

        def received(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            on_message(payload)

        driver.add_termination_listener(lambda _conn: closed.set())
        await driver.add_listener(CHANNEL, received)
        on_ready()
        try:
            await closed.wait()
        finally:
            if not driver.is_closed():
                await driver.remove_listener(CHANNEL, received)
