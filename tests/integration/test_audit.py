"""The audit log on SQLite and PostgreSQL: one chain under concurrent appends (also from two
engines, as two bridge instances would), and tampering found by the real `passerelle audit`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import delete, event, insert, update

from bridge.audit_cli import verify
from bridge.config import DatabaseConfig
from bridge.core.audit import AuditEntry, row_hash
from bridge.db import audit as audit_db
from bridge.db.engine import Database, open_database
from bridge.db.schema import audit_head, audit_log
from bridge.harness.ports import free_port
from bridge.registration import dump_yaml
from tests.conftest import bridge_config_dict, run_cli


def entry(n: int, link: str = "liste@agency.example.org", key: str | None = None) -> AuditEntry:
    return AuditEntry(
        direction="mail_in" if n % 2 else "remote_out",
        link=link,
        room_id="!r:localhost",
        sender=f"person{n}@agency.example.org",
        outcome="posted",
        recipients=("!r:localhost",),
        ids={"message_id": f"m{n}@agency.example.org", "event_id": f"$e{n}"},
        body_sha256="ab" * 32,
        item_key=key,
    )


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(DatabaseConfig(url=db_url, pool_size=5))
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def config_file(db_url: str, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(bridge_config_dict(free_port(), free_port(), db_url)))
    return path


def audit_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`passerelle audit ARGS -c CONFIG`, in this process (`run_cli`), in a thread of its own
    (the command runs its own event loop; the caller's waits meanwhile)."""
    command = ("audit", *args, "-c", str(config))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(run_cli, *command).result(timeout=120)
    return subprocess.CompletedProcess(
        command, result.returncode, result.stdout.decode("utf-8"), result.stderr
    )


async def fill(db: Database, n: int) -> None:
    for i in range(1, n + 1):
        await audit_db.append(db, entry(i))


async def test_concurrent_appends_from_two_instances_keep_one_chain(
    db: Database, db_url: str
) -> None:
    other = await open_database(DatabaseConfig(url=db_url, pool_size=5))
    try:
        await asyncio.gather(
            *(audit_db.append(db if i % 2 else other, entry(i)) for i in range(60))
        )
    finally:
        await other.close()
    rows = [row async for row in audit_db.rows(db, batch=7)]
    assert [r.seq for r in rows] == list(range(1, 61))
    assert len({r.entry.sender for r in rows}) == 60
    verifier, broken = await verify(db, batch=7)
    assert broken is None
    assert verifier.count == 60
    assert (await audit_db.head(db)) == (60, rows[-1].hash)


async def test_a_keyed_entry_is_logged_once(db: Database) -> None:
    first = await audit_db.append(db, entry(1, key="mail_out:1:$e"))
    again = await audit_db.append(db, entry(2, key="mail_out:1:$e"))
    assert first is not None
    assert again is None
    assert [r.seq async for r in audit_db.rows(db)] == [1]


async def test_an_append_rolled_back_with_its_state_leaves_no_trace(db: Database) -> None:
    await fill(db, 2)

    async def failing_state_write() -> None:
        async with db.begin() as conn:
            await audit_db.append_in(conn, entry(3))
            raise RuntimeError("the state write failed")

    with pytest.raises(RuntimeError, match="state write"):
        await failing_state_write()
    await audit_db.append(db, entry(4))
    _verifier, broken = await verify(db)
    assert broken is None
    assert (await audit_db.head(db))[0] == 3


async def test_appends_alternating_between_instances_keep_one_chain(
    db: Database, db_url: str
) -> None:
    """Each instance remembers the head it wrote last; the other's appends make that stale,
    and the next append must find the real head, not fork the chain."""
    other = await open_database(DatabaseConfig(url=db_url, pool_size=5))
    try:
        for i in range(1, 9):
            await audit_db.append(db if i % 3 else other, entry(i))
    finally:
        await other.close()
    assert [r.seq async for r in audit_db.rows(db)] == list(range(1, 9))
    verifier, broken = await verify(db)
    assert broken is None
    assert verifier.count == 8


async def test_an_append_after_this_instances_last_costs_two_statements(db: Database) -> None:
    """The relay appends with every mail it settles: once this process wrote the head, an
    unkeyed append is the head moved from there plus the row (and the advisory lock on
    PostgreSQL), not a lock write, a head read, the row and a head write."""
    await fill(db, 1)
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]).split()[0].upper())

    event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    try:
        await audit_db.append(db, entry(2))
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", count)
    expected = ["UPDATE", "INSERT"]
    assert statements == (["SELECT", *expected] if db.dialect == "postgresql" else expected)
    _verifier, broken = await verify(db)
    assert broken is None


