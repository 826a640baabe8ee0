"""Config of Matrix → mail: the SMTP server, the sender address, retries, per-link settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.config import parse_config
from bridge.core.links import LinkSettings
from tests.unit.test_config import AS_TOKEN, config_error, minimal

LIST = "achats@finances.gouv.fr"
MAILBOX = {"host": "imap.finances.gouv.fr", "user": "achats", "password": "pw"}


def with_smtp(smtp: dict[str, Any] | None = None, **mail: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "smtp": {"host": "smtp.finances.gouv.fr"} | (smtp or {}),
        "from_address": "passerelle@finances.gouv.fr",
    }
    return minimal(mail=values | mail)


def test_off_by_default() -> None:
    config = parse_config(minimal(), env={})
    assert config.mail.smtp is None
    assert config.mail.from_address is None
    assert config.mail.on_sent == "none"


def test_smtp_defaults_are_submission_with_starttls() -> None:
    smtp = parse_config(with_smtp(), env={}).mail.smtp
    assert smtp is not None
    assert (smtp.host, smtp.port, smtp.tls, smtp.user, smtp.password) == (
        "smtp.finances.gouv.fr",
        587,
        "starttls",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("smtp", "port"),
    [
        ({"tls": "tls"}, 465),
        ({"tls": "starttls"}, 587),
        ({"tls": "none", "host": "127.0.0.1"}, 25),
        ({"tls": "tls", "port": 2465}, 2465),
    ],
)
def test_smtp_port_follows_the_tls_mode_unless_given(smtp: dict[str, Any], port: int) -> None:
    settings = parse_config(with_smtp(smtp), env={}).mail.smtp
    assert settings is not None
    assert settings.port == port


def test_from_address_is_required_with_smtp() -> None:
    config_error(
        minimal(mail={"smtp": {"host": "smtp.example.org"}}), "mail.from_address", "required"
    )


@pytest.mark.parametrize(
    "address",
    ["attacker@protonmail.com@presidence.gouv.fr", "no-at-sign", "a b@x.org", "x@", 42],
)
def test_from_address_must_be_one_plain_address(address: object) -> None:
    config_error(with_smtp(from_address=address), "mail.from_address", "plain mail address")


def test_cleartext_smtp_only_on_loopback() -> None:
    config_error(with_smtp({"tls": "none"}), "mail.smtp.tls", "this machine")
    smtp = parse_config(with_smtp({"host": "127.0.0.1", "tls": "none"}), env={}).mail.smtp
    assert smtp is not None
    assert smtp.tls == "none"


@pytest.mark.parametrize(
    ("smtp", "key"),
    [
        ({"tls": "ssl"}, "mail.smtp.tls"),
        ({"port": 0}, "mail.smtp.port"),
        ({"port": "25"}, "mail.smtp.port"),
        ({"host": "smtp host"}, "mail.smtp.host"),
        ({"user": "u"}, "mail.smtp.password"),
        ({"password": "p"}, "mail.smtp.password"),
        ({"user": "u", "password": "p", "password_file": "/x"}, "mail.smtp.password"),
        ({"timeout": 0}, "mail.smtp.timeout"),
        ({"bogus": 1}, "mail.smtp.bogus"),
    ],
)
def test_bad_smtp_settings_name_their_key(smtp: dict[str, Any], key: str) -> None:
    config_error(with_smtp(smtp), key)


def test_smtp_password_file_and_secret_masking(tmp_path: Path) -> None:
    secret = tmp_path / "smtp.password"
    secret.write_text("s3cret-smtp\n", encoding="utf-8")
    config = parse_config(with_smtp({"user": "passerelle", "password_file": str(secret)}), env={})
    assert config.mail.smtp is not None
    assert config.mail.smtp.password == "s3cret-smtp"
    assert "s3cret-smtp" in config.secrets()
    assert "s3cret-smtp" not in repr(config)


@pytest.mark.parametrize("value", ["reaction", "none"])
def test_on_sent(value: str) -> None:
    assert parse_config(with_smtp(on_sent=value), env={}).mail.on_sent == value


def test_on_sent_refuses_anything_else() -> None:
    config_error(with_smtp(on_sent="emoji"), "mail.on_sent")


def test_retry_delays() -> None:
    config = parse_config(with_smtp(retry_delays=[1, 2.5]), env={})
    assert config.mail.retry_delays == (1.0, 2.5)
    for bad in ([], [0], ["30"], [True], 30):
        config_error(with_smtp(retry_delays=bad), "mail.retry_delays")


def test_link_mail_out_settings() -> None:
    raw = with_smtp(mailboxes={LIST: MAILBOX})
    raw["links"] = [
        {
            "room": "!r:example.org",
            "address": LIST,
            "from_address": "Achats-Matrix@Finances.gouv.fr",
            "send_edits": False,
            "egress_domains": ["finances.gouv.fr"],
        }
    ]
    (spec,) = parse_config(raw, env={}).links
    assert spec.from_address == "achats-matrix@finances.gouv.fr"
    assert spec.send_edits is False
    assert spec.egress_domains == ("finances.gouv.fr",)


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"send_edits": "yes"}, "links[0].send_edits"),
        ({"egress_domains": ["*"]}, "links[0].egress_domains"),
        ({"from_address": "a@b@c.org"}, "links[0].from_address"),
    ],
)
def test_bad_link_mail_out_settings(entry: dict[str, Any], key: str) -> None:
    raw = with_smtp(mailboxes={LIST: MAILBOX})
    raw["links"] = [{"room": "!r:example.org", "address": LIST} | entry]
    config_error(raw, key)


def test_message_id_secret_is_derived_from_the_token() -> None:
    first = parse_config(minimal(), env={}).message_id_secret
    assert first == parse_config(minimal(), env={}).message_id_secret
    assert len(first) == 32
    assert AS_TOKEN.encode() not in first
    other = minimal(appservice={"as_token": "as-" + "Q" * 40})
    assert parse_config(other, env={}).message_id_secret != first


@pytest.mark.parametrize(
    ("recipient", "allowed"),
    [
        (LIST, True),
        (LIST.upper(), True),
        ("chef@finances.gouv.fr", True),
        ("chef@sub.finances.gouv.fr", False),
        ("attacker@protonmail.com@finances.gouv.fr", False),
        ("victim@example.org", False),
        ("finances.gouv.fr", False),
        ("@finances.gouv.fr", False),
    ],
)
def test_egress_policy(recipient: str, allowed: bool) -> None:
    settings = LinkSettings(egress_domains=("finances.gouv.fr",))
    assert settings.recipient_allowed(LIST, recipient) is allowed


def test_egress_policy_without_domains_allows_only_the_list() -> None:
    settings = LinkSettings()
    assert settings.recipient_allowed(LIST, LIST)
    assert not settings.recipient_allowed(LIST, "other@finances.gouv.fr")


def test_link_settings_round_trip_through_json() -> None:
    settings = LinkSettings(
        allowed_senders=("gouv.fr",),
        thread_mode="flat",
        from_address="x@gouv.fr",
        send_edits=False,
        egress_domains=("*.gouv.fr",),
    )
    assert LinkSettings.from_json(settings.as_json()) == settings
    # Links stored before these settings existed read back with the defaults.
    old = LinkSettings.from_json({"allowed_senders": ["gouv.fr"], "thread_mode": "threads"})
    assert (old.from_address, old.send_edits, old.egress_domains) == (None, True, ())
