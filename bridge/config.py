"""Configuration: defaults from example-config.yaml, the user's file, env overrides, validation."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from bridge.core.ids import UserID
from bridge.core.links import LinkSettings
from bridge.core.permissions import PermissionLevel, PermissionTable

ENV_PREFIX = "PASSERELLE_"
TOKEN_PLACEHOLDER = "generate"
MIN_TOKEN_LENGTH = 32
# Values that only exist in the example file and must be replaced before the bridge runs.
PLACEHOLDER_DOMAIN = "example.invalid"
# Sections whose keys are free-form: the user's mapping replaces the default one whole.
FREE_FORM = {("permissions",), ("logging", "loggers"), ("mail", "mailboxes")}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_MAIL_ADDRESS = re.compile(r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$")
EXAMPLE_CONFIG = Path(__file__).resolve().parent / "example-config.yaml"

_SERVER_NAME = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(?::[0-9]{1,5})?$"
)
_MXID = re.compile(r"^@[a-z0-9._=\-/+]+:(.+)$")
_LOCALPART = re.compile(r"^[a-z0-9._=\-/+]+$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """A problem in the configuration, naming the key it is about."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class HomeserverConfig:
    address: str
    domain: str
    verify_ssl: bool
    request_timeout: float


@dataclass(frozen=True)
class AppserviceConfig:
    id: str
    address: str
    hostname: str
    port: int
    bot_username: str
    bot_displayname: str
    command_prefix: str
    ghost_username_template: str
    as_token: str = field(repr=False)
    hs_token: str = field(repr=False)
    max_body_size: int
    max_event_attempts: int


@dataclass(frozen=True)
class DatabaseConfig:
    url: str
    pool_size: int


@dataclass(frozen=True)
class LoggingConfig:
    level: str
    loggers: dict[str, str]
    file: str | None


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

    def settings(self) -> LinkSettings:
        return LinkSettings(
            allowed_senders=self.allowed_senders,
            thread_mode=self.thread_mode,
            from_address=self.from_address,
            send_edits=self.send_edits,
            egress_domains=self.egress_domains,
        )


@dataclass(frozen=True)
class Config:
    homeserver: HomeserverConfig
    appservice: AppserviceConfig
    database: DatabaseConfig
    permissions: PermissionTable
    logging: LoggingConfig
    mail: MailConfig
    links: tuple[LinkSpec, ...]
    path: Path | None = None
    warnings: tuple[str, ...] = ()
    env_overrides: tuple[str, ...] = field(default=())

    @property
    def bot_mxid(self) -> UserID:
        return UserID(f"@{self.appservice.bot_username}:{self.homeserver.domain}")

    def ghost_mxid(self, localpart: str) -> UserID:
        name = self.appservice.ghost_username_template.format(localpart=localpart)
        return UserID(f"@{name}:{self.homeserver.domain}")

    @property
    def ghost_regex(self) -> str:
        """Fully anchored regex for every ghost user ID."""
        prefix, suffix = self.appservice.ghost_username_template.split("{localpart}")
        domain = re.escape(self.homeserver.domain)
        return f"^@{re.escape(prefix)}[a-z0-9._=/+-]+{re.escape(suffix)}:{domain}$"

    @property
    def alias_regex(self) -> str:
        prefix = self.appservice.ghost_username_template.split("{localpart}")[0]
        return f"^#{re.escape(prefix)}.+:{re.escape(self.homeserver.domain)}$"

    def is_ghost(self, mxid: str) -> bool:
        return re.fullmatch(self.ghost_regex, mxid) is not None

    @property
    def message_id_secret(self) -> bytes:
        """The key that tags the bridge's own Message-IDs, derived from the as_token (so it
        needs no storage of its own; a new token means earlier mails are no longer
        recognised by their ID, only by the Message-ID map)."""
        token = self.appservice.as_token.encode("utf-8")
        return hmac.new(token, b"passerelle message-id tag", hashlib.sha256).digest()

    def secrets(self) -> list[str]:
        """Values that must never reach a log line."""
        values = [self.appservice.as_token, self.appservice.hs_token]
        values += [m.password for m in self.mail.mailboxes.values()]
        if self.mail.smtp is not None and self.mail.smtp.password:
            values.append(self.mail.smtp.password)
        password = urlsplit(self.database.url).password
        if password:
            values.append(password)
        return [v for v in values if v and v != TOKEN_PLACEHOLDER]


def yaml_loader() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.indent(mapping=4, sequence=4, offset=2)
    return yaml


