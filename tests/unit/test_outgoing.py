"""Which Matrix events become mail, and the OutgoingMail for each: hostile events end to end."""

from __future__ import annotations

import email
import email.message
import email.policy
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core.ids import EventID, UserID
from bridge.core.message import Attachment
from bridge.mail.compose import OutgoingMail, compose
from bridge.mail.outgoing import (
    MAILED_MSGTYPES,
    MediaRef,
    NotSent,
    PlannedMail,
    outgoing_mail,
    placeholder_attachment,
    plan_event,
)
from tests.unit.test_mail_compose import html_part, text_part

BOT = "@passerelle:agency.example.org"
ALICE = "@alice:agency.example.org"
GHOST = "@mail_bob=40example.org:agency.example.org"
PREFIX = "!passerelle"
EVENT_ID = "$event1:agency.example.org"
ROOT = "$root:agency.example.org"
PARENT = "$parent:agency.example.org"
URL = "mxc://agency.example.org/AbCdEf_12-3"
SECRET = b"0123456789abcdef0123456789abcdef"
FROM = "passerelle@agency.example.org"
LIST = "list@lists.example.org"
DOMAIN = "agency.example.org"
NOW = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"


def is_ghost(mxid: str) -> bool:
    return mxid.startswith("@mail_")


def event(content: object = None, **fields: object) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "m.room.message",
        "event_id": EVENT_ID,
        "sender": ALICE,
        "room_id": "!room:agency.example.org",
        "origin_server_ts": 1714566600000,
        "content": {"msgtype": "m.text", "body": "Hello list."} if content is None else content,
    }
    base.update(fields)
    return base


def plan(raw: Any) -> PlannedMail | NotSent:
    return plan_event(raw, bot_mxid=BOT, is_bridge_user=is_ghost, command_prefix=PREFIX)


def planned(raw: object) -> PlannedMail:
    result = plan(raw)
    assert isinstance(result, PlannedMail), result
    return result


def not_sent(raw: object) -> str:
    result = plan(raw)
    assert isinstance(result, NotSent), result
    assert result.reason
    assert "\n" not in result.reason
    assert "\r" not in result.reason
    assert len(result.reason) < 120
    return result.reason


def image(**overrides: object) -> dict[str, Any]:
    content: dict[str, Any] = {
        "msgtype": "m.image",
        "body": "photo.png",
        "url": URL,
        "info": {"mimetype": "image/png", "size": 1234},
    }
    content.update(overrides)
    return content


def mail_for(
    result: PlannedMail | NotSent,
    *,
    sender_name: str = "Alice Martin",
    subject: str = "",
    in_reply_to: str | None = None,
    attachments: tuple[Attachment, ...] = (),
) -> OutgoingMail:
    assert isinstance(result, PlannedMail), result
    return outgoing_mail(
        result,
        sender_name=sender_name,
        disambiguate=False,
        subject=subject,
        in_reply_to=in_reply_to,
        references=(),
        attachments=attachments,
    )


