"""Config of sender authentication (mail.trust) and the per-link trust settings."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import parse_config
from bridge.core.links import LinkSettings
from tests.unit.test_config import config_error, minimal

LIST = "achats@finances.gouv.fr"
MAILBOX = {"host": "imap.finances.gouv.fr", "user": "achats", "password": "pw"}


def with_trust(**trust: Any) -> dict[str, Any]:
    return minimal(mail={"trust": trust})


def with_link(**link: Any) -> dict[str, Any]:
    config = minimal(mail={"mailboxes": {LIST: MAILBOX}})
    config["links"] = [{"room": "!r:example.org", "address": LIST} | link]
    return config


def test_nothing_trusted_by_default() -> None:
    trust = parse_config(minimal(), env={}).mail.trust
    assert trust.authserv_ids == ()
    assert trust.verify_dkim is False
    assert trust.dns_server is None
    assert trust.dns_timeout == 5.0


def test_authserv_ids_are_a_list_or_one_name_lowercased_without_repeats() -> None:
    ids = ["MX.Agency.gouv.fr", "mx.agency.gouv.fr"]
    config = parse_config(with_trust(authserv_id=ids), env={})
    assert config.mail.trust.authserv_ids == ("mx.agency.gouv.fr",)
    one = parse_config(with_trust(authserv_id="mx2.agency.gouv.fr"), env={})
    assert one.mail.trust.authserv_ids == ("mx2.agency.gouv.fr",)


@pytest.mark.parametrize(
    "value", [[""], ["mx agency"], ["mx;dkim=pass"], [1], {"a": 1}, ["-mx.gouv.fr"], ["x" * 300]]
)
def test_an_authserv_id_that_is_not_a_host_name_is_refused(value: Any) -> None:
    config_error(with_trust(authserv_id=value), "mail.trust.authserv_id", "authserv-id")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.53", ("10.0.0.53", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5300", ("::1", 5300)),
        ("[2001:db8::1]", ("2001:db8::1", 53)),
        ("2001:db8::1", ("2001:db8::1", 53)),
    ],
)
def test_dns_server_is_an_ip_address_with_an_optional_port(
    value: str, expected: tuple[str, int]
) -> None:
    assert parse_config(with_trust(dns_server=value), env={}).mail.trust.dns_server == expected


@pytest.mark.parametrize(
    "value", ["dns.example.org", "10.0.0.53:", "10.0.0.53:0", "10.0.0.53:99999", "[::1]x", 53]
)
def test_a_dns_server_that_is_not_an_address_is_refused(value: Any) -> None:
    config_error(with_trust(dns_server=value), "mail.trust.dns_server", "IP address")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_verify_dkim_is_a_boolean(value: Any) -> None:
    config_error(with_trust(verify_dkim=value), "mail.trust.verify_dkim", "true or false")


@pytest.mark.parametrize("value", [0, 61, True, "5"])
def test_dns_timeout_is_bounded(value: Any) -> None:
    config_error(with_trust(dns_timeout=value), "mail.trust.dns_timeout", "seconds")


def test_require_authenticated_defaults_to_every_allowed_sender() -> None:
    config = parse_config(with_link(allowed_senders=["finances.gouv.fr", "*.gouv.fr"]), env={})
    settings = config.links[0].settings()
    assert settings.require_authenticated is None
    assert settings.authentication_required("a@finances.gouv.fr")
    assert settings.authentication_required("a@x.gouv.fr")
    assert not settings.authentication_required("a@example.org")


def test_require_authenticated_can_name_fewer_domains() -> None:
    config = parse_config(
        with_link(
            allowed_senders=["finances.gouv.fr", "partner.example.org"],
            require_authenticated=["finances.gouv.fr"],
        ),
        env={},
    )
    settings = config.links[0].settings()
    assert settings.authentication_required("a@finances.gouv.fr")
    assert not settings.authentication_required("a@partner.example.org")
    empty = parse_config(with_link(require_authenticated=[]), env={}).links[0].settings()
    assert not empty.authentication_required("a@finances.gouv.fr")


def test_require_authenticated_patterns_are_checked() -> None:
    config_error(with_link(require_authenticated=["gouv..fr"]), "links[0].require_authenticated")


def test_settings_round_trip_through_json_and_stay_strict_on_odd_values() -> None:
    settings = LinkSettings(
        allowed_senders=("gouv.fr",), require_authenticated=("gouv.fr",), marking="DR"
    )
    assert LinkSettings.from_json(settings.as_json()) == settings
    default = LinkSettings(allowed_senders=("gouv.fr",))
    assert LinkSettings.from_json(default.as_json()) == default
    # A stored value that is not a list never weakens the default (all allowed senders).
    odd = LinkSettings.from_json({"allowed_senders": ["gouv.fr"], "require_authenticated": "x"})
    assert odd.require_authenticated is None
    assert odd.authentication_required("a@gouv.fr")
