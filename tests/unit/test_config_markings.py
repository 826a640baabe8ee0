"""Config of classification markings (mail.markings) and links[].marking checked against it."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import parse_config
from tests.unit.test_config import config_error, minimal
from tests.unit.test_config_trust import with_link


def with_markings(link: dict[str, Any] | None = None, **markings: Any) -> dict[str, Any]:
    config = with_link(**(link or {}))
    config["mail"]["markings"] = markings
    return config


def test_defaults_are_the_igi_1300_levels_and_x_classification() -> None:
    markings = parse_config(minimal(), env={}).mail.markings
    assert markings.levels.names == (
        "NON PROTÉGÉ",
        "DIFFUSION RESTREINTE",
        "SECRET",
        "TRÈS SECRET",
    )
    assert markings.header == "X-Classification"


def test_a_link_marking_is_stored_as_the_configured_spelling() -> None:
    config = parse_config(with_link(marking="diffusion  restreinte"), env={})
    assert config.links[0].marking == "DIFFUSION RESTREINTE"
    assert config.links[0].settings().marking == "DIFFUSION RESTREINTE"
    assert parse_config(with_link(), env={}).links[0].marking is None


@pytest.mark.parametrize("value", ["CONFIDENTIEL DÉFENSE", "", 3, ["SECRET"], "S\u0415CRET"])
def test_a_link_marking_must_be_one_of_the_levels(value: Any) -> None:
    error = config_error(with_link(marking=value), "links[0].marking", "mail.markings.levels")
    assert "DIFFUSION RESTREINTE" in error.problem


def test_custom_levels_and_header() -> None:
    config = parse_config(
        with_markings({"marking": "Internal"}, levels=["Public", "Internal"], header="SIO-Label"),
        env={},
    )
    assert config.mail.markings.levels.names == ("Public", "Internal")
    assert config.mail.markings.header == "SIO-Label"
    assert config.links[0].marking == "Internal"
    config_error(
        with_markings({"marking": "SECRET"}, levels=["Public", "Internal"]),
        "links[0].marking",
        "Public, Internal",
    )


@pytest.mark.parametrize(
    "levels",
    [[], "SECRET", [""], ["  "], ["[SECRET]"], [1], ["a\nb"], ["x"] * 21, ["x" * 300]],
)
def test_bad_levels_are_refused(levels: Any) -> None:
    config_error(with_markings(levels=levels), "mail.markings.levels", "levels")


def test_levels_equal_once_normalised_are_refused() -> None:
    config_error(
        with_markings(levels=["Secret", "Très secret", "TRES SECRET"]),
        "mail.markings.levels",
        "listed twice",
    )


@pytest.mark.parametrize(
    "header", ["", "X Classification", "Subject", "From", "x-passerelle-loop", 5]
)
def test_bad_header_names_are_refused(header: Any) -> None:
    config_error(with_markings(header=header), "mail.markings.header", "header name")


def test_unknown_keys_are_refused() -> None:
    config_error(with_markings(subject_tag=True), "mail.markings.subject_tag", "unknown key")