def build(mail: OutgoingMail) -> email.message.EmailMessage:
    """compose() the mail and parse it back, checking the list is its only recipient."""
    raw = compose(
        mail, from_address=FROM, list_address=LIST, domain=DOMAIN, secret=SECRET, now=NOW
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    recipients = [
        address.addr_spec
        for name in ("To", "Cc", "Bcc", "Resent-To", "Resent-Cc", "Resent-Bcc")
        for header in msg.get_all(name, [])
        for address in header.addresses
    ]
    assert recipients == [LIST]
    head = raw.partition(b"\r\n\r\n")[0]
    assert b"\nbcc" not in head.lower()
    return msg


# --- which events are mailed ------------------------------------------------------------------


def test_a_text_message_is_planned_with_every_field() -> None:
    result = planned(event({"msgtype": "m.text", "body": "Hello list."}))
    assert result == PlannedMail(
        event_id=EventID(EVENT_ID),
        sender=UserID(ALICE),
        msgtype="m.text",
        body_text="Hello list.",
        body_html=None,
        media=None,
        thread_root=None,
        reply_to=None,
        replaces=None,
    )


@pytest.mark.parametrize("msgtype", ["m.text", "m.emote"])
def test_text_msgtypes_are_mailed_with_their_html(msgtype: str) -> None:
    content = {
        "msgtype": msgtype,
        "body": "*hi*",
        "format": "org.matrix.custom.html",
        "formatted_body": "<em>hi</em>",
    }
    result = planned(event(content))
    assert result.msgtype == msgtype
    assert (result.body_text, result.body_html) == ("*hi*", "<em>hi</em>")


def test_mailed_msgtypes_are_the_documented_ones() -> None:
    assert MAILED_MSGTYPES == ("m.text", "m.emote", "m.file", "m.image", "m.audio", "m.video")


def test_reactions_are_not_mailed() -> None:
    reaction = event(
        {"m.relates_to": {"rel_type": "m.annotation", "event_id": PARENT, "key": "👍"}},
        type="m.reaction",
    )
    assert not_sent(reaction) == "reactions are not mailed"


@pytest.mark.parametrize(
    "event_type",
    ["m.sticker", "m.room.member", "m.room.encrypted", "M.ROOM.MESSAGE", "m.room.message\n",
     "", None, 5, ["m.room.message"], {"a": 1}, "x" * 100_000 + "\r\nBcc: v@example.org"],
)  # fmt: skip
def test_other_event_types_are_not_mailed(event_type: object) -> None:
    reason = not_sent(event({"msgtype": "m.text", "body": "hi"}, type=event_type))
    assert reason.startswith("event type ")
    assert reason.endswith(" is not mailed")


def test_a_state_event_is_not_mailed_even_with_a_message_type() -> None:
    reason = not_sent(event({"msgtype": "m.text", "body": "hi"}, state_key=""))
    assert reason == "state events are not mailed"


@pytest.mark.parametrize("raw", [None, [], "event", 5, b"{}"])
def test_something_that_is_not_an_event(raw: object) -> None:
    assert not_sent(raw) == "the event is not a JSON object"


@pytest.mark.parametrize("field", ["event_id", "sender"])
@pytest.mark.parametrize(
    "value",
    [None, 5, ["$x:y"], "", "x:agency.example.org", "$a\r\nBcc: v@example.org", "$a b",
     "$a\u202eb", "$" + "a" * 255, "$" + "é" * 130, "$a\ud800"],
)  # fmt: skip
def test_event_id_and_sender_must_be_matrix_ids(field: str, value: object) -> None:
    if field == "sender" and isinstance(value, str) and value.startswith("$"):
        value = "@" + value[1:]
    reason = not_sent(event(**{field: value}))
    assert reason == f"the event has no valid {field}"


def test_missing_event_id_or_sender() -> None:
    for field in ("event_id", "sender"):
        raw = event()
        del raw[field]
        assert not_sent(raw) == f"the event has no valid {field}"


def test_a_long_but_valid_event_id_is_kept() -> None:
    event_id = "$" + "A" * 254
    assert planned(event(event_id=event_id)).event_id == event_id


@pytest.mark.parametrize("sender", [BOT, GHOST])
def test_the_bridges_own_messages_are_not_mailed(sender: str) -> None:
    assert not_sent(event(sender=sender)) == "sent by the bridge itself"


def test_is_bridge_user_is_asked_about_the_sender() -> None:
    asked: list[str] = []

    def record(mxid: str) -> bool:
        asked.append(mxid)
        return False

    result = plan_event(event(), bot_mxid=BOT, is_bridge_user=record, command_prefix=PREFIX)
    assert isinstance(result, PlannedMail)
    assert asked == [ALICE]


@pytest.mark.parametrize("content", [None, [], "hello", 5, [("msgtype", "m.text")]])
def test_content_that_is_not_an_object(content: object) -> None:
    raw = event()
    raw["content"] = content
    assert not_sent(raw) == "the event content is not a JSON object"


@pytest.mark.parametrize("content", [{}, {"body": "hello"}])
def test_redacted_or_empty_messages_are_not_mailed(content: dict[str, Any]) -> None:
    assert not_sent(event(content)) == "redacted or empty message"


def test_notices_are_bot_output() -> None:
    reason = not_sent(event({"msgtype": "m.notice", "body": "I am a bot"}))
    assert reason == "m.notice messages are not mailed (bot output)"


@pytest.mark.parametrize(
    ("msgtype", "shown"),
    [
        ("m.location", "'m.location'"),
        ("m.key.verification.request", "'m.key.verification.request'"),
        ("M.TEXT", "'M.TEXT'"),
        ("m.text\r\nBcc: v@example.org", "'m.text\\r\\nBcc: v@example.org'"),
        (None, "missing"),
        (5, "<int>"),
        (["m.text"], "<list>"),
    ],
)
def test_other_msgtypes_are_not_mailed(msgtype: object, shown: str) -> None:
    reason = not_sent(event({"msgtype": msgtype, "body": "hi"}))
    assert reason == f"msgtype {shown} is not mailed"


def test_a_long_hostile_msgtype_is_shown_short() -> None:
    reason = not_sent(event({"msgtype": "\u202e" + "x" * 100_000, "body": "hi"}))
    assert "\u202e" not in reason
    assert reason.startswith("msgtype '\\u202e")
    assert "…" in reason


@pytest.mark.parametrize("body", [None, 5, 1.5, True, ["hi"], {"text": "hi"}])
def test_the_body_must_be_text(body: object) -> None:
    assert not_sent(event({"msgtype": "m.text", "body": body})) == "the message body is not text"
    assert not_sent(event(image(body=body))) == "the message body is not text"


def test_a_missing_body() -> None:
    assert not_sent(event({"msgtype": "m.text"})) == "the message body is not text"


def test_a_huge_body_and_html_are_cut() -> None:
    body = "é" * 200_000
    content = {
        "msgtype": "m.text",
        "body": body,
        "format": "org.matrix.custom.html",
        "formatted_body": "<b>" * 100_000,
    }
    result = planned(event(content))
    assert result.body_text == "é" * 65536
    assert result.body_html is not None
    assert len(result.body_html) == 65536


@pytest.mark.parametrize(
    "extra",
    [
        {"formatted_body": "<b>hi</b>"},  # no format
        {"format": "org.matrix.custom.html"},  # no formatted_body
        {"format": "org.matrix.custom.markdown", "formatted_body": "<b>hi</b>"},
        {"format": "ORG.MATRIX.CUSTOM.HTML", "formatted_body": "<b>hi</b>"},
        {"format": "org.matrix.custom.html", "formatted_body": 5},
        {"format": "org.matrix.custom.html", "formatted_body": ["<b>hi</b>"]},
        {"format": ["org.matrix.custom.html"], "formatted_body": "<b>hi</b>"},
    ],
)
def test_html_only_from_a_custom_html_string(extra: dict[str, object]) -> None:
    result = planned(event({"msgtype": "m.text", "body": "hi", **extra}))
    assert result.body_html is None
    assert result.body_text == "hi"


# --- commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    ["!passerelle help", "!passerelle", "  !PASSERELLE   status", "\n\t!Passerelle\nlink x",
     "!passerelle\u00a0help", "!passerelle\u2003"],
)  # fmt: skip
def test_commands_to_the_bridge_are_not_mailed(body: str) -> None:
    assert not_sent(event({"msgtype": "m.text", "body": body})) == "a command to the bridge"


