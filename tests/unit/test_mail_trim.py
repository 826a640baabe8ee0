"""Reply trimming: signatures, trailing quoted history and Outlook's quoted original go."""

from __future__ import annotations

import time

import pytest

from bridge.mail.trim import trim_reply


def test_plain_text_is_returned_unchanged() -> None:
    text = "Hello,\n\nthe meeting moves to 3 pm.\n\nAlice\n"
    assert trim_reply(text) is text


def test_signature_delimiter_cuts_the_rest() -> None:
    text = "The report is attached.\n\n-- \nAlice Martin\nPréfecture de X\n"
    assert trim_reply(text) == "The report is attached."


@pytest.mark.parametrize("line", ["--", "---", "-- x", " -- ", "> -- "])
def test_only_dash_dash_space_is_a_signature(line: str) -> None:
    text = f"first\n{line}\nsecond"
    assert trim_reply(text) == text


def test_signature_line_with_crlf_ending() -> None:
    assert trim_reply("answer\r\n-- \r\nsig\r\n") == "answer"


def test_english_attribution_and_trailing_quote() -> None:
    text = (
        "Yes, Thursday works.\n\n"
        "On Mon, 3 Jun 2024 at 10:00, Bob Durand <bob@agency.example.org> wrote:\n"
        "> Can we meet on Thursday?\n"
        ">\n"
        "> Bob\n"
    )
    assert trim_reply(text) == "Yes, Thursday works."


def test_french_attribution_wrapped_over_two_lines() -> None:
    text = (
        "D'accord pour jeudi.\n\n"
        "Le lun. 3 juin 2024 à 10:00, Bob Durand <bob@agency.example.org>\n"
        "a écrit :\n"
        "\n"
        "> Peut-on se voir jeudi ?\n"
    )
    assert trim_reply(text) == "D'accord pour jeudi."


def test_trailing_quote_without_attribution_is_trimmed() -> None:
    assert trim_reply("Agreed.\n\n> earlier text\n> more\n\n") == "Agreed."


def test_inline_replies_keep_their_quotes_only_the_trailing_block_goes() -> None:
    text = (
        "On Mon, 3 Jun 2024, Bob <bob@x.org> wrote:\n"
        "> Question one?\n"
        "Answer one.\n"
        "> Question two?\n"
        "Answer two.\n"
        "> Rest of Bob's mail\n"
        "> that nobody answered\n"
    )
    assert trim_reply(text) == (
        "On Mon, 3 Jun 2024, Bob <bob@x.org> wrote:\n"
        "> Question one?\n"
        "Answer one.\n"
        "> Question two?\n"
        "Answer two."
    )


def test_outlook_original_message_separator() -> None:
    text = (
        "Please find the figures below.\n\n"
        "-----Original Message-----\n"
        "From: Bob\nSent: Monday\nTo: list\nSubject: figures\n\nold text\n"
    )
    assert trim_reply(text) == "Please find the figures below."


def test_outlook_french_header_block_and_rule() -> None:
    text = (
        "Bien reçu, merci.\n\n"
        "________________________________\n"
        "De : Bob Durand <bob@agency.example.org>\n"
        "Envoyé : lundi 3 juin 2024 10:00\n"
        "À : liste@agency.example.org\n"
        "Objet : Réunion\n"
        "\n"
        "Texte d'origine, non cité.\n"
    )
    assert trim_reply(text) == "Bien reçu, merci."


def test_forwarded_message_is_not_trimmed() -> None:
    text = (
        "FYI, see below.\n\n"
        "---------- Forwarded message ---------\n"
        "From: Bob <bob@x.org>\n"
        "Date: Mon, 3 Jun 2024\n"
        "Subject: Budget\n"
        "To: Alice <alice@x.org>\n\n"
        "The budget is approved.\n"
    )
    assert trim_reply(text) == text


def test_outlook_block_of_a_forward_is_not_trimmed() -> None:
    text = "FYI.\n\nFrom: Bob\nSent: Monday\nTo: Alice\nSubject: FW: Budget\n\nApproved.\n"
    assert trim_reply(text) == text


def test_everything_quoted_is_returned_unchanged() -> None:
    text = "On Mon, Bob wrote:\n> only\n> quotes\n"
    assert trim_reply(text) == text
    assert trim_reply("> a\n> b") == "> a\n> b"


def test_never_empty_when_there_was_unquoted_content() -> None:
    # A mail that is only a signature, or starts with the quoted block, keeps its content.
    assert trim_reply("-- \nAlice Martin\n") == "-- \nAlice Martin\n"
    text = "> quoted first\n-- \nsig"
    assert trim_reply(text) == text
    assert trim_reply("> q\nanswer\n-- \nsig") == "> q\nanswer"


def test_signature_before_quote_wins() -> None:
    text = "Fine.\n-- \nAlice\n\nOn Tue, Bob wrote:\n> question\n"
    assert trim_reply(text) == "Fine."


def test_empty_and_blank_input() -> None:
    assert trim_reply("") == ""
    assert trim_reply("\n\n") == "\n\n"


def test_large_input_is_linear() -> None:
    text = "answer\n" + "> quoted line of history\n" * 200_000
    start = time.perf_counter()
    assert trim_reply(text) == "answer"
    assert time.perf_counter() - start < 2
    long_line = "On " + "x" * 500_000 + "\n> q\n"
    start = time.perf_counter()
    trim_reply(long_line)
    assert time.perf_counter() - start < 2
