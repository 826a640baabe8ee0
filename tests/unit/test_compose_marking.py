"""compose() with a link's classification marking: first line of every body, and a header."""

from __future__ import annotations

import email
import email.message
import email.policy

import pytest

from bridge.mail.compose import conversation_subject
from tests.unit.test_mail_compose import build, outgoing

DR = ("X-Classification", "DIFFUSION RESTREINTE")


def parsed(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def body(msg: email.message.EmailMessage, kind: str) -> str:
    part = msg.get_body(preferencelist=(kind,))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def test_marking_is_the_first_line_and_a_header() -> None:
    mail = outgoing(body_text="Bonjour la liste", body_html="<p>Bonjour <em>la</em> liste</p>")
    msg = parsed(build(mail, marking=DR))
    assert msg["X-Classification"] == "DIFFUSION RESTREINTE"
    assert body(msg, "plain").startswith("DIFFUSION RESTREINTE\n\nBonjour la liste")
    assert body(msg, "html").startswith("<p><strong>DIFFUSION RESTREINTE</strong></p>")
    # The subject is still the message's first line, not the marking.
    assert msg["Subject"] == "Bonjour la liste" == conversation_subject(mail)


def test_a_correction_starts_with_the_marking_too() -> None:
    msg = parsed(build(outgoing(body_text="Chiffre corrigé", correction=True), marking=DR))
    assert body(msg, "plain").startswith("DIFFUSION RESTREINTE\n\nCorrection: Chiffre corrigé")
    assert msg["X-Classification"] == "DIFFUSION RESTREINTE"


def test_a_non_ascii_marking_is_encoded_and_the_mail_stays_ascii() -> None:
    raw = build(outgoing(), marking=("X-Classification", "TRÈS SECRET"))
    assert raw.isascii()
    assert parsed(raw)["X-Classification"] == "TRÈS SECRET"


def test_no_marking_no_header() -> None:
    msg = parsed(build(outgoing()))
    assert msg["X-Classification"] is None
    assert body(msg, "plain").startswith("Hello list.")


def test_a_hostile_marking_cannot_make_a_header() -> None:
    msg = parsed(build(outgoing(), marking=("X-Classification", "DR\r\nBcc: x@evil.example")))
    assert msg["Bcc"] is None
    assert "\n" not in str(msg["X-Classification"])


@pytest.mark.parametrize("header", ["Subject", "X-Passerelle-Loop", "Bad Header", ""])
def test_the_marking_header_must_be_its_own(header: str) -> None:
    with pytest.raises(ValueError, match="marking header"):
        build(outgoing(), marking=(header, "SECRET"))