@pytest.mark.parametrize(
    "body",
    ["!passerellehelp", "!passerelle-help", "say !passerelle help", "> !passerelle", "passerelle",
     "!passerell"],
)  # fmt: skip
def test_messages_that_only_look_like_commands_are_mailed(body: str) -> None:
    assert planned(event({"msgtype": "m.text", "body": body})).body_text == body


def test_only_text_messages_are_checked_for_commands() -> None:
    emote = planned(event({"msgtype": "m.emote", "body": "!passerelle help"}))
    assert emote.body_text == "!passerelle help"
    captioned = planned(event(image(filename="a.png", body="!passerelle help")))
    assert captioned.body_text == "!passerelle help"
    named = planned(event(image(body="!passerelle")))
    assert named.media is not None
    assert named.media.filename == "!passerelle"


def test_an_empty_prefix_makes_nothing_a_command() -> None:
    result = plan_event(
        event({"msgtype": "m.text", "body": "help"}),
        bot_mxid=BOT,
        is_bridge_user=is_ghost,
        command_prefix="",
    )
    assert isinstance(result, PlannedMail)
    blank = plan_event(
        event({"msgtype": "m.text", "body": "   "}),
        bot_mxid=BOT,
        is_bridge_user=is_ghost,
        command_prefix="",
    )
    assert isinstance(blank, PlannedMail)


# --- media ------------------------------------------------------------------------------------


@pytest.mark.parametrize("msgtype", ["m.file", "m.image", "m.audio", "m.video"])
def test_media_without_caption(msgtype: str) -> None:
    result = planned(event(image(msgtype=msgtype, body="report.pdf")))
    assert result.msgtype == msgtype
    assert result.body_text == ""
    assert result.body_html is None
    assert result.media == MediaRef(URL, "report.pdf", "image/png", 1234)


def test_media_filename_equal_to_body_is_no_caption() -> None:
    result = planned(event(image(filename="photo.png", body="photo.png")))
    assert result.body_text == ""
    assert result.media is not None
    assert result.media.filename == "photo.png"


