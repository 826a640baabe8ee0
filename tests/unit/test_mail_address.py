"""Strict From parsing: hostile headers are rejected or reduced to one canonical address."""

from __future__ import annotations

import email
import email.message
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core.ghosts import ghost_display_name
from bridge.core.message import Sender
from bridge.core.policy import DomainPattern, domain_allowed, normalize_domain
from bridge.mail.address import parse_from
from bridge.mail.errors import MailRejected

GOUV = DomainPattern.parse("gouv.fr")
ANY_GOUV = DomainPattern.parse("*.gouv.fr")


def message(*from_values: bytes, extra: bytes = b"") -> email.message.EmailMessage:
    """A message parsed from bytes exactly as the mail adapter does, with these From lines."""
    head = b"".join(b"From: " + value + b"\r\n" for value in from_values)
    raw = head + b"To: list@interieur.gouv.fr\r\nSubject: test\r\n" + extra + b"\r\nbody\r\n"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def parse(value: bytes) -> Sender:
    return parse_from(message(value))


def reject(value: bytes) -> str:
    with pytest.raises(MailRejected) as info:
        parse(value)
    return str(info.value)


# --- the release-day bug and its relatives -------------------------------------------------


def test_two_at_signs_rejected() -> None:
    reject(b"attacker@protonmail.com@presidence.gouv.fr")
    reject(b"x@protonmail.com@gouv.fr")


def test_quoted_address_in_display_name_is_not_the_sender() -> None:
    sender = parse(b'"agent@gouv.fr" <x@evil.com>')
    assert sender.address == "x@evil.com"
    assert not domain_allowed(sender.address.rpartition("@")[2], [GOUV, ANY_GOUV])
    assert ghost_display_name(sender.display_name, sender.address) == "x@evil.com"


def test_lookalike_domain_is_its_own_domain() -> None:
    sender = parse(b"agent@gouv.fr.evil.com")
    assert sender.address == "agent@gouv.fr.evil.com"
    domain = sender.address.rpartition("@")[2]
    assert domain == "gouv.fr.evil.com"
    assert not GOUV.matches(domain)
    assert not ANY_GOUV.matches(domain)


def test_two_addresses_rejected() -> None:
    assert "exactly one address" in reject(b"a@gouv.fr, b@gouv.fr")
    reject(b"<x@evil.com>, <y@gouv.fr>")


def test_two_from_headers_rejected() -> None:
    with pytest.raises(MailRejected, match="exactly one From header, found 2"):
        parse_from(message(b"a@gouv.fr", b"b@evil.com"))


def test_missing_from_rejected() -> None:
    with pytest.raises(MailRejected, match="found 0"):
        parse_from(message())


@pytest.mark.parametrize("value", [b"", b"   ", b"<>", b"<> ", b"()"])
def test_empty_from_rejected(value: bytes) -> None:
    reject(value)


@pytest.mark.parametrize(
    "value", [b"undisclosed:;", b"undisclosed-recipients: ;", b"grp: a@gouv.fr;"]
)
def test_group_syntax_rejected(value: bytes) -> None:
    reject(value)


@pytest.mark.parametrize(
    "value", [b'"a b"@gouv.fr', b'"x@evil.com"@gouv.fr', b'Agent <"a b"@gouv.fr>']
)
def test_quoted_local_part_rejected(value: bytes) -> None:
    reject(value)


@pytest.mark.parametrize(
    "value", [b"a@[1.2.3.4]", b"a@[IPv6:::1]", b"<a@[1.2.3.4]>", b"a@1.2.3.4"]
)
def test_domain_literal_and_ip_rejected(value: bytes) -> None:
    reject(value)


def test_encoded_word_display_name_is_only_a_name() -> None:
    sender = parse(b"=?utf-8?q?agent=40gouv.fr?= <x@evil.com>")
    assert sender.address == "x@evil.com"
    assert sender.display_name == "agent@gouv.fr"
    assert ghost_display_name(sender.display_name, sender.address) == "x@evil.com"


@pytest.mark.parametrize(
    "value",
    [
        # Python 3.11.7 decodes encoded-words inside the domain, silently and without a
        # defect: the first gives the address "agent@gouv.fr@evil.com".
        b"agent@=?utf-8?q?gouv.fr=40evil.com?=",
        b"agent@=?utf-8?q?gouv.fr?=",
        b"=?utf-8?q?agent=40gouv.fr?=@evil.com",
        b"<x@=?utf-8?q?evil.com?=>",
        b"=?utf-8?q?agent=40gouv.fr?=",
    ],
)
def test_encoded_words_in_the_address_rejected(value: bytes) -> None:
    reject(value)


