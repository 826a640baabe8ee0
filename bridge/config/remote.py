"""The remotes section (other ministries' homeservers) and links to rooms on them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridge.config.base import (
    _MXID,
    _SERVER_NAME,
    LOOPBACK_HOSTS,
    ConfigError,
    _ca_file,
    _http_url,
    _int,
    _number,
    _room_id,
    _secret,
    _type_name,
)

REMOTE_NAME = re.compile(r"^[a-z0-9-]{1,32}$")
REMOTE_KEYS = (
    "address",
    "server_name",
    "user_id",
    "access_token",
    "access_token_file",
    "ca_file",
    "allowed_servers",
    "display_suffix",
    "agency_suffix",
    "max_media_size",
    "request_timeout",
    "sync_timeout",
    "give_up_after",
)
# The example config documents these; a remote entry is free-form, so they cannot be merged
# from it like the other sections' defaults.
REMOTE_DEFAULTS: dict[str, Any] = {
    "max_media_size": 10485760,
    "request_timeout": 30,
    "sync_timeout": 30,
    "give_up_after": 86400,
}
REMOTE_LINK_KEYS = ("room", "remote", "remote_room")
MAX_SUFFIX_LENGTH = 64


@dataclass(frozen=True)
class RemoteSettings:
    """Another ministry's homeserver, and the account the bridge uses there."""

    name: str
    address: str
    server_name: str
    user_id: str
    access_token: str = field(repr=False)
    ca_file: str | None
    allowed_servers: tuple[str, ...]
    display_suffix: str
    agency_suffix: str
    max_media_size: int
    request_timeout: float
    sync_timeout: float
    give_up_after: float


@dataclass(frozen=True)
class RemoteLinkSpec:
    """A link declared in the config file between an agency room and a room on a remote."""

    room_id: str  # the agency room
    remote: str  # the remote's name
    remote_room: str  # room ID or alias on the remote


def _shown(name: Any) -> str:
    """A remote's name as it may appear in a key: never a line break, never very long."""
    text = str(name)
    return text if text.isprintable() and len(text) <= 64 else repr(text)[:64]


def _remotes(
    raw: dict[str, Any], homeserver_domain: str, config_dir: Path | None
) -> dict[str, RemoteSettings]:
    value = raw["remotes"]
    if not isinstance(value, Mapping):
        raise ConfigError("remotes", f"must be a mapping, not {_type_name(value)}")
    remotes = {}
    for name, entry in value.items():
        if not isinstance(name, str) or not REMOTE_NAME.fullmatch(name):
            raise ConfigError(
                f"remotes.{_shown(name)}", "a remote's name is 1 to 32 of a-z, 0-9 and '-'"
            )
        remotes[name] = _remote(name, entry, homeserver_domain, config_dir)
    return remotes


def _remote(
    name: str, value: Any, homeserver_domain: str, config_dir: Path | None
) -> RemoteSettings:
    key = f"remotes.{name}"
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, not {_type_name(value)}")
    for entry_key in value:
        if entry_key not in REMOTE_KEYS:
            raise ConfigError(f"{key}.{_shown(entry_key)}", "unknown key")
    for required in ("address", "server_name", "user_id"):
        if value.get(required) is None:
            raise ConfigError(f"{key}.{required}", "is required")
    # The checks below look keys up by dotted path; a remote's name never holds a dot.
    raw = {"remotes": {name: {**REMOTE_DEFAULTS, **value}}}
    address = _remote_address(raw, f"{key}.address")
    server_name = value["server_name"]
    if not isinstance(server_name, str) or not _SERVER_NAME.fullmatch(server_name):
        raise ConfigError(f"{key}.server_name", "must be a server name like ministry.example.org")
    if server_name.lower() == homeserver_domain.lower():
        raise ConfigError(
            f"{key}.server_name",
            "is the agency's own homeserver (homeserver.domain); a remote is another server",
        )
    user_id = value["user_id"]
    mxid = _MXID.fullmatch(user_id) if isinstance(user_id, str) and len(user_id) <= 255 else None
    if mxid is None:
        raise ConfigError(f"{key}.user_id", "must be a user ID like @passerelle:ministry.org")
    if mxid.group(1) != server_name:
        raise ConfigError(f"{key}.user_id", f"must be a user on server_name ({server_name})")
    token = _secret(key, value, config_dir, "access_token")
    if token is None:
        raise ConfigError(
            f"{key}.access_token", "set exactly one of access_token and access_token_file"
        )
    if any(c.isspace() or not c.isprintable() for c in token):
        # It goes into an HTTP header; never echo it.
        raise ConfigError(f"{key}.access_token", "must not contain spaces or control characters")
    return RemoteSettings(
        name=name,
        address=address,
        server_name=server_name,
        user_id=user_id,
        access_token=token,
        ca_file=_ca_file(key, value),
        allowed_servers=_allowed_servers(
            f"{key}.allowed_servers",
            value.get("allowed_servers", [server_name]),
            homeserver_domain,
        ),
        display_suffix=_suffix(key, value, "display_suffix", f"({server_name})", empty=False),
        agency_suffix=_suffix(key, value, "agency_suffix", f"({homeserver_domain})", empty=True),
        max_media_size=_int(raw, f"{key}.max_media_size", 1, 1 << 31),
        request_timeout=_number(raw, f"{key}.request_timeout", 1, 600),
        sync_timeout=_number(raw, f"{key}.sync_timeout", 0, 300),
        give_up_after=_number(raw, f"{key}.give_up_after", 60, 30 * 86400),
    )


