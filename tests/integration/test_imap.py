"""ImapWatcher against a real Dovecot: sync, IDLE, reconnects, UIDVALIDITY, limits and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import re
import signal
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path

import aioimaplib
import pytest

from bridge.core.health import ComponentHealth
from bridge.harness.dovecot import DovecotServer
from bridge.harness.ports import free_port
from bridge.mail import imap_session
from bridge.mail.imap_session import ImapError, ImapTlsError, MailboxConfig
from bridge.mail.imap_watcher import QUARANTINED_SIZE, ImapWatcher, MailboxStore
from bridge.mail.imap_wire import FetchRecord, parse_fetch

PASSWORD = "imap-test-Secr3t"
MAILBOX = "list@agency.example"


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def user(dovecot: DovecotServer) -> str:
    """A fresh Dovecot user (with an empty INBOX) for each test."""
    return dovecot.add_user(f"t{uuid.uuid4().hex[:12]}", PASSWORD)


class MemoryStore:
    """An in-memory MailboxStore that records calls and flags anything a watcher must not do."""

    def __init__(self, mailbox: str = MAILBOX) -> None:
        self.mailbox = mailbox
        self.raw: dict[tuple[int, int], bytes] = {}
        self.oversized: dict[tuple[int, int], int] = {}
        self.stored_at: dict[tuple[int, int], float] = {}
        self.calls: list[tuple[object, ...]] = []
        self.notified = 0
        self.problems: list[str] = []

    def _problem(self, text: str) -> None:
        self.problems.append(text)
        raise AssertionError(text)

    def _check(self, mailbox: str, uidvalidity: int) -> None:
        if mailbox != self.mailbox:
            self._problem(f"wrong mailbox {mailbox!r}")
        if uidvalidity <= 0:
            self._problem(f"bad uidvalidity {uidvalidity}")

    def highest(self, uidvalidity: int) -> int:
        keys = [*self.raw, *self.oversized]
        return max((uid for validity, uid in keys if validity == uidvalidity), default=0)

    def _check_new(self, uidvalidity: int, uid: int) -> None:
        key = (uidvalidity, uid)
        if key in self.raw or key in self.oversized:
            self._problem(f"stored twice: {key}")
        if uid <= self.highest(uidvalidity):
            self._problem(f"out of UID order: {uid} after {self.highest(uidvalidity)}")

    async def resume_point(self, mailbox: str, uidvalidity: int) -> int:
        self._check(mailbox, uidvalidity)
        self.calls.append(("resume_point", uidvalidity))
        return self.highest(uidvalidity)

    async def store_raw(self, mailbox: str, uidvalidity: int, uid: int, raw: bytes) -> None:
        self._check(mailbox, uidvalidity)
        if not isinstance(raw, bytes) or not raw:
            self._problem(f"store_raw({uid}) with {type(raw).__name__} of length {len(raw)}")
        self._check_new(uidvalidity, uid)
        self.raw[(uidvalidity, uid)] = raw
        self.stored_at[(uidvalidity, uid)] = time.monotonic()
        self.calls.append(("store_raw", uidvalidity, uid))

    async def store_oversized(self, mailbox: str, uidvalidity: int, uid: int, size: int) -> None:
        self._check(mailbox, uidvalidity)
        self._check_new(uidvalidity, uid)
        self.oversized[(uidvalidity, uid)] = size
        self.calls.append(("store_oversized", uidvalidity, uid, size))

    def notify(self) -> None:
        self.notified += 1
        self.calls.append(("notify",))

    def stores(self) -> list[tuple[object, ...]]:
        return [call for call in self.calls if call[0] in ("store_raw", "store_oversized")]

    def uids(self, uidvalidity: int) -> list[int]:
        return sorted(uid for validity, uid in self.raw if validity == uidvalidity)


def _typed(store: MemoryStore) -> MailboxStore:
    return store  # mypy checks here that MemoryStore implements the Protocol


def make_message(subject: str, body: str = "Bonjour la liste.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "agent@agency.example"
    msg["To"] = MAILBOX
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@agency.example>"
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def config_for(dovecot: DovecotServer, user: str, **changes: object) -> MailboxConfig:
    values: dict[str, object] = {
        "host": dovecot.host,
        "port": dovecot.imap_port,
        "tls": "none",
        "user": user,
        "password": PASSWORD,
    }
    values.update(changes)
    return MailboxConfig(**values)  # type: ignore[arg-type]


def watcher_for(
    config: MailboxConfig,
    store: MemoryStore,
    health: ComponentHealth,
    *,
    max_size: int = 1_000_000,
    batch: int = 50,
    idle_renew: float = 29 * 60,
    poll_interval: float = 30.0,
    connect_timeout: float = 10.0,
) -> ImapWatcher:
    return ImapWatcher(
        MAILBOX,
        config,
        _typed(store),
        health,
        max_size=max_size,
        batch=batch,
        idle_renew=idle_renew,
        poll_interval=poll_interval,
        connect_timeout=connect_timeout,
    )


async def wait_until(predicate: Callable[[], bool], budget: float = 5.0, what: str = "") -> float:
    """Poll ``predicate`` every 10 ms; return the seconds it took, fail after ``budget``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > budget:
            raise AssertionError(f"not within {budget} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def running(watcher: ImapWatcher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(watcher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def append_many(dovecot: DovecotServer, user: str, messages: list[bytes]) -> list[int]:
    """APPEND in one session; return the UIDs."""
    uids = []
    async with dovecot.session(user, PASSWORD, folder=None) as client:
        for raw in messages:
            response = await client.append(raw, mailbox="INBOX")
            assert response.result == "OK", response.lines
            match = re.search(rb"\[APPENDUID \d+ (\d+)\]", b" ".join(map(bytes, response.lines)))
            assert match
            uids.append(int(match.group(1)))
    return uids


def login_logged(dovecot: DovecotServer, user: str) -> bool:
    """Whether Dovecot's log shows a successful login of ``user``."""
    return f"Login: user=<{user}>" in dovecot.log_path.read_text(errors="replace")


# --- sync ----------------------------------------------------------------------------------------


async def test_initial_sync_in_uid_order(dovecot: DovecotServer, user: str) -> None:
    messages = [make_message(f"initial {n}") for n in range(5)]
    uids = await append_many(dovecot, user, messages)
    validity = await dovecot.uidvalidity(user, PASSWORD)
    store, health = MemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user), store, health, batch=2)

    assert await watcher.sync_once() == 5

    assert store.calls[0] == ("resume_point", validity)
    assert [call for call in store.calls if call[0] == "store_raw"] == [
        ("store_raw", validity, uid) for uid in uids
    ]
    assert [store.raw[(validity, uid)] for uid in uids] == messages  # byte for byte
    assert store.notified == 3  # once per batch of 2, after its store_raw calls
    assert store.calls[-1] == ("notify",)
    assert health.reachable
    assert health.last_error is None
    assert store.problems == []


