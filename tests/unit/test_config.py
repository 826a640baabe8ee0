"""The config loader: defaults, validation, environment overrides, one-line errors."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bridge.config import (
    EXAMPLE_CONFIG,
    Config,
    ConfigError,
    load_config,
    parse_config,
)
from bridge.core.ids import UserID
from bridge.core.permissions import PermissionLevel

AS_TOKEN = "as-" + "A1b2C3d4" * 5
HS_TOKEN = "hs-" + "Z9y8X7w6" * 5
EXAMPLE_ROOT = Path(__file__).resolve().parents[2] / "config" / "example-config.yaml"


def minimal(**sections: Mapping[str, Any]) -> dict[str, Any]:
    """The smallest valid config, with some sections extended or replaced."""
    config: dict[str, Any] = {
        "homeserver": {"address": "https://matrix.example.org", "domain": "example.org"},
        "appservice": {"as_token": AS_TOKEN, "hs_token": HS_TOKEN},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def example_defaults() -> dict[str, Any]:
    data = YAML(typ="safe").load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def config_error(
    user: Any, key: str, *fragments: str, env: Mapping[str, str] | None = None, **kw: Any
) -> ConfigError:
    """Parse user, expect a ConfigError about key whose single-line message has fragments."""
    with pytest.raises(ConfigError) as info:
        parse_config(user, env={} if env is None else env, **kw)
    assert_one_line_about(info.value, key, *fragments)
    return info.value


def assert_one_line_about(error: ConfigError, key: str, *fragments: str) -> None:
    message = str(error)
    assert error.key == key, message
    assert message.startswith(f"{key}: "), message
    assert message == f"{error.key}: {error.problem}"
    assert "\n" not in message, message
    assert "\r" not in message, message
    assert message.strip() == message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- Defaults and the example config ----------------------------------------------------------


def test_shipped_example_is_the_package_default() -> None:
    assert EXAMPLE_ROOT.read_text(encoding="utf-8") == EXAMPLE_CONFIG.read_text(encoding="utf-8")


def test_minimal_config_loads_with_example_defaults() -> None:
    config = parse_config(minimal(), env={})
    defaults = example_defaults()
    assert isinstance(config, Config)
    assert config.homeserver.address == "https://matrix.example.org"
    assert config.homeserver.domain == "example.org"
    assert config.homeserver.verify_ssl is defaults["homeserver"]["verify_ssl"] is True
    assert config.homeserver.request_timeout == float(defaults["homeserver"]["request_timeout"])
    assert isinstance(config.homeserver.request_timeout, float)
    appservice = defaults["appservice"]
    for key in (
        "id",
        "address",
        "hostname",
        "port",
        "bot_username",
        "bot_displayname",
        "command_prefix",
        "ghost_username_template",
        "max_body_size",
        "max_event_attempts",
    ):
        assert getattr(config.appservice, key) == appservice[key], key
    assert config.appservice.port == 29330
    assert config.appservice.command_prefix == "!passerelle"
    assert config.appservice.as_token == AS_TOKEN
    assert config.appservice.hs_token == HS_TOKEN
    assert (
        config.database.url == defaults["database"]["url"] == "sqlite+aiosqlite:///passerelle.db"
    )
    assert config.database.pool_size == defaults["database"]["pool_size"]
    assert config.logging.level == defaults["logging"]["level"] == "INFO"
    assert config.logging.loggers == {}
    assert config.logging.file is None
    assert config.permissions.as_dict() == defaults["permissions"]
    assert config.warnings == ()
    assert config.env_overrides == ()
    assert config.path is None
    assert config.bot_mxid == "@passerelle:example.org"


def test_minimal_config_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# my bridge\n"
        "homeserver:\n"
        "  address: https://matrix.example.org/\n"
        "  domain: example.org\n"
        "appservice:\n"
        f"  as_token: {AS_TOKEN}\n"
        f"  hs_token: '{HS_TOKEN}'\n",
    )
    config = load_config(path, env={})
    assert config.path == path
    assert config.homeserver.address == "https://matrix.example.org"
    assert config.appservice.hs_token == HS_TOKEN


def test_empty_file_is_refused_for_the_placeholders(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), env={})
    assert_one_line_about(info.value, "homeserver.address", "placeholder")


def test_parsing_does_not_modify_the_callers_mapping() -> None:
    user = minimal(permissions={"example.org": "user"}, logging={"loggers": {"x": "debug"}})
    before = copy.deepcopy(user)
    parse_config(user, env={"PASSERELLE_APPSERVICE__PORT": "1234"})
    assert user == before


def test_example_config_is_refused_for_placeholder_address() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE_CONFIG, env={})
    assert_one_line_about(info.value, "homeserver.address", "placeholder", "example.invalid")


def test_example_config_is_refused_for_placeholder_domain() -> None:
    config_error(
        {"homeserver": {"address": "https://matrix.example.org"}},
        "homeserver.domain",
        "placeholder",
    )


@pytest.mark.parametrize("key", ["as_token", "hs_token"])
def test_generate_tokens_are_refused_when_required(key: str) -> None:
    user = minimal()
    user["appservice"][key] = "generate"
    config_error(user, f"appservice.{key}", "generate-registration")


def test_generate_tokens_are_allowed_before_registration() -> None:
    user = minimal()
    del user["appservice"]
    config = parse_config(user, env={}, require_tokens=False)
    assert config.appservice.as_token == config.appservice.hs_token == "generate"
    assert config.secrets() == []


# --- YAML files ---------------------------------------------------------------------------------


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "homeserver:\n  address: https://matrix.example.org\n  domain: [example.org\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    error = info.value
    assert_one_line_about(error, "(file)", str(path), "not valid YAML")
    assert re.search(r"\bline [34]\b", str(error)), str(error)


def test_bad_indentation_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "homeserver:\n  address: x\n domain: y\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert_one_line_about(info.value, "(file)", "line 3")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", env={})
    assert_one_line_about(info.value, "(file)", "nope.yaml", "does not exist")


def test_top_level_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "- homeserver\n- appservice\n"), env={})
    assert_one_line_about(info.value, "(file)", "mapping")
    config_error(["homeserver"], "(file)", "mapping", "list")


def test_top_level_scalar_is_refused() -> None:
    config_error("homeserver", "(file)", "mapping", "str")


def test_section_must_be_a_mapping() -> None:
    config_error(minimal() | {"appservice": "yes"}, "appservice", "mapping", "str")
    config_error(minimal() | {"logging": None}, "logging", "mapping", "null")


def test_duplicate_key_error_does_not_reveal_the_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "homeserver:\n  address: https://matrix.example.org\n  domain: example.org\n"
        f"appservice:\n  as_token: {AS_TOKEN}\n  as_token: {HS_TOKEN}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert_one_line_about(info.value, "(file)", "line 6")
    assert AS_TOKEN not in str(info.value)
    assert HS_TOKEN not in str(info.value)


# --- Types and ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("appservice", "port", "abc", "integer"),
        ("appservice", "port", 0, "between 1 and 65535"),
        ("appservice", "port", 70000, "between 1 and 65535"),
        ("appservice", "port", True, "integer"),
        ("appservice", "port", 80.5, "integer"),
        ("homeserver", "verify_ssl", "yes", "true or false"),
        ("homeserver", "verify_ssl", 1, "true or false"),
        ("homeserver", "request_timeout", True, "number"),
        ("homeserver", "request_timeout", "30", "number"),
        ("homeserver", "request_timeout", 0, "between"),
        ("homeserver", "request_timeout", float("nan"), "between"),
        ("appservice", "max_body_size", "10485760", "integer"),
        ("appservice", "max_body_size", 10, "between"),
        ("appservice", "max_event_attempts", 0, "between"),
        ("database", "pool_size", None, "integer"),
        ("appservice", "bot_displayname", 42, "string"),
        ("appservice", "bot_displayname", "  ", "empty"),
        ("appservice", "id", "pass erelle", "letters"),
        ("appservice", "bot_username", "Passerelle", "localpart"),
        ("appservice", "command_prefix", "! passerelle", "spaces"),
        ("logging", "file", "", "path"),
        ("mail", "max_imap_connections", 0, "between 1 and"),
        ("mail", "max_imap_connections", -3, "between 1 and"),
        ("mail", "max_imap_connections", 2.5, "integer"),
        ("mail", "max_imap_connections", "10", "integer"),
        ("mail", "max_imap_connections", True, "integer"),
    ],
)
def test_wrong_type_or_range_names_the_key(
    section: str, key: str, value: Any, fragment: str
) -> None:
    config_error(minimal(**{section: {key: value}}), f"{section}.{key}", fragment)


def test_imap_connection_pool_default_and_minimum() -> None:
    assert parse_config(minimal(), env={}).mail.max_imap_connections == 100
    config = parse_config(minimal(mail={"max_imap_connections": 1}), env={})
    assert config.mail.max_imap_connections == 1


def test_boundary_values_are_accepted() -> None:
    config = parse_config(
        minimal(
            appservice={"port": 65535, "max_body_size": 1024},
            homeserver={"request_timeout": 1, "verify_ssl": False},
        ),
        env={},
    )
    assert config.appservice.port == 65535
    assert config.homeserver.request_timeout == 1.0
    assert config.homeserver.verify_ssl is False


def test_yaml_file_types_are_checked(tmp_path: Path) -> None:
    base = "homeserver:\n  address: https://matrix.example.org\n  domain: example.org\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, base + "  verify_ssl: yes\n"), env={})
    assert_one_line_about(info.value, "homeserver.verify_ssl", "true or false")
    with pytest.raises(ConfigError) as info:
        load_config(
            write(tmp_path, base + "appservice:\n  port: '8080'\n"), env={}, require_tokens=False
        )
    assert_one_line_about(info.value, "appservice.port", "integer")


@pytest.mark.parametrize(
    ("text", "key", "plain_type"),
    [
        ("- homeserver\n", "(file)", "a list"),
        ("appservice: [1, 2]\n", "appservice", "a list"),
        ("appservice:\n  port: '8080'\n", "appservice.port", "a string"),
        ('appservice:\n  port: "8080"\n', "appservice.port", "a string"),
        ("database:\n  pool_size: 2.5\n", "database.pool_size", "a number"),
    ],
)
def test_type_names_in_file_errors_are_plain(
    tmp_path: Path, text: str, key: str, plain_type: str
) -> None:
    base = "homeserver:\n  address: https://matrix.example.org\n  domain: example.org\n"
    body = text if text.startswith("-") else base + text
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body), env={}, require_tokens=False)
    assert_one_line_about(info.value, key)
    assert str(info.value).endswith(f"not {plain_type}"), str(info.value)


# --- Unknown keys -------------------------------------------------------------------------------


def test_unknown_top_level_key_is_a_warning() -> None:
    config = parse_config(minimal() | {"bridge": {"x": 1}}, env={})
    assert len(config.warnings) == 1
    assert "'bridge'" in config.warnings[0]
    assert "\n" not in config.warnings[0]


def test_unknown_nested_key_is_an_error() -> None:
    config_error(minimal(appservice={"hs_tokn": HS_TOKEN}), "appservice.hs_tokn", "unknown key")


def test_unknown_deeper_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "homeserver:\n  adress: https://matrix.example.org\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert_one_line_about(info.value, "homeserver.adress", "unknown")


# --- Tokens -------------------------------------------------------------------------------------


def test_token_of_31_characters_is_too_short() -> None:
    config_error(
        minimal(appservice={"as_token": "x" * 31}), "appservice.as_token", "too short", "32"
    )


def test_token_of_32_characters_is_enough() -> None:
    config = parse_config(minimal(appservice={"hs_token": "y" * 32}), env={})
    assert config.appservice.hs_token == "y" * 32


def test_equal_tokens_are_refused() -> None:
    config_error(minimal(appservice={"hs_token": AS_TOKEN}), "appservice.hs_token", "as_token")


@pytest.mark.parametrize("space", [" ", "\t", "\n", "\u00a0", "\x00"])
def test_token_with_whitespace_or_control_is_refused(space: str) -> None:
    token = "k" * 20 + space + "k" * 20
    error = config_error(minimal(appservice={"as_token": token}), "appservice.as_token")
    assert token not in str(error)


def test_token_must_be_a_string() -> None:
    config_error(minimal(appservice={"as_token": 10**40}), "appservice.as_token", "string")


# --- Homeserver URL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("matrix.example.org", "http"),
        ("ftp://matrix.example.org", "http"),
        ("https://", "host"),
        ("https://matrix.example.org/?x=1", "query"),
        ("https://matrix.example.org/#top", "fragment"),
        ("", "empty"),
    ],
)
def test_bad_homeserver_address(address: str, fragment: str) -> None:
    config_error(minimal(homeserver={"address": address}), "homeserver.address", fragment)


def test_homeserver_address_trailing_slash_is_dropped() -> None:
    config = parse_config(minimal(homeserver={"address": "http://127.0.0.1:8008/"}), env={})
    assert config.homeserver.address == "http://127.0.0.1:8008"


def test_unbalanced_ipv6_address_is_a_config_error() -> None:
    config_error(minimal(homeserver={"address": "http://[::1:8008"}), "homeserver.address")


@pytest.mark.parametrize(
    "address", ["https://matrix.example.org:abc", "https://matrix.example.org:99999"]
)
def test_bad_port_in_homeserver_address_is_refused(address: str) -> None:
    config_error(minimal(homeserver={"address": address}), "homeserver.address")


def test_appservice_address_is_checked_too() -> None:
    config_error(minimal(appservice={"address": "127.0.0.1:29330"}), "appservice.address", "http")


@pytest.mark.parametrize(
    "domain", ["exa mple.org", "-example.org", "example.org:abc", "", "example.org\n"]
)
def test_bad_homeserver_domain(domain: str) -> None:
    config_error(minimal(homeserver={"domain": domain}), "homeserver.domain")


@pytest.mark.parametrize("domain", ["localhost", "example.org:8448", "[::1]:8448", "10.0.0.1"])
def test_good_homeserver_domain(domain: str) -> None:
    assert parse_config(minimal(homeserver={"domain": domain}), env={}).homeserver.domain == (
        domain
    )


# --- Database URL -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite:////var/lib/passerelle/x.db", "sqlite+aiosqlite:////var/lib/passerelle/x.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        (
            "postgresql://bridge:pw@db:5432/passerelle",
            "postgresql+asyncpg://bridge:pw@db:5432/passerelle",
        ),
        ("postgres://bridge@db/passerelle", "postgresql+asyncpg://bridge@db/passerelle"),
        ("postgresql+asyncpg://bridge@db/passerelle", "postgresql+asyncpg://bridge@db/passerelle"),
    ],
)
def test_database_url_is_normalised(url: str, normalised: str) -> None:
    config = parse_config(minimal(database={"url": url}), env={})
    assert config.database.url == normalised


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mysql://bridge:pw@db/passerelle", "mysql"),
        ("postgresql+psycopg2://bridge@db/passerelle", "unsupported"),
        ("sqlite://", "database URL"),
        ("sqlite:///", "file"),
        ("sqlite://relative.db", "file"),
        ("sqlite:///:memory:", "file"),  # every mapping lost at each restart
        ("sqlite+aiosqlite:///:memory:?cache=shared", "file"),
        ("passerelle.db", "database URL"),
        ("garbage", "database URL"),
        ("://", "database URL"),
    ],
)
def test_bad_database_url(url: str, fragment: str) -> None:
    config_error(minimal(database={"url": url}), "database.url", fragment)


def test_unsupported_database_url_does_not_echo_the_password() -> None:
    error = config_error(
        minimal(database={"url": "mysql://bridge:Sup3rS3cretPw@db/p"}), "database.url"
    )
    assert "Sup3rS3cretPw" not in str(error)


def test_malformed_database_url_does_not_echo_the_password() -> None:
    url = "postgresql:/bridge:Sup3rS3cretPw@db/passerelle"
    error = config_error(minimal(), "database.url", env={"PASSERELLE_DATABASE__URL": url})
    assert "Sup3rS3cretPw" not in str(error)


def test_database_url_that_breaks_secrets_is_refused() -> None:
    url = "postgresql://bridge:pa[ss@db/passerelle"
    # Accepted today, after which Config.secrets() raises ValueError.
    config_error(minimal(database={"url": url}), "database.url")


# --- Permissions --------------------------------------------------------------------------------


def test_permissions_user_server_and_star() -> None:
    config = parse_config(
        minimal(permissions={"@alice:example.org": "admin", "Example.ORG": "user", "*": "user"}),
        env={},
    )
    table = config.permissions
    assert table.as_dict() == {"@alice:example.org": "admin", "example.org": "user", "*": "user"}
    assert table.level_for(UserID("@alice:example.org")) is PermissionLevel.ADMIN
    assert table.level_for(UserID("@bob:example.org")) is PermissionLevel.USER
    assert table.level_for(UserID("@eve:elsewhere.net")) is PermissionLevel.USER


def test_user_permissions_replace_the_default_table() -> None:
    config = parse_config(minimal(permissions={"@alice:example.org": "Admin"}), env={})
    assert config.permissions.as_dict() == {"@alice:example.org": "admin"}
    assert config.permissions.level_for(UserID("@bob:example.invalid")) is PermissionLevel.NONE


def test_empty_permissions_allow_nobody() -> None:
    config = parse_config(minimal() | {"permissions": {}}, env={})
    assert config.permissions.level_for(UserID("@alice:example.org")) is PermissionLevel.NONE


def test_bad_permission_level() -> None:
    config_error(
        minimal(permissions={"@alice:example.org": "root"}),
        "permissions.@alice:example.org",
        "'root'",
        "user",
        "admin",
    )


@pytest.mark.parametrize("level", [None, 1, True, "none"])
def test_non_level_values_are_refused(level: Any) -> None:
    config_error(minimal(permissions={"example.org": level}), "permissions.example.org")


@pytest.mark.parametrize(
    "who",
    [
        "not a server!",
        "@Alice:example.org",
        "@alice",
        "alice@example",
        # A trailing newline once passed the check ("$" matches before it).
        "example.org\n",
        "@alice:example.org\n",
    ],
)
def test_bad_permission_key(who: str) -> None:
    shown = who if who.isprintable() else repr(who)  # the error stays one line
    config_error(minimal(permissions={who: "user"}), f"permissions.{shown}", "user ID")


def test_permissions_must_be_a_mapping() -> None:
    config_error(minimal() | {"permissions": ["*"]}, "permissions", "mapping")


# --- Logging ------------------------------------------------------------------------------------


def test_log_level_loud_is_refused() -> None:
    config_error(minimal(logging={"level": "LOUD"}), "logging.level", "DEBUG", "INFO")


def test_log_levels_are_uppercased() -> None:
    config = parse_config(
        minimal(logging={"level": "debug", "loggers": {"aiohttp.access": "warning"}}), env={}
    )
    assert config.logging.level == "DEBUG"
    assert config.logging.loggers == {"aiohttp.access": "WARNING"}


def test_bad_per_logger_level_names_the_logger() -> None:
    config_error(
        minimal(logging={"loggers": {"passerelle.db": "LOUD"}}), "logging.loggers.passerelle.db"
    )


# --- Ghost template and bot ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "passerelle_user",
        "passerelle_{localpart}_{localpart}",
        "{localpart}",
        "{localpart}_passerelle",
        "passerelle_{name}",
        "passerelle_{localpart}{",
        "Passerelle_{localpart}",
        "pass erelle_{localpart}",
    ],
)
def test_bad_ghost_template(template: str) -> None:
    config_error(
        minimal(appservice={"ghost_username_template": template}),
        "appservice.ghost_username_template",
    )


def test_ghost_template_with_suffix() -> None:
    config = parse_config(
        minimal(appservice={"ghost_username_template": "mail_{localpart}_bridge"}), env={}
    )
    assert config.ghost_mxid("bob") == "@mail_bob_bridge:example.org"
    assert config.is_ghost("@mail_bob_bridge:example.org")
    assert not config.is_ghost("@mail_bob:example.org")


def test_bot_username_matching_the_ghost_template_is_refused() -> None:
    config_error(
        minimal(appservice={"bot_username": "passerelle_bot"}),
        "appservice.bot_username",
        "ghost",
    )


def test_bot_username_equal_to_the_prefix_is_fine() -> None:
    config = parse_config(minimal(appservice={"bot_username": "passerelle_"}), env={})
    assert not config.is_ghost(config.bot_mxid)


# --- Environment overrides ----------------------------------------------------------------------


def test_env_database_url() -> None:
    config = parse_config(minimal(), env={"PASSERELLE_DATABASE__URL": "sqlite:///other.db"})
    assert config.database.url == "sqlite+aiosqlite:///other.db"
    assert config.env_overrides == ("database.url",)


def test_env_values_are_yaml_scalars_and_beat_the_file() -> None:
    config = parse_config(
        minimal(appservice={"port": 1000}, homeserver={"verify_ssl": True}),
        env={
            "PASSERELLE_APPSERVICE__PORT": "1234",
            "PASSERELLE_HOMESERVER__VERIFY_SSL": "false",
            "PASSERELLE_HOMESERVER__REQUEST_TIMEOUT": "2.5",
        },
    )
    assert config.appservice.port == 1234
    assert type(config.appservice.port) is int
    assert config.homeserver.verify_ssl is False
    assert config.homeserver.request_timeout == 2.5


def test_env_override_of_a_bad_value_names_the_key() -> None:
    config_error(minimal(), "appservice.port", "integer", env={"PASSERELLE_APPSERVICE__PORT": "x"})


def test_env_override_unknown_section_names_the_variable() -> None:
    config_error(minimal(), "PASSERELLE_FOO__BAR", "foo", env={"PASSERELLE_FOO__BAR": "1"})


def test_env_override_unknown_key_names_the_variable() -> None:
    config_error(
        minimal(),
        "PASSERELLE_APPSERVICE__HS_TOKN",
        "appservice.hs_tokn",
        env={"PASSERELLE_APPSERVICE__HS_TOKN": HS_TOKEN},
    )


@pytest.mark.parametrize(
    "name",
    ["PASSERELLE_X", "PASSERELLE_APPSERVICE", "PASSERELLE__PORT", "PASSERELLE_APPSERVICE__"],
)
def test_env_override_without_section_is_refused(name: str) -> None:
    config_error(minimal(), name, "PASSERELLE_<SECTION>__<KEY>", env={name: "1"})


def test_env_override_below_a_scalar_is_refused() -> None:
    config_error(
        minimal(), "PASSERELLE_APPSERVICE__PORT__X", env={"PASSERELLE_APPSERVICE__PORT__X": "1"}
    )


def test_other_environment_variables_are_ignored() -> None:
    config = parse_config(minimal(), env={"HOME": "/root", "PASSERELLEX": "1", "PATH": "/bin"})
    assert config.env_overrides == ()


def test_env_overrides_list_keys_never_values() -> None:
    secret_token = "env-token-" + "Q" * 30
    password = "Pg-Secret-Password-42"
    env = {
        "PASSERELLE_APPSERVICE__AS_TOKEN": secret_token,
        "PASSERELLE_DATABASE__URL": f"postgresql://bridge:{password}@db/passerelle",
        "PASSERELLE_PERMISSIONS__EXAMPLE.ORG": "admin",
    }
    config = parse_config(minimal() | {"unknown_section": secret_token}, env=env)
    assert config.env_overrides == (
        "appservice.as_token",
        "database.url",
        "permissions.example.org",
    )
    assert config.appservice.as_token == secret_token
    assert config.permissions.level_for(UserID("@a:example.org")) is PermissionLevel.ADMIN
    shown = " ".join(config.warnings + config.env_overrides)
    assert config.warnings
    for value in (secret_token, password):
        assert value not in shown


@pytest.mark.parametrize("bad", ["short-" + "s" * 10, "has space " + "s" * 30])
def test_bad_env_token_is_not_echoed(bad: str) -> None:
    error = config_error(
        minimal(), "appservice.hs_token", env={"PASSERELLE_APPSERVICE__HS_TOKEN": bad}
    )
    assert bad not in str(error)
    assert bad.strip() not in str(error)


# --- Secrets and ghost IDs ----------------------------------------------------------------------


def test_secrets_include_tokens_and_database_password() -> None:
    config = parse_config(
        minimal(database={"url": "postgresql://bridge:db-Pass-word@db:5432/passerelle"}), env={}
    )
    assert set(config.secrets()) == {AS_TOKEN, HS_TOKEN, "db-Pass-word"}


def test_secrets_without_database_password() -> None:
    assert sorted(parse_config(minimal(), env={}).secrets()) == sorted([AS_TOKEN, HS_TOKEN])


def test_ghost_regex_is_anchored_and_escapes_the_domain() -> None:
    config = parse_config(minimal(), env={})
    regex = config.ghost_regex
    assert regex.startswith("^@")
    assert regex.endswith("$")
    assert r"example\.org" in regex
    assert re.match(regex, "@passerelle_alice:example.org")
    assert not re.match(regex, "@passerelle_alice:exampleXorg")
    assert not re.match(regex, "@passerelle_alice:example.org.evil.com")
    assert not re.search(regex, "@x@passerelle_alice:example.org")
    assert not re.search(regex, "@passerelle_alice:evil.example.org")


@pytest.mark.parametrize(
    ("mxid", "ghost"),
    [
        ("@passerelle_alice:example.org", True),
        ("@passerelle_a.b=c-d/e+f_0:example.org", True),
        ("@passerelle_alice:exampleXorg", False),
        ("@passerelle_alice:example.org.evil", False),
        ("@passerelle_:example.org", False),
        ("@passerelle_Alice:example.org", False),
        ("@passerelle:example.org", False),
        ("@other_alice:example.org", False),
        ("passerelle_alice:example.org", False),
        ("@passerelle_alice:example.org\n", False),
        ("@passerelle_alice:other.org", False),
    ],
)
def test_is_ghost(mxid: str, ghost: bool) -> None:
    config = parse_config(minimal(), env={})
    assert config.is_ghost(mxid) is ghost


def test_ghost_mxid_is_a_ghost() -> None:
    config = parse_config(minimal(homeserver={"domain": "example.org:8448"}), env={})
    mxid = config.ghost_mxid("bob")
    assert mxid == "@passerelle_bob:example.org:8448"
    assert config.is_ghost(mxid)
    assert not config.is_ghost(config.bot_mxid)


def test_template_with_regex_characters_is_escaped() -> None:
    config = parse_config(
        minimal(appservice={"ghost_username_template": "p.g+{localpart}"}), env={}
    )
    assert config.is_ghost("@p.g+bob:example.org")
    assert not config.is_ghost("@pxg+bob:example.org")
    assert not config.is_ghost("@p.ggbob:example.org")


def test_repr_of_the_config_holds_no_token() -> None:
    config = parse_config(minimal(), env={})
    assert AS_TOKEN not in repr(config)
    assert HS_TOKEN not in repr(config)


def test_a_local_address_on_another_port_than_the_listener_is_a_warning() -> None:
    config = parse_config(minimal(appservice={"port": 29331}), env={})
    assert any("appservice.port (29331)" in w for w in config.warnings)
    config = parse_config(minimal(), env={})
    assert config.warnings == ()
