"""The mail section (IMAP mailboxes, SMTP, sending limits) and mail links."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config.base import (
    LOOPBACK_HOSTS,
    ConfigError,
    _ca_file,
    _int,
    _number,
    _password,
    _room_id,
    _string,
    _type_name,
)
from bridge.core.links import LinkSettings
from bridge.core.marking import MAX_LABEL, Levels, normalise

_MAIL_ADDRESS = re.compile(r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$")


@dataclass(frozen=True)
class MailboxSettings:
    """An IMAP mailbox the bridge may read, by the list address it receives."""

    address: str
    host: str
    port: int
    tls: str  # "tls", "starttls" or "none"
    user: str
    password: str = field(repr=False)
    folder: str = "INBOX"
    ca_file: str | None = None


@dataclass(frozen=True)
class SmtpSettings:
    """The SMTP server Matrix messages are submitted to."""

    host: str
    port: int
    tls: str  # "tls", "starttls" or "none"
    user: str | None
    password: str | None = field(repr=False)
    ca_file: str | None
    timeout: float


ON_SENT = ("none", "reaction")


@dataclass(frozen=True)
class TrustSettings:
    """Who vouches for a mail's sender: the agency MTA's Authentication-Results (pinned by
    authserv-id), and optionally the bridge's own DKIM check when they say nothing."""

    authserv_ids: tuple[str, ...] = ()
    verify_dkim: bool = False
    dns_server: tuple[str, int] | None = None  # (IP address, port); None: the system's
    dns_timeout: float = 5.0


_DEFAULT_LEVELS = ("NON PROTÉGÉ", "DIFFUSION RESTREINTE", "SECRET", "TRÈS SECRET")


@dataclass(frozen=True)
class MarkingSettings:
    """Classification markings: the ordered levels (lowest first) and the header that carries
    a mail's marking, in and out."""

    levels: Levels = field(default_factory=lambda: Levels(_DEFAULT_LEVELS))
    header: str = "X-Classification"


@dataclass(frozen=True)
class BounceSettings:
    """Where delivery reports (bounces) of the bridge's mail come back, and how they name the
    mail: a VERP envelope sender ``local+TOKEN@domain``, the token naming the outbox item."""

    verp: bool = True
    address: str | None = None  # the envelope sender's base; None: the link's from_address
    mailbox: str | None = None  # one of mail.mailboxes that receives only delivery reports


@dataclass(frozen=True)
class BackfillSettings:
    """mail.backfill: how a history import paces itself and reports."""

    max_rate: float = 0.0  # mails per second; 0: no limit
    progress_interval: float = 5.0


@dataclass(frozen=True)
class MailConfig:
    mailboxes: dict[str, MailboxSettings]
    poll_interval: float
    max_message_size: int
    max_depth: int
    max_parts: int
    max_attempts: int
    smtp: SmtpSettings | None = None  # None: Matrix → mail is off
    from_address: str | None = None
    retry_delays: tuple[float, ...] = (30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
    give_up_after: float = 172800.0
    max_attachment_size: int = 10485760
    on_sent: str = "none"
    trust: TrustSettings = TrustSettings()
    markings: MarkingSettings = MarkingSettings()
    bounces: BounceSettings = BounceSettings()
    backfill: BackfillSettings = BackfillSettings()
    max_imap_connections: int = 100


@dataclass(frozen=True)
class LinkSpec:
    """A link declared in the config file."""

    room_id: str
    address: str
    allowed_senders: tuple[str, ...]
    thread_mode: str
    from_address: str | None = None
    send_edits: bool = True
    egress_domains: tuple[str, ...] = ()
    require_authenticated: tuple[str, ...] | None = None
    marking: str | None = None

    def settings(self) -> LinkSettings:
        return LinkSettings(
            allowed_senders=self.allowed_senders,
            thread_mode=self.thread_mode,
            from_address=self.from_address,
            send_edits=self.send_edits,
            egress_domains=self.egress_domains,
            require_authenticated=self.require_authenticated,
            marking=self.marking,
        )


def mail_address(key: str, value: Any) -> str:
    """A list or mailbox address as the config writes it: plain, lowercase, one '@'."""
    if not isinstance(value, str) or not _MAIL_ADDRESS.fullmatch(value.strip().lower()):
        raise ConfigError(key, "must be a plain mail address like list@agency.example.org")
    return value.strip().lower()


def _mailbox(address: str, value: Any, config_dir: Path | None) -> MailboxSettings:
    key = f"mail.mailboxes.{address}"
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, not {_type_name(value)}")
    known = {"host", "port", "tls", "user", "password", "password_file", "folder", "ca_file"}
    for name in value:
        if name not in known:
            raise ConfigError(f"{key}.{name}", "unknown key")
    raw = {"m": dict(value)}
    host = _string(raw, "m.host") if "host" in value else ""
    if not host:
        raise ConfigError(f"{key}.host", "is required")
    tls, port = _tls_and_port(key, value, host, default_tls="tls", ports=_IMAP_PORTS)
    user = value.get("user")
    if not isinstance(user, str) or not user:
        raise ConfigError(f"{key}.user", "is required")
    password = _password(key, value, config_dir)
    if password is None:
        raise ConfigError(f"{key}.password", "set exactly one of password and password_file")
    folder = value.get("folder", "INBOX")
    if not isinstance(folder, str) or not folder or not folder.isprintable():
        raise ConfigError(f"{key}.folder", "must be a folder name")
    ca_file = _ca_file(key, value)
    return MailboxSettings(
        address=address,
        host=host,
        port=port,
        tls=tls,
        user=user,
        password=password,
        folder=folder,
        ca_file=ca_file,
    )


_IMAP_PORTS = {"tls": 993, "starttls": 143, "none": 143}
_SMTP_PORTS = {"tls": 465, "starttls": 587, "none": 25}


def _tls_and_port(
    key: str,
    value: Mapping[str, Any],
    host: str,
    *,
    default_tls: str | None,
    ports: dict[str, int],
) -> tuple[str, int]:
    """A server's TLS mode (cleartext only on this machine) and port (by mode if not given)."""
    tls = value.get("tls", default_tls)
    if tls not in ("tls", "starttls", "none"):
        raise ConfigError(f"{key}.tls", "must be tls, starttls or none")
    if tls == "none" and host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"{key}.tls", "none (cleartext) is only allowed for a server on this machine"
        )
    port = value.get("port")
    if port is None:
        port = ports[tls]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{key}.port", "must be a port number")
    return tls, port


