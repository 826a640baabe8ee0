"""Fetched mails kept in one commit per run (a BatchStore): against the real Dovecot and the real
database, runs broken at any mail that cannot go with them, UIDs never skipped."""

from __future__ import annotations

import pytest

from bridge.config import DatabaseConfig
from bridge.core.health import ComponentHealth
from bridge.core.ids import RoomID
from bridge.core.links import LinkSettings
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db.engine import open_database
from bridge.harness.dovecot import DovecotServer
from bridge.mail import imap_watcher
from bridge.mail.imap_watcher import BatchStore
from bridge.mail.store import DbMailboxStore
from tests.integration import test_imap
from tests.integration.test_imap import (
    MemoryStore,
    append_many,
    config_for,
    make_message,
    watcher_for,
)

user = test_imap.user


class BatchMemoryStore(MemoryStore):
    """MemoryStore with store_raw_many: each run recorded as one call."""

    async def store_raw_many(
        self, mailbox: str, uidvalidity: int, mails: list[tuple[int, bytes]]
    ) -> None:
        if not mails:
            self._problem("an empty run")
        for uid, raw in mails:
            self._check(mailbox, uidvalidity)
            self._check_new(uidvalidity, uid)
            self.raw[(uidvalidity, uid)] = raw
        self.calls.append(("store_raw_many", uidvalidity, [uid for uid, _ in mails]))


def test_only_a_store_with_store_raw_many_is_a_batch_store() -> None:
    assert isinstance(BatchMemoryStore(), BatchStore)
    assert not isinstance(MemoryStore(), BatchStore)


async def test_runs_are_kept_in_one_call_and_broken_at_an_oversized_mail(
    dovecot: DovecotServer, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imap_watcher, "_FIRST_BATCH", 50)  # one batch, whatever comes first
    small, big = make_message("small"), make_message("big", "y" * 5000 + "\n")
    uids = await append_many(dovecot, user, [small, small, big, small, small, small])
    validity = await dovecot.uidvalidity(user, test_imap.PASSWORD)
    store, health = BatchMemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user), store, health, max_size=3000, batch=50)
    assert await watcher.sync_once() == 5
    assert [c for c in store.calls if c[0] != "resume_point"] == [
        ("store_raw_many", validity, uids[0:2]),
        ("store_oversized", validity, uids[2], len(big)),
        ("store_raw_many", validity, uids[3:6]),
        ("notify",),
    ]
    assert store.problems == []


@pytest.mark.parametrize(
    ("count", "batch", "runs"),
    [
        (5, 2, [(0, 2), (2, 4), (4, 5)]),
        # A sync's first batch holds at most 5: a burst's first mail is stored, and the relay
        # told, before the rest is fetched.
        (12, 50, [(0, 5), (5, 12)]),
    ],
)
async def test_runs_follow_the_fetch_batches(
    dovecot: DovecotServer, user: str, count: int, batch: int, runs: list[tuple[int, int]]
) -> None:
    uids = await append_many(dovecot, user, [make_message(f"m{n}") for n in range(count)])
    validity = await dovecot.uidvalidity(user, test_imap.PASSWORD)
    store, health = BatchMemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user), store, health, batch=batch)
    assert await watcher.sync_once() == count
    assert [c for c in store.calls if c[0] == "store_raw_many"] == [
        ("store_raw_many", validity, uids[a:b]) for a, b in runs
    ]
    assert store.notified == len(runs)  # once per batch, after its commit
    assert store.problems == []


async def test_a_batch_on_the_database_keeps_duplicates_and_order(db_url: str) -> None:
    """Two copies of one Message-ID in one run: the second is a duplicate, as one at a time;
    a run stored again (a refetch) adds nothing."""
    db = await open_database(DatabaseConfig(url=db_url, pool_size=5))
    try:
        link = await link_db.save_link(
            db,
            room_id=RoomID("!r:localhost"),
            kind="mail",
            remote="list@agency.example",
            settings=LinkSettings(allowed_senders=("agency.example",)),
            source="config",
            created_by=None,
        )
        store = DbMailboxStore(db, link.id, lambda: None)
        first, second = make_message("one"), make_message("two")
        run = [(1, first), (2, second), (3, first)]
        await store.store_raw_many("list@agency.example", 7, run)
        await store.store_raw_many("list@agency.example", 7, run)
        pending = await mail_db.pending_mail(db, 10, set())
        assert [(m.uid, m.raw) for m in pending] == [(1, first), (2, second)]
        assert await mail_db.highest_uid(db, "list@agency.example", 7) == 3
    finally:
        await db.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_watcher_on_the_database_stores_every_mail_once(
    dovecot: DovecotServer, user: str, db_url: str
) -> None:
    db = await open_database(DatabaseConfig(url=db_url, pool_size=5))
    try:
        link = await link_db.save_link(
            db,
            room_id=RoomID("!r:localhost"),
            kind="mail",
            remote=test_imap.MAILBOX,
            settings=LinkSettings(allowed_senders=("agency.example",)),
            source="config",
            created_by=None,
        )
        notified: list[int] = []
        store = DbMailboxStore(db, link.id, lambda: notified.append(1))
        watcher = watcher_for(config_for(dovecot, user), store, ComponentHealth("imap"), batch=3)
        assert await watcher.sync_once() == 0  # a new link starts from the mailbox's end
        uids = await append_many(dovecot, user, [make_message(f"m{n}") for n in range(7)])
        assert await watcher.sync_once() == 7
        assert await watcher.sync_once() == 0
        assert [m.uid for m in await mail_db.pending_mail(db, 20, set())] == uids
        assert len(notified) == 3
    finally:
        await db.close()
