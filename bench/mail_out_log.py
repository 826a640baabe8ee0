"""What `matrix_to_mail.py` reads in the bridge's log: statements per mail (--diagnose), and
when each mail was queued and sent."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from bench.relay_diagnosis import LOG_LINE_RE

QUEUED_RE = re.compile(r"queued message (\S+) of ")
QUEUED_ID_RE = re.compile(r"queued message (\S+) of .* \(#(\d+)\)$")
SENT_RE = re.compile(r"outbox item (\d+) sent")


def sql_per_mail(lines: list[str], capacity: dict[str, Any], mails: int) -> dict[str, float]:
    """From a --diagnose bridge log: the database transactions (BEGIN) and statements by kind
    the bridge ran per mail during the capacity phase."""
    since, until = capacity["window"]
    counts: Counter[str] = Counter()
    for when, logger, message in log_records(lines):
        word = message.split(" ", 1)[0]
        # "[generated in …] (parameters)" lines follow their statement: not counted.
        if logger == "sqlalchemy.engine.Engine" and since <= when <= until and word[:1] != "[":
            counts[word] += 1
    return {kind: round(n / mails, 2) for kind, n in counts.most_common()}


def log_records(lines: Sequence[str]) -> Iterator[tuple[float, str, str]]:
    """(Unix time, logger, message) of each line of the bridge's log (millisecond stamps)."""
    for line in lines:
        match = LOG_LINE_RE.match(line)
        if match is not None:
            stamp = match.group(1)
            when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
            yield when + int(stamp[20:]) / 1000, match.group(2), match.group(3)


def queued_times(lines: Sequence[str]) -> dict[str, float]:
    """Event ID -> when the bridge logged it queued in its outbox (bridge/relay/mail_out.py)."""
    return {
        match.group(1): when
        for when, _, message in log_records(lines)
        if (match := QUEUED_RE.match(message))
    }


def bridge_sent_times(lines: Sequence[str], run: str) -> dict[int, float]:
    """Sequence number -> when the bridge logged the mail of event `$bench-{run}-{seq}` sent
    (the SMTP server's 250 to its DATA; millisecond stamps)."""
    prefix = f"$bench-{run}-"
    items: dict[int, int] = {}
    sent: dict[int, float] = {}
    for when, _, message in log_records(lines):
        if (match := QUEUED_ID_RE.match(message)) and match.group(1).startswith(prefix):
            items[int(match.group(2))] = int(match.group(1)[len(prefix) :])
        elif (match := SENT_RE.match(message)) and int(match.group(1)) in items:
            sent.setdefault(items[int(match.group(1))], when)
    return sent