def test_media_with_a_caption() -> None:
    content = image(
        filename="IMG_0042.jpg",
        body="The *site* today",
        format="org.matrix.custom.html",
        formatted_body="The <em>site</em> today",
    )
    result = planned(event(content))
    assert result.body_text == "The *site* today"
    assert result.body_html == "The <em>site</em> today"
    assert result.media is not None
    assert result.media.filename == "IMG_0042.jpg"


def test_media_html_without_a_caption_is_dropped() -> None:
    content = image(format="org.matrix.custom.html", formatted_body="<b>photo.png</b>")
    assert planned(event(content)).body_html is None


@pytest.mark.parametrize("filename", [None, 5, "", ["a.png"]])
def test_media_filename_falls_back_to_the_body(filename: object) -> None:
    result = planned(event(image(filename=filename, body="photo.png")))
    assert result.media is not None
    assert result.media.filename == "photo.png"
    assert result.body_text == ""  # no caption either


def test_media_filename_is_kept_as_given() -> None:
    hostile = "../../\u202egpj.exe\r\nBcc: v@example.org"
    result = planned(event(image(filename=hostile, body="look")))
    assert result.media is not None
    assert result.media.filename == hostile
    assert result.body_text == "look"


@pytest.mark.parametrize(
    "url",
    ["mxc://matrix.example.org/abc", "mxc://matrix.example.org:8448/A_b-C",
     "mxc://[2001:db8::1]:8448/abc", "mxc://127.0.0.1/abc"],
)  # fmt: skip
def test_valid_media_urls(url: str) -> None:
    result = planned(event(image(url=url)))
    assert result.media is not None
    assert result.media.url == url


@pytest.mark.parametrize(
    "url",
    [None, 5, ["mxc://a/b"], "", "https://example.org/a.png", "MXC://a/b", "mxc://a", "mxc://a/",
     "mxc:///b", "mxc://a/b/c", "mxc://a/../b", "mxc://a/b?x=1", "mxc://a/b#x", "mxc://a b/c",
     "mxc://a/b\r\nBcc: v@example.org", "mxc://a/b\n", "mxc://évil/b", "mxc://a/b\u202e",
     "mxc://user@a/b", "mxc://a/" + "b" * 300],
)  # fmt: skip
def test_invalid_media_urls(url: object) -> None:
    assert not_sent(event(image(url=url))) == "m.image without a valid mxc:// url"


def test_media_without_url() -> None:
    content = image()
    del content["url"]
    assert not_sent(event(content)) == "m.image without a valid mxc:// url"


def test_encrypted_media_is_not_mailed() -> None:
    encrypted = image(file={"url": URL, "key": {}, "iv": "x", "hashes": {}})
    del encrypted["url"]
    assert not_sent(event(encrypted)) == "encrypted media is not mailed"
    both = image(file={"url": URL})
    assert not_sent(event(both)) == "encrypted media is not mailed"


@pytest.mark.parametrize(
    ("info", "content_type", "size"),
    [
        ({"mimetype": "application/pdf", "size": 0}, "application/pdf", 0),
        ({"mimetype": "text/plain\r\nBcc: v@x.org", "size": 5}, "text/plain\r\nBcc: v@x.org", 5),
        ({"mimetype": 5, "size": -1}, "application/octet-stream", None),
        ({"mimetype": None, "size": True}, "application/octet-stream", None),
        ({"size": 1.5}, "application/octet-stream", None),
        ({"size": "1234"}, "application/octet-stream", None),
        ({"size": 10**30}, "application/octet-stream", 10**30),
        (None, "application/octet-stream", None),
        ([], "application/octet-stream", None),
        ("image/png", "application/octet-stream", None),
    ],
)
def test_media_info_is_read_defensively(info: object, content_type: str, size: int | None) -> None:
    result = planned(event(image(info=info)))
    assert result.media is not None
    assert (result.media.content_type, result.media.size) == (content_type, size)


def test_a_huge_mimetype_is_cut() -> None:
    result = planned(event(image(info={"mimetype": "a/" + "b" * 100_000})))
    assert result.media is not None
    assert len(result.media.content_type) == 255


# --- edits ------------------------------------------------------------------------------------


def edit(new_content: object, **relates: object) -> dict[str, Any]:
    content: dict[str, Any] = {
        "msgtype": "m.text",
        "body": "* fallback text",
        "m.new_content": new_content,
        "m.relates_to": {"rel_type": "m.replace", "event_id": PARENT, **relates},
    }
    return event(content)


