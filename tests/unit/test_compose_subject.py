"""conversation_subject: the subject a conversation is known by, exactly as compose() writes it."""

from __future__ import annotations

import email
import email.message
import email.policy
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.mail.compose import OutgoingMail, compose, conversation_subject
from tests.unit.test_mail_compose import outgoing

SECRET = b"0123456789abcdef0123456789abcdef"
NOW = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def sent_subject(mail: OutgoingMail) -> str:
    raw = compose(
        mail,
        from_address="passerelle@agency.example.org",
        list_address="list@lists.example.org",
        domain="agency.example.org",
        secret=SECRET,
        now=NOW,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    subject = msg["Subject"]
    assert isinstance(subject, str)
    return str(subject)


def assert_agrees(mail: OutgoingMail) -> str:
    """conversation_subject(mail), checked against the Subject compose() writes, exactly
    (encoded-words included: see test_a_space_between_encoded_words_is_kept)."""
    subject = conversation_subject(mail)
    # A value that fits on a line of its own is folded whole onto the next one
    # ("Subject:\r\n word word"): the parser keeps that folding space at its start.
    sent = sent_subject(mail).lstrip(" ")
    assert sent in (subject, "Re: " + subject)
    return subject


@pytest.mark.parametrize(
    ("fields", "expected", "sent"),
    [
        ({"body_text": "Hello list.\nMore text."}, "Hello list.", "Hello list."),
        ({"body_text": "\n  \n  First real line  \nsecond"}, "First real line", None),
        ({"body_text": ""}, "(no subject)", "(no subject)"),
        ({"body_text": " \n\t\n"}, "(no subject)", "(no subject)"),
        ({"body_text": "Re: old news"}, "old news", "Re: old news"),
        ({"body_text": "Re: Re: old news"}, "Re: old news", "Re: Re: old news"),  # one "Re: "
        ({"body_text": "Budget", "correction": True}, "Budget", "Re: Budget"),
        ({"body_text": "", "correction": True}, "(no subject)", "Re: (no subject)"),
        ({"subject": "Budget 2024"}, "Budget 2024", "Re: Budget 2024"),
        ({"subject": "Re: RE: Fwd: Budget"}, "Fwd: Budget", "Re: Fwd: Budget"),
        ({"subject": "Re[2]: Budget"}, "Budget", "Re: Budget"),
        ({"subject": "Budget", "correction": True}, "Budget", "Re: Budget"),
        ({"subject": "Re: "}, "Hello list.", "Hello list."),  # nothing left: a new one
        ({"subject": "Budget\r\nBcc: victim@example.org"}, "Budget Bcc: victim@example.org", None),
        ({"subject": "=?utf-8?q?x=0D=0A?="}, "= ?utf-8?q?x=0D=0A?=", None),
        ({"subject": "A\u202eB\x00C"}, "AB C", None),
        ({"body_text": "x" * 500}, "x" * 78, None),
    ],
)
def test_conversation_subject(fields: dict[str, object], expected: str, sent: str | None) -> None:
    mail = outgoing(**fields)
    assert assert_agrees(mail) == expected
    if sent is not None:
        assert sent_subject(mail) == sent


def test_a_reply_fallback_is_not_the_subject() -> None:
    mail = outgoing(body_text="> <@bob:x> Lunch?\n\nYes, at noon", in_reply_to="m1@x.org")
    assert assert_agrees(mail) == "Yes, at noon"
    no_reply = outgoing(body_text="> <@bob:x> Lunch?\n\nYes, at noon")
    assert assert_agrees(no_reply) == "> <@bob:x> Lunch?"


def test_the_subject_comes_from_the_html_when_the_text_is_blank() -> None:
    mail = outgoing(body_text="", body_html="<mx-reply>quoted</mx-reply><p>From <b>HTML</b></p>")
    assert assert_agrees(mail) == "From HTML"


def test_html_that_sanitises_to_nothing_gives_no_subject() -> None:
    mail = outgoing(body_text="", body_html="<script>Budget</script>")
    assert assert_agrees(mail) == "(no subject)"


def test_non_ascii_and_long_subjects_survive_encoding_and_folding() -> None:
    subject = "Réunion budgétaire — équipe 3 ✓ " * 12
    mail = outgoing(subject=subject)
    known = " ".join(subject.split())[:300].rsplit(" ", 1)[0]
    assert assert_agrees(mail) == known
    assert sent_subject(mail) == "Re: " + known


def test_a_long_ascii_subject_folded_whole_onto_the_next_line() -> None:
    mail = outgoing(body_text="word " * 40)
    assert assert_agrees(mail) == ("word " * 15).strip()
    assert sent_subject(mail) == " " + ("word " * 15).strip()  # the folding space


def test_a_space_between_encoded_words_is_kept() -> None:
    """Regression: Python 3.11's folder wrote the space between two encoded-words of a long
    subject as folding whitespace, which RFC 2047 decoders drop ("les équipes« numérique »")."""
    subject = "Déménagement du service: les équipes « numérique » et « données » changent d'étage"
    mail = outgoing(subject=subject)
    assert conversation_subject(mail) == subject
    assert sent_subject(mail) == "Re: " + subject


HOSTILE = st.sampled_from(
    ["\r", "\n", "\r\n", "\x00", "\u2028", "\x85", "=?", "?=", "Re: ", "re:", "RE[3]: ", "Fwd: ",
     "> <@bob:x> ", ">", "<b>", "</p>", "<mx-reply>", "&amp;", "\u202e", "\ud800", "é", "✓",
     "Bcc: ", " ", "\t", "a", "word "]
)  # fmt: skip
TEXT = st.lists(st.one_of(HOSTILE, st.text(max_size=6)), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(
    subject=TEXT,
    body=TEXT,
    html=st.none() | TEXT,
    reply=st.booleans(),
    correction=st.booleans(),
)
def test_property_compose_writes_the_conversation_subject(
    subject: str, body: str, html: str | None, reply: bool, correction: bool
) -> None:
    mail = outgoing(
        subject=subject,
        body_text=body,
        body_html=html,
        in_reply_to="m1@lists.example.org" if reply else None,
        correction=correction,
    )
    known = assert_agrees(mail)
    assert known
    assert known == known.strip()
    assert not any(c in known for c in "\r\n\x00\u2028\u202e")
