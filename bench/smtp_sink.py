#!/usr/bin/env python3
"""The SMTP sink of bench/matrix_to_mail.py, in a process of its own: every mail it accepts is
one line of its log (marker, time, size), read back by SinkLog as it grows.

    python bench/smtp_sink.py PORT FILE     # started by SinkProcess; runs until SIGTERM
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.measure import start_script, stop_process  # noqa: E402
from bench.rooms import (  # noqa: E402
    MARKER_RE,
)
from bridge.harness.ports import free_port  # noqa: E402

MARKER_BYTES = re.compile(MARKER_RE.pattern.encode())

# --- the SMTP sink (its own process) -----------------------------------------------------------


def find_marker(content: bytes) -> tuple[str, int]:
    """(tag, sequence number) of a mail; ("?", -1) when it carries none."""
    match = MARKER_BYTES.search(content)
    if match is None:  # an encoded Subject and body: read it decoded
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        body = parsed.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
        text = body.get_content() if body is not None else ""
        found = MARKER_RE.search(str(parsed["Subject"] or "") + str(text))
        return (found.group(1), int(found.group(2))) if found else ("?", -1)
    return match.group(1).decode(), int(match.group(2))


class SinkHandler:
    """aiosmtpd handler: accepts every mail and writes "tag seq accepted_at size" for it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        accepted = time.time()
        content: bytes = envelope.original_content or envelope.content
        tag, seq = find_marker(content)
        self.out.write(f"{tag} {seq} {accepted:.6f} {len(content)}\n")
        return "250 2.0.0 queued"


def serve_sink(port: int, log_path: Path) -> None:
    """The sink's process (`smtp_sink.py PORT FILE`), until SIGTERM. Its first line: "ready"."""
    from aiosmtpd.smtp import SMTP

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with log_path.open("a", buffering=1, encoding="utf-8") as out:
            handler = SinkHandler(out)
            server = await loop.create_server(
                lambda: SMTP(handler, hostname="sink.test"), "127.0.0.1", port
            )
            out.write(f"ready 0 {time.time():.6f} 0\n")
            await stop.wait()
            server.close()

    asyncio.run(serve())


@dataclass
class SinkProcess:
    """The sink, started as `python bench/smtp_sink.py PORT FILE`."""

    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        self.proc = start_script(
            [__file__, str(self.port), str(self.log_path)],
            self.log_path.with_suffix(".out"),
            self.log_path,
            "SMTP sink",
            timeout,
        )

    def stop(self) -> None:
        stop_process(self.proc)


class SinkLog:
    """What the sink accepted, read from its log as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.accepted: dict[str, dict[int, list[float]]] = {}
        self.sizes: dict[str, list[int]] = {}

    def refresh(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            tag, seq, at, size = line.split()
            if tag == "ready":
                continue
            self.accepted.setdefault(tag, {}).setdefault(int(seq), []).append(float(at))
            self.sizes.setdefault(tag, []).append(int(size))

    def times(self, tag: str) -> dict[int, list[float]]:
        return self.accepted.get(tag, {})

    async def wait(self, tag: str, count: int, timeout: float) -> bool:
        """Until `count` distinct mails of `tag` were accepted; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if len(self.times(tag)) >= count:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)

    def check(self, tag: str, count: int) -> dict[str, Any]:
        """Exactly once: every sequence number of 0..count-1 accepted once, nothing else."""
        self.refresh()
        seen = self.times(tag)
        missing = [seq for seq in range(count) if seq not in seen]
        sizes = self.sizes.get(tag, [])
        return {
            "accepted": sum(len(v) for v in seen.values()),
            "duplicates": sum(len(v) - 1 for v in seen.values()),
            "missing": len(missing),
            "missing_first": missing[:10],
            "unexpected": sum(1 for seq in seen if not 0 <= seq < count),
            "mean_size": round(sum(sizes) / len(sizes)) if sizes else None,
        }


if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[1].isdigit():
        sys.exit("usage: smtp_sink.py PORT FILE (started by bench/matrix_to_mail.py)")
    serve_sink(int(sys.argv[1]), Path(sys.argv[2]))