def _remote_address(raw: dict[str, Any], key: str) -> str:
    address = _http_url(raw, key)
    parts = urlsplit(address)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(key, "must not hold a user name or password")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise ConfigError(key, "plain http is only allowed for a server on this machine")
    return address


def _allowed_servers(key: str, value: Any, homeserver_domain: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "must be a non-empty list of server names")
    servers: list[str] = []
    for server in value:
        if isinstance(server, str) and "*" in server:
            raise ConfigError(
                key, f"wildcards are not allowed, list exact server names: {server[:100]!r}"
            )
        if not isinstance(server, str) or not _SERVER_NAME.fullmatch(server):
            raise ConfigError(key, f"{str(server)[:100]!r} is not a valid server name")
        if server.lower() == homeserver_domain.lower():
            raise ConfigError(key, "must not list the agency's own server (homeserver.domain)")
        if server not in servers:
            servers.append(server)
    return tuple(servers)


def _suffix(key: str, entry: Mapping[str, Any], name: str, default: str, *, empty: bool) -> str:
    key = f"{key}.{name}"
    value = entry.get(name, default)
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {_type_name(value)}")
    if not empty and not value.strip():
        raise ConfigError(key, "must not be empty: it tells people a name is relayed")
    if len(value) > MAX_SUFFIX_LENGTH:
        if name not in entry:
            raise ConfigError(
                key, f"the default {value[:20]}…) is over {MAX_SUFFIX_LENGTH} characters: set one"
            )
        raise ConfigError(key, f"must be at most {MAX_SUFFIX_LENGTH} characters")
    if not value.isprintable():
        raise ConfigError(key, "must be printable text on one line")
    return value


def _remote_room(key: str, value: Any) -> str:
    """A room ID (!x:server, or !x from room version 12) or alias (#x:server) on a remote."""
    if (
        not isinstance(value, str)
        or value[:1] not in ("!", "#")
        or not 1 < len(value) <= 255
        or not value.isprintable()
        or any(c.isspace() for c in value)
        or (value.startswith("#") and not re.fullmatch(r"#[^:]+:.+", value))
    ):
        raise ConfigError(
            key, "must be a room ID (!abc:ministry.org) or alias (#name:ministry.org)"
        )
    return value


def _remote_link(
    key: str,
    entry: Mapping[str, Any],
    remotes: Mapping[str, RemoteSettings],
    seen: set[tuple[str, str]],
) -> RemoteLinkSpec:
    """One `links:` entry with a remote: an agency room linked to a room on that remote."""
    for name in entry:
        if name not in REMOTE_LINK_KEYS:
            raise ConfigError(f"{key}.{name}", "unknown key")
    room = _room_id(f"{key}.room", entry.get("room"))
    remote = entry.get("remote")
    if not isinstance(remote, str) or remote not in remotes:
        raise ConfigError(f"{key}.remote", "is not one of remotes")
    remote_room = _remote_room(f"{key}.remote_room", entry.get("remote_room"))
    if (remote, remote_room) in seen:
        raise ConfigError(f"{key}.remote_room", "is linked twice")
    seen.add((remote, remote_room))
    return RemoteLinkSpec(room_id=room, remote=remote, remote_room=remote_room)
