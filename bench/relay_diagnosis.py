"""Where a relayed mail's time goes (bench/mail_to_matrix.py --diagnose): the bridge's log split
into homeserver round trips and its own work."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from bench.measure import percentile
from bridge.config import DatabaseConfig, MailConfig
from bridge.core.ids import EventID, RoomID
from bridge.core.links import LinkSettings
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db.engine import open_database
from bridge.mail.ingest import make_parser

Mailer = Callable[[str, str, int], bytes]  # (mailbox address, marker tag, seq) -> raw mail

LOG_LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (\S+): (.*)$")
SEND_DONE_RE = re.compile(r"/send/m\.room\.message/\S*\) completed in ([\d.]+)(ms|s) ")


def log_lines(text: str, since: float, until: float) -> Iterator[tuple[float, str]]:
    """(time, message) of each line of a bridge log logged between `since` and `until`."""
    for line in text.splitlines():
        match = LOG_LINE_RE.match(line)
        if match is None:
            continue
        when = time.mktime(time.strptime(match.group(1)[:19], "%Y-%m-%d %H:%M:%S"))
        when += int(match.group(1)[20:]) / 1000
        if since <= when <= until:
            yield when, match.group(3)


def _posted_mail(message: str) -> bool:
    return message.startswith("posted mail ")


def diagnose_log(
    text: str, since: float, until: float, posted: Callable[[str], bool] = _posted_mail
) -> dict[str, Any]:
    """From a --diagnose bridge log: per relayed message (`posted` tells its log line; a mail
    by default), the gap between two posts in one room and the homeserver's answer time to the
    send inside it; the difference is the bridge's own time."""
    posts: list[float] = []
    sends: list[float] = []
    stored: list[float] = []
    for when, message in log_lines(text, since, until):
        if posted(message):
            posts.append(when)
        elif message.startswith("IMAP ") and "stored" in message:
            stored.append(when)
        elif done := SEND_DONE_RE.search(message):
            value = float(done.group(1))
            sends.append(value if done.group(2) == "ms" else value * 1000)
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(posts)]
    mean_gap = sum(gaps) / len(gaps) if gaps else None
    mean_send = sum(sends) / len(sends) if sends else None
    return {
        "posts": len(posts),
        "post_gap_mean_ms": round(mean_gap, 1) if mean_gap is not None else None,
        "post_gap_p50_ms": percentile(gaps, 50),
        "send_mean_ms": round(mean_send, 1) if mean_send is not None else None,
        "send_p50_ms": percentile(sends, 50),
        "bridge_own_mean_ms": (
            round(mean_gap - mean_send, 1)
            if mean_gap is not None and mean_send is not None
            else None
        ),
        "ingest_s": round(stored[-1] - stored[0], 2) if stored else None,
    }


async def relay_steps(
    folder: Path, mail: MailConfig, make_mail: Mailer, allow: str, count: int = 300
) -> dict[str, float]:
    """The database and parsing steps MailRelay.handle awaits one after the other for each
    mail (bridge/relay/mail_in.py), timed alone in this process on a fresh SQLite database
    with the bridge's own settings: their cost without any contention (ms per mail)."""
    folder.mkdir(parents=True, exist_ok=True)
    db = await open_database(
        DatabaseConfig(url=f"sqlite+aiosqlite:///{folder / 'steps.db'}", pool_size=5)
    )
    spent: dict[str, float] = {}

    async def timed(step: str, awaitable: Awaitable[Any]) -> Any:
        begin = time.perf_counter()
        result = await awaitable
        spent[step] = spent.get(step, 0.0) + time.perf_counter() - begin
        return result

    try:
        room = RoomID("!steps:localhost")
        link = await link_db.save_link(
            db,
            room_id=room,
            kind="mail",
            remote="steps@example.test",
            settings=LinkSettings((allow,), "threads"),
            source="bot",
            created_by=None,
        )
        parse = make_parser(mail)
        raws = [make_mail("steps@example.test", "x", seq) for seq in range(count)]
        for seq, raw in enumerate(raws):
            await timed(
                "imap store_raw (write)",
                mail_db.store_raw(
                    db,
                    link_id=link.id,
                    mailbox="steps@example.test",
                    uidvalidity=1,
                    uid=seq + 1,
                    message_id=f"m{seq}",
                    raw=raw,
                    size=len(raw),
                ),
            )
        pending = await mail_db.pending_mail(db, count, set())
        for item in pending:
            begin = time.perf_counter()
            assert item.raw is not None
            parse(item.raw)
            spent["parse_mail"] = spent.get("parse_mail", 0.0) + time.perf_counter() - begin
            mid = f"m{item.uid - 1}"
            await timed("mail_db.lookup (read)", mail_db.lookup(db, link.id, mid))
            event = EventID(f"$e{item.uid}")
            await timed(
                "mail_db.record_posted (write)",
                mail_db.record_posted(
                    db,
                    mail_id=item.id,
                    link_id=link.id,
                    message_id=mid,
                    room_id=room,
                    event_id=event,
                    thread_root=event,
                    subject=None,
                ),
            )
    finally:
        await db.close()
    return {step: round(1000 * seconds / count, 2) for step, seconds in spent.items()}
