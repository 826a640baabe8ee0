"""A throw-away Dovecot IMAP + LMTP server for tests and the demo, configured outside /etc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aioimaplib

from bridge.core.tasks import wait_for
from bridge.harness.ports import free_port

# Mail processes run as nobody: Dovecot refuses to access mail as root.
MAIL_UID = 65534
MAIL_GID = 65534

_LOCALPART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_APPENDUID_RE = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_UIDVALIDITY_RE = re.compile(rb"UIDVALIDITY (\d+)")


def _tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


def make_runtime_dir(prefix: str) -> Path:
    """A fresh 0755 directory under the system temp dir, for paths service users must reach.

    Dovecot's auth (user dovecot) and mail (nobody) processes open the passwd-files, sockets and
    Maildirs by absolute path, so every ancestor must be searchable by them. pytest's
    ``/tmp/pytest-of-root`` is 0700, and every pytest session that starts resets it to 0700,
    so granting o+x there would not last while other sessions run.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    for directory in path.parents:
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise RuntimeError(f"{directory} is not searchable by others; set TMPDIR elsewhere")
    return path


def _discard(runtime_dir: Path, config_path: Path) -> None:
    """Finalizer: SIGTERM a master still running with ``config_path``, delete ``runtime_dir``."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((runtime_dir / "run" / "master.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if os.fsencode(config_path) in cmdline:
            os.kill(pid, signal.SIGTERM)
    shutil.rmtree(runtime_dir, ignore_errors=True)


def _imap_quote(text: str) -> str:
    """An IMAP quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class DovecotServer:
    """Dovecot serving IMAP and LMTP on loopback, with passwd-file users and Maildir storage.

    Ports left at 0 are chosen when the object is created, so they are known (for Postfix's LMTP
    transport, say) before ``start()`` and stay the same across ``restart()``.

    ``base_dir`` holds what only root reads (dovecot.conf, logs). What Dovecot's unprivileged
    processes open (sockets, passwd-files, Maildirs) lives in ``runtime_dir``, a directory under
    /tmp (linked as ``base_dir/runtime``). When this object is garbage-collected a master still
    running is sent SIGTERM and that directory deleted.
    """

    base_dir: Path
    imap_port: int = 0
    lmtp_port: int = 0
    domain: str = "example.test"
    host: str = field(default="127.0.0.1", init=False)
    runtime_dir: Path = field(init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _stderr: IO[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = make_runtime_dir("passerelle-dovecot-")
        weakref.finalize(self, _discard, self.runtime_dir, self.config_path)
        link = self.base_dir / "runtime"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(self.runtime_dir)
        if self.imap_port == 0:
            self.imap_port = free_port()
        if self.lmtp_port == 0:
            self.lmtp_port = free_port()
            while self.lmtp_port == self.imap_port:
                self.lmtp_port = free_port()

    # -- paths ----------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """The standalone dovecot.conf."""
        return self.base_dir / "dovecot.conf"

    @property
    def passwd_dir(self) -> Path:
        """One passwd-file per address, each a single ``address:{PLAIN}password`` line."""
        return self.runtime_dir / "passwd.d"

    @property
    def mail_root(self) -> Path:
        """Directory holding one home directory (with its Maildir) per address."""
        return self.runtime_dir / "mail"

    @property
    def log_path(self) -> Path:
        """Dovecot's own log file."""
        return self.base_dir / "dovecot.log"

    @property
    def run_dir(self) -> Path:
        """Dovecot's base_dir (sockets, master.pid)."""
        return self.runtime_dir / "run"

    def maildir(self, address: str) -> Path:
        """The Maildir of ``address``."""
        return self.mail_root / address / "Maildir"

    # -- users ----------------------------------------------------------------------------------

    def add_user(self, localpart: str, password: str) -> str:
        """Add (or replace) a user and create its Maildir; return the address.

        Works on a running server too: each user has its own passwd-file (see below).
        """
        if not _LOCALPART_RE.match(localpart):
            raise ValueError(f"unsupported localpart: {localpart!r}")
        if any(ch in password for ch in ":\r\n\0"):
            raise ValueError("password must not contain ':', NUL or line breaks")
        address = f"{localpart}@{self.domain}"
        self._prepare_dirs()

        # One passwd-file per user: Dovecot loads a file it has not seen on first lookup, whereas
        # a file it already knows is stat()ed at most once a second and compared by mtime (whole
        # seconds) and size, so an edit made in the same second as a lookup would go unnoticed.
        self.passwd_dir.mkdir(mode=0o755, exist_ok=True)
        path = self.passwd_dir / address
        old_mtime = path.stat().st_mtime if path.exists() else 0.0
        tmp = path.with_name(f".{address}.tmp")
        tmp.write_text(f"{address}:{{PLAIN}}{password}\n")
        tmp.chmod(0o644)
        # A replaced password must not keep the mtime Dovecot saw (its stamp has 1 s resolution).
        mtime = max(time.time(), int(old_mtime) + 1)
        os.utime(tmp, (mtime, mtime))
        tmp.replace(path)
        if old_mtime and self.running:
            # Dovecot skips the stat() if it already looked at this file during the current second.
            time.sleep(1 - time.time() % 1 + 0.01)

        home = self.mail_root / address
        for directory in (
            home,
            home / "Maildir",
            *(home / "Maildir" / sub for sub in ("cur", "new", "tmp")),
        ):
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chown(directory, MAIL_UID, MAIL_GID)
        return address

    # -- lifecycle ------------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.mail_root.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.mail_root, MAIL_UID, MAIL_GID)

    def _write_config(self) -> None:
        state_dir = self.runtime_dir / "state"
        state_dir.mkdir(exist_ok=True)
        self.passwd_dir.mkdir(mode=0o755, exist_ok=True)
        conf = f"""\
# Generated by bridge.harness.dovecot; standalone, nothing is read from /etc/dovecot.
protocols = imap lmtp
listen = {self.host}
base_dir = {self.run_dir}
state_dir = {state_dir}
log_path = {self.log_path}
instance_name = dovecot-{self.imap_port}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{self.mail_root}/%u/Maildir
mail_fsync = never
first_valid_uid = {MAIL_UID}
first_valid_gid = {MAIL_GID}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_dir}/%u
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_GID} home={self.mail_root}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = {self.host}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {self.host}
    port = {self.lmtp_port}
  }}
}}
protocol imap {{
  mail_max_userip_connections = 200
}}
protocol lmtp {{
  postmaster_address = postmaster@{self.domain}
}}
"""
        self.config_path.write_text(conf)

    @property
    def running(self) -> bool:
        """Whether the master process started by ``start()`` is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10) -> None:
        """Write the config, run Dovecot's master in the foreground, wait for the IMAP greeting."""
        if self.running:
            return
        dovecot = shutil.which("dovecot") or "/usr/sbin/dovecot"
        self._prepare_dirs()
        self._write_config()
        self._stderr = (self.base_dir / "dovecot.stderr").open("ab")
        # -F keeps the master as our child: stop() can wait for it, and no zombie is left behind.
        self._proc = subprocess.Popen(
            [dovecot, "-F", "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                raise RuntimeError(f"dovecot exited with status {code}\n{self._diagnostics()}")
            if self._greets():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"dovecot gave no IMAP greeting on port {self.imap_port} within {timeout} s\n"
                    f"{self._diagnostics()}"
                )
            time.sleep(0.02)

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.imap_port), timeout=1) as sock:
                return sock.recv(256).startswith(b"* OK")
        except OSError:
            return False

    def _diagnostics(self) -> str:
        return (
            f"--- {self.log_path.name} ---\n{_tail(self.log_path)}\n"
            f"--- dovecot.stderr ---\n{_tail(self.base_dir / 'dovecot.stderr')}"
        )

    def _reap(self) -> None:
        self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def stop(self, timeout: float = 10) -> None:
        """Stop the master (SIGTERM, then SIGKILL after ``timeout``); harmless if not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def restart(self) -> None:
        """Stop and start again on the same ports, keeping users and mail."""
        self.stop()
        self.start()

    # -- IMAP helpers ---------------------------------------------------------------------------

    @asynccontextmanager
    async def session(
        self, user: str, password: str, folder: str | None = "INBOX"
    ) -> AsyncIterator[aioimaplib.IMAP4]:
        """A logged-in aioimaplib client (``folder`` selected unless None), closed on exit.

        aioimaplib leaves the socket to be closed when the server's EOF after LOGOUT arrives;
        if the event loop ends first that is an "unclosed transport" ResourceWarning, so the
        transport is closed here explicitly.
        """
        client = aioimaplib.IMAP4(host=self.host, port=self.imap_port, timeout=10)
        try:
            await client.wait_hello_from_server()
            response = await client.login(user, password)
            if response.result != "OK":
                raise RuntimeError(f"IMAP login as {user} failed: {response.lines!r}")
            if folder is not None:
                response = await client.select(_imap_quote(folder))
                if response.result != "OK":
                    raise RuntimeError(f"IMAP SELECT {folder} failed: {response.lines!r}")
            yield client
        finally:
            await close_imap(client)

    async def append(self, user: str, password: str, raw: bytes, folder: str = "INBOX") -> int:
        """APPEND ``raw`` to ``folder`` of ``user``; return its UID (from APPENDUID)."""
        async with self.session(user, password, folder=None) as client:
            response = await client.append(raw, mailbox=_imap_quote(folder))
        if response.result != "OK":
            raise RuntimeError(f"APPEND to {folder} failed: {response.lines!r}")
        for line in response.lines:
            match = _APPENDUID_RE.search(bytes(line))
            if match:
                return int(match.group(2))
        raise RuntimeError(f"APPEND gave no APPENDUID: {response.lines!r}")

    async def uidvalidity(self, user: str, password: str, folder: str = "INBOX") -> int:
        """The UIDVALIDITY of ``folder`` of ``user`` (via STATUS)."""
        async with self.session(user, password, folder=None) as client:
            response = await client.status(_imap_quote(folder), "(UIDVALIDITY)")
        for line in response.lines:
            match = _UIDVALIDITY_RE.search(bytes(line))
            if match:
                return int(match.group(1))
        raise RuntimeError(f"STATUS gave no UIDVALIDITY: {response.lines!r}")


async def close_imap(client: aioimaplib.IMAP4) -> None:
    """LOGOUT if still connected, then close the socket without waiting for the server's EOF."""
    protocol = client.protocol
    try:
        if protocol is not None and protocol.state in ("NONAUTH", "AUTH", "SELECTED"):
            with contextlib.suppress(Exception):
                await wait_for(client.logout(), 5)
    finally:
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.close()
            await asyncio.sleep(0)  # let the transport's connection_lost run on this loop
