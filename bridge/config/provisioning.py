"""The `provisioning:` section: the shared secret of the provisioning HTTP API (or none: off)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config.base import MIN_TOKEN_LENGTH, ConfigError, _secret, _type_name


@dataclass(frozen=True)
class ProvisioningConfig:
    # None: the API is off (every path under its prefix answers 404).
    shared_secret: str | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.shared_secret is not None


def _provisioning(raw: dict[str, Any], config_dir: Path | None) -> ProvisioningConfig:
    value = raw.get("provisioning")
    if not isinstance(value, dict):
        raise ConfigError("provisioning", f"must be a mapping, not {_type_name(value)}")
    secret = _secret("provisioning", value, config_dir, "shared_secret")
    if secret is None:
        return ProvisioningConfig()
    if len(secret) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            "provisioning.shared_secret", f"is too short: at least {MIN_TOKEN_LENGTH} characters"
        )
    if any(c.isspace() or not c.isprintable() for c in secret):
        raise ConfigError(
            "provisioning.shared_secret", "must not contain spaces or control characters"
        )
    return ProvisioningConfig(shared_secret=secret)
