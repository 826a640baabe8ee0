"""A throw-away Postfix accepting SMTP on loopback and handing the test domain to LMTP."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from bridge.harness.dovecot import make_runtime_dir
from bridge.harness.ports import free_port

_ETC = Path("/etc/postfix")
# master.cf columns: service type private unpriv chroot wakeup maxproc command
_SERVICE_RE = re.compile(r"^(\S+)(\s+)(\S+)(\s+)(\S+)(\s+)(\S+)(\s+)(\S+)(\s+)(.*)$")


def _rewrite_master_cf(text: str, smtp_port: int) -> str:
    """Debian's master.cf with smtpd on ``127.0.0.1:smtp_port`` and no chroot anywhere."""
    out: list[str] = []
    for line in text.splitlines():
        match = _SERVICE_RE.match(line)
        if line.startswith(("#", " ", "\t")) or not match:
            out.append(line)
            continue
        parts = list(match.groups())
        service, kind = parts[0], parts[2]
        if kind == "inet":
            if service not in ("smtp", "25"):
                continue  # no other listener in tests (none is enabled by default anyway)
            parts[0] = f"127.0.0.1:{smtp_port}"
        parts[8] = "n"  # chroot column
        out.append("".join(parts))
    return "\n".join(out) + "\n"


@dataclass
class PostfixServer:
    """Postfix with its own config directory, queue and data directory.

    ``base_dir`` holds the config and logs; the queue and data directories, which Postfix's
    unprivileged processes (and the master, for its lock) reach by absolute path, live in
    ``runtime_dir`` under /tmp (linked as ``base_dir/runtime``; see ``make_runtime_dir``).
    When this object is garbage-collected a master still running is stopped and that directory
    deleted.

    Mail for ``domain`` is relayed to ``lmtp_host:lmtp_port`` (Dovecot's LMTP listener); other
    domains are refused at RCPT time (550, there is no outbound mail). Mail to an unknown user of
    ``domain`` is accepted, refused by Dovecot's LMTP (550 5.1.1) and bounced by Postfix with a
    real delivery report to the envelope sender. Several instances can run at once.

    ``milters`` (e.g. ``["unix:/path/opendkim.sock"]``, run in that order) become
    ``smtpd_milters`` and ``non_smtpd_milters``; a milter that does not answer makes Postfix
    temp-fail the mail (``milter_default_action = tempfail``) rather than deliver it unchecked.
    With ``xclient``, loopback clients may send ``XCLIENT ADDR=...`` to appear to Postfix and
    its milters as a remote host (SPF checks pass any loopback client unconditionally).
    """

    base_dir: Path
    smtp_port: int = 0
    lmtp_port: int = 0
    domain: str = "example.test"
    lmtp_host: str = "127.0.0.1"
    milters: list[str] = field(default_factory=list)
    xclient: bool = False
    # Virtual aliases, as a mailing list expands: address → the addresses it is delivered to
    # (an address may list itself). Read at start.
    aliases: dict[str, list[str]] = field(default_factory=dict)
    host: str = field(default="127.0.0.1", init=False)
    runtime_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        if self.lmtp_port <= 0:
            raise ValueError("lmtp_port is required (pass DovecotServer.lmtp_port)")
        self.base_dir = Path(self.base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = make_runtime_dir("passerelle-postfix-")
        weakref.finalize(self, _discard, self.queue_dir, self.runtime_dir)
        link = self.base_dir / "runtime"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(self.runtime_dir)
        if self.smtp_port == 0:
            self.smtp_port = free_port()

    # -- paths ----------------------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        """The directory passed to ``postfix -c``."""
        return self.base_dir / "etc"

    @property
    def queue_dir(self) -> Path:
        """queue_directory."""
        return self.runtime_dir / "spool"

    @property
    def data_dir(self) -> Path:
        """data_directory (master.lock lives here)."""
        return self.runtime_dir / "data"

    @property
    def log_path(self) -> Path:
        """maillog_file, written by postlogd."""
        return self.base_dir / "postfix.log"

    @property
    def console_path(self) -> Path:
        """What postfix-script printed on its terminal (the only place start-up errors show)."""
        return self.base_dir / "postfix.console"

    # -- lifecycle ------------------------------------------------------------------------------

    def _write_config(self) -> None:
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.queue_dir, 0, 0)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        shutil.copyfile(_ETC / "dynamicmaps.cf", self.config_dir / "dynamicmaps.cf")
        master_cf = _rewrite_master_cf((_ETC / "master.cf").read_text(), self.smtp_port)
        (self.config_dir / "master.cf").write_text(master_cf)
        name = f"postfix-{self.smtp_port}"
        main_cf = f"""\
# Generated by bridge.harness.postfix; nothing is read from /etc/postfix/main.cf.
compatibility_level = 3.6
config_directory = {self.config_dir}
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
syslog_name = {name}
maillog_file = {self.log_path}
maillog_file_prefixes = {self.base_dir}
myhostname = mx.{self.domain}
mydomain = {self.domain}
myorigin = $myhostname
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
smtputf8_enable = yes
smtpd_banner = $myhostname ESMTP {name}
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
virtual_mailbox_domains = {self.domain}
virtual_transport = lmtp:inet:{self.lmtp_host}:{self.lmtp_port}
default_transport = error:no outbound mail in tests
relay_transport = error:no outbound mail in tests
in_flow_delay = 0s
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
"""
        if self.milters:
            milters = ", ".join(self.milters)
            main_cf += f"""\
smtpd_milters = {milters}
non_smtpd_milters = {milters}
milter_default_action = tempfail
milter_protocol = 6
"""
        if self.xclient:
            main_cf += "smtpd_authorized_xclient_hosts = 127.0.0.0/8\n"
        if self.aliases:
            lines = [f"{a} {', '.join(targets)}" for a, targets in self.aliases.items()]
            (self.config_dir / "virtual").write_text("\n".join(lines) + "\n")
            main_cf += f"virtual_alias_maps = texthash:{self.config_dir}/virtual\n"
        (self.config_dir / "main.cf").write_text(main_cf)
        # Postfix will not read a dictionary file changed within the last second or two: it polls
        # every 0.3 s until the file looks settled (≈ 2 s per start). Backdate what we wrote.
        past = time.time() - 60
        for name in ("main.cf", "master.cf", "dynamicmaps.cf", "virtual"):
            if not (self.config_dir / name).exists():
                continue
            os.utime(self.config_dir / name, (past, past))

    @property
    def pid_path(self) -> Path:
        """The master's pid file."""
        return self.queue_dir / "pid" / "master.pid"

    @property
    def running(self) -> bool:
        """Whether this instance's master process is alive."""
        return _master_pid(self.queue_dir) is not None

    def start(self, timeout: float = 30) -> None:
        """Write the config, ``postfix -c DIR start``, wait for the SMTP banner.

        Postfix reports start-up errors on its stderr only when that is a terminal, and to syslog
        otherwise (which does not run here): stderr is a pty, whose output is kept in
        ``console_path``; on failure the RuntimeError quotes it and the ``fatal:`` lines of the
        mail log (the master's own reason, e.g. a port in use, only appears there).
        """
        if self.running:
            return
        first = not (self.queue_dir / "pid").is_dir()
        self._write_config()
        if not first:
            # Skip the slow integrity checks (post-install, postsuper, find) on a restart.
            (self.queue_dir / "quick-start").touch()
        log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
        code, console = _run_on_pty(
            [shutil.which("postfix") or "/usr/sbin/postfix", "-c", str(self.config_dir), "start"],
            timeout,
        )
        with self.console_path.open("a") as out:
            out.write(console)
        if code != 0 or "fatal:" in console:
            raise RuntimeError(
                f"postfix start failed (status {code})\n{self._diagnostics(console, log_size)}"
            )
        deadline = time.monotonic() + timeout
        while not self._greets():
            if time.monotonic() > deadline:
                diagnostics = self._diagnostics(console, log_size)
                self.stop()
                raise RuntimeError(
                    f"postfix gave no SMTP banner on port {self.smtp_port} within {timeout} s\n"
                    f"{diagnostics}"
                )
            time.sleep(0.05)

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.smtp_port), timeout=2) as sock:
                banner = sock.recv(512)
                with contextlib.suppress(OSError):
                    sock.sendall(b"QUIT\r\n")
                    sock.recv(512)
                return banner.startswith(b"220")
        except OSError:
            return False

    def _diagnostics(self, console: str, log_offset: int = 0) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(log_offset)
                log_text = log.read().decode(errors="replace")
        except OSError:
            log_text = ""
        fatal = [
            line for line in (*console.splitlines(), *log_text.splitlines()) if "fatal:" in line
        ]
        tail = "\n".join(log_text.splitlines()[-30:])
        return (
            "\n".join(fatal)
            + f"\n--- console ---\n{console.strip()}\n--- {self.log_path.name} ---\n{tail}"
        )

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the master (it takes its children down), then wait; harmless if not running.

        Same as ``postfix stop`` but polls every 20 ms instead of every second.
        """
        _stop_master(self.queue_dir, timeout)

    def restart(self) -> None:
        """Stop and start again on the same port, keeping the queue."""
        self.stop()
        self.start()


def _alive(pid: int, queue_dir: Path) -> bool:
    """Whether ``pid`` is the running master of the instance whose queue is ``queue_dir``.

    Not gone, not a zombie awaiting its reaper, and (against pid reuse) a process whose working
    directory is that queue: the master chdir()s there.
    """
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    state = stat_line.rpartition(")")[2].split()[0]
    return state not in ("Z", "X") and Path(cwd) == queue_dir


def _master_pid(queue_dir: Path) -> int | None:
    """The pid of the live master of the instance whose queue is ``queue_dir``, if any."""
    try:
        pid = int((queue_dir / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid, queue_dir) else None


def _stop_master(queue_dir: Path, timeout: float) -> None:
    """SIGTERM the master (it takes its process group down) and wait; SIGKILL the group late."""
    pid = _master_pid(queue_dir)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid, queue_dir):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.02)


def _discard(queue_dir: Path, runtime_dir: Path) -> None:
    """Finalizer: stop a master still running, delete the runtime directory."""
    _stop_master(queue_dir, 10)
    shutil.rmtree(runtime_dir, ignore_errors=True)


def _run_on_pty(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pty; return its status and what it printed."""
    primary, secondary = os.openpty()
    output = bytearray()
    try:
        os.set_blocking(primary, False)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
        os.close(secondary)
        secondary = -1
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            _drain(primary, output)
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(
                    f"{' '.join(argv)} did not finish within {timeout} s:\n"
                    + output.decode(errors="replace")
                )
            time.sleep(0.02)
        _drain(primary, output)
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    return proc.returncode, output.decode(errors="replace").replace("\r\n", "\n")


def _drain(fd: int, into: bytearray) -> None:
    """Read what the pty holds without blocking (EIO: every writer has closed it)."""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EIO:
                return
            raise
        if not chunk:
            return
        into += chunk