def test_an_edit_takes_its_text_from_new_content() -> None:
    new = {
        "msgtype": "m.text",
        "body": "The meeting is at 3 pm",
        "format": "org.matrix.custom.html",
        "formatted_body": "The meeting is at <b>3 pm</b>",
    }
    result = planned(edit(new))
    assert result.replaces == PARENT
    assert result.body_text == "The meeting is at 3 pm"
    assert result.body_html == "The meeting is at <b>3 pm</b>"
    assert (result.thread_root, result.reply_to) == (None, None)


def test_an_edit_ignores_relations_besides_the_replacement() -> None:
    # Thread and reply come from the original event, looked up by the service.
    raw = edit({"msgtype": "m.text", "body": "new"}, **{"m.in_reply_to": {"event_id": ROOT}})
    result = planned(raw)
    assert (result.replaces, result.thread_root, result.reply_to) == (PARENT, None, None)


@pytest.mark.parametrize("new_content", [None, "new text", 5, ["m.text"]])
def test_an_edit_without_new_content(new_content: object) -> None:
    assert not_sent(edit(new_content)) == "an edit without m.new_content"
    raw = edit(None)
    del raw["content"]["m.new_content"]
    assert not_sent(raw) == "an edit without m.new_content"


@pytest.mark.parametrize("event_id", [None, 5, "", "not-an-event", "$a\nb"])
def test_an_edit_of_no_valid_event(event_id: object) -> None:
    raw = edit({"msgtype": "m.text", "body": "new"}, event_id=event_id)
    assert not_sent(raw) == "an edit without a valid event_id to replace"


def test_an_edit_into_a_notice_is_not_mailed() -> None:
    reason = not_sent(edit({"msgtype": "m.notice", "body": "bot says"}))
    assert reason == "m.notice messages are not mailed (bot output)"


def test_an_edit_of_a_notice_is_not_mailed() -> None:
    raw = edit({"msgtype": "m.text", "body": "now text"})
    raw["content"]["msgtype"] = "m.notice"
    assert not_sent(raw) == "m.notice messages are not mailed (bot output)"


@pytest.mark.parametrize(
    ("new_content", "reason"),
    [
        ({}, "msgtype missing is not mailed"),
        ({"body": "x"}, "msgtype missing is not mailed"),
        ({"msgtype": "m.location", "body": "x"}, "msgtype 'm.location' is not mailed"),
        ({"msgtype": "m.text", "body": 5}, "the message body is not text"),
        ({"msgtype": "m.text"}, "the message body is not text"),
        ({"msgtype": "m.text", "body": "!passerelle help"}, "a command to the bridge"),
        ({"msgtype": "m.image", "body": "a.png"}, "m.image without a valid mxc:// url"),
        ({"msgtype": "m.image", "body": "a.png", "file": {}}, "encrypted media is not mailed"),
    ],
)
def test_new_content_is_validated_like_a_message(new_content: object, reason: str) -> None:
    assert not_sent(edit(new_content)) == reason


def test_an_edit_of_a_caption() -> None:
    new = {"msgtype": "m.image", "body": "Better caption", "filename": "a.png", "url": URL}
    result = planned(edit(new))
    assert result.replaces == PARENT
    assert result.body_text == "Better caption"
    assert result.media == MediaRef(URL, "a.png", "application/octet-stream", None)


def test_a_huge_edit_is_cut() -> None:
    result = planned(edit({"msgtype": "m.text", "body": "x" * 100_000}))
    assert len(result.body_text) == 65536


# --- threads and replies ----------------------------------------------------------------------


def thread(**relates: object) -> dict[str, Any]:
    content = {
        "msgtype": "m.text",
        "body": "in the thread",
        "m.relates_to": {"rel_type": "m.thread", "event_id": ROOT, **relates},
    }
    return event(content)


def test_a_thread_message_falling_back_is_no_reply() -> None:
    result = planned(thread(is_falling_back=True, **{"m.in_reply_to": {"event_id": PARENT}}))
    assert (result.thread_root, result.reply_to, result.replaces) == (ROOT, None, None)


@pytest.mark.parametrize("falling_back", [False, None, "true", 1])
def test_a_real_reply_in_a_thread(falling_back: object) -> None:
    relates: dict[str, object] = {"m.in_reply_to": {"event_id": PARENT}}
    if falling_back is not None:
        relates["is_falling_back"] = falling_back
    result = planned(thread(**relates))
    assert (result.thread_root, result.reply_to) == (ROOT, PARENT)


