"""The webhooks section: inbound hooks (each posting to one room), outbound hooks (each sending
one room's messages to a URL) and the egress allowlist those URLs must match."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config.base import ConfigError, _int, _number, _room_id, _secret, _type_name
from bridge.config.mail import parse_dns_server
from bridge.webhooks.egress import EgressPolicy, EgressRefused, check_url, parse_egress
from bridge.webhooks.signature import decode_secret

HOOK_NAME = re.compile(r"^[a-z0-9-]{1,32}$")
HOOK_KEYS = ("room", "secret", "secret_file")
OUT_HOOK_KEYS = ("room", "url", "secret", "secret_file")


@dataclass(frozen=True)
class HookSettings:
    """One inbound hook: its room and its Standard Webhooks secret."""

    name: str
    room_id: str
    secret: str = field(repr=False)  # whsec_<base64>

    @property
    def key(self) -> bytes:
        return decode_secret(self.secret)


@dataclass(frozen=True)
class OutHookSettings:
    """One outbound hook: the room whose messages it receives, its URL (allowed by the egress
    list) and the secret that signs each delivery."""

    name: str
    room_id: str
    url: str
    secret: str = field(repr=False)  # whsec_<base64>


@dataclass(frozen=True)
class WebhooksConfig:
    hooks: dict[str, HookSettings]
    max_body_size: int
    tolerance: int
    rotation_grace: int = 86400  # seconds the previous secret stays valid after `webhook rotate`
    outgoing: dict[str, OutHookSettings] = field(default_factory=dict)
    egress: EgressPolicy = field(default_factory=lambda: parse_egress([]))
    egress_dns_server: tuple[str, int] | None = None  # None: the system's resolver
    delivery_timeout: float = 10.0  # seconds for one POST, connection included
    give_up_after: int = 86400  # seconds a delivery is retried before it is failed and told


def _shown(name: Any) -> str:
    text = str(name)
    return text if text.isprintable() and len(text) <= 64 else repr(text)[:64]


def _webhooks(raw: dict[str, Any], config_dir: Path | None) -> WebhooksConfig:
    section = raw["webhooks"]
    if not isinstance(section, Mapping):
        raise ConfigError("webhooks", f"must be a mapping, not {_type_name(section)}")
    value = section["hooks"]
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError("webhooks.hooks", f"must be a mapping, not {_type_name(value)}")
    hooks = {}
    for name, entry in value.items():
        key = f"webhooks.hooks.{_shown(name)}"
        if not isinstance(name, str) or not HOOK_NAME.fullmatch(name):
            raise ConfigError(key, "a hook's name is 1 to 32 of a-z, 0-9 and '-'")
        hooks[name] = _hook(key, name, entry, config_dir)
    try:
        egress = parse_egress(section["egress"])
    except ValueError as e:
        raise ConfigError("webhooks.egress", str(e)) from None
    outgoing = _outgoing(section["outgoing"], egress, config_dir)
    for name in sorted(hooks.keys() & outgoing.keys()):
        raise ConfigError(
            f"webhooks.outgoing.{name}", "an inbound hook has this name: names are unique"
        )
    return WebhooksConfig(
        hooks=hooks,
        max_body_size=_int(raw, "webhooks.max_body_size", 256, 1 << 24),
        tolerance=_int(raw, "webhooks.tolerance", 30, 86400),
        rotation_grace=_int(raw, "webhooks.rotation_grace", 1, 30 * 86400),
        outgoing=outgoing,
        egress=egress,
        egress_dns_server=parse_dns_server(
            "webhooks.egress_dns_server", section["egress_dns_server"]
        ),
        delivery_timeout=_number(raw, "webhooks.delivery_timeout", 1, 300),
        give_up_after=_int(raw, "webhooks.give_up_after", 60, 30 * 86400),
    )


def _outgoing(
    value: Any, egress: EgressPolicy, config_dir: Path | None
) -> dict[str, OutHookSettings]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError("webhooks.outgoing", f"must be a mapping, not {_type_name(value)}")
    found = {}
    for name, entry in value.items():
        key = f"webhooks.outgoing.{_shown(name)}"
        if not isinstance(name, str) or not HOOK_NAME.fullmatch(name):
            raise ConfigError(key, "a hook's name is 1 to 32 of a-z, 0-9 and '-'")
        if not isinstance(entry, Mapping):
            raise ConfigError(
                key, f"must be a mapping with room, url and secret, not {_type_name(entry)}"
            )
        for entry_key in entry:
            if entry_key not in OUT_HOOK_KEYS:
                raise ConfigError(f"{key}.{_shown(entry_key)}", "unknown key")
        url = entry.get("url")
        if not isinstance(url, str):
            raise ConfigError(f"{key}.url", "must be an http or https URL")
        try:
            check_url(egress, url)
        except EgressRefused as e:
            raise ConfigError(f"{key}.url", str(e)) from None
        found[name] = OutHookSettings(
            name=name,
            room_id=_room_id(f"{key}.room", entry.get("room")),
            url=url,
            secret=_hook_secret(key, entry, config_dir),
        )
    return found


def _hook_secret(key: str, entry: Mapping[str, Any], config_dir: Path | None) -> str:
    secret = _secret(key, entry, config_dir, "secret")
    if secret is None:
        raise ConfigError(f"{key}.secret", "set exactly one of secret and secret_file")
    try:
        decode_secret(secret)
    except ValueError as e:
        # Never the value: it is a secret, even a malformed one.
        raise ConfigError(
            f"{key}.secret", f"{e} (a Standard Webhooks secret: whsec_ and base64)"
        ) from None
    return secret


def _hook(key: str, name: str, entry: Any, config_dir: Path | None) -> HookSettings:
    if not isinstance(entry, Mapping):
        raise ConfigError(key, f"must be a mapping with room and secret, not {_type_name(entry)}")
    for entry_key in entry:
        if entry_key not in HOOK_KEYS:
            raise ConfigError(f"{key}.{_shown(entry_key)}", "unknown key")
    room_id = _room_id(f"{key}.room", entry.get("room"))
    return HookSettings(name=name, room_id=room_id, secret=_hook_secret(key, entry, config_dir))
