"""generate_registration and the `passerelle` command line, on files in a temporary folder."""

from __future__ import annotations

import json
import logging
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bridge.cli import EXIT_CONFIG, EXIT_OK, main
from bridge.config import ConfigError, load_config
from bridge.registration import build_registration, generate_registration, new_token

# The Matrix spec files are kept in the repository (tests/spec/README.md: source, licence).
SPEC = Path(__file__).resolve().parents[1] / "spec"
SCHEMA = SPEC / "registration.schema.json"
TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")
AS_TOKEN = "as-" + "K" * 40
HS_TOKEN = "hs-" + "M" * 40
HOMESERVER = "homeserver:\n  address: https://matrix.example.org\n  domain: example.org\n"

CONFIG_WITH_COMMENTS = """\
# Passerelle for the ministry — keep this comment
homeserver:
  address: https://matrix.example.org  # the public address
  domain: example.org

# The bridge itself
appservice:
  port: 29331
  # tokens below are filled in by generate-registration
permissions:
  "@admin:example.org": admin
"""


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """The CLI may configure logging; leave the root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def read_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def schema() -> dict[str, Any]:
    data = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write(tmp_path / "config.yaml", CONFIG_WITH_COMMENTS)


# --- generate_registration ----------------------------------------------------------------------


def test_new_token_has_32_bytes_of_randomness() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(TOKEN.match(t) for t in tokens)


def test_generates_tokens_into_the_config(config_path: Path, tmp_path: Path) -> None:
    reg_path = tmp_path / "registration.yaml"
    config, generated = generate_registration(config_path, reg_path, env={})
    assert generated == ["appservice.as_token", "appservice.hs_token"]
    as_token, hs_token = config.appservice.as_token, config.appservice.hs_token
    assert TOKEN.match(as_token)
    assert TOKEN.match(hs_token)
    assert as_token != hs_token
    saved = read_yaml(config_path)
    assert saved["appservice"]["as_token"] == as_token
    assert saved["appservice"]["hs_token"] == hs_token
    assert saved["appservice"]["port"] == 29331
    # The rewritten file loads as it is, tokens required.
    reloaded = load_config(config_path, env={})
    assert reloaded.appservice.as_token == as_token
    assert reloaded.permissions.as_dict() == {"@admin:example.org": "admin"}
    registration = read_yaml(reg_path)
    assert registration["as_token"] == as_token
    assert registration["hs_token"] == hs_token


def test_keeps_the_users_comments(config_path: Path, tmp_path: Path) -> None:
    generate_registration(config_path, tmp_path / "registration.yaml", env={})
    text = config_path.read_text(encoding="utf-8")
    for comment in (
        "# Passerelle for the ministry — keep this comment",
        "# the public address",
        "# The bridge itself",
        "# tokens below are filled in by generate-registration",
    ):
        assert comment in text


def test_two_fresh_configs_get_different_tokens(tmp_path: Path) -> None:
    tokens: list[str] = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        path = write(folder / "config.yaml", CONFIG_WITH_COMMENTS)
        config, _ = generate_registration(path, folder / "registration.yaml", env={})
        tokens += [config.appservice.as_token, config.appservice.hs_token]
    assert len(set(tokens)) == 4


def test_existing_tokens_are_kept(config_path: Path, tmp_path: Path) -> None:
    text = CONFIG_WITH_COMMENTS.replace(
        "  port: 29331\n", f"  port: 29331\n  as_token: {AS_TOKEN}\n  hs_token: {HS_TOKEN}\n"
    )
    write(config_path, text)
    before = config_path.read_bytes()
    config, generated = generate_registration(config_path, tmp_path / "reg.yaml", env={})
    assert generated == []
    assert config_path.read_bytes() == before
    assert (config.appservice.as_token, config.appservice.hs_token) == (AS_TOKEN, HS_TOKEN)
    assert read_yaml(tmp_path / "reg.yaml")["as_token"] == AS_TOKEN


def test_only_the_missing_token_is_generated(config_path: Path, tmp_path: Path) -> None:
    write(
        config_path, CONFIG_WITH_COMMENTS.replace("  port: 29331\n", f"  as_token: {AS_TOKEN}\n")
    )
    config, generated = generate_registration(config_path, tmp_path / "reg.yaml", env={})
    assert generated == ["appservice.hs_token"]
    assert config.appservice.as_token == AS_TOKEN
    assert TOKEN.match(config.appservice.hs_token)
    assert read_yaml(config_path)["appservice"]["as_token"] == AS_TOKEN


def test_second_run_changes_nothing(config_path: Path, tmp_path: Path) -> None:
    reg_path = tmp_path / "reg.yaml"
    first, _ = generate_registration(config_path, reg_path, env={})
    config_text, reg_text = config_path.read_text(), reg_path.read_text()
    second, generated = generate_registration(config_path, reg_path, env={})
    assert generated == []
    assert second.appservice.as_token == first.appservice.as_token
    assert config_path.read_text() == config_text
    assert reg_path.read_text() == reg_text


def test_config_without_appservice_section(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "homeserver:\n  address: https://matrix.example.org\n  domain: example.org\n",
    )
    config, generated = generate_registration(path, tmp_path / "r.yaml", env={})
    assert len(generated) == 2
    assert read_yaml(path)["appservice"]["hs_token"] == config.appservice.hs_token


def test_registration_validates_against_the_schema(config_path: Path, tmp_path: Path) -> None:
    from jsonschema import Draft202012Validator

    spec = schema()
    Draft202012Validator.check_schema(spec)
    reg_path = tmp_path / "registration.yaml"
    generate_registration(config_path, reg_path, env={})
    registration = read_yaml(reg_path)
    errors = sorted(Draft202012Validator(spec).iter_errors(registration), key=str)
    assert errors == []


def test_registration_content(config_path: Path, tmp_path: Path) -> None:
    reg_path = tmp_path / "registration.yaml"
    config, _ = generate_registration(config_path, reg_path, env={})
    registration = read_yaml(reg_path)
    assert registration == build_registration(config)
    assert registration["id"] == "passerelle"
    assert registration["url"] == "http://127.0.0.1:29330"
    assert registration["sender_localpart"] == config.appservice.bot_username == "passerelle"
    assert registration["rate_limited"] is False
    namespaces = registration["namespaces"]
    entries = [*namespaces["users"], *namespaces["aliases"], *namespaces["rooms"]]
    assert namespaces["users"]
    assert namespaces["aliases"]
    for entry in entries:
        assert entry["exclusive"] is True
        regex = entry["regex"]
        assert regex.startswith("^"), regex
        assert regex.endswith("$"), regex
        assert regex.endswith(r":example\.org$"), regex
        re.compile(regex)
    user_regexes = [e["regex"] for e in namespaces["users"]]
    bot = f"@{config.appservice.bot_username}:example.org"
    assert any(re.fullmatch(r, bot) for r in user_regexes)
    ghost = config.ghost_mxid("alice")
    assert any(re.fullmatch(r, ghost) for r in user_regexes)
    for outsider in (
        "@alice:example.org",
        "@passerelle_alice:exampleXorg",
        "@passerelle_alice:example.org.evil",
        "@passerellexbot:example.org",
    ):
        assert not any(re.search(r, outsider) for r in user_regexes), outsider
    alias_regex = namespaces["aliases"][0]["regex"]
    assert re.fullmatch(alias_regex, "#passerelle_list:example.org")
    assert not re.search(alias_regex, "#passerelle_list:exampleXorg")
    assert not re.search(alias_regex, "#general:example.org")


def test_server_name_with_port_is_escaped(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "homeserver:\n  address: https://m.example.org\n  domain: m.example.org:8448\n",
    )
    config, _ = generate_registration(path, tmp_path / "r.yaml", env={})
    registration = read_yaml(tmp_path / "r.yaml")
    for entry in registration["namespaces"]["users"]:
        assert entry["regex"].endswith(r":m\.example\.org:8448$")
    assert config.is_ghost("@passerelle_x:m.example.org:8448")


def test_registration_file_is_private(config_path: Path, tmp_path: Path) -> None:
    config_path.chmod(0o644)
    reg_path = tmp_path / "registration.yaml"
    write(reg_path, "old: content\n").chmod(0o644)
    generate_registration(config_path, reg_path, env={})
    assert stat.S_IMODE(reg_path.stat().st_mode) == 0o600
    # The config holds the tokens now: nobody else may read it either.
    assert stat.S_IMODE(config_path.stat().st_mode) & 0o077 == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_yaml_error_leaves_both_files_untouched(tmp_path: Path) -> None:
    config_path = write(tmp_path / "config.yaml", CONFIG_WITH_COMMENTS + "logging: [\n")
    reg_path = write(tmp_path / "registration.yaml", "id: previous\n")
    before = (config_path.read_bytes(), reg_path.read_bytes())
    with pytest.raises(ConfigError) as info:
        generate_registration(config_path, reg_path, env={})
    assert info.value.key == "(file)"
    assert "line" in str(info.value)
    assert (config_path.read_bytes(), reg_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "registration.yaml"]


def test_invalid_config_leaves_both_files_untouched(tmp_path: Path) -> None:
    config_path = write(tmp_path / "config.yaml", CONFIG_WITH_COMMENTS.replace("29331", "seventy"))
    reg_path = tmp_path / "registration.yaml"
    before = config_path.read_bytes()
    with pytest.raises(ConfigError) as info:
        generate_registration(config_path, reg_path, env={})
    assert info.value.key == "appservice.port"
    assert config_path.read_bytes() == before
    assert not reg_path.exists()


def test_missing_registration_folder_keeps_the_config_usable(
    config_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(OSError):  # noqa: PT011 - any file error is fine here
        generate_registration(config_path, tmp_path / "missing" / "r.yaml", env={})
    # Whatever was saved is a complete, loadable config.
    load_config(config_path, env={}, require_tokens=False)


# --- Command line -------------------------------------------------------------------------------


def good_config(tmp_path: Path) -> Path:
    return write(
        tmp_path / "good.yaml",
        "homeserver:\n  address: https://matrix.example.org\n  domain: example.org\n"
        f"appservice:\n  as_token: {AS_TOKEN}\n  hs_token: {HS_TOKEN}\n",
    )


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = good_config(tmp_path)
    assert main(["check-config", "-c", str(path)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "ok" in out
    assert "@passerelle:example.org" in out
    assert err == ""
    assert AS_TOKEN not in out
    assert HS_TOKEN not in out


def test_check_config_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = good_config(tmp_path)
    path.write_text(path.read_text() + "extra: 1\n")
    assert main(["check-config", "-c", str(path)]) == EXIT_OK
    err = capsys.readouterr().err
    assert err.startswith("warning: ")
    assert "'extra'" in err


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            HOMESERVER
            + f"appservice:\n  as_token: {AS_TOKEN}\n  hs_token: {HS_TOKEN}\n  port: abc\n",
            "appservice.port",
        ),
        ("appservice:\n  hs_tokn: x\n", "appservice.hs_tokn"),
        (HOMESERVER + "database:\n  url: mysql://u:p@h/db\n", "database.url"),
        ("homeserver: [\n", "(file)"),
        ("", "homeserver.address"),
        ("- a\n", "(file)"),
    ],
)
def test_check_config_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    path = write(tmp_path / "bad.yaml", text)
    assert main(["check-config", "-c", str(path)]) == EXIT_CONFIG == 10
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"passerelle: config error: {key}"), err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "-c", str(tmp_path / "none.yaml")]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("passerelle: config error: (file)")
    assert len(err.splitlines()) == 1


def test_check_config_refuses_placeholder_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path / "c.yaml",
        "homeserver:\n  address: https://matrix.example.org\n  domain: example.org\n",
    )
    assert main(["check-config", "-c", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("passerelle: config error: appservice.as_token")


def test_check_config_bad_ipv6_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path / "c.yaml",
        f"homeserver:\n  address: http://[::1\n  domain: localhost\n"
        f"appservice:\n  as_token: {AS_TOKEN}\n  hs_token: {HS_TOKEN}\n",
    )
    assert main(["check-config", "-c", str(path)]) == EXIT_CONFIG
    assert capsys.readouterr().err.startswith("passerelle: config error: homeserver.address")


def test_cli_generate_registration(
    config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg_path = tmp_path / "registration.yaml"
    code = main(["generate-registration", "-c", str(config_path), "-r", str(reg_path)])
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "appservice.as_token" in out
    assert str(reg_path) in out
    config = load_config(config_path, env={})
    assert read_yaml(reg_path)["hs_token"] == config.appservice.hs_token
    assert config.appservice.as_token not in out
    assert main(["check-config", "-c", str(config_path)]) == EXIT_OK


def test_cli_generate_registration_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "c.yaml", "appservice:\n  port: 0\n")
    reg_path = tmp_path / "r.yaml"
    assert main(["generate-registration", "-c", str(path), "-r", str(reg_path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("passerelle: config error: ")
    assert not reg_path.exists()


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "generate-registration", "check-config", "demo"):
        assert re.search(rf"\b{re.escape(command)}\b", out), command


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "passerelle" in capsys.readouterr().err
