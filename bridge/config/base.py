"""Config plumbing: ConfigError, YAML loading, merging, env overrides and value checks."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from bridge.config import yaml12

ENV_PREFIX = "PASSERELLE_"
TOKEN_PLACEHOLDER = "generate"
MIN_TOKEN_LENGTH = 32
# Values that only exist in the example file and must be replaced before the bridge runs.
PLACEHOLDER_DOMAIN = "example.invalid"
# Sections whose keys are free-form: the user's mapping replaces the default one whole.
FREE_FORM = {
    ("permissions",),
    ("logging", "loggers"),
    ("mail", "mailboxes"),
    ("remotes",),
    ("webhooks", "hooks"),
    ("webhooks", "outgoing"),
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The package's default config: bridge/example-config.yaml (a link to config/example-config.yaml).
EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "example-config.yaml"

_SERVER_NAME = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(?::[0-9]{1,5})?$"
)
_MXID = re.compile(r"^@[a-z0-9._=\-/+]+:(.+)$")
_LOCALPART = re.compile(r"^[a-z0-9._=\-/+]+$")


class ConfigError(Exception):
    """A problem in the configuration, naming the key it is about."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def yaml_loader() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.indent(mapping=4, sequence=4, offset=2)
    return yaml


def read_yaml_file(path: Path, *, round_trip: bool = False) -> Any:
    """Parse a YAML file, turning every failure into a one-line ConfigError.

    `round_trip` keeps comments and layout (ruamel) for a file that will be written back;
    otherwise the fast reader of `yaml12` gives plain dicts and lists, with the same meaning.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("(file)", f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("(file)", f"cannot read {path}: {e}") from None
    try:
        return yaml_loader().load(text) if round_trip else yaml12.load(text)
    except (YAMLError, yaml.YAMLError) as e:
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
    if driver.startswith("sqlite") and (
        not rest.startswith("/") or rest == "/" or rest.split("?")[0].lstrip("/") == ":memory:"
    ):
        # (In memory, every mapping would be lost at each restart, and the bridge's engine
        # would not even open it.)
        raise ConfigError(key, "a SQLite URL needs a file: sqlite+aiosqlite:///passerelle.db")
    return f"{driver}://{rest}"


def _ca_file(key: str, value: Mapping[str, Any]) -> str | None:
    ca_file = value.get("ca_file")
    if ca_file is not None and not isinstance(ca_file, str):
        raise ConfigError(f"{key}.ca_file", "must be a file path or null")
    return ca_file


def _password(key: str, value: Mapping[str, Any], config_dir: Path | None) -> str | None:
    """The password given inline or in password_file (not both); None when neither."""
    return _secret(key, value, config_dir, "password")


def _secret(key: str, value: Mapping[str, Any], config_dir: Path | None, name: str) -> str | None:
    """A secret given inline as `name` or in `name`_file (not both; the file relative to the
    config's folder, without its line ending); None when neither."""
    secret = value.get(name)
    secret_file = value.get(f"{name}_file")
    if secret is not None and secret_file is not None:
        raise ConfigError(f"{key}.{name}", f"set exactly one of {name} and {name}_file")
    if secret_file is not None:
        if not isinstance(secret_file, str):
            raise ConfigError(f"{key}.{name}_file", "must be a file path")
        path = Path(secret_file)
        if not path.is_absolute() and config_dir is not None:
            path = config_dir / path
        try:
            secret = path.read_text(encoding="utf-8").strip("\r\n")
        except OSError as e:
            raise ConfigError(f"{key}.{name}_file", f"cannot read it: {e.strerror}") from None
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ConfigError(f"{key}.{name}", "must be a non-empty string")
    return secret


def _room_id(key: str, value: Any) -> str:
    """An agency room ID. Room versions 12 and later have IDs without a server part."""
    if (
        not isinstance(value, str)
        or not value.startswith("!")
        or not 1 < len(value) <= 255
        or not value.isprintable()
        or " " in value
    ):
        raise ConfigError(key, "must be a room ID like !abc:agency.example.org")
    return value
