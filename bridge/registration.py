"""Generating the appservice registration file and the tokens it shares with the config."""

from __future__ import annotations

import io
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap

from bridge.config import (
    TOKEN_PLACEHOLDER,
    Config,
    ConfigError,
    parse_config,
    read_yaml_file,
    yaml_loader,
)


def new_token() -> str:
    """32 bytes from the system's CSPRNG, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def build_registration(config: Config) -> dict[str, Any]:
    """The registration the homeserver loads: our URL, tokens and exclusive namespaces."""
    return {
        "id": config.appservice.id,
        "url": config.appservice.address,
        "as_token": config.appservice.as_token,
        "hs_token": config.appservice.hs_token,
        "sender_localpart": config.appservice.bot_username,
        "rate_limited": False,
        "receive_ephemeral": False,
        "namespaces": {
            "users": [
                {"regex": config.ghost_regex, "exclusive": True},
                {
                    "regex": "^@"
                    + _escape(config.appservice.bot_username)
                    + ":"
                    + _escape(config.homeserver.domain)
                    + "$",
                    "exclusive": True,
                },
            ],
            "aliases": [{"regex": config.alias_regex, "exclusive": True}],
            "rooms": [],
        },
    }


def _escape(text: str) -> str:
    return re.escape(text)


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file whole or not at all; secrets inside, so only its owner may read it."""
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_yaml(data: Any) -> str:
    buffer = io.StringIO()
    yaml_loader().dump(data, buffer)
    return buffer.getvalue()


def generate_registration(
    config_path: Path, registration_path: Path, env: Mapping[str, str] | None = None
) -> tuple[Config, list[str]]:
    """Fill in missing tokens (written back into the config file), then write the registration.

    Returns the final config and the keys whose tokens were generated.
    """
    user = read_yaml_file(config_path, round_trip=True)
    if user is None:
        user = CommentedMap()
    draft = parse_config(user, env=env, require_tokens=False, path=config_path)
    generated = []
    section = user.get("appservice")
    if section is None:
        section = user["appservice"] = CommentedMap()
    elif not isinstance(section, dict):
        raise ConfigError("appservice", "must be a mapping")
    for key in ("as_token", "hs_token"):
        if getattr(draft.appservice, key) == TOKEN_PLACEHOLDER:
            section[key] = new_token()
            generated.append(f"appservice.{key}")
    if generated:
        atomic_write(config_path, dump_yaml(user), mode=_mode_of(config_path))
    config = parse_config(user, env=env, require_tokens=True, path=config_path)
    atomic_write(registration_path, dump_yaml(build_registration(config)))
    return config, generated


def _mode_of(path: Path) -> int:
    # The config now holds tokens: never leave it readable by others.
    return path.stat().st_mode & 0o700
