"""Config of bounces (mail.bounces): VERP, its base address, and the bounce mailbox."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import parse_config
from tests.unit.test_config import config_error, minimal

LIST = "achats@finances.gouv.fr"
BOUNCES = "rebonds@finances.gouv.fr"
MAILBOX = {"host": "imap.finances.gouv.fr", "user": "u", "password": "pw"}


def with_bounces(**bounces: Any) -> dict[str, Any]:
    return minimal(mail={"mailboxes": {LIST: MAILBOX, BOUNCES: MAILBOX}, "bounces": bounces})


def test_verp_on_from_the_link_address_and_no_bounce_mailbox_by_default() -> None:
    bounces = parse_config(minimal(), env={}).mail.bounces
    assert (bounces.verp, bounces.address, bounces.mailbox) == (True, None, None)


def test_an_address_and_a_mailbox_are_plain_lowercase_addresses() -> None:
    raw = with_bounces(address="Rebonds@Finances.gouv.fr", mailbox=BOUNCES)
    config = parse_config(raw, env={})
    assert config.mail.bounces.address == BOUNCES
    assert config.mail.bounces.mailbox == BOUNCES
    assert parse_config(with_bounces(verp=False), env={}).mail.bounces.verp is False


def test_the_bounce_secret_is_its_own_key() -> None:
    config = parse_config(minimal(), env={})
    assert len(config.bounce_secret) == 32
    assert config.bounce_secret != config.message_id_secret


@pytest.mark.parametrize(
    ("bounces", "key", "fragment"),
    [
        ({"verp": "yes"}, "mail.bounces.verp", "true or false"),
        ({"address": "not an address"}, "mail.bounces.address", "plain mail address"),
        ({"address": "a+b@finances.gouv.fr"}, "mail.bounces.address", "'+'"),
        ({"mailbox": "other@finances.gouv.fr"}, "mail.bounces.mailbox", "mail.mailboxes"),
        ({"mailbox": 3}, "mail.bounces.mailbox", "plain mail address"),
        ({"mialbox": BOUNCES}, "mail.bounces.mialbox", "unknown key"),
    ],
)
def test_bad_values_name_their_key(bounces: dict[str, Any], key: str, fragment: str) -> None:
    config_error(with_bounces(**bounces), key, fragment)


def test_bounces_must_be_a_mapping() -> None:
    config_error(minimal(mail={"bounces": ["x"]}), "mail.bounces", "mapping")


def test_the_bounce_mailbox_is_never_linked() -> None:
    config = with_bounces(mailbox=BOUNCES)
    config["links"] = [{"room": "!r:example.org", "address": BOUNCES}]
    config_error(config, "links[0].address", "mail.bounces.mailbox")
    config["links"] = [{"room": "!r:example.org", "address": LIST}]
    assert parse_config(config, env={}).links[0].address == LIST