async def test_nothing_new_stores_nothing(dovecot: DovecotServer, user: str) -> None:
    await append_many(dovecot, user, [make_message(f"old {n}") for n in range(3)])
    store, health = MemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user), store, health)
    assert await watcher.sync_once() == 3
    before = list(store.calls)

    # resume_point is now the highest UID: "UID SEARCH UID 4:*" still answers UID 3.
    assert await watcher.sync_once() == 0
    assert await watcher.sync_once() == 0
    assert store.stores() == [c for c in before if c[0] in ("store_raw", "store_oversized")]
    assert store.notified == 1

    # The same while watching, across several IDLE renewals.
    async with running(watcher_for(config_for(dovecot, user), store, health, idle_renew=0.2)):
        await wait_until(
            lambda: sum(c[0] == "resume_point" for c in store.calls) >= 6, what="3 renewals"
        )
    assert store.stores() == [c for c in before if c[0] in ("store_raw", "store_oversized")]
    assert store.problems == []


async def test_bulk_fetch_rate(dovecot: DovecotServer, user: str) -> None:
    count = 400
    messages = [make_message(f"bulk {n}", "x" * 2000 + "\n") for n in range(count)]
    started = time.monotonic()
    await append_many(dovecot, user, messages)
    appended = time.monotonic()
    store, health = MemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user), store, health)
    assert await watcher.sync_once() == count
    took = time.monotonic() - appended
    print(
        f"APPEND {count}: {count / (appended - started):.0f}/s; "
        f"watcher fetch+store {count}: {took:.2f} s = {count / took:.0f} mails/s"
    )
    validity = await dovecot.uidvalidity(user, PASSWORD)
    assert store.uids(validity) == list(range(1, count + 1))
    # Sizes are read 200 UIDs at a time; bodies in batches of 50, the sync's first of 5:
    # 5, 50, 50, 50, 45, then 4 × 50.
    assert store.notified == 9
    assert store.problems == []


