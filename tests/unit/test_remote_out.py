"""Agency → remote decisions: which agency event goes to a linked remote room, and as what."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.matrix_event import MAX_TEXT, MediaRef, NotSent, Relations
from bridge.core.remote_out import (
    PROFILE_KEY,
    OutgoingPlan,
    plan_agency_event,
    remote_event,
    sender_label,
    with_sender,
)
from tests.unit.test_remote_in import (
    HOSTILE_HTML,
    PROPERTY,
    assert_clean_html,
    json_values,
    leaf,
    message_content,
)

AGENCY = "agence.example.org"
ALICE = f"@alice:{AGENCY}"
BOT = f"@passerelle:{AGENCY}"
GHOST = f"@_remote_eve:{AGENCY}"
TARGET = f"$target:{AGENCY}"
MXC_URL = f"mxc://{AGENCY}/media1"
HTML = "org.matrix.custom.html"


def is_bridge_user(user_id: str) -> bool:
    return user_id.startswith("@_remote_")


def event(content: Any = None, *, type_: Any = "m.room.message", **extra: Any) -> dict[str, Any]:
    found: dict[str, Any] = {
        "event_id": "$ev1:" + AGENCY,
        "sender": ALICE,
        "type": type_,
        "content": {"msgtype": "m.text", "body": "hello"} if content is None else content,
    }
    return found | extra


def plan(ev: Any, prefix: str = "!passerelle") -> OutgoingPlan | NotSent:
    return plan_agency_event(
        ev, bot_mxid=BOT, is_bridge_user=is_bridge_user, command_prefix=prefix
    )


def message(content: Any, **extra: Any) -> OutgoingPlan:
    found = plan(event(content, **extra))
    assert isinstance(found, OutgoingPlan), found
    assert found.kind == "message"
    return found


# --- plan_agency_event: the envelope ----------------------------------------------------------


@pytest.mark.parametrize("ev", [None, "x", 5, [], [event()]])
def test_not_an_object(ev: Any) -> None:
    assert plan(ev) == NotSent("the event is not a JSON object")


@pytest.mark.parametrize("state_key", ["", ALICE, None, 5])
def test_state_is_never_passed_on(state_key: object) -> None:
    assert plan(event(state_key=state_key)) == NotSent("state is not passed on")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("event_id", None),
        ("event_id", "ev"),
        ("event_id", "$ev\n"),
        ("sender", 5),
        ("sender", ALICE + "\n"),
        ("sender", "alice"),
        ("sender", "@ali\u202ece:" + AGENCY),
    ],
)
def test_envelope_is_checked(key: str, value: object) -> None:
    assert plan(event() | {key: value}) == NotSent("the event has no valid event_id or sender")


@pytest.mark.parametrize("sender", [BOT, GHOST])
def test_the_bridges_own_events_are_not_passed_on(sender: str) -> None:
    assert plan(event(sender=sender)) == NotSent("sent by the bridge itself")


@pytest.mark.parametrize("content", [None, "x", ["x"], 5])
def test_content_not_an_object(content: object) -> None:
    ev = event() | {"content": content}
    assert plan(ev) == NotSent("the event content is not a JSON object")


@pytest.mark.parametrize(
    "type_",
    ["m.room.encrypted", "m.call.invite", "m.room.member", None, 5, ["m.room.message"]],
)
def test_other_types(type_: object) -> None:
    found = plan(event(type_=type_))
    assert isinstance(found, NotSent)
    assert "is not passed on" in found.reason


def test_redaction_top_level_and_in_content() -> None:
    expected = OutgoingPlan("redaction", "$ev1:" + AGENCY, ALICE, target=TARGET)
    assert plan(event({}, type_="m.room.redaction", redacts=TARGET)) == expected
    assert plan(event({"redacts": TARGET}, type_="m.room.redaction")) == expected


@pytest.mark.parametrize("target", [None, 5, "t", ["$x"]])
def test_redaction_without_a_valid_target(target: object) -> None:
    found = plan(event({"redacts": target}, type_="m.room.redaction", redacts=target))
    assert found == NotSent("a redaction without a valid target")


def test_reaction() -> None:
    content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": TARGET, "key": "👍"}}
    assert plan(event(content, type_="m.reaction")) == OutgoingPlan(
        "reaction", "$ev1:" + AGENCY, ALICE, target=TARGET, key="👍"
    )


@pytest.mark.parametrize(
    ("relates", "why"),
    [
        ({"rel_type": "m.annotation", "event_id": TARGET, "key": "k" * 10_000}, "key"),
        ({"rel_type": "m.annotation", "event_id": TARGET, "key": ""}, "key"),
        ({"rel_type": "m.annotation", "event_id": TARGET, "key": 5}, "key"),
        ({"rel_type": "m.annotation", "event_id": TARGET}, "key"),
        ({"rel_type": "m.reference", "event_id": TARGET, "key": "x"}, "annotation"),
        ({"rel_type": "m.annotation", "event_id": "x", "key": "x"}, "annotation"),
        ("m.annotation", "annotation"),
        (None, "annotation"),
    ],
)
def test_reaction_refused(relates: object, why: str) -> None:
    found = plan(event({"m.relates_to": relates}, type_="m.reaction"))
    assert isinstance(found, NotSent)
    assert why in found.reason


# --- plan_agency_event: messages --------------------------------------------------------------


def test_plain_text() -> None:
    found = message({"msgtype": "m.text", "body": "hello", "m.mentions": {"room": True}})
    assert found.content == {"msgtype": "m.text", "body": "hello"}
    assert (found.thread_root, found.reply_to, found.replaces, found.media) == (None,) * 4


def test_redacted_message() -> None:
    assert plan(event({})) == NotSent("a redacted or empty message")


@pytest.mark.parametrize("msgtype", ["m.location", "m.key.verification.request", None, 5])
def test_unknown_msgtype_is_not_passed_on(msgtype: object) -> None:
    found = plan(event({"msgtype": msgtype, "body": "x"}))
    assert isinstance(found, NotSent)
    assert "msgtype" in found.reason


@pytest.mark.parametrize("body", [None, 5, ["x"]])
def test_body_not_text(body: object) -> None:
    assert plan(event({"msgtype": "m.text", "body": body})) == NotSent(
        "the message body is not text"
    )


@pytest.mark.parametrize("body", ["!passerelle help", "!PASSERELLE link", "  !passerelle"])
def test_commands_to_the_bridge_stay_home(body: str) -> None:
    assert plan(event({"msgtype": "m.text", "body": body})) == NotSent("a command to the bridge")


@pytest.mark.parametrize(
    ("body", "msgtype", "prefix"),
    [
        ("!passerellex help", "m.text", "!passerelle"),
        ("say !passerelle", "m.text", "!passerelle"),
        ("!passerelle help", "m.notice", "!passerelle"),
        ("!passerelle help", "m.text", ""),
        ("", "m.text", "!passerelle"),
    ],
)
def test_not_commands(body: str, msgtype: str, prefix: str) -> None:
    found = plan(event({"msgtype": msgtype, "body": body}), prefix)
    assert isinstance(found, OutgoingPlan)


def test_long_body_is_bounded() -> None:
    assert len(message({"msgtype": "m.text", "body": "x" * 200_000}).content["body"]) == MAX_TEXT


def test_hostile_html() -> None:
    found = message(
        {"msgtype": "m.text", "body": "x", "format": HTML, "formatted_body": HOSTILE_HTML}
    )
    assert_clean_html(found.content["formatted_body"])


@pytest.mark.parametrize(
    ("fmt", "html"), [("text/html", "<b>x</b>"), (HTML, 5), (HTML, "<script>")]
)
def test_formatted_body_dropped(fmt: object, html: object) -> None:
    found = message({"msgtype": "m.text", "body": "x", "format": fmt, "formatted_body": html})
    assert found.content == {"msgtype": "m.text", "body": "x"}


def test_reply_fallback_removed() -> None:
    found = message(
        {
            "msgtype": "m.text",
            "body": "> <@a:b> q\n\nanswer",
            "format": HTML,
            "formatted_body": "<mx-reply>q</mx-reply><i>answer</i>",
            "m.relates_to": {"m.in_reply_to": {"event_id": TARGET}},
        }
    )
    assert found.content["body"] == "answer"
    assert found.content["formatted_body"] == "<i>answer</i>"
    assert found.reply_to == TARGET


def test_thread_whose_fallback_reply_points_elsewhere() -> None:
    found = message(
        {
            "msgtype": "m.text",
            "body": "t",
            "m.relates_to": {
                "rel_type": "m.thread",
                "event_id": TARGET,
                "is_falling_back": True,
                "m.in_reply_to": {"event_id": "$latest:" + AGENCY},
            },
        }
    )
    assert (found.thread_root, found.reply_to) == (TARGET, None)


def test_edit_with_a_different_msgtype() -> None:
    found = message(
        {
            "msgtype": "m.text",
            "body": "* new",
            "m.new_content": {"msgtype": "m.notice", "body": "new"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": TARGET},
        }
    )
    assert found.content == {"msgtype": "m.notice", "body": "new"}
    assert found.replaces == TARGET


@pytest.mark.parametrize(
    ("relates", "new_content", "reason"),
    [
        ({"rel_type": "m.replace", "event_id": "x"}, {"body": "x"}, "an edit without a valid"),
        ({"rel_type": "m.replace", "event_id": TARGET}, None, "an edit without m.new_content"),
        ({"rel_type": "m.replace", "event_id": TARGET}, "x", "an edit without m.new_content"),
    ],
)
def test_edit_refused(relates: dict[str, Any], new_content: object, reason: str) -> None:
    content = {"msgtype": "m.text", "body": "* x", "m.new_content": new_content}
    found = plan(event(content | {"m.relates_to": relates}))
    assert isinstance(found, NotSent)
    assert found.reason.startswith(reason)


def test_image_without_caption() -> None:
    found = message(
        {
            "msgtype": "m.image",
            "body": "a.png",
            "url": MXC_URL,
            "format": HTML,
            "formatted_body": "<b>a.png</b>",
            "info": {"mimetype": "image/png", "size": 3, "w": -1, "h": 2.5, "duration": False},
        }
    )
    assert found.media == {
        "url": MXC_URL,
        "filename": "a.png",
        "content_type": "image/png",
        "size": 3,
    }
    assert found.content == {
        "msgtype": "m.image",
        "body": "a.png",
        "filename": "a.png",
        "info": {"mimetype": "image/png", "size": 3},
    }


def test_file_with_caption_keeps_its_html_and_a_clean_filename() -> None:
    found = message(
        {
            "msgtype": "m.file",
            "body": "the report",
            "filename": "rapport\u202efdp.exe",
            "url": MXC_URL,
            "format": HTML,
            "formatted_body": "<b>the report</b>",
        }
    )
    assert found.content["filename"] == "rapportfdp.exe"
    assert found.content["formatted_body"] == "<b>the report</b>"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ({"msgtype": "m.file", "body": "f", "file": {"url": MXC_URL}}, "encrypted media"),
        ({"msgtype": "m.file", "body": "f", "url": "https://x/y"}, "m.file without a valid"),
    ],
)
def test_media_refused(content: dict[str, Any], reason: str) -> None:
    found = plan(event(content))
    assert isinstance(found, NotSent)
    assert found.reason.startswith(reason)
    assert found.reason.endswith("is not passed on")


def test_sticker_goes_as_an_image_message() -> None:
    found = message({"body": "cat", "url": MXC_URL}, type_="m.sticker")
    assert found.content["msgtype"] == "m.image"
    assert found.event_type == "m.room.message"


# --- OutgoingPlan -----------------------------------------------------------------------------


def test_plan_round_trips_through_json() -> None:
    original = message(
        {
            "msgtype": "m.image",
            "body": "a caption",
            "filename": "a.png",
            "url": MXC_URL,
            "m.relates_to": {"rel_type": "m.thread", "event_id": TARGET},
        }
    )
    stored = json.loads(json.dumps(original.as_json()))
    assert OutgoingPlan.from_json(stored | {"unknown": 1}) == original
    assert original.relations == Relations(thread_root=TARGET)
    assert original.related() == (TARGET,)
    assert original.media_ref() == MediaRef(MXC_URL, "a.png", "application/octet-stream", None)
    assert "key" not in original.as_json()


def test_plan_relations_ignore_stored_garbage() -> None:
    stored = OutgoingPlan("message", "$e", ALICE, thread_root="x", reply_to="$r\n", replaces=None)
    assert stored.relations == Relations()
    assert OutgoingPlan("reaction", "$e", ALICE, target=TARGET).related() == (TARGET,)
    assert OutgoingPlan("message", "$e", ALICE).media_ref() is None


# --- sender_label, with_sender ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("Alice Martin", "Alice Martin (Agence)"),
        ("Alice\u202e Martin\u200b", "Alice Martin (Agence)"),
        (None, f"{ALICE} (Agence)"),
        ("\u200b", f"{ALICE} (Agence)"),
        ("A\nB", "A B (Agence)"),
    ],
)
def test_sender_label(name: str | None, label: str) -> None:
    assert sender_label(name, ALICE, "(Agence)") == label


def test_sender_label_is_at_most_255_bytes() -> None:
    label = sender_label("é" * 100, ALICE, "(Agence)" * 30)
    assert len(label.encode("utf-8")) <= 255


def test_with_sender() -> None:
    content = {"msgtype": "m.text", "body": "a <b>\nline"}
    out = with_sender(content, "Al <i>ice", {"id": ALICE, "displayname": "Al <i>ice"})
    assert out["body"] == "Al <i>ice : a <b>\nline"
    assert out["format"] == HTML
    assert out["formatted_body"] == (
        "<strong data-mx-profile-fallback>Al &lt;i&gt;ice : </strong>a &lt;b&gt;<br>line"
    )
    assert out[PROFILE_KEY] == {"id": ALICE, "displayname": "Al <i>ice", "has_fallback": True}
    assert content == {"msgtype": "m.text", "body": "a <b>\nline"}


def test_with_sender_keeps_formatted_body() -> None:
    out = with_sender({"body": "x", "formatted_body": "<b>x</b>"}, "A", {})
    assert out["formatted_body"].endswith(" : </strong><b>x</b>")


# --- remote_event -----------------------------------------------------------------------------


def test_reaction_to_a_relayed_event() -> None:
    reaction = OutgoingPlan("reaction", "$e", ALICE, target=TARGET, key="👍")
    assert remote_event(reaction, label="A", mapped={TARGET: "$r"}, media_url=None) == (
        "m.reaction",
        {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$r", "key": "👍"}},
    )


@pytest.mark.parametrize("mapped", [{}, {TARGET: None}])
def test_reaction_to_a_never_relayed_event_is_said_in_words(mapped: dict[str, str | None]) -> None:
    reaction = OutgoingPlan("reaction", "$e", ALICE, target=TARGET, key="👍")
    found = remote_event(reaction, label="A (Agence)", mapped=mapped, media_url=None)
    assert not isinstance(found, NotSent)
    event_type, content = found
    assert event_type == "m.room.message"
    assert content["msgtype"] == "m.notice"
    assert content["body"] == "A (Agence) : reacted 👍 to a message"
    assert content["m.mentions"] == {}


def test_redaction_is_not_a_remote_event() -> None:
    redaction = OutgoingPlan("redaction", "$e", ALICE, target=TARGET)
    assert remote_event(redaction, label="A", mapped={}, media_url=None) == NotSent(
        "redaction is not a message"
    )


def outgoing(content: dict[str, Any], **relations: Any) -> OutgoingPlan:
    return message(content | ({"m.relates_to": relations} if relations else {}))


def test_message_never_pings_and_carries_a_profile() -> None:
    msg = outgoing({"msgtype": "m.text", "body": "hi @room", "m.mentions": {"room": True}})
    found = remote_event(msg, label="A", mapped={}, media_url=None, avatar_url="mxc://a/b")
    assert not isinstance(found, NotSent)
    _, content = found
    assert content["m.mentions"] == {}
    assert content[PROFILE_KEY] == {
        "id": ALICE,
        "displayname": "A",
        "avatar_url": "mxc://a/b",
        "has_fallback": True,
    }
    assert "m.relates_to" not in content


def test_media_needs_its_copy() -> None:
    msg = outgoing({"msgtype": "m.file", "body": "f", "url": MXC_URL})
    assert remote_event(msg, label="A", mapped={}, media_url=None) == NotSent(
        "the file could not be copied"
    )
    found = remote_event(msg, label="A", mapped={}, media_url="mxc://remote/copy")
    assert not isinstance(found, NotSent)
    assert found[1]["url"] == "mxc://remote/copy"


def test_reply_and_thread_mapped_or_not() -> None:
    reply = outgoing({"msgtype": "m.text", "body": "r"}, **{"m.in_reply_to": {"event_id": TARGET}})
    found = remote_event(reply, label="A", mapped={TARGET: "$r"}, media_url=None)
    assert not isinstance(found, NotSent)
    assert found[1]["m.relates_to"] == {"m.in_reply_to": {"event_id": "$r"}}
    found = remote_event(reply, label="A", mapped={TARGET: None}, media_url=None)
    assert not isinstance(found, NotSent)
    assert "m.relates_to" not in found[1]
    thread = outgoing({"msgtype": "m.text", "body": "t"}, rel_type="m.thread", event_id=TARGET)
    found = remote_event(thread, label="A", mapped={TARGET: "$r"}, media_url=None)
    assert not isinstance(found, NotSent)
    assert found[1]["m.relates_to"]["rel_type"] == "m.thread"


def test_edit_mapped_or_not() -> None:
    edit = outgoing(
        {"msgtype": "m.text", "body": "* n", "m.new_content": {"msgtype": "m.text", "body": "n"}},
        rel_type="m.replace",
        event_id=TARGET,
    )
    found = remote_event(edit, label="A", mapped={TARGET: "$r"}, media_url=None)
    assert not isinstance(found, NotSent)
    content = found[1]
    assert content["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$r"}
    assert content["body"] == "* A : n"
    assert content["m.new_content"]["body"] == "A : n"
    assert content["m.mentions"] == content["m.new_content"]["m.mentions"] == {}
    found = remote_event(edit, label="A", mapped={}, media_url=None)
    assert not isinstance(found, NotSent)
    assert found[1]["body"] == "A : n"
    assert "m.relates_to" not in found[1]


# --- properties -------------------------------------------------------------------------------

agency_events = st.fixed_dictionaries(
    {
        "event_id": st.just("$e:" + AGENCY) | leaf,
        "sender": st.sampled_from([ALICE, BOT, GHOST]) | leaf,
        "type": st.sampled_from(["m.room.message", "m.sticker", "m.reaction", "m.room.redaction"])
        | leaf,
        "content": message_content | leaf,
    },
    optional={"state_key": leaf, "redacts": leaf},
)


def assert_safe(found: object, label: str) -> None:
    assert isinstance(found, OutgoingPlan | NotSent)
    if not isinstance(found, OutgoingPlan):
        return
    assert found.sender not in (BOT, GHOST)
    if found.kind == "message":
        assert "m.relates_to" not in found.content
        assert "m.mentions" not in found.content
        html = found.content.get("formatted_body")
        if html is not None:
            assert_clean_html(html)
    assert OutgoingPlan.from_json(json.loads(json.dumps(found.as_json()))) == found
    sent = remote_event(found, label=label, mapped={TARGET: "$r"}, media_url="mxc://r/c")
    if isinstance(sent, NotSent):
        return
    _, content = sent
    if "m.relates_to" in content and content["m.relates_to"].get("rel_type") == "m.annotation":
        return
    assert content["m.mentions"] == {}
    assert_clean_html(content["formatted_body"])


@PROPERTY
@given(json_values)
def test_any_json_value_is_planned_without_raising(value: Any) -> None:
    assert_safe(plan(value), "A")


@PROPERTY
@given(agency_events, st.sampled_from(["A (Agence)", '<script>x</script> <a onclick="x">']))
def test_hostile_leaves_in_a_valid_skeleton(ev: dict[str, Any], label: str) -> None:
    assert_safe(plan(ev), label)
