"""Config of inbound webhooks: names, rooms, secrets (inline or in a file), limits."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bridge.config import HookSettings, OutHookSettings, load_config, parse_config
from bridge.logsetup import SecretMask
from bridge.webhooks.signature import decode_secret
from tests.unit.test_config import config_error, minimal

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
ROOM = "!ops:example.org"


def with_hooks(hooks: Any, **section: Any) -> dict[str, Any]:
    return minimal(webhooks={"hooks": hooks, **section})


def test_defaults() -> None:
    config = parse_config(minimal(), env={})
    assert config.webhooks.hooks == {}
    assert config.webhooks.max_body_size == 65536
    assert config.webhooks.tolerance == 300


def test_inline_secret() -> None:
    config = parse_config(with_hooks({"ci-build": {"room": ROOM, "secret": SECRET}}), env={})
    hook = config.webhooks.hooks["ci-build"]
    assert hook == HookSettings(name="ci-build", room_id=ROOM, secret=SECRET)
    assert hook.key == b"k" * 32
    assert config.is_ghost(config.hook_ghost_mxid("ci-build"))
    assert "webhook-ci-build" in config.hook_ghost_mxid("ci-build")


def test_secret_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "hook.whsec").write_text(SECRET + "\n", encoding="utf-8")
    path = tmp_path / "config.yaml"
    with path.open("w", encoding="utf-8") as f:
        YAML().dump(with_hooks({"h1": {"room": ROOM, "secret_file": "hook.whsec"}}), f)
    config = load_config(path, env={})
    assert config.webhooks.hooks["h1"].secret == SECRET


@pytest.mark.parametrize("name", ["", "Upper", "under_score", "x" * 33, "dot.ted"])
def test_bad_names(name: str) -> None:
    hooks = {name: {"room": ROOM, "secret": SECRET}}
    config_error(with_hooks(hooks), f"webhooks.hooks.{name}", "a-z, 0-9")


def test_name_of_32_accepted() -> None:
    name = "a-" * 16
    assert (
        name
        in parse_config(
            with_hooks({name: {"room": ROOM, "secret": SECRET}}), env={}
        ).webhooks.hooks
    )


def test_both_or_neither_secret(tmp_path: Path) -> None:
    both = {"room": ROOM, "secret": SECRET, "secret_file": str(tmp_path / "x")}
    config_error(with_hooks({"h": both}), "webhooks.hooks.h.secret", "exactly one")
    config_error(with_hooks({"h": {"room": ROOM}}), "webhooks.hooks.h.secret", "exactly one")


def test_unreadable_secret_file(tmp_path: Path) -> None:
    entry = {"room": ROOM, "secret_file": str(tmp_path / "missing")}
    config_error(with_hooks({"h": entry}), "webhooks.hooks.h.secret_file", "cannot read")


@pytest.mark.parametrize(
    "secret",
    ["plain-password", "whsec_%%%", "whsec_" + base64.b64encode(b"short").decode()],
)
def test_bad_secret_never_shown(secret: str) -> None:
    error = config_error(
        with_hooks({"h": {"room": ROOM, "secret": secret}}), "webhooks.hooks.h.secret", "whsec_"
    )
    assert secret not in str(error)


@pytest.mark.parametrize(
    ("entry", "key", "fragment"),
    [
        ({"room": "ops", "secret": SECRET}, "webhooks.hooks.h.room", "room ID"),
        ({"secret": SECRET}, "webhooks.hooks.h.room", "room ID"),
        ({"room": ROOM, "secret": SECRET, "colour": "red"}, "webhooks.hooks.h.colour", "unknown"),
        ("!room:x", "webhooks.hooks.h", "mapping"),
    ],
)
def test_bad_entries(entry: Any, key: str, fragment: str) -> None:
    config_error(with_hooks({"h": entry}), key, fragment)


def test_limits() -> None:
    config_error(with_hooks({}, max_body_size=10), "webhooks.max_body_size")
    config_error(with_hooks({}, tolerance=0), "webhooks.tolerance")
    config_error(minimal(webhooks={"hooks": []}), "webhooks.hooks", "mapping")


def test_secret_redacted_in_logs() -> None:
    config = parse_config(with_hooks({"h": {"room": ROOM, "secret": SECRET}}), env={})
    assert SECRET in config.secrets()
    assert SECRET not in repr(config)
    record = logging.LogRecord(
        "passerelle.webhooks", logging.INFO, "x", 1, "got %s and %s", (SECRET, SECRET[6:]), None
    )
    SecretMask(config.secrets()).filter(record)
    assert SECRET[6:] not in record.getMessage()
    assert decode_secret(SECRET) == b"k" * 32


def test_rotation_grace() -> None:
    assert parse_config(minimal(), env={}).webhooks.rotation_grace == 86400
    assert parse_config(with_hooks({}, rotation_grace=60), env={}).webhooks.rotation_grace == 60
    config_error(with_hooks({}, rotation_grace=0), "webhooks.rotation_grace")


# --- outbound hooks and the egress list ---------------------------------------------------------

URL = "https://tickets.example.org/hooks/matrix"


def with_outgoing(
    outgoing: Any, egress: Any = ("https://tickets.example.org/hooks",), **kw: Any
) -> dict[str, Any]:
    return minimal(webhooks={"outgoing": outgoing, "egress": list(egress), **kw})


def test_outgoing_defaults() -> None:
    webhooks = parse_config(minimal(), env={}).webhooks
    assert webhooks.outgoing == {}
    assert webhooks.egress.allows_nothing
    assert webhooks.egress_dns_server is None
    assert (webhooks.delivery_timeout, webhooks.give_up_after) == (10, 86400)


def test_outgoing_hook() -> None:
    config = parse_config(
        with_outgoing(
            {"tickets": {"room": ROOM, "url": URL, "secret": SECRET}},
            egress_dns_server="127.0.0.53:5353",
            delivery_timeout=2.5,
            give_up_after=600,
        ),
        env={},
    )
    hook = config.webhooks.outgoing["tickets"]
    assert hook == OutHookSettings(name="tickets", room_id=ROOM, url=URL, secret=SECRET)
    assert SECRET not in repr(hook)
    assert SECRET in config.secrets()
    assert config.webhooks.egress_dns_server == ("127.0.0.53", 5353)
    assert (config.webhooks.delivery_timeout, config.webhooks.give_up_after) == (2.5, 600)


@pytest.mark.parametrize(
    "url",
    [
        "https://tickets.example.org/other",  # outside the prefix's path
        "https://tickets.example.org/hooksx",  # not at a "/" boundary
        "https://evil.example.org/hooks/x",
        "http://tickets.example.org/hooks/x",  # another scheme
        "https://tickets.example.org:8443/hooks/x",  # another port
        "https://user@tickets.example.org/hooks/x",
        "http://169.254.169.254/latest/meta-data",
        "http://127.0.0.1/hooks",
        "ftp://tickets.example.org/hooks",
        "not a url",
    ],
)
def test_outgoing_url_must_be_allowed(url: str) -> None:
    entry = {"room": ROOM, "url": url, "secret": SECRET}
    config_error(with_outgoing({"t": entry}), "webhooks.outgoing.t.url")


def test_nothing_allowed_without_egress() -> None:
    entry = {"room": ROOM, "url": URL, "secret": SECRET}
    config_error(with_outgoing({"t": entry}, egress=()), "webhooks.outgoing.t.url")


@pytest.mark.parametrize(
    ("entry", "key", "fragment"),
    [
        ({"room": ROOM, "url": URL}, "webhooks.outgoing.t.secret", "exactly one"),
        ({"room": ROOM, "url": URL, "secret": "nope"}, "webhooks.outgoing.t.secret", "whsec_"),
        ({"url": URL, "secret": SECRET}, "webhooks.outgoing.t.room", "room ID"),
        ({"room": ROOM, "secret": SECRET}, "webhooks.outgoing.t.url", "URL"),
        ({"room": ROOM, "url": URL, "secret": SECRET, "x": 1}, "webhooks.outgoing.t.x", "unknown"),
        ([URL], "webhooks.outgoing.t", "mapping"),
    ],
)
def test_bad_outgoing_entries(entry: Any, key: str, fragment: str) -> None:
    config_error(with_outgoing({"t": entry}), key, fragment)


def test_names_unique_across_directions() -> None:
    raw = with_outgoing({"ci": {"room": ROOM, "url": URL, "secret": SECRET}})
    raw["webhooks"]["hooks"] = {"ci": {"room": ROOM, "secret": SECRET}}
    config_error(raw, "webhooks.outgoing.ci", "unique")


@pytest.mark.parametrize("egress", [["gopher://x/"], ["https://a@b/"], [7], ["10.0.0.0/33"]])
def test_bad_egress_entries(egress: Any) -> None:
    config_error(with_outgoing({}, egress=egress), "webhooks.egress")


def test_bad_delivery_settings() -> None:
    config_error(with_outgoing({}, delivery_timeout=0), "webhooks.delivery_timeout")
    config_error(with_outgoing({}, give_up_after=5), "webhooks.give_up_after")
    config_error(with_outgoing({}, egress_dns_server="dns.example"), "webhooks.egress_dns_server")
