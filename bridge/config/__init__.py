"""Configuration: defaults from example-config.yaml, the user's file, env overrides, validation."""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridge.config import yaml12
from bridge.config.base import (
    _LOCALPART,
    _MXID,
    _SERVER_NAME,
    ENV_PREFIX,
    EXAMPLE_CONFIG,
    FREE_FORM,
    LOOPBACK_HOSTS,
    MIN_TOKEN_LENGTH,
    PLACEHOLDER_DOMAIN,
    TOKEN_PLACEHOLDER,
    ConfigError,
    _apply_env,
    _bool,
    _get,
    _http_url,
    _int,
    _merge,
    _number,
    _string,
    _token,
    _type_name,
    normalise_database_url,
    read_yaml_file,
    yaml_loader,
)
from bridge.config.mail import (
    LINK_KEYS,
    ON_SENT,
    BounceSettings,
    LinkSpec,
    MailboxSettings,
    MailConfig,
    SmtpSettings,
    _mail,
    _mail_link,
    check_sender_patterns,
    mail_address,
)
from bridge.config.provisioning import ProvisioningConfig, _provisioning
from bridge.config.remote import (
    REMOTE_LINK_KEYS,
    RemoteLinkSpec,
    RemoteSettings,
    _remote_link,
    _remotes,
)
from bridge.config.webhooks import HookSettings, OutHookSettings, WebhooksConfig, _webhooks
from bridge.core.ghosts import encode_localpart
from bridge.core.ids import UserID
from bridge.core.permissions import PermissionLevel, PermissionTable

MAX_MXID_BYTES = 255  # the Matrix spec's limit for a user ID

__all__ = [
    "ENV_PREFIX",
    "EXAMPLE_CONFIG",
    "FREE_FORM",
    "LINK_KEYS",
    "LOOPBACK_HOSTS",
    "MIN_TOKEN_LENGTH",
    "ON_SENT",
    "PLACEHOLDER_DOMAIN",
    "REMOTE_LINK_KEYS",
    "TOKEN_PLACEHOLDER",
    "AppserviceConfig",
    "BounceSettings",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "HomeserverConfig",
    "HookSettings",
    "InstanceConfig",
    "LinkSpec",
    "LoggingConfig",
    "MailConfig",
    "MailboxSettings",
    "OutHookSettings",
    "ProvisioningConfig",
    "RemoteLinkSpec",
    "RemoteSettings",
    "SmtpSettings",
    "WebhooksConfig",
    "check_sender_patterns",
    "load_config",
    "mail_address",
    "normalise_database_url",
    "parse_config",
    "read_yaml_file",
    "yaml_loader",
]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
class MetricsConfig:
    enabled: bool
    hostname: str
    port: int | None  # None: served on the appservice listener


@dataclass(frozen=True)
class DatabaseConfig:
    url: str
    pool_size: int