def read_yaml_file(path: Path) -> Any:
    """Parse a YAML file, turning every failure into a one-line ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("(file)", f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("(file)", f"cannot read {path}: {e}") from None
    try:
        return yaml_loader().load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        duplicate = re.search(r'duplicate key "([^"]*)"', problem)
        if duplicate:
            # ruamel's message quotes both values: they may be tokens.
            problem = f"duplicate key {duplicate.group(1)!r}"
        raise ConfigError("(file)", f"{path} is not valid YAML{where}: {problem}") from None


def _plain(value: Any) -> Any:
    """Turn ruamel's round-trip containers into plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _merge(
    defaults: dict[str, Any], user: Mapping[str, Any], path: tuple[str, ...], warnings: list[str]
) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in user.items():
        key_path = (*path, str(key))
        dotted = ".".join(key_path)
        if key not in defaults:
            if not path:
                warnings.append(f"unknown top-level key {key!r} is ignored")
                continue
            raise ConfigError(
                dotted, "unknown key (check the spelling against the example config)"
            )
        default = defaults[key]
        if isinstance(default, dict) and key_path not in FREE_FORM:
            if not isinstance(value, Mapping):
                raise ConfigError(dotted, f"must be a mapping, not {_type_name(value)}")
            merged[key] = _merge(default, value, key_path, warnings)
        else:
            merged[key] = _plain(value)
    return merged


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    applied = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(parts) < 2 or not all(parts):
            raise ConfigError(name, "environment override must be PASSERELLE_<SECTION>__<KEY>")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                raise ConfigError(name, f"no section {'.'.join(parts[: i + 1])!r} to override")
            node = child
        leaf = parts[-1]
        if leaf not in node and tuple(parts[:-1]) not in FREE_FORM:
            raise ConfigError(name, f"no key {'.'.join(parts)!r} to override")
        try:
            value = YAML(typ="safe").load(io.StringIO(env[name]))
        except YAMLError:
            value = env[name]
        if value is None and env[name].strip() not in ("null", "~"):
            value = env[name]
        node[leaf] = value
        applied.append(".".join(parts))
    return applied


