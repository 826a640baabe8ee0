"""The webhooks section: inbound hooks declared in the config, each posting to one room."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config.base import ConfigError, _int, _room_id, _secret, _type_name
from bridge.webhooks.signature import decode_secret

HOOK_NAME = re.compile(r"^[a-z0-9-]{1,32}$")
HOOK_KEYS = ("room", "secret", "secret_file")


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
class WebhooksConfig:
    hooks: dict[str, HookSettings]
    max_body_size: int
    tolerance: int
    rotation_grace: int = 86400  # seconds the previous secret stays valid after `webhook rotate`


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
    return WebhooksConfig(
        hooks=hooks,
        max_body_size=_int(raw, "webhooks.max_body_size", 256, 1 << 24),
        tolerance=_int(raw, "webhooks.tolerance", 30, 86400),
        rotation_grace=_int(raw, "webhooks.rotation_grace", 1, 30 * 86400),
    )


def _hook(key: str, name: str, entry: Any, config_dir: Path | None) -> HookSettings:
    if not isinstance(entry, Mapping):
        raise ConfigError(key, f"must be a mapping with room and secret, not {_type_name(entry)}")
    for entry_key in entry:
        if entry_key not in HOOK_KEYS:
            raise ConfigError(f"{key}.{_shown(entry_key)}", "unknown key")
    room_id = _room_id(f"{key}.room", entry.get("room"))
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
    return HookSettings(name=name, room_id=room_id, secret=secret)