@pytest.mark.parametrize(
    "value",
    [
        b"=?utf-8?q?Agent=0AFrom=3A_agent=40gouv.fr?= <x@evil.com>",
        b"=?utf-8?q?Agent=0D=0ABcc=3A_x=40evil.com?= <x@evil.com>",
        b"=?utf-8?b?QWdlbnQKRnJvbTogYWdlbnRAZ291di5mcg==?= <x@evil.com>",
        b"=?utf-8?q?a=00b?= <x@evil.com>",
    ],
)
def test_encoded_control_characters_in_display_name_rejected(value: bytes) -> None:
    # The email package raises ValueError for CR/LF (it is not a defect): still a rejection.
    reject(value)


def test_comment_is_not_a_display_name() -> None:
    # email.utils.parseaddr would call "x@evil.com" the display name here.
    sender = parse(b"agent@gouv.fr (x@evil.com)")
    assert sender == Sender(address="agent@gouv.fr", display_name="")
    assert ghost_display_name(sender.display_name, sender.address) == "agent@gouv.fr"


@pytest.mark.parametrize(
    "value", [b"x(c)@evil.com", b"x@(c)evil.com", b"x@evil.com(c)@gouv.fr", b"a@b.fr (unclosed"]
)
def test_comments_inside_the_address_rejected(value: bytes) -> None:
    reject(value)


@pytest.mark.parametrize(
    "value",
    [
        b"alice@example.com\r\n <b@evil.com>",
        b"a@gouv.fr\r\n\tb@evil.com",
        b"Agent\r\n <a@gouv.fr>\r\n <b@evil.com>",
        b"a@gouv.fr\r\n ,b@evil.com",
    ],
)
def test_folding_attacks_rejected(value: bytes) -> None:
    reject(value)


def test_folded_display_name_accepted() -> None:
    assert parse(b"Jean\r\n Dupont <jean.dupont@gouv.fr>") == Sender(
        "jean.dupont@gouv.fr", "Jean Dupont"
    )


def test_header_injected_by_bare_newline_is_another_header() -> None:
    # A bare LF ends the header; the injected line is a second From, which is refused.
    with pytest.raises(MailRejected, match="found 2"):
        parse_from(message(b"a@gouv.fr\nFrom: b@evil.com"))


@pytest.mark.parametrize(
    "value",
    [
        b"a@gouv.fr <b@evil.com>",
        b"x@evil.com <x@a.gouv.fr>",
        b"<x@evil.com> agent@gouv.fr",
        b"a@b@c <j@gouv.fr>",
        b"x@evil.com\\@gouv.fr",
        b"<@route:x@evil.com>",
        b"j@gouv.fr,",
        b",j@gouv.fr",
        b"j@gouv.fr;",
        b"<j@gouv.fr",
        b"j@gouv.fr>",
        b"Dupont, Jean <j@gouv.fr>",
        b"j@gouv.fr.",
        b"j..k@gouv.fr",
        b".j@gouv.fr",
        b"j@gouv..fr",
        b"j@gouv.fr\x00",
        b"j@gouv.fr\x1b[2J",
    ],
)
def test_malformed_or_ambiguous_rejected(value: bytes) -> None:
    reject(value)


def test_idn_domain_is_ascii() -> None:
    sender = parse("agent@préfecture.gouv.fr".encode())
    assert sender.address == "agent@xn--prfecture-c4a.gouv.fr"
    assert GOUV.matches("préfecture.gouv.fr") is False
    assert ANY_GOUV.matches(sender.address.rpartition("@")[2])


def test_idn_domain_as_a_label_is_the_same_identity() -> None:
    assert parse(b"agent@xn--prfecture-c4a.gouv.fr").address == "agent@xn--prfecture-c4a.gouv.fr"
    assert parse("Agent@PRÉFECTURE.gouv.fr".encode()).address == (
        "agent@xn--prfecture-c4a.gouv.fr"
    )


def test_canonical_domain_is_what_the_policy_uses() -> None:
    for raw, domain in [("a@faß.de", "xn--fa-hia.de"), ("a@ＧＯＵＶ.fr", "gouv.fr")]:
        address = parse(raw.encode()).address
        assert address == "a@" + domain
        assert normalize_domain(domain) == domain


def test_smtputf8_local_part_and_8bit_display_name() -> None:
    sender = parse("Élodie <Élodie@préfecture.gouv.fr>".encode())
    assert sender == Sender("élodie@xn--prfecture-c4a.gouv.fr", "Élodie")


def test_invalid_utf8_rejected() -> None:
    assert "UTF-8" in reject(b"\xff\xfe <j@gouv.fr>")
    reject(b"j@gouv\xc3.fr")


def test_unsafe_characters_in_local_part_rejected() -> None:
    reject("a\u202e@gouv.fr".encode())
    reject("a\u200b@gouv.fr".encode())


def test_uppercase_is_folded() -> None:
    assert parse(b"Agent@GOUV.FR") == Sender("agent@gouv.fr", "")
    assert parse(b"AGENT <Agent.Dupont@Interieur.Gouv.Fr>") == Sender(
        "agent.dupont@interieur.gouv.fr", "AGENT"
    )