def test_a_thread_message_without_reply() -> None:
    result = planned(thread())
    assert (result.thread_root, result.reply_to) == (ROOT, None)


def test_a_thread_with_an_invalid_root_still_honours_falling_back() -> None:
    raw = thread(event_id=5, is_falling_back=True, **{"m.in_reply_to": {"event_id": PARENT}})
    result = planned(raw)
    assert (result.thread_root, result.reply_to) == (None, None)


def test_a_plain_reply() -> None:
    content = {
        "msgtype": "m.text",
        "body": "> <@bob:x> question\n\nanswer",
        "m.relates_to": {"m.in_reply_to": {"event_id": PARENT}},
    }
    result = planned(event(content))
    assert (result.thread_root, result.reply_to, result.replaces) == (None, PARENT, None)
    assert result.body_text == "> <@bob:x> question\n\nanswer"  # compose strips the fallback


@pytest.mark.parametrize(
    "relates",
    [None, "m.thread", ["m.thread"], {"rel_type": 5, "event_id": ROOT},
     {"rel_type": "m.thread", "event_id": ["$x"]}, {"rel_type": "m.thread", "event_id": "$a\r\nb"},
     {"m.in_reply_to": PARENT}, {"m.in_reply_to": {"event_id": 5}},
     {"m.in_reply_to": {"event_id": "no sigil"}}, {"rel_type": "m.reference", "event_id": ROOT}],
)  # fmt: skip
def test_hostile_relations_are_ignored(relates: object) -> None:
    result = planned(event({"msgtype": "m.text", "body": "hi", "m.relates_to": relates}))
    assert (result.thread_root, result.reply_to, result.replaces) == (None, None, None)
    assert result.body_text == "hi"


