"""The fast config reader means what ruamel's reading meant (YAML 1.2), refuses a key given
twice, refuses Python tags, and the round-trip reader still keeps the comments it writes back."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bridge.config import ConfigError, _defaults, load_config, read_yaml_file
from bridge.config.base import EXAMPLE_CONFIG, _plain
from bridge.config.yaml12 import load
from bridge.registration import dump_yaml

SCALARS = """\
yes_word: yes
no_word: no
on_word: on
off_word: off
y: y
true_word: true
false_caps: FALSE
octal_new: 0o17
leading_zero: 017
hexadecimal: 0x1f
sexagesimal: 1:20
exponent: 1e3
float: 1.5
infinity: .inf
minus_infinity: -.inf
tilde: ~
empty:
null_caps: NULL
date: 2024-01-02
quoted: "017"
negative: -12
plus: +5
underscores: 1_000
version: 1.10
port: 8008
password: 'p@ss: "w0rd"'
"""


def test_scalars_mean_what_ruamel_read() -> None:
    fast = load(SCALARS)
    ruamel = _plain(YAML(typ="rt").load(SCALARS))
    assert fast == ruamel
    # The YAML 1.1 readings that would change a config's meaning are not taken:
    assert fast["yes_word"] == "yes"
    assert fast["off_word"] == "off"
    assert fast["leading_zero"] == 17
    assert fast["sexagesimal"] == "1:20"
    assert fast["exponent"] == 1000.0
    assert fast["octal_new"] == 15
    assert fast["date"] == dt.date(2024, 1, 2)


def test_nan_and_types() -> None:
    assert math.isnan(load("x: .nan")["x"])
    assert load("x: [1, two, {3: four}]") == {"x": [1, "two", {3: "four"}]}


def test_merge_keys_and_anchors() -> None:
    text = "base: &b {host: a, port: 1}\nother:\n  <<: *b\n  port: 2\n"
    assert load(text)["other"] == {"host": "a", "port": 2}


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\nb: 2\na: 3\n",
        "appservice:\n  as_token: one\n  as_token: two\n",
        "x: {1: a, 1: b}\n",
    ],
)
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="duplicate key") as info:
        read_yaml_file(path)
    assert "line " in str(info.value)
    # The message names the key, never the values (they may be tokens).
    assert "one" not in str(info.value)
    assert "two" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "x: !!python/object/apply:os.system ['true']\n",
        "x: !!python/name:os.system\n",
        "x: !custom 1\n",
    ],
)
def test_tags_beyond_the_schema_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml_file(path)


def test_round_trip_reading_keeps_the_comments(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("# the agency's\nhomeserver:  # ours\n  domain: example.org\n")
    data: Any = read_yaml_file(path, round_trip=True)
    written = dump_yaml(data)
    assert "# the agency's" in written
    assert "# ours" in written
    assert read_yaml_file(path) == {"homeserver": {"domain": "example.org"}}


def test_env_overrides_do_not_leak_into_the_next_config(tmp_path: Path) -> None:
    """The example's defaults are read once and copied: an override is the config's own."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "homeserver: {address: 'https://matrix.example.org', domain: example.org}\n"
        "appservice: {as_token: generate, hs_token: generate}\n"
    )
    pristine = load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    load_config(
        path,
        env={
            "PASSERELLE_PERMISSIONS__EXAMPLE.ORG": "admin",
            "PASSERELLE_MAIL__POLL_INTERVAL": "7",
        },
        require_tokens=False,
    )
    assert _defaults() == pristine
    assert load_config(path, env={}, require_tokens=False).mail.poll_interval != 7