def _smtp(raw: dict[str, Any], config_dir: Path | None) -> SmtpSettings | None:
    key = "mail.smtp"
    value = raw["mail"]["smtp"]
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, not {_type_name(value)}")
    known = {"host", "port", "tls", "user", "password", "password_file", "ca_file", "timeout"}
    for name in value:
        if name not in known:
            raise ConfigError(f"{key}.{name}", "unknown key")
    host = value.get("host")
    if host is None:
        return None
    if not isinstance(host, str) or not host or not host.isprintable() or " " in host:
        raise ConfigError(f"{key}.host", "must be a host name, or null to send no mail")
    tls, port = _tls_and_port(key, value, host, default_tls=None, ports=_SMTP_PORTS)
    user = value.get("user")
    if user is not None and (not isinstance(user, str) or not user or not user.isprintable()):
        raise ConfigError(f"{key}.user", "must be a user name or null")
    password = _password(key, value, config_dir)
    if (user is None) != (password is None):
        raise ConfigError(f"{key}.password", "user and a password go together")
    ca_file = _ca_file(key, value)
    return SmtpSettings(
        host=host,
        port=port,
        tls=tls,
        user=user,
        password=password,
        ca_file=ca_file,
        timeout=_number(raw, f"{key}.timeout", 1, 600),
    )


def _retry_delays(value: Any) -> tuple[float, ...]:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= 50
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0.1 <= v <= 86400
            for v in value
        )
    ):
        raise ConfigError(
            "mail.retry_delays", "must be a list of 1 to 50 delays in seconds (0.1 to 86400)"
        )
    return tuple(float(v) for v in value)