# --- never raises -----------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
KEYS = st.sampled_from(
    ["msgtype", "body", "format", "formatted_body", "url", "file", "filename", "info",
     "m.relates_to", "m.new_content", "rel_type", "event_id", "m.in_reply_to",
     "is_falling_back", "mimetype", "size"]
)  # fmt: skip
VALUES = st.one_of(
    JSON,
    st.sampled_from(
        ["m.text", "m.emote", "m.image", "m.notice", "m.replace", "m.thread", URL, ROOT,
         "org.matrix.custom.html", "!passerelle go", True]
    ),
)  # fmt: skip
CONTENT = st.recursive(
    st.dictionaries(KEYS, VALUES, max_size=8),
    lambda children: st.dictionaries(KEYS, st.one_of(VALUES, children), max_size=8),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(
    content=st.one_of(CONTENT, JSON),
    event_type=st.sampled_from(["m.room.message", "m.reaction", None, 5]),
    sender=st.sampled_from([ALICE, BOT, GHOST, None, "", 5]),
)
def test_property_any_event_gives_a_plan_or_a_reason(
    content: object, event_type: object, sender: object
) -> None:
    result = plan(event(content if content is not None else {}, type=event_type, sender=sender))
    if isinstance(result, NotSent):
        assert result.reason
        assert "\n" not in result.reason
        assert len(result.reason) < 120
        return
    assert isinstance(result, PlannedMail)
    assert result.msgtype in MAILED_MSGTYPES
    assert isinstance(result.body_text, str)
    assert result.body_html is None or isinstance(result.body_html, str)
    assert (result.media is not None) == (result.msgtype not in ("m.text", "m.emote"))
    # And whatever was planned composes into a safe mail.
    name = "Eve\r\nBcc: v@example.org"
    build(mail_for(result, sender_name=name, subject="s", in_reply_to="m1@x.org"))


# --- the OutgoingMail for a plan --------------------------------------------------------------


def test_a_plan_passes_through_to_the_mail() -> None:
    result = planned(event({"msgtype": "m.text", "body": "Hello list."}))
    attachment = Attachment("a.txt", "text/plain", b"x")
    mail = outgoing_mail(
        result,
        sender_name="Alice Martin",
        disambiguate=True,
        subject="Budget",
        in_reply_to="m2@lists.example.org",
        references=("m1@lists.example.org",),
        attachments=(attachment,),
    )
    assert mail == OutgoingMail(
        event_id=EVENT_ID,
        sender_mxid=ALICE,
        sender_name="Alice Martin",
        body_text="Hello list.",
        body_html=None,
        subject="Budget",
        in_reply_to="m2@lists.example.org",
        references=("m1@lists.example.org",),
        attachments=(attachment,),
        correction=False,
        disambiguate=True,
    )


def test_an_edit_becomes_a_correction() -> None:
    mail = mail_for(plan(edit({"msgtype": "m.text", "body": "Meeting at 3 pm"})))
    assert mail.correction
    assert mail.body_text == "Meeting at 3 pm"
    msg = build(mail)
    assert msg["Subject"] == "Re: Meeting at 3 pm"
    assert text_part(msg) == "Correction: Meeting at 3 pm\n"


def test_an_emote() -> None:
    content = {
        "msgtype": "m.emote",
        "body": "waves",
        "format": "org.matrix.custom.html",
        "formatted_body": "<em>waves</em>",
    }
    mail = mail_for(plan(event(content)), sender_name="Alice <b>Martin</b>")
    assert mail.body_text == "* Alice <b>Martin</b> waves"
    assert mail.body_html == "* Alice &lt;b&gt;Martin&lt;/b&gt; <em>waves</em>"
    msg = build(mail)
    assert text_part(msg) == "* Alice <b>Martin</b> waves\n"
    html = html_part(msg)
    assert html is not None
    assert html.startswith("* Alice &lt;b&gt;Martin&lt;/b&gt; <em>waves</em>")


def test_an_emote_with_a_hostile_display_name() -> None:
    name = "Eve\r\nBcc: victim@example.org\u202e\x00"
    mail = mail_for(plan(event({"msgtype": "m.emote", "body": "waves"})), sender_name=name)
    assert mail.body_text == "* Eve Bcc: victim@example.org waves"
    assert mail.sender_name == name  # compose cleans it for From itself
    msg = build(mail)
    assert text_part(msg) == "* Eve Bcc: victim@example.org waves\n"
    assert msg["Subject"] == "* Eve Bcc: victim@example.org waves"


@pytest.mark.parametrize("name", ["", "\u202e\u200b", "\r\n"])
def test_an_emote_by_someone_without_a_name_shows_the_mxid(name: str) -> None:
    mail = mail_for(plan(event({"msgtype": "m.emote", "body": "waves"})), sender_name=name)
    assert mail.body_text == f"* {ALICE} waves"


def test_an_emote_reply_keeps_its_fallback_first() -> None:
    content = {
        "msgtype": "m.emote",
        "body": "> <@bob:x> Lunch?\n\nnods",
        "format": "org.matrix.custom.html",
        "formatted_body": "<mx-reply><blockquote>Lunch?</blockquote></mx-reply>nods",
        "m.relates_to": {"m.in_reply_to": {"event_id": PARENT}},
    }
    mail = mail_for(plan(event(content)), subject="Lunch", in_reply_to="m1@lists.example.org")
    assert mail.body_text == "> <@bob:x> Lunch?\n\n* Alice Martin nods"
    msg = build(mail)
    assert text_part(msg) == "* Alice Martin nods\n"  # compose removed the fallback
    html = html_part(msg)
    assert html is not None
    assert html.startswith("* Alice Martin nods")
    assert "Lunch?" not in html


def test_an_emote_that_only_looks_like_a_fallback_when_no_reply() -> None:
    content = {"msgtype": "m.emote", "body": "> <@bob:x> quotes\n\nhimself"}
    mail = mail_for(plan(event(content)))
    assert mail.body_text == "* Alice Martin > <@bob:x> quotes\n\nhimself"


def test_a_file_without_caption_shows_its_name() -> None:
    content = image(msgtype="m.file", body="Budget 2024.pdf", info={"mimetype": "application/pdf"})
    result = plan(event(content))
    assert isinstance(result, PlannedMail)
    assert result.media is not None
    mail = mail_for(result, attachments=(placeholder_attachment(result.media),))
    assert (mail.body_text, mail.body_html) == ("Budget 2024.pdf", None)
    msg = build(mail)
    assert msg["Subject"] == "Budget 2024.pdf"
    assert text_part(msg) == "Budget 2024.pdf\n"
    (part,) = msg.iter_attachments()
    assert part.get_filename() == "Budget 2024.pdf"
    assert part.get_content_type() == "application/pdf"


def test_a_file_with_a_caption_shows_the_caption() -> None:
    content = image(
        filename="IMG_0042.jpg",
        body="The site today",
        format="org.matrix.custom.html",
        formatted_body="The <b>site</b> today",
    )
    mail = mail_for(plan(event(content)))
    assert (mail.body_text, mail.body_html) == ("The site today", "The <b>site</b> today")


def test_a_hostile_filename_flows_through_safely() -> None:
    hostile = f"..\\../x{BIDI}gpj.exe\r\nBcc: victim@example.org\r\n\r\n.txt"
    result = plan(event(image(msgtype="m.file", body=hostile)))
    assert isinstance(result, PlannedMail)
    assert result.media is not None
    mail = mail_for(result, attachments=(placeholder_attachment(result.media),))
    assert "\r" not in mail.body_text
    assert "\n" not in mail.body_text
    assert not any(c in mail.body_text for c in BIDI)
    msg = build(mail)
    (part,) = msg.iter_attachments()
    name = part.get_filename()
    assert name == "xgpj.exeBcc: victim@example.org.txt"
    assert not any(c in name for c in BIDI)
    assert text_part(msg) == "xgpj.exeBcc: victim@example.org.txt\n"
    assert not any(c in msg["Subject"] for c in BIDI + "\r\n")


def test_bidi_characters_in_a_filename_are_removed_everywhere() -> None:
    # "invoice\u202efdp.exe" shows as "invoiceexe.pdf" where the override is honoured.
    result = plan(event(image(msgtype="m.file", body="invoice\u202efdp.exe")))
    assert isinstance(result, PlannedMail)
    assert result.media is not None
    mail = mail_for(result, attachments=(placeholder_attachment(result.media),))
    msg = build(mail)
    (part,) = msg.iter_attachments()
    assert part.get_filename() == "invoicefdp.exe"
    assert mail.body_text == "invoicefdp.exe"
    assert msg["Subject"] == "invoicefdp.exe"


def test_crlf_bcc_in_the_body_stays_in_the_body() -> None:
    body = "Hello\r\nBcc: victim@example.org\r\n\r\nTo: x@evil.example"
    mail = mail_for(plan(event({"msgtype": "m.text", "body": body})))
    msg = build(mail)
    assert msg["Subject"] == "Hello"
    assert text_part(msg) == "Hello\nBcc: victim@example.org\n\nTo: x@evil.example\n"


def test_crlf_bcc_in_the_display_name_gives_one_recipient() -> None:
    mail = mail_for(plan(event()), sender_name="Eve\r\nBcc: victim@example.org")
    msg = build(mail)
    assert len(msg["From"].addresses) == 1
    assert msg["From"].addresses[0].addr_spec == FROM


def test_scripts_and_javascript_links_are_gone_after_compose() -> None:
    html = (
        '<p>Hi <a href="javascript:alert(1)">click</a> <a href="JaVaScRiPt:x()">two</a>'
        '<script>alert("x")</script><img src=x onerror="alert(2)">'
        '<a href="https://example.org/ok">fine</a></p>'
    )
    content = {
        "msgtype": "m.text",
        "body": "Hi click two fine",
        "format": "org.matrix.custom.html",
        "formatted_body": html,
    }
    msg = build(mail_for(plan(event(content))))
    sent = html_part(msg)
    assert sent is not None
    lowered = sent.lower()
    for gone in ("<script", "javascript:", "alert", "onerror"):
        assert gone not in lowered
    assert 'href="https://example.org/ok"' in sent
    assert "click" in sent


def test_a_huge_event_composes() -> None:
    content = {
        "msgtype": "m.text",
        "body": "line\r\n" * 50_000,
        "format": "org.matrix.custom.html",
        "formatted_body": "<b>" * 50_000,
    }
    mail = mail_for(plan(event(content)), sender_name="x" * 100_000)
    msg = build(mail)
    assert msg["Subject"] == "line"
    assert len(text_part(msg)) <= 65536


# --- placeholder attachments ------------------------------------------------------------------


def test_placeholder_attachment() -> None:
    attachment = placeholder_attachment(MediaRef(URL, "report.pdf", "application/pdf", 2048))
    assert attachment == Attachment(
        filename="report.pdf",
        content_type="application/pdf",
        data=(
            b"[placeholder for mxc://agency.example.org/AbCdEf_12-3, 2048 bytes:"
            b" the file is downloaded when the mail is sent]"
        ),
    )


def test_placeholder_attachment_of_unknown_size_and_hostile_name() -> None:
    media = MediaRef(URL, "../\u202eevil\r\n.txt", "application/octet-stream", None)
    attachment = placeholder_attachment(media)
    assert attachment.data == (
        b"[placeholder for mxc://agency.example.org/AbCdEf_12-3, unknown size:"
        b" the file is downloaded when the mail is sent]"
    )
    assert attachment.filename == "evil.txt"  # made safe, as Attachment promises
    assert not attachment.inline
