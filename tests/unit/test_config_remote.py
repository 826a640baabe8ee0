"""Config of other ministries' homeservers (remotes) and of links to rooms on them."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bridge.config import (
    EXAMPLE_CONFIG,
    Config,
    RemoteLinkSpec,
    RemoteSettings,
    load_config,
    parse_config,
)
from bridge.config.remote import REMOTE_KEYS
from bridge.core.ghosts import decode_localpart, encode_localpart
from bridge.logsetup import SecretMask
from tests.unit.test_config import config_error, minimal

NAME = "ministere-interieur"
KEY = f"remotes.{NAME}"
TOKEN = "syt_cGFzc2VyZWxsZQ_" + "Qk9iZ1hKT3Z" * 3
REMOTE: dict[str, Any] = {
    "address": "https://matrix.interieur.example.org",
    "server_name": "interieur.example.org",
    "user_id": "@passerelle-agence:interieur.example.org",
    "access_token": TOKEN,
}
LIST = "achats@finances.gouv.fr"
MAILBOX = {"host": "imap.finances.gouv.fr", "user": "achats", "password": "pw"}
ROOM = "!agence:example.org"


def with_remote(links: list[Any] | None = None, name: str = NAME, **entry: Any) -> dict[str, Any]:
    """The minimal config with one remote (REMOTE changed by entry; None removes a key)."""
    values = {k: v for k, v in (REMOTE | entry).items() if v is not None}
    config = minimal(remotes={name: values})
    if links is not None:
        config["links"] = links
    return config


def remote(**entry: Any) -> RemoteSettings:
    return parse_config(with_remote(**entry), env={}).remotes[NAME]


def remote_link(**entry: Any) -> dict[str, Any]:
    return {
        "room": ROOM,
        "remote": NAME,
        "remote_room": "#coordination:interieur.example.org",
    } | entry


# --- A remote entry ------------------------------------------------------------------------------


def test_none_by_default() -> None:
    config = parse_config(minimal(), env={})
    assert config.remotes == {}
    assert config.remote_links == ()


def test_full_entry(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    settings = remote(
        address="https://matrix.interieur.example.org:8448/",
        ca_file=str(ca),
        allowed_servers=["interieur.example.org", "prefecture.example.org"],
        display_suffix="(Intérieur)",
        agency_suffix="(Agence)",
        max_media_size=1024,
        request_timeout=12.5,
        sync_timeout=0,
        give_up_after=3600,
    )
    assert settings == RemoteSettings(
        name=NAME,
        address="https://matrix.interieur.example.org:8448",
        server_name="interieur.example.org",
        user_id="@passerelle-agence:interieur.example.org",
        access_token=TOKEN,
        ca_file=str(ca),
        allowed_servers=("interieur.example.org", "prefecture.example.org"),
        display_suffix="(Intérieur)",
        agency_suffix="(Agence)",
        max_media_size=1024,
        request_timeout=12.5,
        sync_timeout=0.0,
        give_up_after=3600.0,
    )


def test_defaults() -> None:
    settings = remote()
    assert settings.ca_file is None
    assert settings.allowed_servers == ("interieur.example.org",)
    assert settings.display_suffix == "(interieur.example.org)"
    assert settings.agency_suffix == "(example.org)"  # homeserver.domain of minimal()
    assert settings.max_media_size == 10485760
    assert (settings.request_timeout, settings.sync_timeout) == (30.0, 30.0)
    assert settings.give_up_after == 86400.0


def test_several_remotes() -> None:
    config = minimal(
        remotes={
            "a": REMOTE,
            "justice-2": REMOTE
            | {"server_name": "justice.example.org", "user_id": "@p:justice.example.org"},
        }
    )
    assert sorted(parse_config(config, env={}).remotes) == ["a", "justice-2"]


def _example_blocks() -> tuple[str, str]:
    """The commented-out remote entry and remote link of the example config, uncommented."""
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    entry = re.search(r"^#   ministere-interieur:\n((?:#       .*\n)+)remotes: \{\}$", text, re.M)
    link = re.search(r"^(#   - room: \"!otherroom.*\n(?:#     .*\n)+)links: \[\]$", text, re.M)
    assert entry is not None
    assert link is not None
    return (
        "ministere-interieur:\n" + re.sub(r"^#", "", entry.group(1), flags=re.M),
        re.sub(r"^#", "", link.group(1), flags=re.M),
    )


def test_example_entry_is_valid_and_documents_every_key(tmp_path: Path) -> None:
    entry_text, link_text = _example_blocks()
    entry = YAML(typ="safe").load(entry_text)
    links = YAML(typ="safe").load(link_text)
    assert set(entry[NAME]) | {"access_token"} == set(REMOTE_KEYS)
    token_file = tmp_path / "interieur.token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    entry[NAME]["access_token_file"] = str(token_file)
    config = parse_config(minimal(remotes=entry) | {"links": links}, env={})
    settings = config.remotes[NAME]
    assert settings.access_token == TOKEN
    assert settings.display_suffix == "(Intérieur)"
    assert config.remote_links == (
        RemoteLinkSpec(
            "!otherroom:agency.example.org", NAME, "#coordination:interieur.example.org"
        ),
    )


def test_example_default_is_an_empty_mapping() -> None:
    data = YAML(typ="safe").load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    assert data["remotes"] == {}


@pytest.mark.parametrize(
    "name", ["Interieur", "a" * 33, "ministere.interieur", "a_b", "été", "a b", "123:"]
)
def test_remote_name_is_checked(name: str) -> None:
    config_error(with_remote(name=name), f"remotes.{name}", "name")


@pytest.mark.parametrize(
    ("name", "shown"), [("a\nb", "'a\\nb'"), ("interieur\n", "'interieur\\n'")]
)
def test_remote_name_with_a_line_break_stays_on_one_line(name: str, shown: str) -> None:
    config_error(with_remote(name=name), f"remotes.{shown}", "name")


def test_longest_and_shortest_names() -> None:
    assert list(parse_config(with_remote(name="a" * 32), env={}).remotes) == ["a" * 32]
    assert list(parse_config(with_remote(name="0"), env={}).remotes) == ["0"]


@pytest.mark.parametrize("value", [[], "x", None, 3])
def test_remotes_must_be_a_mapping(value: Any) -> None:
    config_error(minimal() | {"remotes": value}, "remotes", "mapping")


@pytest.mark.parametrize("value", [None, "https://x", []])
def test_entry_must_be_a_mapping(value: Any) -> None:
    config_error(minimal(remotes={NAME: value}), KEY, "mapping")


def test_unknown_key() -> None:
    config_error(with_remote(adress="https://x.example.org"), f"{KEY}.adress", "unknown key")


@pytest.mark.parametrize("name", ["address", "server_name", "user_id"])
def test_required_keys(name: str) -> None:
    config_error(with_remote(**{name: None}), f"{KEY}.{name}", "required")


# --- address -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("ftp://matrix.interieur.example.org", "http"),
        ("https://", "host"),
        ("matrix.interieur.example.org", "http"),
        ("https://matrix.interieur.example.org/?x=1", "query"),
        ("https://matrix.interieur.example.org/#top", "fragment"),
        ("https://user:pw@matrix.interieur.example.org", "password"),
        ("https://matrix.interieur.example.org:99999", "URL"),
        ("http://matrix.interieur.example.org", "only allowed for a server on this machine"),
        ("http://10.0.0.5:8008", "only allowed for a server on this machine"),
        ("http://127.0.0.1.example.org", "only allowed for a server on this machine"),
        (42, "string"),
        ("", "empty"),
    ],
)
def test_bad_address(address: Any, fragment: str) -> None:
    config_error(with_remote(address=address), f"{KEY}.address", fragment)


@pytest.mark.parametrize(
    ("address", "stored"),
    [
        ("http://127.0.0.1:8008/", "http://127.0.0.1:8008"),
        ("http://localhost:8008", "http://localhost:8008"),
        ("http://[::1]:8008", "http://[::1]:8008"),
        ("https://ministry.example.org/matrix/", "https://ministry.example.org/matrix"),
    ],
)
def test_good_address(address: str, stored: str) -> None:
    assert remote(address=address).address == stored


# --- server_name and user_id ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "server", ["bad server", "*.example.org", "", 42, "-x.org", "a:b:c", "interieur.example.org\n"]
)
def test_bad_server_name(server: Any) -> None:
    config_error(with_remote(server_name=server), f"{KEY}.server_name", "server name")


@pytest.mark.parametrize("server", ["example.org", "EXAMPLE.org"])
def test_the_agency_homeserver_is_not_a_remote(server: str) -> None:
    config_error(
        with_remote(server_name=server, user_id=f"@p:{server}"),
        f"{KEY}.server_name",
        "homeserver.domain",
    )


def test_server_name_with_a_port() -> None:
    settings = remote(
        server_name="interieur.example.org:8448", user_id="@p:interieur.example.org:8448"
    )
    assert settings.server_name == "interieur.example.org:8448"


@pytest.mark.parametrize(
    ("user_id", "fragment"),
    [
        ("@passerelle:other.example.org", "server_name"),
        ("@passerelle:interieur.example.org:8448", "server_name"),
        ("@passerelle:INTERIEUR.example.org", "server_name"),
        ("@passerelle:interieur.example.org\n", "user ID"),
        ("@Passerelle:interieur.example.org", "user ID"),
        ("passerelle:interieur.example.org", "user ID"),
        ("@passerelle", "user ID"),
        ("@:interieur.example.org", "user ID"),
        ("@a b:interieur.example.org", "user ID"),
        ("@" + "a" * 255 + ":interieur.example.org", "user ID"),
        (42, "user ID"),
    ],
)
def test_bad_user_id(user_id: Any, fragment: str) -> None:
    config_error(with_remote(user_id=user_id), f"{KEY}.user_id", fragment)


# --- access token --------------------------------------------------------------------------------


def test_token_from_a_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "interieur.token").write_text(TOKEN + "\r\n", encoding="utf-8")
    path = tmp_path / "config.yaml"
    YAML(typ="safe").dump(
        with_remote(access_token=None, access_token_file="secrets/interieur.token"), path
    )
    assert load_config(path, env={}).remotes[NAME].access_token == TOKEN


def test_token_file_that_cannot_be_read(tmp_path: Path) -> None:
    config = with_remote(access_token=None, access_token_file=str(tmp_path / "missing"))
    config_error(config, f"{KEY}.access_token_file", "cannot read")


@pytest.mark.parametrize(
    ("entry", "key", "fragment"),
    [
        ({"access_token": None}, "access_token", "exactly one"),
        ({"access_token_file": "/etc/passerelle/t"}, "access_token", "exactly one"),
        ({"access_token": ""}, "access_token", "non-empty"),
        ({"access_token": 42}, "access_token", "non-empty"),
        ({"access_token": None, "access_token_file": 42}, "access_token_file", "file path"),
        ({"access_token": TOKEN + " x"}, "access_token", "spaces"),
        ({"access_token": TOKEN + "\r\nX-Evil: 1"}, "access_token", "control"),
    ],
)
def test_bad_token(entry: dict[str, Any], key: str, fragment: str) -> None:
    error = config_error(with_remote(**entry), f"{KEY}.{key}", fragment)
    assert TOKEN not in str(error)


def test_empty_token_file(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("\n", encoding="utf-8")
    config = with_remote(access_token=None, access_token_file=str(tmp_path / "t"))
    config_error(config, f"{KEY}.access_token", "non-empty")


def test_token_is_a_secret_and_never_shown() -> None:
    config = parse_config(with_remote(), env={})
    assert TOKEN in config.secrets()
    assert TOKEN not in repr(config.remotes[NAME])
    assert TOKEN not in repr(config)
    record = logging.LogRecord(
        "passerelle.remote", logging.INFO, "x", 1, "sync %s", (TOKEN,), None
    )
    SecretMask(config.secrets()).filter(record)
    assert TOKEN not in record.getMessage()


# --- ca_file, allowed_servers, suffixes, limits --------------------------------------------------


def test_ca_file_must_be_a_path() -> None:
    config_error(with_remote(ca_file=42), f"{KEY}.ca_file", "file path")


@pytest.mark.parametrize(
    ("servers", "fragment"),
    [
        (["*.example.org"], "wildcards are not allowed"),
        (["*"], "wildcards are not allowed"),
        (["interieur.example.org", "prefecture.*"], "wildcards are not allowed"),
        ([], "non-empty list"),
        ("interieur.example.org", "list"),
        (None, "list"),
        ([42], "not a valid server name"),
        (["bad server"], "not a valid server name"),
        (["interieur.example.org\n"], "not a valid server name"),
        (["example.org"], "agency's own server"),
        (["Example.ORG"], "agency's own server"),
    ],
)
def test_bad_allowed_servers(servers: Any, fragment: str) -> None:
    config = with_remote()
    config["remotes"][NAME]["allowed_servers"] = servers
    config_error(config, f"{KEY}.allowed_servers", fragment)


def test_allowed_servers_are_exact_and_deduplicated() -> None:
    servers = ["b.example.org", "interieur.example.org", "b.example.org", "[::1]:8448"]
    settings = remote(allowed_servers=servers)
    assert settings.allowed_servers == ("b.example.org", "interieur.example.org", "[::1]:8448")


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("display_suffix", "", "not be empty"),
        ("display_suffix", "   ", "not be empty"),
        ("display_suffix", "x" * 65, "at most 64"),
        ("display_suffix", "(Intérieur)\n(Admin)", "one line"),
        ("display_suffix", "(Int\u202eérieur)", "printable"),
        ("display_suffix", 42, "string"),
        ("display_suffix", None, "string"),
        ("agency_suffix", "x" * 65, "at most 64"),
        ("agency_suffix", "a\tb", "one line"),
        ("agency_suffix", ["(Agence)"], "string"),
    ],
)
def test_bad_suffix(name: str, value: Any, fragment: str) -> None:
    config = with_remote()
    config["remotes"][NAME][name] = value
    config_error(config, f"{KEY}.{name}", fragment)


def test_suffix_limits() -> None:
    settings = remote(display_suffix="x" * 64, agency_suffix="")
    assert settings.display_suffix == "x" * 64
    assert settings.agency_suffix == ""


def test_too_long_default_display_suffix_asks_for_one() -> None:
    server = "a" * 60 + ".example.org"
    config = with_remote(server_name=server, user_id=f"@p:{server}")
    config_error(config, f"{KEY}.display_suffix", "default", "set one")
    config["remotes"][NAME]["display_suffix"] = "(Ministère A)"
    assert parse_config(config, env={}).remotes[NAME].display_suffix == "(Ministère A)"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_media_size", 0),
        ("max_media_size", (1 << 31) + 1),
        ("max_media_size", 1.5),
        ("max_media_size", True),
        ("max_media_size", "10M"),
        ("request_timeout", 0.5),
        ("request_timeout", 601),
        ("request_timeout", "30"),
        ("sync_timeout", -1),
        ("sync_timeout", 301),
        ("give_up_after", 59),
        ("give_up_after", 30 * 86400 + 1),
        ("give_up_after", None),
    ],
)
def test_bad_limit(name: str, value: Any) -> None:
    config = with_remote()
    config["remotes"][NAME][name] = value
    config_error(config, f"{KEY}.{name}")


def test_limit_bounds() -> None:
    low = remote(max_media_size=1, request_timeout=1, sync_timeout=0, give_up_after=60)
    assert (low.max_media_size, low.request_timeout, low.sync_timeout, low.give_up_after) == (
        1,
        1.0,
        0.0,
        60.0,
    )
    high = remote(
        max_media_size=1 << 31, request_timeout=600, sync_timeout=300, give_up_after=30 * 86400
    )
    assert high.max_media_size == 1 << 31
    assert (high.request_timeout, high.sync_timeout, high.give_up_after) == (
        600.0,
        300.0,
        30 * 86400.0,
    )


# --- Links to remote rooms -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "remote_room",
    [
        "#coordination:interieur.example.org",
        "!abcDEF123:interieur.example.org",
        "!abcDEF123",  # room version 12: no server part
        "#coordination:other.example.org:8448",
    ],
)
def test_remote_link(remote_room: str) -> None:
    config = parse_config(with_remote(links=[remote_link(remote_room=remote_room)]), env={})
    assert config.remote_links == (RemoteLinkSpec(ROOM, NAME, remote_room),)
    assert config.links == ()


def test_mail_and_remote_links_side_by_side() -> None:
    config = with_remote(
        links=[
            remote_link(),
            {"room": ROOM, "address": LIST},
            remote_link(remote_room="!other:interieur.example.org"),
        ]
    )
    config["mail"] = {"mailboxes": {LIST: MAILBOX}}
    parsed = parse_config(config, env={})
    assert [link.address for link in parsed.links] == [LIST]
    assert [link.remote_room for link in parsed.remote_links] == [
        "#coordination:interieur.example.org",
        "!other:interieur.example.org",
    ]


def test_address_and_remote_together() -> None:
    config = with_remote(links=[remote_link(address=LIST)])
    config["mail"] = {"mailboxes": {LIST: MAILBOX}}
    config_error(config, "links[0].remote", "address", "remote")


@pytest.mark.parametrize("remote_name", ["ministere-justice", "", None, 42, ["x"]])
def test_remote_must_be_configured(remote_name: Any) -> None:
    config_error(
        with_remote(links=[remote_link(remote=remote_name)]), "links[0].remote", "not one of"
    )


def test_remote_link_without_remotes() -> None:
    config = minimal()
    config["links"] = [remote_link()]
    config_error(config, "links[0].remote", "not one of remotes")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("allowed_senders", ["interieur.example.org"]),
        ("thread_mode", "flat"),
        ("from_address", "a@example.org"),
        ("send_edits", False),
        ("egress_domains", []),
    ],
)
def test_mail_only_keys_on_a_remote_link(name: str, value: Any) -> None:
    config = with_remote(links=[remote_link(**{name: value})])
    config_error(config, f"links[0].{name}", "only for mail links")


def test_remote_room_on_a_mail_link() -> None:
    config = with_remote(links=[{"room": ROOM, "address": LIST, "remote_room": "#a:b.org"}])
    config["mail"] = {"mailboxes": {LIST: MAILBOX}}
    config_error(config, "links[0].remote_room", "only for remote links")


def test_unknown_key_on_a_remote_link() -> None:
    config = with_remote(links=[remote_link(remote_rooom="#a:b.org")])
    config_error(config, "links[0].remote_rooom", "unknown key")


@pytest.mark.parametrize(
    "remote_room",
    [
        None,
        42,
        "",
        "coordination:interieur.example.org",
        "@user:interieur.example.org",
        "!",
        "#",
        "#coordination",
        "#:interieur.example.org",
        "!a b:interieur.example.org",
        "!a\tb:interieur.example.org",
        "!a\n:interieur.example.org",
        "#a:interieur.example.org\u2028",
        "!" + "a" * 255,
    ],
)
def test_bad_remote_room(remote_room: Any) -> None:
    config = with_remote(links=[remote_link(remote_room=remote_room)])
    config_error(config, "links[0].remote_room", "room ID")


@pytest.mark.parametrize("room", [None, "#alias:example.org", "!", "!a b:example.org", 42])
def test_bad_agency_room_on_a_remote_link(room: Any) -> None:
    config_error(with_remote(links=[remote_link(room=room)]), "links[0].room", "room ID")


def test_remote_room_linked_twice() -> None:
    other_room = remote_link(room="!autre:example.org")
    config_error(with_remote(links=[remote_link(), other_room]), "links[1].remote_room", "twice")


def test_remote_link_entry_must_be_a_mapping() -> None:
    config_error(with_remote(links=["!a:example.org"]), "links[0]", "remote_room")


# --- Ghosts of remote users ----------------------------------------------------------------------


def test_remote_ghost_mxid() -> None:
    config: Config = parse_config(with_remote(), env={})
    ghost = config.remote_ghost_mxid(NAME, "@alice.martin:interieur.example.org")
    assert ghost.endswith(":example.org")
    assert config.is_ghost(ghost)
    assert ghost == config.remote_ghost_mxid(NAME, "@alice.martin:interieur.example.org")
    localpart = ghost[1:].split(":")[0].removeprefix("passerelle_")
    assert decode_localpart(localpart) == f"{NAME}/@alice.martin:interieur.example.org"


def test_remote_ghosts_differ_from_mail_ghosts_and_between_remotes() -> None:
    config = parse_config(with_remote(), env={})
    user = "@alice:interieur.example.org"
    ghosts = {
        config.remote_ghost_mxid(NAME, user),
        config.remote_ghost_mxid("justice", user),
        config.remote_ghost_mxid(NAME, "@alice:justice.example.org"),
    }
    assert len(ghosts) == 3
    mail_ghost = config.ghost_mxid(encode_localpart("alice@interieur.example.org"))
    assert mail_ghost not in ghosts


def test_a_user_id_too_long_to_encode_gets_a_ghost_within_the_spec_limit() -> None:
    """A remote user ID of 255 bytes is about three times longer once encoded: its ghost
    would be refused by the homeserver. It gets a digest instead, still one per user."""
    config = parse_config(with_remote(), env={})
    long_a = "@" + "é" * 100 + ":interieur.example.org"
    long_b = "@" + "è" * 100 + ":interieur.example.org"
    ghost_a = config.remote_ghost_mxid(NAME, long_a)
    assert len(ghost_a.encode("utf-8")) <= 255
    assert config.is_ghost(ghost_a)
    assert ghost_a == config.remote_ghost_mxid(NAME, long_a)
    assert ghost_a != config.remote_ghost_mxid(NAME, long_b)
    assert ghost_a != config.remote_ghost_mxid("autre", long_a)