def _mail(raw: dict[str, Any], config_dir: Path | None) -> MailConfig:
    boxes = raw["mail"]["mailboxes"]
    if not isinstance(boxes, Mapping):
        raise ConfigError("mail.mailboxes", f"must be a mapping, not {_type_name(boxes)}")
    mailboxes = {}
    for address, value in boxes.items():
        canonical = mail_address(f"mail.mailboxes.{address}", address)
        mailboxes[canonical] = _mailbox(canonical, value, config_dir)
    smtp = _smtp(raw, config_dir)
    from_value = raw["mail"]["from_address"]
    from_address = None if from_value is None else mail_address("mail.from_address", from_value)
    if smtp is not None and from_address is None:
        raise ConfigError("mail.from_address", "is required when mail.smtp.host is set")
    on_sent = raw["mail"]["on_sent"]
    if on_sent not in ON_SENT:
        raise ConfigError("mail.on_sent", "must be none or reaction")
    return MailConfig(
        mailboxes=mailboxes,
        poll_interval=_number(raw, "mail.poll_interval", 1, 3600),
        max_message_size=_int(raw, "mail.max_message_size", 1024, 1 << 31),
        max_depth=_int(raw, "mail.max_depth", 1, 50),
        max_parts=_int(raw, "mail.max_parts", 1, 1000),
        max_attempts=_int(raw, "mail.max_attempts", 1, 100),
        smtp=smtp,
        from_address=from_address,
        retry_delays=_retry_delays(raw["mail"]["retry_delays"]),
        give_up_after=_number(raw, "mail.give_up_after", 0, 365 * 86400),
        max_attachment_size=_int(raw, "mail.max_attachment_size", 0, 1 << 30),
        on_sent=on_sent,
        trust=_trust(raw["mail"]["trust"]),
        markings=_markings(raw["mail"]["markings"]),
        bounces=_bounces(raw["mail"]["bounces"], mailboxes),
        backfill=BackfillSettings(
            max_rate=_number(raw, "mail.backfill.max_rate", 0, 100000),
            progress_interval=_number(raw, "mail.backfill.progress_interval", 0.5, 3600),
        ),
        max_imap_connections=_int(raw, "mail.max_imap_connections", 1, 100000),
    )


_FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,60}")  # as bridge.mail.compose writes one
# Headers the bridge writes itself or that mean something else: never a marking header.
_RESERVED_HEADERS = frozenset(
    {
        "from", "to", "cc", "bcc", "reply-to", "sender", "subject", "date", "message-id",
        "in-reply-to", "references", "mime-version", "content-type", "content-disposition",
        "content-transfer-encoding", "content-id", "x-auto-response-suppress",
        "x-passerelle-loop", "received", "return-path", "authentication-results",
        "dkim-signature", "arc-seal", "arc-message-signature", "arc-authentication-results",
    }
)  # fmt: skip


def _markings(value: Any) -> MarkingSettings:
    key = "mail.markings"
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, not {_type_name(value)}")
    for name in value:
        if name not in ("levels", "header"):
            raise ConfigError(f"{key}.{name}", "unknown key")
    levels = value.get("levels")
    problem = "must be a list of 1 to 20 levels, lowest first, like [DIFFUSION RESTREINTE, SECRET]"
    if (
        not isinstance(levels, list)
        or not 1 <= len(levels) <= 20
        or not all(_level_label(level) for level in levels)
    ):
        raise ConfigError(f"{key}.levels", problem)
    names = tuple(" ".join(level.split()) for level in levels)
    keys = [normalise(name) for name in names]
    for i, name in enumerate(keys):
        if name in keys[:i]:
            raise ConfigError(
                f"{key}.levels",
                f"“{names[i]}” is listed twice (case, accents and spaces do not count)",
            )
    header = value.get("header")
    if (
        not isinstance(header, str)
        or not _FIELD_NAME.fullmatch(header)
        or header.lower() in _RESERVED_HEADERS
    ):
        raise ConfigError(
            f"{key}.header", "must be a header name of its own, like X-Classification"
        )
    return MarkingSettings(levels=Levels(names), header=header)


def _level_label(value: Any) -> bool:
    """A level as the config may write it: printable, no brackets, not blank, not too long."""
    return (
        isinstance(value, str)
        and value.isprintable()
        and bool(normalise(value))
        and len(value) <= MAX_LABEL
        and not any(c in value for c in "[]")
    )


def _bounces(value: Any, mailboxes: Mapping[str, MailboxSettings]) -> BounceSettings:
    key = "mail.bounces"
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, not {_type_name(value)}")
    for name in value:
        if name not in ("verp", "address", "mailbox"):
            raise ConfigError(f"{key}.{name}", "unknown key")
    verp = value.get("verp", True)
    if not isinstance(verp, bool):
        raise ConfigError(f"{key}.verp", "must be true or false")
    address = value.get("address")
    if address is not None:
        address = mail_address(f"{key}.address", address)
        if "+" in address.partition("@")[0]:
            raise ConfigError(f"{key}.address", "must not contain '+' (it starts the token)")
    mailbox = value.get("mailbox")
    if mailbox is not None:
        mailbox = mail_address(f"{key}.mailbox", mailbox)
        if mailbox not in mailboxes:
            raise ConfigError(f"{key}.mailbox", "is not one of mail.mailboxes")
    return BounceSettings(verp=verp, address=address, mailbox=mailbox)


_AUTHSERV_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,253}[A-Za-z0-9])?$")


