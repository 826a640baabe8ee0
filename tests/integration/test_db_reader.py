"""Lookups by key on the reader's own connection: the same answers as the ordinary path, a
write seen as soon as it is committed, and a broken or cut connection never losing a read."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import text

from bridge.config import DatabaseConfig
from bridge.core.ids import RoomID
from bridge.core.links import LinkSettings
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db.engine import Database, open_database
from bridge.db.schema import message_map


async def _db_with_link(url: str) -> tuple[Database, int]:
    db = await open_database(DatabaseConfig(url=url, pool_size=2))
    link = await link_db.save_link(
        db,
        room_id=RoomID("!room:agency.example"),
        kind="mail",
        remote="list@agency.example",
        settings=LinkSettings(),
        source="bot",
        created_by=None,
    )
    return db, link.id


async def _map(db: Database, link_id: int, n: int, created_at: int = 1) -> None:
    async with db.begin() as conn:
        await conn.execute(
            message_map.insert().values(
                link_id=link_id,
                message_id=f"<m{n}@agency.example>",
                room_id="!room:agency.example",
                event_id=f"$event{n % 3}",
                thread_root=f"$root{n}",
                subject=None if n % 2 else f"Sujet {n} — été",
                created_at=created_at,
            )
        )


async def test_lookups_answer_as_the_ordinary_path_and_see_each_commit(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db, link_id = await _db_with_link(db_url)
    caplog.set_level(logging.WARNING, logger="passerelle.db")
    try:
        assert await mail_db.lookup(db, link_id, "<m1@agency.example>") is None
        for n in range(6):
            await _map(db, link_id, n, created_at=100 - n)
            # Committed through the engine, seen at once through the reader.
            found = await mail_db.lookup(db, link_id, f"<m{n}@agency.example>")
            assert found is not None
            assert (found.event_id, found.thread_root) == (f"$event{n % 3}", f"$root{n}")
            assert found.subject == (None if n % 2 else f"Sujet {n} — été")
        # event → Message-ID: the oldest of the two mapped to $event1 (m4 is older than m1).
        oldest = await mail_db.lookup_event(db, link_id, "$event1")
        assert oldest is not None
        assert oldest.message_id == "<m4@agency.example>"
        assert await mail_db.lookup_event(db, link_id, "$nothing") is None
        assert await mail_db.lookup(db, link_id + 1, "<m1@agency.example>") is None
        # Hostile keys are parameters, never SQL.
        assert await mail_db.lookup(db, link_id, "<x' OR '1'='1@agency.example>") is None
        # Every one of them went through the reader's connection (a LIMIT's own value once
        # made lookup_event fail there and take the ordinary way every time).
        assert set(db.reader._columns) == {"mail.lookup", "mail.lookup_event"}
        assert "lookup connection failed" not in caplog.text
    finally:
        await db.close()


async def test_a_broken_connection_loses_no_read(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, link_id = await _db_with_link(db_url)
    try:
        await _map(db, link_id, 2)
        assert await mail_db.lookup(db, link_id, "<m2@agency.example>") is not None
        driver = db.reader._driver
        assert driver is not None  # the reader's own connection is in use
        if db.dialect == "postgresql":
            async with db.begin() as conn:  # the server ends the reader's session
                await conn.execute(
                    text("SELECT pg_terminate_backend(:pid)"), {"pid": driver.get_server_pid()}
                )
        else:
            await driver.close()
        with caplog.at_level(logging.WARNING, logger="passerelle.db"):
            found = await mail_db.lookup(db, link_id, "<m2@agency.example>")
        assert found is not None
        assert found.thread_root == "$root2"
        assert "lookup connection failed" in caplog.text
        # For a while, reads take the ordinary way, without a word more.
        caplog.clear()
        for _ in range(3):
            assert await mail_db.lookup(db, link_id, "<m2@agency.example>") is not None
        assert db.reader._driver is None
        assert "lookup connection failed" not in caplog.text
        # Then the next read opens a new connection of its own.
        monkeypatch.setattr(db.reader, "_retry_at", 0.0)
        assert await mail_db.lookup(db, link_id, "<m2@agency.example>") is not None
        assert db.reader._driver is not None
        assert db.reader._driver is not driver
    finally:
        await db.close()


async def test_a_read_cut_by_cancellation_leaves_the_next_one_whole(db_url: str) -> None:
    db, link_id = await _db_with_link(db_url)
    try:
        await _map(db, link_id, 4)
        for _ in range(20):
            task = asyncio.create_task(mail_db.lookup(db, link_id, "<m4@agency.example>"))
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            found = await mail_db.lookup(db, link_id, "<m4@agency.example>")
            assert found is not None
            assert found.thread_root == "$root4"
    finally:
        await db.close()