async def test_verify_and_export_through_the_cli(db: Database, config_file: Path) -> None:
    await fill(db, 4)
    await audit_db.append(db, entry(5, link="autre@agency.example.org"))
    done = audit_cli(config_file, "verify")
    assert done.returncode == 0, done.stderr
    assert "5 rows" in done.stdout
    exported = audit_cli(config_file, "export", "--link", "autre@agency.example.org")
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["seq"] for line in lines] == [5]
    assert lines[0]["time"].endswith("Z")
    assert lines[0]["ids"]["event_id"] == "$e5"
    assert set(lines[0]) >= {"prev_hash", "hash", "direction", "outcome", "body_sha256"}
    everything = audit_cli(config_file, "export", "--since", "2000-01-01")
    assert len(everything.stdout.splitlines()) == 5
    assert audit_cli(config_file, "export", "--since", "2999-01-01").stdout == ""
    bad = audit_cli(config_file, "export", "--since", "yesterday")
    assert bad.returncode == 2


def broken_row(config: Path) -> str:
    done = audit_cli(config, "verify")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stdout


async def test_an_updated_field_is_named(db: Database, config_file: Path) -> None:
    await fill(db, 5)
    async with db.begin() as conn:
        await conn.execute(update(audit_log).where(audit_log.c.seq == 3).values(outcome="refused"))
    assert "row 3:" in broken_row(config_file)


async def test_a_deleted_middle_row_is_named(db: Database, config_file: Path) -> None:
    await fill(db, 5)
    async with db.begin() as conn:
        await conn.execute(delete(audit_log).where(audit_log.c.seq == 3))
    assert "row 3: missing" in broken_row(config_file)


async def test_a_deleted_last_row_is_named_thanks_to_the_head(
    db: Database, config_file: Path
) -> None:
    await fill(db, 5)
    async with db.begin() as conn:
        await conn.execute(delete(audit_log).where(audit_log.c.seq == 5))
    assert "row 5: missing" in broken_row(config_file)


async def test_an_inserted_row_is_named(db: Database, config_file: Path) -> None:
    await fill(db, 5)
    rows = [row async for row in audit_db.rows(db)]
    async with db.begin() as conn:
        await conn.execute(
            insert(audit_log).values(
                seq=6,
                time=rows[-1].time_ms + 1,
                direction="mail_out",
                link="liste@agency.example.org",
                recipients="[]",
                ids="{}",
                outcome="sent",
                prev_hash=rows[-1].hash,
                hash="e" * 64,
            )
        )
    assert "row 6:" in broken_row(config_file)


async def test_a_chain_rewritten_whole_is_caught_by_an_anchor_kept_elsewhere(
    db: Database, config_file: Path
) -> None:
    await fill(db, 5)
    first = audit_cli(config_file, "verify")
    anchor = first.stdout.split("head ", 1)[1].split()[0]
    assert anchor.startswith("5:")
    # Someone with write access changes row 3 and recomputes every hash from there, and the
    # head: the chain alone holds again.
    rows = [row async for row in audit_db.rows(db)]
    prev = rows[1].hash
    async with db.begin() as conn:
        for row in rows[2:]:
            changed = replace(row.entry, outcome="refused") if row.seq == 3 else row.entry
            new_hash = row_hash(row.seq, row.time_ms, changed, prev)
            await conn.execute(
                update(audit_log)
                .where(audit_log.c.seq == row.seq)
                .values(outcome=changed.outcome, prev_hash=prev, hash=new_hash)
            )
            prev = new_hash
        await conn.execute(update(audit_head).values(seq=5, hash=prev))
    assert audit_cli(config_file, "verify").returncode == 0  # the known limit of a chain
    caught = audit_cli(config_file, "verify", "--anchor", anchor)
    assert caught.returncode == 1
    assert "row 5:" in caught.stdout
    assert "anchor" in caught.stdout
    # An anchor beyond the end (rows removed and the head rewritten), and a malformed one.
    beyond = audit_cli(config_file, "verify", "--anchor", "9:" + "0" * 64)
    assert beyond.returncode == 1
    assert "row 9:" in beyond.stdout
    assert audit_cli(config_file, "verify", "--anchor", "five:abc").returncode == 2