def _trust(value: Any) -> TrustSettings:
    key = "mail.trust"
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, not {_type_name(value)}")
    ids = value.get("authserv_id", [])
    if isinstance(ids, str):
        ids = [ids]
    if not isinstance(ids, list) or not all(
        isinstance(i, str) and _AUTHSERV_ID.fullmatch(i) for i in ids
    ):
        raise ConfigError(
            f"{key}.authserv_id",
            "must be a list of the agency MTA's authserv-ids (host names like mx.agency.gouv.fr)",
        )
    verify = value.get("verify_dkim", False)
    if not isinstance(verify, bool):
        raise ConfigError(f"{key}.verify_dkim", "must be true or false")
    timeout = value.get("dns_timeout", 5)
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not number or not 0.1 <= timeout <= 60:
        raise ConfigError(f"{key}.dns_timeout", "must be a number of seconds (0.1 to 60)")
    return TrustSettings(
        authserv_ids=tuple(dict.fromkeys(i.lower() for i in ids)),
        verify_dkim=verify,
        dns_server=parse_dns_server(f"{key}.dns_server", value.get("dns_server")),
        dns_timeout=float(timeout),
    )


def parse_dns_server(key: str, value: Any) -> tuple[str, int] | None:
    """An IP address, with an optional port: 192.0.2.1, 192.0.2.1:5353, [2001:db8::1]:53."""
    if value is None:
        return None
    problem = "must be an IP address, optionally with :port (e.g. 10.0.0.53 or [::1]:5353)"
    if not isinstance(value, str):
        raise ConfigError(key, problem)
    host, port = value, 53
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ConfigError(key, problem)
            port = int(rest[1:])
    elif value.count(":") == 1:
        host, _, text = value.partition(":")
        if not text.isdigit():
            raise ConfigError(key, problem)
        port = int(text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(key, problem) from None
    if not 0 < port < 65536:
        raise ConfigError(key, problem)
    return str(address), port


def check_sender_patterns(key: str, value: Any) -> tuple[str, ...]:
    from bridge.core.policy import DomainPattern

    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "must be a list of domains like gouv.fr or *.gouv.fr")
    for pattern in value:
        try:
            DomainPattern.parse(pattern)
        except ValueError as e:
            raise ConfigError(key, f"{pattern[:100]!r}: {e}") from None
    return tuple(value)


LINK_KEYS = (
    "room",
    "address",
    "allowed_senders",
    "thread_mode",
    "from_address",
    "send_edits",
    "egress_domains",
    "require_authenticated",
    "marking",
)


def _mail_link(key: str, entry: Mapping[str, Any], mail: MailConfig, seen: set[str]) -> LinkSpec:
    """One `links:` entry with an address: a room linked to one of mail.mailboxes."""
    for name in entry:
        if name not in LINK_KEYS:
            raise ConfigError(f"{key}.{name}", "unknown key")
    room = _room_id(f"{key}.room", entry.get("room"))
    address = mail_address(f"{key}.address", entry.get("address"))
    if address not in mail.mailboxes:
        raise ConfigError(f"{key}.address", "is not one of mail.mailboxes")
    if address in seen:
        raise ConfigError(f"{key}.address", "is linked twice")
    if address == mail.bounces.mailbox:
        raise ConfigError(f"{key}.address", "is mail.bounces.mailbox, which is never linked")
    seen.add(address)
    mode = entry.get("thread_mode", "threads")
    if mode not in ("threads", "flat"):
        raise ConfigError(f"{key}.thread_mode", "must be threads or flat")
    senders = check_sender_patterns(f"{key}.allowed_senders", entry.get("allowed_senders", []))
    link_from = entry.get("from_address")
    if link_from is not None:
        link_from = mail_address(f"{key}.from_address", link_from)
    edits = entry.get("send_edits", True)
    if not isinstance(edits, bool):
        raise ConfigError(f"{key}.send_edits", "must be true or false")
    egress = check_sender_patterns(f"{key}.egress_domains", entry.get("egress_domains", []))
    required = entry.get("require_authenticated")
    if required is not None:
        required = check_sender_patterns(f"{key}.require_authenticated", required)
    marking = entry.get("marking")
    if marking is not None:
        canonical = mail.markings.levels.canonical(marking) if isinstance(marking, str) else None
        if canonical is None:
            known = ", ".join(mail.markings.levels.names)
            raise ConfigError(f"{key}.marking", f"must be one of mail.markings.levels ({known})")
        marking = canonical
    return LinkSpec(
        room,
        address,
        senders,
        mode,
        link_from,
        edits,
        egress,
        require_authenticated=required,
        marking=marking,
    )