# --- IDLE --------------------------------------------------------------------------------------


async def test_idle_wakeup_and_expunge(dovecot: DovecotServer, user: str) -> None:
    store, health = MemoryStore(), ComponentHealth("imap")
    await append_many(dovecot, user, [make_message("before watching")])
    watcher = watcher_for(config_for(dovecot, user), store, health)
    async with running(watcher) as task:
        await wait_until(lambda: watcher.idling, what="IDLE after the initial sync")
        validity = await dovecot.uidvalidity(user, PASSWORD)
        assert store.uids(validity) == [1]

        latencies = []
        for n in range(3):
            await wait_until(lambda: watcher.idling, what="back in IDLE")
            sent = time.monotonic()
            key = (validity, await dovecot.append(user, PASSWORD, make_message(f"idle {n}")))
            await wait_until(lambda: key in store.raw, budget=2.0, what="IDLE wake-up")  # noqa: B023
            latencies.append(store.stored_at[key] - sent)
        print("APPEND → stored via IDLE: " + ", ".join(f"{s * 1000:.0f} ms" for s in latencies))

        # Another client expunges a mail while we IDLE: "* N EXPUNGE" must not disturb us.
        await wait_until(lambda: watcher.idling, what="back in IDLE")
        async with dovecot.session(user, PASSWORD) as client:
            response = await client.uid("store", "2", "+FLAGS.SILENT", r"(\Deleted)")
            assert response.result == "OK", response.lines
            assert (await client.expunge()).result == "OK"
        await asyncio.sleep(0.7)  # Dovecot announces after 0.5 s
        assert watcher.idling
        assert not task.done()
        uid = await dovecot.append(user, PASSWORD, make_message("after expunge"))
        await wait_until(lambda: (validity, uid) in store.raw, budget=2.0, what="after expunge")

    assert store.uids(validity) == [1, 2, 3, 4, 5]
    assert health.reachable
    assert store.problems == []


async def test_poll_without_idle_capability(
    dovecot: DovecotServer, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = aioimaplib.IMAP4.has_capability

    def no_idle(self: aioimaplib.IMAP4, capability: str) -> bool:
        return capability != "IDLE" and original(self, capability)

    monkeypatch.setattr(aioimaplib.IMAP4, "has_capability", no_idle)
    store, health = MemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user), store, health, poll_interval=0.3)
    async with running(watcher):
        await wait_until(lambda: health.reachable, what="first sync")
        uid = await dovecot.append(user, PASSWORD, make_message("polled"))
        validity = await dovecot.uidvalidity(user, PASSWORD)
        await wait_until(lambda: (validity, uid) in store.raw, budget=2.0, what="poll")
        assert not watcher.idling
    assert store.problems == []


# --- reconnects --------------------------------------------------------------------------------


