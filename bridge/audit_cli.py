"""`passerelle audit export` and `passerelle audit verify`: the audit log read back in batches."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from bridge.config import Config
from bridge.core.audit import Break, ChainVerifier
from bridge.db import audit as audit_db
from bridge.db.engine import Database, open_database

EXIT_INTACT = 0
EXIT_BROKEN = 1
# Rounds of "the head moved on while we read": appends go on during a verification.
_CATCH_UP_ROUNDS = 20


def parse_since(value: str) -> int:
    """ms since the epoch for a date (2024-05-01) or an ISO-8601 time (naive = UTC)."""
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: not an ISO-8601 date or time: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


async def export(db: Database, out: TextIO, *, since_ms: int | None, link: str | None) -> int:
    """Write the rows as JSON Lines in seq order; returns how many."""
    count = 0
    async for row in audit_db.rows(db, since_ms=since_ms, link=link):
        out.write(json.dumps(row.export(), ensure_ascii=False, sort_keys=True) + "\n")
        count += 1
    return count


def parse_anchor(value: str) -> tuple[int, str]:
    """SEQ:HASH, as `audit verify` prints the head."""
    seq, _, hash_ = value.partition(":")
    if not seq.isdigit() or int(seq) < 1 or len(hash_) != 64:
        raise ValueError(f"--anchor {value[:80]!r}: expected SEQ:HASH as verify prints it")
    return int(seq), hash_.lower()


async def verify(
    db: Database, *, batch: int = audit_db.BATCH, anchors: Mapping[int, str] | None = None
) -> tuple[ChainVerifier, Break | None]:
    """Walk the whole chain, then hold its end against the head table. Rows appended while
    this runs are read too (the head is read after the rows, and the rows after it again
    until both agree)."""
    verifier = ChainVerifier(anchors)
    async for row in audit_db.rows(db, batch=batch):
        if verifier.feed(row) is not None:
            return verifier, verifier.broken
    for _ in range(_CATCH_UP_ROUNDS):
        head_seq, head_hash = await audit_db.head(db)
        if head_seq <= verifier.last_seq:
            return verifier, verifier.finish(head_seq, head_hash)
        more = 0
        async for row in audit_db.rows(db, after=verifier.last_seq, batch=batch):
            more += 1
            if verifier.feed(row) is not None:
                return verifier, verifier.broken
        if not more:  # the head is ahead of every row: rows were removed from the end
            return verifier, verifier.finish(head_seq, head_hash)
    return verifier, None


async def run_export(
    config: Config, output: Path | None, since: str | None, link: str | None
) -> int:
    since_ms = parse_since(since) if since else None
    db = await open_database(config.database)
    try:
        if output is None:
            await export(db, sys.stdout, since_ms=since_ms, link=link)
            sys.stdout.flush()
        else:
            with output.open("w", encoding="utf-8") as f:
                await export(db, f, since_ms=since_ms, link=link)
    finally:
        await db.close()
    return EXIT_INTACT


async def run_verify(config: Config, anchors: Sequence[str] = ()) -> int:
    parsed = dict(parse_anchor(a) for a in anchors)
    db = await open_database(config.database)
    try:
        verifier, broken = await verify(db, anchors=parsed)
    finally:
        await db.close()
    if broken is not None:
        print(f"audit log broken: {broken} ({verifier.count} rows intact before it)")
        return EXIT_BROKEN
    print(
        f"audit log intact: {verifier.count} rows, head {verifier.last_seq}:{verifier.last_hash}"
        " (keep it outside the database; verify --anchor checks it later)"
    )
    return EXIT_INTACT