@dataclass(frozen=True)
class InstanceConfig:
    leases: bool = False
    id: str | None = None  # None: hostname-pid-random, chosen at start
    lease_ttl: float = 15.0
    lease_renew: float = 5.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str
    loggers: dict[str, str]
    file: str | None


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
    remotes: dict[str, RemoteSettings] = field(default_factory=dict)
    remote_links: tuple[RemoteLinkSpec, ...] = ()
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    webhooks: WebhooksConfig = field(
        default_factory=lambda: WebhooksConfig(hooks={}, max_body_size=65536, tolerance=300)
    )
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(True, "127.0.0.1", None))
    instance: InstanceConfig = field(default_factory=InstanceConfig)

    @property
    def bot_mxid(self) -> UserID:
        return UserID(f"@{self.appservice.bot_username}:{self.homeserver.domain}")

    def ghost_mxid(self, localpart: str) -> UserID:
        name = self.appservice.ghost_username_template.format(localpart=localpart)
        return UserID(f"@{name}:{self.homeserver.domain}")

    def remote_ghost_mxid(self, remote: str, user_id: str) -> UserID:
        """The ghost of a remote's user. Never a mail sender's ghost: a mail address has no
        ":" after its "@". A user ID too long to encode within Matrix's 255 bytes gets a
        digest instead ("<remote>/#<sha256>", which no user ID can be: IDs start with "@")."""
        mxid = self.ghost_mxid(encode_localpart(f"{remote}/{user_id}"))
        if len(mxid.encode("utf-8")) <= MAX_MXID_BYTES:
            return mxid
        digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()
        return self.ghost_mxid(encode_localpart(f"{remote}/#{digest}"))

    def hook_ghost_mxid(self, name: str) -> UserID:
        """The ghost that posts an inbound webhook's messages. Never a mail or remote ghost:
        those encode an "@" or a "/"."""
        return self.ghost_mxid(encode_localpart(f"webhook-{name}"))

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

    @property
    def bounce_secret(self) -> bytes:
        """The key of the VERP tokens naming outbox items in envelope senders, derived from
        the as_token like message_id_secret (a new token: earlier mails' bounces are matched
        by their Message-ID only)."""
        token = self.appservice.as_token.encode("utf-8")
        return hmac.new(token, b"passerelle bounce token", hashlib.sha256).digest()

    def secrets(self) -> list[str]:
        """Values that must never reach a log line."""
        values = [self.appservice.as_token, self.appservice.hs_token]
        values += [m.password for m in self.mail.mailboxes.values()]
        if self.mail.smtp is not None and self.mail.smtp.password:
            values.append(self.mail.smtp.password)
        values += [r.access_token for r in self.remotes.values()]
        if self.provisioning.shared_secret:
            values.append(self.provisioning.shared_secret)
        hook_secrets = [hook.secret for hook in self.webhooks.hooks.values()]
        hook_secrets += [hook.secret for hook in self.webhooks.outgoing.values()]
        for secret in hook_secrets:
            # The whole secret, and its base64 part alone (as a signer may print it).
            values += [secret, secret.removeprefix("whsec_")]
        password = urlsplit(self.database.url).password
        if password:
            values.append(password)
        return [v for v in values if v and v != TOKEN_PLACEHOLDER]


def _permissions(raw: dict[str, Any]) -> PermissionTable:
    value = raw["permissions"]
    if not isinstance(value, dict):
        raise ConfigError("permissions", f"must be a mapping, not {_type_name(value)}")
    table: dict[str, PermissionLevel] = {}
    for who, level in value.items():
        shown = who if isinstance(who, str) and who.isprintable() else repr(who)
        key = f"permissions.{shown}"
        if not isinstance(who, str) or not (
            who == "*" or _MXID.fullmatch(who) or _SERVER_NAME.fullmatch(who)
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
    if not _LOCALPART.fullmatch(bot):
        raise ConfigError("appservice.bot_username", "must be a valid lowercase Matrix localpart")
    template = _string(raw, "appservice.ghost_username_template")
    if template.count("{localpart}") != 1 or "{" in template.replace("{localpart}", ""):
        raise ConfigError(
            "appservice.ghost_username_template", "must contain {localpart} exactly once"
        )
    prefix, suffix = template.split("{localpart}")
    if not prefix or not _LOCALPART.fullmatch(prefix + "x" + suffix):
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


def _links(
    raw: dict[str, Any], mail: MailConfig, remotes: Mapping[str, RemoteSettings]
) -> tuple[tuple[LinkSpec, ...], tuple[RemoteLinkSpec, ...]]:
    """The `links:` entries: mail links (with address) and remote links (with remote)."""
    value = raw["links"]
    if not isinstance(value, list):
        raise ConfigError("links", f"must be a list, not {_type_name(value)}")
    mail_links = []
    remote_links = []
    seen_addresses: set[str] = set()
    seen_rooms: set[tuple[str, str]] = set()
    for i, entry in enumerate(value):
        key = f"links[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(
                key, "must be a mapping with room and address, or room, remote and remote_room"
            )
        if "remote" not in entry:
            if "remote_room" in entry:
                raise ConfigError(f"{key}.remote_room", "only for remote links (with remote)")
            mail_links.append(_mail_link(key, entry, mail, seen_addresses))
            continue
        if "address" in entry:
            raise ConfigError(
                f"{key}.remote", "set either address (a mail link) or remote, not both"
            )
        for name in entry:
            if name in LINK_KEYS and name not in REMOTE_LINK_KEYS:
                raise ConfigError(f"{key}.{name}", "only for mail links")
        remote_links.append(_remote_link(key, entry, remotes, seen_rooms))
    return tuple(mail_links), tuple(remote_links)