def kill_session_of(dovecot: DovecotServer, user: str) -> int:
    """SIGTERM the one live Dovecot imap process serving ``user``; return its pid.

    Candidates are the pids Dovecot logged for that user's logins (each test has its own user;
    the harness's APPEND sessions have logged out); the one left must be one of this Dovecot's
    imap processes.
    """
    logins = re.findall(
        rf"Login: user=<{re.escape(user)}>.*?mpid=(\d+)", dovecot.log_path.read_text()
    )
    alive = []
    for pid in {int(found) for found in logins}:
        with contextlib.suppress(FileNotFoundError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if cmdline.startswith(f"dovecot-{dovecot.imap_port}/imap".encode()):
                alive.append(pid)
    assert len(alive) == 1, (logins, alive)
    os.kill(alive[0], signal.SIGTERM)
    return alive[0]


@pytest.mark.slow
async def test_reconnects_after_server_restart_and_dropped_connection(
    dovecot: DovecotServer, user: str
) -> None:
    store, health = MemoryStore(), ComponentHealth("imap")
    await append_many(dovecot, user, [make_message("first")])
    validity = await dovecot.uidvalidity(user, PASSWORD)
    watcher = watcher_for(config_for(dovecot, user), store, health)
    async with running(watcher):
        await wait_until(lambda: watcher.idling, what="IDLE")

        # Dovecot's imap processes outlive a restart of its master: the IDLE goes on.
        dovecot.restart()
        key = (validity, await dovecot.append(user, PASSWORD, make_message("after restart")))
        await wait_until(lambda: key in store.raw, budget=3, what="mail after restart")
        await wait_until(lambda: watcher.idling, what="IDLE after restart")

        # Now the server side of the IDLE connection goes away (BYE, then EOF).
        kill_session_of(dovecot, user)
        await wait_until(lambda: not health.reachable, budget=2, what="loss noticed")
        reason = health.last_error or ""
        key = (validity, await dovecot.append(user, PASSWORD, make_message("after drop")))
        elapsed = await wait_until(lambda: key in store.raw, budget=5, what="after reconnect")
        print(f"connection dropped → next mail stored after reconnect: {elapsed:.2f} s")
        await wait_until(lambda: watcher.idling, what="IDLE again")
    assert store.uids(validity) == [1, 2, 3]
    assert len(store.stores()) == 3  # no duplicates
    assert "connection closed by the server (BYE" in reason, reason
    assert health.reachable
    assert store.problems == []


@pytest.mark.slow
async def test_uidvalidity_change_refetches_from_uid_1(dovecot: DovecotServer, user: str) -> None:
    store, health = MemoryStore(), ComponentHealth("imap")
    old = [make_message("old 1"), make_message("old 2")]
    await append_many(dovecot, user, old)
    old_validity = await dovecot.uidvalidity(user, PASSWORD)
    watcher = watcher_for(config_for(dovecot, user), store, health)
    async with running(watcher):
        await wait_until(lambda: store.uids(old_validity) == [1, 2], what="initial sync")
        await wait_until(lambda: watcher.idling, what="IDLE")

        # The folder is rebuilt: Dovecot forgets its UIDs and assigns a new UIDVALIDITY.
        dovecot.stop()
        for path in dovecot.maildir(user).iterdir():
            if path.name.startswith("dovecot") and not path.name.startswith("dovecot-uidvalidity"):
                path.unlink()
        dovecot.start()
        new = make_message("new 3")
        await append_many(dovecot, user, [new])
        new_validity = await dovecot.uidvalidity(user, PASSWORD)
        assert new_validity != old_validity

        await wait_until(lambda: len(store.uids(new_validity)) == 3, what="refetch from 1")
    assert ("resume_point", new_validity) in store.calls
    assert [store.raw[(new_validity, uid)] for uid in (1, 2, 3)] == [*old, new]
    assert store.uids(old_validity) == [1, 2]
    assert store.problems == []


# --- limits and flags --------------------------------------------------------------------------


async def test_oversized_mail_is_recorded_not_fetched(
    dovecot: DovecotServer, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aioimaplib.aioimaplib")
    small, big = make_message("small"), make_message("big", "y" * 5000 + "\n")
    uids = await append_many(dovecot, user, [small, big, small])
    validity = await dovecot.uidvalidity(user, PASSWORD)
    store, health = MemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user), store, health, max_size=3000)

    assert await watcher.sync_once() == 2
    assert store.stores() == [
        ("store_raw", validity, uids[0]),
        ("store_oversized", validity, uids[1], len(big)),
        ("store_raw", validity, uids[2]),
    ]
    # On the wire: the body of the big one was never asked for.
    fetched: set[int] = set()
    for record in caplog.records:
        message = record.getMessage()
        if "Sending" in message and "BODY.PEEK[]" in message:
            match = re.search(r"UID FETCH ([0-9:,]+) BODY", message)
            assert match, message
            for part in match.group(1).split(","):
                low, _, high = part.partition(":")
                fetched.update(range(int(low), int(high or low) + 1))
    assert fetched == {uids[0], uids[2]}
    assert store.problems == []


async def test_fetching_does_not_mark_seen(dovecot: DovecotServer, user: str) -> None:
    await append_many(dovecot, user, [make_message(f"unseen {n}") for n in range(3)])
    store, health = MemoryStore(), ComponentHealth("imap")
    assert await watcher_for(config_for(dovecot, user), store, health).sync_once() == 3
    async with dovecot.session(user, PASSWORD) as client:
        response = await client.uid("fetch", "1:*", "(UID FLAGS)")
    assert response.result == "OK"
    flag_lines = [bytes(line) for line in response.lines if b"FLAGS" in bytes(line)]
    assert len(flag_lines) == 3
    assert not any(b"\\Seen" in line for line in flag_lines), flag_lines