def test_bidi_characters_removed_from_display_name() -> None:
    sender = parse(b"=?utf-8?q?Agent_=E2=80=AEcod.exe=E2=80=AC=E2=81=A6x=E2=81=A9?= <a@gouv.fr>")
    assert sender == Sender("a@gouv.fr", "Agent cod.exex")
    sender = parse("Jean\u202e Dupont <a@gouv.fr>".encode())
    assert sender.display_name == "Jean Dupont"


def test_huge_display_name_is_bounded() -> None:
    sender = parse(b'"' + b"A" * 10_000 + b'" <a@gouv.fr>')
    assert sender.address == "a@gouv.fr"
    assert sender.display_name == "A" * 100


def test_huge_header_rejected() -> None:
    assert "too long" in reject(b'"' + b"A" * 100_000 + b'" <a@gouv.fr>')


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"jean.dupont@interieur.gouv.fr", Sender("jean.dupont@interieur.gouv.fr", "")),
        (b"<jean.dupont@interieur.gouv.fr>", Sender("jean.dupont@interieur.gouv.fr", "")),
        (b"Jean Dupont <jean@gouv.fr>", Sender("jean@gouv.fr", "Jean Dupont")),
        (b'"Dupont, Jean" <jean@gouv.fr>', Sender("jean@gouv.fr", "Dupont, Jean")),
        (b'"J. \\"JD\\" Dupont" <jean@gouv.fr>', Sender("jean@gouv.fr", 'J. "JD" Dupont')),
        # An unquoted "." in the name is an "obsolete" defect we tolerate: common, harmless.
        (b"J. Dupont <jean@gouv.fr>", Sender("jean@gouv.fr", "J. Dupont")),
        (b"=?utf-8?q?=C3=89lodie_Martin?= <em@gouv.fr>", Sender("em@gouv.fr", "Élodie Martin")),
        (b"=?iso-8859-1?q?H=E9l=E8ne?= <h@gouv.fr>", Sender("h@gouv.fr", "Hélène")),
        (b"Jean (DGSI) Dupont <jean@gouv.fr>", Sender("jean@gouv.fr", "Jean Dupont")),
        (b"  jean@gouv.fr  ", Sender("jean@gouv.fr", "")),
        (b"jean+list@gouv.fr", Sender("jean+list@gouv.fr", "")),
        (b"o'brien@gouv.fr", Sender("o'brien@gouv.fr", "")),
    ],
)
def test_ordinary_senders(value: bytes, expected: Sender) -> None:
    assert parse(value) == expected


def test_test_domains_only_when_asked() -> None:
    msg = message(b"sender@elsewhere.test")
    with pytest.raises(MailRejected):
        parse_from(msg)
    assert parse_from(msg, allow_test_domains=True).address == "sender@elsewhere.test"


def test_headers_set_in_code_keep_their_defects() -> None:
    msg = email.message.EmailMessage()
    msg["From"] = "a@gouv.fr <b@evil.com>"  # parsed on assignment to "a@gouv.fr" + a defect
    with pytest.raises(MailRejected):
        parse_from(msg)
    ok = email.message.EmailMessage()
    ok["From"] = "Jean <Jean@Gouv.fr>"
    assert parse_from(ok) == Sender("jean@gouv.fr", "Jean")


@pytest.mark.parametrize(
    "value",
    [
        b'"' + b"\xe2\x80\xae" * 500 + b'" x@@evil.com',
        b"=?utf-8?q?" + b"=1B" * 300 + b"?= <x@evil.com>",
        b"\x1b[31m" * 50 + b"a@gouv.fr",
        b"a" * 5000 + b"@@gouv.fr",
    ],
)
def test_reasons_are_short_ascii_lines(value: bytes) -> None:
    reason = reject(value)
    assert len(reason) <= 200
    assert reason.isascii()
    assert reason.isprintable()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(value: bytes) -> None:
    value = value.replace(b"\r", b" ").replace(b"\n", b" ")
    reason = ""
    try:
        sender = parse(value)
    except MailRejected as e:
        reason = str(e)
    if reason:
        assert reason.isascii()
        assert reason.isprintable()
        return
    local, _, domain = sender.address.rpartition("@")
    assert local
    assert domain
    assert "@" not in local
    assert domain.isascii()
    assert normalize_domain(domain) == domain  # the policy sees exactly this domain
    assert sender.address.count("@") == 1


_ATOM = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-_",
    min_size=1,
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(_ATOM, _ATOM, st.sampled_from(["gouv.fr", "interieur.gouv.fr", "Préfecture.Gouv.Fr"]))
def test_canonical_address_is_a_fixed_point(name: str, local: str, domain: str) -> None:
    raw = f"{name} <{local}@{domain}>".encode()
    first = parse(raw)
    again = parse(first.address.encode())
    assert again.address == first.address
    assert first.address == first.address.lower()