def _type_name(value: Any) -> str:
    """Plain YAML-ish names, whatever class the parser used (ruamel has its own)."""
    for kind, name in (
        (type(None), "null"),
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (Mapping, "a mapping"),
        (list, "a list"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node[part]
    return node


def _string(raw: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = _get(raw, key)
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise ConfigError(key, "must not be empty")
    return value


def _int(raw: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = _get(raw, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, not {_type_name(value)}")
    if not lo <= value <= hi:
        raise ConfigError(key, f"must be between {lo} and {hi}, not {value}")
    return value


def _number(raw: dict[str, Any], key: str, lo: float, hi: float) -> float:
    value = _get(raw, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, not {_type_name(value)}")
    if not lo <= value <= hi:
        raise ConfigError(key, f"must be between {lo} and {hi}, not {value}")
    return float(value)


def _bool(raw: dict[str, Any], key: str) -> bool:
    value = _get(raw, key)
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, not {_type_name(value)}")
    return value


def _http_url(raw: dict[str, Any], key: str) -> str:
    value = _string(raw, key)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise ConfigError(key, f"is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"must be an http:// or https:// URL with a host, not {value!r}")
    if port == 0:
        raise ConfigError(key, "has port 0")
    if parts.query or parts.fragment:
        raise ConfigError(key, "must not contain a query or fragment")
    return value.rstrip("/")


def _token(raw: dict[str, Any], key: str, require: bool) -> str:
    value = _string(raw, key)
    if value == TOKEN_PLACEHOLDER:
        if require:
            raise ConfigError(key, "is not set; run `passerelle generate-registration` first")
        return value
    if len(value) < MIN_TOKEN_LENGTH:
        raise ConfigError(key, f"is too short: at least {MIN_TOKEN_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(key, "must not contain spaces or control characters")
    return value


def normalise_database_url(key: str, url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        # Never echo it: it may hold a password.
        raise ConfigError(key, "is not a database URL (expected KIND://…)")
    try:
        urlsplit(url).port  # noqa: B018 - raises on a malformed host or port
    except ValueError:
        problem = "has a malformed host, port or password (percent-encode it)"
        raise ConfigError(key, problem) from None
    drivers = {
        "sqlite": "sqlite+aiosqlite",
        "sqlite+aiosqlite": "sqlite+aiosqlite",
        "postgres": "postgresql+asyncpg",
        "postgresql": "postgresql+asyncpg",
        "postgresql+asyncpg": "postgresql+asyncpg",
    }
    if scheme.lower() not in drivers:
        raise ConfigError(
            key,
            f"unsupported database kind {scheme!r}: use sqlite+aiosqlite:///FILE "
            "or postgresql+asyncpg://USER:PASSWORD@HOST/DB",
        )
    driver = drivers[scheme.lower()]
    if driver.startswith("sqlite") and (not rest.startswith("/") or rest == "/"):
        raise ConfigError(key, "a SQLite URL needs a file: sqlite+aiosqlite:///passerelle.db")
    return f"{driver}://{rest}"


def _permissions(raw: dict[str, Any]) -> PermissionTable:
    value = raw["permissions"]
    if not isinstance(value, dict):
        raise ConfigError("permissions", f"must be a mapping, not {_type_name(value)}")
    table: dict[str, PermissionLevel] = {}
    for who, level in value.items():
        key = f"permissions.{who}"
        if not isinstance(who, str) or not (
            who == "*" or _MXID.match(who) or _SERVER_NAME.match(who)
        ):
            raise ConfigError(key, "must be a user ID (@user:server), a server name or '*'")
        try:
            table[who.lower() if not who.startswith("@") else who] = PermissionLevel.parse(level)
        except ValueError:
            raise ConfigError(key, f"level must be 'user' or 'admin', not {level!r}") from None
    return PermissionTable(table)


def _logging(raw: dict[str, Any]) -> LoggingConfig:
    level = _string(raw, "logging.level").upper()
    if level not in _LOG_LEVELS:
        raise ConfigError("logging.level", f"must be one of {', '.join(_LOG_LEVELS)}")
    loggers = raw["logging"]["loggers"]
    if not isinstance(loggers, dict):
        raise ConfigError("logging.loggers", f"must be a mapping, not {_type_name(loggers)}")
    checked: dict[str, str] = {}
    for name, lvl in loggers.items():
        if not isinstance(lvl, str) or lvl.upper() not in _LOG_LEVELS:
            raise ConfigError(
                f"logging.loggers.{name}", f"must be one of {', '.join(_LOG_LEVELS)}"
            )
        checked[str(name)] = lvl.upper()
    file = raw["logging"]["file"]
    if file is not None and (not isinstance(file, str) or not file.strip()):
        raise ConfigError("logging.file", "must be a file path or null")
    return LoggingConfig(level=level, loggers=checked, file=file)


def _appservice(raw: dict[str, Any], require_tokens: bool) -> AppserviceConfig:
    bot = _string(raw, "appservice.bot_username")
    if not _LOCALPART.match(bot):
        raise ConfigError("appservice.bot_username", "must be a valid lowercase Matrix localpart")
    template = _string(raw, "appservice.ghost_username_template")
    if template.count("{localpart}") != 1 or "{" in template.replace("{localpart}", ""):
        raise ConfigError(
            "appservice.ghost_username_template", "must contain {localpart} exactly once"
        )
    prefix, suffix = template.split("{localpart}")
    if not prefix or not _LOCALPART.match(prefix + "x" + suffix):
        raise ConfigError(
            "appservice.ghost_username_template",
            "needs a fixed prefix before {localpart} and only localpart characters",
        )
    if re.fullmatch(re.escape(prefix) + r".+" + re.escape(suffix), bot):
        raise ConfigError("appservice.bot_username", "must not match the ghost username template")
    service_id = _string(raw, "appservice.id")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", service_id):
        raise ConfigError("appservice.id", "may only contain letters, digits, '.', '_' and '-'")
    prefix_cmd = _string(raw, "appservice.command_prefix")
    if any(c.isspace() for c in prefix_cmd):
        raise ConfigError("appservice.command_prefix", "must not contain spaces")
    as_token = _token(raw, "appservice.as_token", require_tokens)
    hs_token = _token(raw, "appservice.hs_token", require_tokens)
    if as_token == hs_token and as_token != TOKEN_PLACEHOLDER:
        raise ConfigError("appservice.hs_token", "must differ from appservice.as_token")
    return AppserviceConfig(
        id=service_id,
        address=_http_url(raw, "appservice.address"),
        hostname=_string(raw, "appservice.hostname"),
        port=_int(raw, "appservice.port", 1, 65535),
        bot_username=bot,
        bot_displayname=_string(raw, "appservice.bot_displayname"),
        command_prefix=prefix_cmd,
        ghost_username_template=template,
        as_token=as_token,
        hs_token=hs_token,
        max_body_size=_int(raw, "appservice.max_body_size", 1024, 1 << 30),
        max_event_attempts=_int(raw, "appservice.max_event_attempts", 1, 1000),
    )


def mail_address(key: str, value: Any) -> str:
    """A list or mailbox address as the config writes it: plain, lowercase, one '@'."""
    if not isinstance(value, str) or not _MAIL_ADDRESS.match(value.strip().lower()):
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


def _ca_file(key: str, value: Mapping[str, Any]) -> str | None:
    ca_file = value.get("ca_file")
    if ca_file is not None and not isinstance(ca_file, str):
        raise ConfigError(f"{key}.ca_file", "must be a file path or null")
    return ca_file


def _password(key: str, value: Mapping[str, Any], config_dir: Path | None) -> str | None:
    """The password given inline or in password_file (not both); None when neither."""
    password = value.get("password")
    password_file = value.get("password_file")
    if password is not None and password_file is not None:
        raise ConfigError(f"{key}.password", "set exactly one of password and password_file")
    if password_file is not None:
        if not isinstance(password_file, str):
            raise ConfigError(f"{key}.password_file", "must be a file path")
        path = Path(password_file)
        if not path.is_absolute() and config_dir is not None:
            path = config_dir / path
        try:
            password = path.read_text(encoding="utf-8").strip("\r\n")
        except OSError as e:
            raise ConfigError(f"{key}.password_file", f"cannot read it: {e.strerror}") from None
    if password is not None and (not isinstance(password, str) or not password):
        raise ConfigError(f"{key}.password", "must be a non-empty string")
    return password


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
    )


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
)


def _links(raw: dict[str, Any], mail: MailConfig) -> tuple[LinkSpec, ...]:
    value = raw["links"]
    if not isinstance(value, list):
        raise ConfigError("links", f"must be a list, not {_type_name(value)}")
    links = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        key = f"links[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(key, "must be a mapping with room and address")
        for name in entry:
            if name not in LINK_KEYS:
                raise ConfigError(f"{key}.{name}", "unknown key")
        room = entry.get("room")
        # Room versions 12 and later have room IDs without a server part: only the sigil.
        if (
            not isinstance(room, str)
            or not room.startswith("!")
            or not 1 < len(room) <= 255
            or not room.isprintable()
            or " " in room
        ):
            raise ConfigError(f"{key}.room", "must be a room ID like !abc:agency.example.org")
        address = mail_address(f"{key}.address", entry.get("address"))
        if address not in mail.mailboxes:
            raise ConfigError(f"{key}.address", "is not one of mail.mailboxes")
        if address in seen:
            raise ConfigError(f"{key}.address", "is linked twice")
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
        links.append(LinkSpec(room, address, senders, mode, link_from, edits, egress))
    return tuple(links)


def _homeserver(raw: dict[str, Any]) -> HomeserverConfig:
    address = _http_url(raw, "homeserver.address")
    domain = _string(raw, "homeserver.domain")
    for key, value in (("homeserver.address", address), ("homeserver.domain", domain)):
        if PLACEHOLDER_DOMAIN in value:
            raise ConfigError(key, f"still holds the example placeholder {value!r}; set it")
    if not _SERVER_NAME.match(domain):
        raise ConfigError("homeserver.domain", f"is not a valid server name: {domain!r}")
    return HomeserverConfig(
        address=address,
        domain=domain,
        verify_ssl=_bool(raw, "homeserver.verify_ssl"),
        request_timeout=_number(raw, "homeserver.request_timeout", 1, 600),
    )


def parse_config(
    user: Any,
    *,
    env: Mapping[str, str] | None = None,
    require_tokens: bool = True,
    path: Path | None = None,
) -> Config:
    """Validate a parsed user config (merged over the defaults) into a Config."""
    if user is None:
        user = {}
    if not isinstance(user, Mapping):
        raise ConfigError(
            "(file)", f"must hold a mapping at the top level, not {_type_name(user)}"
        )
    defaults = _plain(yaml_loader().load(EXAMPLE_CONFIG.read_text(encoding="utf-8")))
    warnings: list[str] = []
    raw = _merge(defaults, user, (), warnings)
    overrides = _apply_env(raw, os.environ if env is None else env)
    database_url = normalise_database_url("database.url", _string(raw, "database.url"))
    homeserver = _homeserver(raw)
    appservice = _appservice(raw, require_tokens)
    mail = _mail(raw, path.parent if path else None)
    address = urlsplit(appservice.address)
    if (
        address.hostname in ("127.0.0.1", "localhost", "::1")
        and (address.port or (443 if address.scheme == "https" else 80)) != appservice.port
    ):
        warnings.append(
            f"appservice.address ({appservice.address}) is on this machine but not on "
            f"appservice.port ({appservice.port}): the homeserver will not reach the bridge"
        )
    return Config(
        homeserver=homeserver,
        appservice=appservice,
        database=DatabaseConfig(
            url=database_url, pool_size=_int(raw, "database.pool_size", 1, 1000)
        ),
        permissions=_permissions(raw),
        logging=_logging(raw),
        mail=mail,
        links=_links(raw, mail),
        path=path,
        warnings=tuple(warnings),
        env_overrides=tuple(overrides),
    )


def load_config(
    path: Path, *, env: Mapping[str, str] | None = None, require_tokens: bool = True
) -> Config:
    """Read, merge and validate the config file at path; raise ConfigError naming the key."""
    return parse_config(read_yaml_file(path), env=env, require_tokens=require_tokens, path=path)