async def test_unreadable_message_is_quarantined_after_three_attempts(
    dovecot: DovecotServer, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the parser fails on UID 2 only; later mails must still flow."""
    uids = await append_many(dovecot, user, [make_message(f"poison {n}") for n in range(4)])
    validity = await dovecot.uidvalidity(user, PASSWORD)
    real_parse = parse_fetch
    seen: list[int] = []

    def parse_but_break_uid_2(lines: list[bytes | bytearray]) -> list[FetchRecord]:
        records = []
        for record in real_parse(lines):
            if record.uid == 2 and record.body is not None:
                seen.append(2)
                record = FetchRecord(2, error="injected")
            records.append(record)
        return records

    # The connection layer looks parse_fetch up at call time in its own module.
    monkeypatch.setattr(imap_session, "parse_fetch", parse_but_break_uid_2)
    store, health = MemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user), store, health)
    assert await watcher.sync_once() == 3
    assert store.stores() == [
        ("store_raw", validity, uids[0]),
        ("store_oversized", validity, 2, QUARANTINED_SIZE),
        ("store_raw", validity, uids[2]),
        ("store_raw", validity, uids[3]),
    ]
    assert seen == [2, 2, 2]  # three fetches of its body, then quarantine
    assert await watcher.sync_once() == 0  # and it is not fetched again
    assert seen == [2, 2, 2]
    assert store.problems == []


# --- authentication and TLS --------------------------------------------------------------------


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    found = (re.search(r"reconnecting in ([0-9.]+) s", r.getMessage()) for r in caplog.records)
    return [match for match in found if match]


@pytest.mark.slow
async def test_wrong_password_fails_health_and_backs_off(
    dovecot: DovecotServer, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = 'Wr0ng-pass"word\\x'
    store, health = MemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user, password=wrong), store, health)
    async with running(watcher) as task:
        # Dovecot delays each failed login by ~2 s; backoff waits 1 s, then 2 s.
        await wait_until(lambda: health.last_error is not None, budget=5, what="first failure")
        reason = health.last_error or ""
        await wait_until(lambda: len(retry_lines(caplog)) >= 2, budget=8, what="second failure")
        assert not task.done()
    assert not health.reachable
    assert f"login as {user} refused" in reason, reason
    assert "AUTHENTICATIONFAILED" in reason, reason
    assert str(dovecot.imap_port) in reason
    delays = [float(m.group(1)) for m in retry_lines(caplog)]
    assert 0.8 <= delays[0] <= 1.2, delays
    assert 1.6 <= delays[1] <= 2.4, delays
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert "Wr0ng" not in text, (record.name, text)
    assert store.calls == []
    # Dovecot now delays every login from 127.0.0.1 (auth penalty, per IP); a good login
    # clears that, so that the tests after this one are not slowed down.
    await dovecot.uidvalidity(user, PASSWORD)


async def test_tls_against_plaintext_port_never_falls_back(
    dovecot: DovecotServer, user: str
) -> None:
    store, health = MemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user, tls="tls"), store, health, connect_timeout=5)
    with pytest.raises(ImapTlsError, match=r"TLS handshake failed .*is this a TLS port"):
        await watcher.sync_once()
    assert f":{dovecot.imap_port}: TLS handshake failed" in (health.last_error or "")
    assert not login_logged(dovecot, user)
    assert store.calls == []


async def test_starttls_refused_when_not_offered(dovecot: DovecotServer, user: str) -> None:
    store, health = MemoryStore(), ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user, tls="starttls"), store, health)
    with pytest.raises(ImapTlsError, match="does not offer STARTTLS"):
        await watcher.sync_once()
    assert not health.reachable
    assert not login_logged(dovecot, user)
    assert store.calls == []


def test_unknown_tls_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="tls must be one of"):
        MailboxConfig("h", 1, "ssl", "u", "p")  # type: ignore[arg-type]
    assert "secretpass" not in repr(MailboxConfig("h", 1, "tls", "u", "secretpass"))


# A TLS front for the plaintext Dovecot, with a throw-away CA, to test the TLS paths for real.


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server cert.pem, server key.pem); the server cert is for IP 127.0.0.1 only."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "passerelle test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class TlsFront:
    """Terminates TLS (implicit, or IMAP STARTTLS) and relays the bytes to Dovecot."""

    def __init__(self, upstream_port: int, context: ssl.SSLContext, starttls: bool) -> None:
        self.upstream_port = upstream_port
        self.context = context
        self.starttls = starttls
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> TlsFront:
        self.server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=None if self.starttls else self.context
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        try:
            if self.starttls:
                writer.write(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] front\r\n")
                while True:
                    tag, _, command = (await reader.readline()).strip().partition(b" ")
                    if command.upper() == b"CAPABILITY":
                        writer.write(b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n")
                        writer.write(tag + b" OK done\r\n")
                    elif command.upper() == b"STARTTLS":
                        writer.write(tag + b" OK begin TLS\r\n")
                        await writer.drain()
                        await writer.start_tls(self.context)
                        break
                    else:
                        writer.write(tag + b" BAD not before TLS\r\n")
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self.writers.append(up_writer)
            if self.starttls:
                await up_reader.readline()  # Dovecot's greeting; ours was sent already
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass  # handshake refused by the client, or a side closed
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


@pytest.mark.parametrize("mode", ["tls", "starttls"])
async def test_tls_with_ca_file_verifies_the_server(
    dovecot: DovecotServer, user: str, tmp_path: Path, mode: str
) -> None:
    ca, cert, key = _certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    await append_many(dovecot, user, [make_message(f"over {mode}")])
    async with TlsFront(dovecot.imap_port, context, starttls=mode == "starttls") as front:
        store, health = MemoryStore(), ComponentHealth("imap")
        good = config_for(dovecot, user, tls=mode, port=front.port, ca_file=str(ca))
        assert await watcher_for(good, store, health).sync_once() == 1
        assert health.reachable

        # Without the agency's CA the certificate is refused: verification is never off.
        untrusted = config_for(dovecot, user, tls=mode, port=front.port)
        with pytest.raises(
            ImapTlsError, match=r"certificate rejected: .*(self.signed|local issuer)"
        ):
            await watcher_for(untrusted, MemoryStore(), health).sync_once()
        assert health.last_error is not None

        # The CA is trusted but the name does not match: refused too.
        wrong_name = config_for(
            dovecot, user, tls=mode, port=front.port, ca_file=str(ca), host="localhost"
        )
        with pytest.raises(ImapTlsError, match=r"certificate rejected: .*(mismatch|match)"):
            await watcher_for(wrong_name, MemoryStore(), health).sync_once()
    assert store.problems == []


async def test_connection_refused_is_an_imap_error(dovecot: DovecotServer, user: str) -> None:
    health = ComponentHealth("imap")
    watcher = watcher_for(config_for(dovecot, user, port=free_port()), MemoryStore(), health)
    with pytest.raises(ImapError, match="cannot connect"):
        await watcher.sync_once()
    assert "cannot connect" in (health.last_error or "")


# --- FETCH parsing -----------------------------------------------------------------------------


def test_parse_fetch_handles_literals_order_and_garbage() -> None:
    body = b"Subject: (tricky) UID 99\r\n\r\n) {12}\r\n"
    lines: list[bytes | bytearray] = [
        b"7 FETCH (BODY[] {%d}" % len(body),
        bytearray(body),
        b" UID 12 FLAGS (\\Recent))",
        b"8 FETCH (UID 13 RFC822.SIZE 4567)",
        b"9 FETCH (FLAGS (\\Seen) UID 14)",  # a flags update: no body
        b'10 FETCH (UID 15 BODY[] "short \\"quoted\\" body")',
        b"11 FETCH (UID 16 BODY[] NIL)",
        b"12 FETCH (UID 17 BODY[] {50}",
        bytearray(b"truncated"),
        b")",
        b"13 FETCH (UID 18 RFC822.SIZE x)",
    ]
    records = parse_fetch(lines)
    assert [(r.uid, r.size, r.body, r.error) for r in records] == [
        (12, None, body, None),
        (13, 4567, None, None),
        (14, None, None, None),
        (15, None, b'short "quoted" body', None),
        (16, None, None, "BODY[] is not a string"),
        (17, None, None, "literal of unexpected size"),
        (18, None, None, "RFC822.SIZE is not a number"),
    ]
