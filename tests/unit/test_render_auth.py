"""What a room sees of a sender's verdict: the machine-readable key always, the marker when the
sender is not authenticated, first in both the plain and the HTML body."""

from __future__ import annotations

import dataclasses

import pytest

from bridge.core.authentication import (
    AUTHENTICATED,
    CONTENT_KEY,
    FAILED,
    MARKS,
    UNVERIFIED,
    Verdict,
)
from bridge.core.message import IncomingMessage, Sender, ThreadRef
from bridge.core.threading import ThreadTarget
from bridge.matrix.render import main_content

MESSAGE = IncomingMessage(
    sender=Sender("agent@achats.gouv.fr", "Agent"),
    subject="Budget",
    text="Bonjour <b>tous</b>",
    html=None,
    attachments=(),
    thread=ThreadRef("m1@achats.gouv.fr"),
    date=None,
)
NEW = ThreadTarget(thread_root=None, parent=None)


def render(verdict: Verdict | None) -> dict[str, object]:
    message = dataclasses.replace(MESSAGE, auth=verdict)
    return main_content(message, NEW, {}, threads=True)


def test_an_authenticated_message_carries_its_verdict_and_no_marker() -> None:
    content = render(Verdict(AUTHENTICATED, "dkim", "achats.gouv.fr", "DKIM pass"))
    assert content[CONTENT_KEY] == {
        "verdict": AUTHENTICATED,
        "method": "dkim",
        "domain": "achats.gouv.fr",
    }
    assert "⚠" not in str(content["body"])
    assert "⚠" not in str(content["formatted_body"])


@pytest.mark.parametrize("verdict", [UNVERIFIED, FAILED])
def test_an_unauthenticated_message_starts_with_the_marker_in_both_bodies(verdict: str) -> None:
    content = render(Verdict(verdict, None, None, "no result"))
    assert str(content["body"]).startswith(MARKS[verdict] + "\n\nBudget")
    html = str(content["formatted_body"])
    assert html.startswith("<p><strong>⚠")
    assert "Bonjour &lt;b&gt;tous&lt;/b&gt;" in html  # the text stays escaped
    assert content[CONTENT_KEY] == {"verdict": verdict, "method": None, "domain": None}


def test_the_reason_is_not_in_the_event() -> None:
    content = render(Verdict(UNVERIFIED, None, None, "secret-ish evidence"))
    assert "secret-ish evidence" not in repr(content)


def test_no_verdict_means_no_key() -> None:
    assert CONTENT_KEY not in render(None)