def _metrics(raw: dict[str, Any], appservice: AppserviceConfig) -> MetricsConfig:
    port = None
    if _get(raw, "metrics.port") is not None:
        port = _int(raw, "metrics.port", 1, 65535)
    hostname = _string(raw, "metrics.hostname")
    if port == appservice.port and hostname == appservice.hostname:
        raise ConfigError(
            "metrics.port", "is the appservice port: leave it null to serve /metrics there"
        )
    return MetricsConfig(enabled=_bool(raw, "metrics.enabled"), hostname=hostname, port=port)


_INSTANCE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,200}")


def _instance(raw: dict[str, Any]) -> InstanceConfig:
    instance_id = None
    if _get(raw, "instance.id") is not None:
        instance_id = _string(raw, "instance.id")
        if not _INSTANCE_ID.fullmatch(instance_id):
            raise ConfigError(
                "instance.id", "must be 1 to 200 letters, digits or . _ : @ - (no spaces)"
            )
    ttl = _number(raw, "instance.lease_ttl", 2, 3600)
    renew = _number(raw, "instance.lease_renew", 0.5, 1800)
    if renew * 2 > ttl:
        raise ConfigError(
            "instance.lease_renew",
            f"must be at most half of instance.lease_ttl ({ttl:g}), not {renew:g}",
        )
    return InstanceConfig(
        leases=_bool(raw, "instance.leases"), id=instance_id, lease_ttl=ttl, lease_renew=renew
    )


def _homeserver(raw: dict[str, Any]) -> HomeserverConfig:
    address = _http_url(raw, "homeserver.address")
    domain = _string(raw, "homeserver.domain")
    for key, value in (("homeserver.address", address), ("homeserver.domain", domain)):
        if PLACEHOLDER_DOMAIN in value:
            raise ConfigError(key, f"still holds the example placeholder {value!r}; set it")
    if not _SERVER_NAME.fullmatch(domain):
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
    defaults = copy.deepcopy(_defaults())
    warnings: list[str] = []
    raw = _merge(defaults, user, (), warnings)
    overrides = _apply_env(raw, os.environ if env is None else env)
    database_url = normalise_database_url("database.url", _string(raw, "database.url"))
    homeserver = _homeserver(raw)
    appservice = _appservice(raw, require_tokens)
    config_dir = path.parent if path else None
    mail = _mail(raw, config_dir)
    remotes = _remotes(raw, homeserver.domain, config_dir)
    links, remote_links = _links(raw, mail, remotes)
    webhooks = _webhooks(raw, config_dir)
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
        links=links,
        path=path,
        warnings=tuple(warnings),
        env_overrides=tuple(overrides),
        remotes=remotes,
        remote_links=remote_links,
        provisioning=_provisioning(raw, config_dir),
        webhooks=webhooks,
        metrics=_metrics(raw, appservice),
        instance=_instance(raw),
    )


@functools.cache
def _defaults() -> dict[str, Any]:
    """The example config, read once (parse_config copies it: env overrides write into it)."""
    defaults: dict[str, Any] = yaml12.load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    return defaults


def load_config(
    path: Path, *, env: Mapping[str, str] | None = None, require_tokens: bool = True
) -> Config:
    """Read, merge and validate the config file at path; raise ConfigError naming the key."""
    return parse_config(read_yaml_file(path), env=env, require_tokens=require_tokens, path=path)
