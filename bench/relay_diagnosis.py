"""Where a relayed mail's time goes (bench/mail_to_matrix.py --diagnose): the bridge's log split
into homeserver round trips and its own work."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.measure import percentile

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
