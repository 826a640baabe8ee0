"""Remote → agency decisions: which remote event is relayed, as what, and under which name."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.core.matrix_event import MAX_TEXT, MediaRef, Relations
from bridge.core.remote_in import (
    NotRelayed,
    RemoteMember,
    RemoteMessage,
    RemotePolicy,
    RemoteReaction,
    RemoteRedaction,
    RemoteRoomChange,
    agency_message_content,
    plan_remote_event,
)

SERVER = "interieur.example.org"
OWN = f"@passerelle:{SERVER}"
EVE = f"@eve:{SERVER}"
POLICY = RemotePolicy("interieur", OWN, frozenset({SERVER}))
TARGET = f"$target:{SERVER}"
MXC_URL = f"mxc://{SERVER}/media1"
HOSTILE_HTML = (
    "<p>hi</p><script>alert(1)</script><img src=x onerror=alert(1)>"
    '<a href="javascript:alert(1)">click</a><a href="JaVaScRiPt:alert(2)">2</a>'
    '<b onclick="alert(3)" onmouseover=x>bold</b><svg onload=alert(4)></svg>'
    "<iframe src=javascript:alert(5)></iframe><style>*{}</style>"
)
_ON_ATTRIBUTE = re.compile(r"<[^>]*\son[a-z]*\s*=", re.IGNORECASE)


def event(
    content: Any = None, *, type_: Any = "m.room.message", sender: Any = EVE, **extra: Any
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "event_id": "$ev1:" + SERVER,
        "sender": sender,
        "type": type_,
        "origin_server_ts": 1_700_000_000_000,
        "content": {"msgtype": "m.text", "body": "hello"} if content is None else content,
    }
    return found | extra


def plan(ev: object) -> Any:
    return plan_remote_event(ev, POLICY)


def message(content: Any, **extra: Any) -> RemoteMessage:
    found = plan(event(content, **extra))
    assert isinstance(found, RemoteMessage), found
    return found


def ghost(user_id: str) -> str:
    return "@_remote_" + user_id.lstrip("@").replace(":", "_") + ":agence.example.org"


def assert_clean_html(html: str) -> None:
    lowered = html.lower()
    assert "<script" not in lowered
    assert "javascript:" not in lowered
    assert not _ON_ATTRIBUTE.search(html), html


# --- the event's envelope ---------------------------------------------------------------------


@pytest.mark.parametrize("ev", [None, "event", 5, [], [event()], b"{}", ("a",)])
def test_not_an_object(ev: object) -> None:
    assert plan(ev) == NotRelayed("the event is not a JSON object")


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("event_id", None, "event_id"),
        ("event_id", 5, "event_id"),
        ("event_id", "ev1", "event_id"),
        ("event_id", "$ev\n1", "event_id"),
        ("event_id", "$" + "x" * 300, "event_id"),
        ("sender", None, "sender"),
        ("sender", "@eve", "sender"),  # no server at all
        ("sender", "@attacker@protonmail.com@presidence.gouv.fr", "sender"),
        ("sender", EVE + "\n", "sender"),
        ("sender", EVE + "\u200b", "sender"),
        ("sender", ["@eve:" + SERVER], "sender"),
        ("type", None, "type"),
        ("type", ["m.room.message"], "type"),
        ("content", None, "content"),
        ("content", "hello", "content"),
        ("content", [{"body": "hello"}], "content"),
    ],
)
def test_envelope_is_checked(key: str, value: object, why: str) -> None:
    found = plan(event() | {key: value})
    assert isinstance(found, NotRelayed)
    assert why in found.reason
    assert not found.refused


@pytest.mark.parametrize("key", ["event_id", "sender", "type", "content"])
def test_missing_keys(key: str) -> None:
    ev = event()
    del ev[key]
    assert isinstance(plan(ev), NotRelayed)


@pytest.mark.parametrize(
    "sender",
    [
        "@eve:interieur.example.org.evil.org",
        "@eve:INTERIEUR.example.org",
        "@eve:interieur.example.org:8448",
        "@eve:evil.org",
        "@eve:interieur.example.org.",
        "@eve:evil.org@interieur.example.org",
        "@eve:evil.org:interieur.example.org",
        "@attacker@protonmail.com@presidence.gouv.fr:evil.org",
        f"@{SERVER}:evil.org",
        "@eve:xn--intrieur-b1a.example.org",
        "@eve:interieur\uff0eexample\uff0eorg",  # fullwidth dots
    ],
)
@pytest.mark.parametrize(
    "content_and_type",
    [
        ({"msgtype": "m.text", "body": "hello"}, "m.room.message"),
        (
            {"m.relates_to": {"rel_type": "m.annotation", "event_id": TARGET, "key": "👍"}},
            "m.reaction",
        ),
        ({"redacts": TARGET}, "m.room.redaction"),
        ({"algorithm": "m.megolm.v1.aes-sha2"}, "m.room.encrypted"),
        ({"url": MXC_URL, "body": "s"}, "m.sticker"),
    ],
)
def test_exact_server_policy(sender: str, content_and_type: tuple[dict[str, Any], str]) -> None:
    content, type_ = content_and_type
    found = plan(event(content, type_=type_, sender=sender))
    assert found == NotRelayed(
        f"{sender} is not on a server this link relays", refused=True, sender=sender
    )


def test_tchap_style_user_id_of_an_allowed_server_is_relayed_as_who_it_is() -> None:
    sender = f"@attacker@protonmail.com@presidence.gouv.fr:{SERVER}"
    found = message({"msgtype": "m.text", "body": "hi"}, sender=sender)
    assert found.sender == sender


@pytest.mark.parametrize(
    "content_and_type",
    [
        ({"msgtype": "m.text", "body": "echo"}, "m.room.message"),
        (
            {"m.relates_to": {"rel_type": "m.annotation", "event_id": TARGET, "key": "x"}},
            "m.reaction",
        ),
        ({"redacts": TARGET}, "m.room.redaction"),
    ],
)
def test_own_account_is_never_relayed_back(content_and_type: tuple[dict[str, Any], str]) -> None:
    content, type_ = content_and_type
    found = plan(event(content, type_=type_, sender=OWN))
    assert found == NotRelayed("sent by the bridge's own account")


def test_encrypted_message_is_refused() -> None:
    found = plan(event({"ciphertext": "..."}, type_="m.room.encrypted"))
    assert found == NotRelayed("an encrypted message cannot be relayed", refused=True, sender=EVE)


@pytest.mark.parametrize(
    "type_", ["m.call.invite", "m.room.message.feedback", "", "m.poll.start", "x" * 10_000]
)
def test_other_event_types_are_not_relayed(type_: str) -> None:
    found = plan(event({"body": "x"}, type_=type_))
    assert isinstance(found, NotRelayed)
    assert not found.refused
    assert len(found.reason) < 100


@pytest.mark.parametrize(
    ("ts", "kept"),
    [
        (1_700_000_000_000, 1_700_000_000_000),
        (True, None),
        (False, None),
        (-5, None),
        (0, None),
        (1.7e12, None),
        ("1700000000000", None),
        (None, None),
        ([1], None),
    ],
)
def test_origin_server_ts(ts: object, kept: int | None) -> None:
    assert message({"msgtype": "m.text", "body": "x"}, origin_server_ts=ts).ts == kept


# --- redactions and reactions -----------------------------------------------------------------


def test_redaction_top_level() -> None:
    found = plan(event({"reason": "oops"}, type_="m.room.redaction", redacts=TARGET))
    assert found == RemoteRedaction("$ev1:" + SERVER, EVE, TARGET, "oops")


def test_redaction_room_v11_in_content() -> None:
    found = plan(event({"redacts": TARGET}, type_="m.room.redaction"))
    assert found == RemoteRedaction("$ev1:" + SERVER, EVE, TARGET, None)


def test_redaction_prefers_a_valid_target() -> None:
    found = plan(event({"redacts": TARGET}, type_="m.room.redaction", redacts=5))
    assert isinstance(found, RemoteRedaction)
    assert found.target == TARGET


@pytest.mark.parametrize("target", [None, 5, "", "target", "@x:y", ["$x"], TARGET + " "])
def test_redaction_without_a_valid_target(target: object) -> None:
    found = plan(event({"redacts": target}, type_="m.room.redaction", redacts=target))
    assert found == NotRelayed("a redaction without a valid target")


@pytest.mark.parametrize(("reason", "kept"), [(5, None), (["x"], None), ("r" * 9000, "r" * 500)])
def test_redaction_reason(reason: object, kept: str | None) -> None:
    found = plan(event({"redacts": TARGET, "reason": reason}, type_="m.room.redaction"))
    assert isinstance(found, RemoteRedaction)
    assert found.reason == kept


def reaction(relates: object) -> object:
    return plan(event({"m.relates_to": relates}, type_="m.reaction"))


def test_reaction() -> None:
    found = reaction({"rel_type": "m.annotation", "event_id": TARGET, "key": "👍"})
    assert found == RemoteReaction("$ev1:" + SERVER, EVE, 1_700_000_000_000, TARGET, "👍")


def test_reaction_key_of_100_characters_is_kept() -> None:
    found = reaction({"rel_type": "m.annotation", "event_id": TARGET, "key": "k" * 100})
    assert isinstance(found, RemoteReaction)


@pytest.mark.parametrize("key", ["k" * 10_000, "k" * 101, "", None, 5, ["👍"], {"k": 1}])
def test_reaction_without_a_valid_key(key: object) -> None:
    found = reaction({"rel_type": "m.annotation", "event_id": TARGET, "key": key})
    assert found == NotRelayed("a reaction without a valid key")


@pytest.mark.parametrize(
    "relates",
    [
        None,
        "m.annotation",
        [],
        {"event_id": TARGET, "key": "x"},
        {"rel_type": "m.reference", "event_id": TARGET, "key": "x"},
        {"rel_type": "m.annotation", "event_id": "target", "key": "x"},
        {"rel_type": "m.annotation", "event_id": None, "key": "x"},
        {"rel_type": "m.annotation", "key": "x"},
    ],
)
def test_reaction_without_a_valid_annotation(relates: object) -> None:
    assert reaction(relates) == NotRelayed("a reaction without a valid annotation")


# --- messages ---------------------------------------------------------------------------------


def test_plain_text() -> None:
    found = message({"msgtype": "m.text", "body": "hello"})
    assert found.content == {"msgtype": "m.text", "body": "hello"}
    assert (found.relations, found.media, found.mentions) == (Relations(), None, ())
    assert found.event_type == "m.room.message"


@pytest.mark.parametrize("msgtype", ["m.notice", "m.emote"])
def test_other_text_msgtypes_are_kept(msgtype: str) -> None:
    assert message({"msgtype": msgtype, "body": "x"}).content["msgtype"] == msgtype


@pytest.mark.parametrize("msgtype", ["m.location", "m.server_notice", "com.evil", None, 5, []])
def test_unknown_msgtype_is_shown_as_text(msgtype: object) -> None:
    assert message({"msgtype": msgtype, "body": "x"}).content == {"msgtype": "m.text", "body": "x"}


@pytest.mark.parametrize("body", [None, 5, ["x"], {"text": "x"}, True])
def test_body_is_not_text(body: object) -> None:
    assert plan(event({"msgtype": "m.text", "body": body})) == NotRelayed(
        "the message body is not text"
    )


def test_redacted_message() -> None:
    assert plan(event({})) == NotRelayed("a redacted or empty message")


def test_long_body_is_bounded() -> None:
    found = message({"msgtype": "m.text", "body": "x" * (MAX_TEXT * 3)})
    assert len(found.content["body"]) == MAX_TEXT


def test_only_known_keys_survive() -> None:
    found = message(
        {
            "msgtype": "m.text",
            "body": "x",
            "m.relates_to": {"m.in_reply_to": {"event_id": TARGET}},
            "m.mentions": {"room": True, "user_ids": [EVE]},
            "m.new_content": {"body": "y"},
            "url": MXC_URL,
            "com.beeper.per_message_profile": {"displayname": "Le Ministre"},
            "io.element.something": {"a": 1},
        }
    )
    assert set(found.content) == {"msgtype", "body"}


def test_hostile_html_is_reduced_to_the_allowlist() -> None:
    found = message(
        {
            "msgtype": "m.text",
            "body": "x",
            "format": "org.matrix.custom.html",
            "formatted_body": HOSTILE_HTML,
        }
    )
    assert_clean_html(found.content["formatted_body"])
    assert "hi" in found.content["formatted_body"]
    assert "<b>bold</b>" in found.content["formatted_body"]


@pytest.mark.parametrize(
    ("fmt", "html"),
    [
        ("text/html", "<b>x</b>"),
        (None, "<b>x</b>"),
        ("org.matrix.custom.html", None),
        ("org.matrix.custom.html", 5),
        ("org.matrix.custom.html", "<script>only</script>"),
        ("org.matrix.custom.html", "   "),
    ],
)
def test_formatted_body_dropped(fmt: object, html: object) -> None:
    content = {"msgtype": "m.text", "body": "x", "format": fmt, "formatted_body": html}
    assert message(content).content == {"msgtype": "m.text", "body": "x"}


def test_huge_deep_html_is_bounded() -> None:
    found = message(
        {
            "msgtype": "m.text",
            "body": "x",
            "format": "org.matrix.custom.html",
            "formatted_body": "<div>" * 50_000 + "deep",
        }
    )
    assert found.content["formatted_body"].count("<div>") <= 100


def test_reply_fallback_is_removed() -> None:
    found = message(
        {
            "msgtype": "m.text",
            "body": "> <@a:b> original\n\nanswer",
            "format": "org.matrix.custom.html",
            "formatted_body": "<mx-reply><blockquote>original</blockquote></mx-reply>answer",
            "m.relates_to": {"m.in_reply_to": {"event_id": TARGET}},
        }
    )
    assert found.content["body"] == "answer"
    assert found.content["formatted_body"] == "answer"
    assert found.relations == Relations(reply_to=TARGET)


def test_quote_is_kept_when_not_a_reply() -> None:
    found = message({"msgtype": "m.text", "body": "> <@a:b> quoted\n\nmine"})
    assert found.content["body"] == "> <@a:b> quoted\n\nmine"


def test_thread_message_whose_fallback_reply_points_elsewhere() -> None:
    found = message(
        {
            "msgtype": "m.text",
            "body": "in thread",
            "m.relates_to": {
                "rel_type": "m.thread",
                "event_id": "$root:" + SERVER,
                "is_falling_back": True,
                "m.in_reply_to": {"event_id": "$elsewhere:" + SERVER},
            },
        }
    )
    assert found.relations == Relations(thread_root="$root:" + SERVER)
    assert "m.relates_to" not in found.content


def test_edit_uses_new_content_with_its_own_msgtype() -> None:
    found = message(
        {
            "msgtype": "m.text",
            "body": "* <b>x</b>",
            "m.new_content": {"msgtype": "m.emote", "body": "waves", "m.mentions": {}},
            "m.relates_to": {"rel_type": "m.replace", "event_id": TARGET},
            "m.mentions": {"user_ids": [f"@bob:{SERVER}"]},
        }
    )
    assert found.content == {"msgtype": "m.emote", "body": "waves"}
    assert found.relations == Relations(replaces=TARGET)
    assert found.mentions == ()  # the edit's own mentions are in m.new_content


def test_edit_into_media_needs_a_url() -> None:
    content = {
        "msgtype": "m.text",
        "body": "* x",
        "m.new_content": {"msgtype": "m.image", "body": "x"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": TARGET},
    }
    found = plan(event(content))
    assert isinstance(found, NotRelayed)
    assert "mxc://" in found.reason


@pytest.mark.parametrize("new_content", [None, "text", ["x"], 5])
def test_edit_without_new_content(new_content: object) -> None:
    content = {
        "msgtype": "m.text",
        "body": "* x",
        "m.new_content": new_content,
        "m.relates_to": {"rel_type": "m.replace", "event_id": TARGET},
    }
    assert plan(event(content)) == NotRelayed("an edit without m.new_content")


def test_edit_without_valid_target() -> None:
    content = {
        "msgtype": "m.text",
        "body": "* x",
        "m.new_content": {"msgtype": "m.text", "body": "x"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": ["$x"]},
    }
    found = plan(event(content))
    assert isinstance(found, NotRelayed)
    assert "edit" in found.reason


# --- media ------------------------------------------------------------------------------------


def test_image() -> None:
    found = message(
        {
            "msgtype": "m.image",
            "body": "a.png",
            "url": MXC_URL,
            "info": {"mimetype": "image/png", "size": 10, "w": 5, "h": True, "duration": -1},
        }
    )
    assert found.media == MediaRef(MXC_URL, "a.png", "image/png", 10)
    assert found.content == {
        "msgtype": "m.image",
        "body": "a.png",
        "info": {"mimetype": "image/png", "size": 10, "w": 5},
    }


@pytest.mark.parametrize("info", [None, "x", [1], {"w": 1.5, "h": "7", "size": None}])
def test_media_info_of_the_wrong_type(info: object) -> None:
    found = message({"msgtype": "m.file", "body": "f", "url": MXC_URL, "info": info})
    assert found.content["info"] == {"mimetype": "application/octet-stream"}


def test_media_caption_filename_is_cleaned() -> None:
    found = message(
        {"msgtype": "m.file", "body": "see", "url": MXC_URL, "filename": "rapport\u202efdp.exe"}
    )
    assert found.content["filename"] == "rapportfdp.exe"


def test_media_caption_filename_that_is_all_invisible() -> None:
    found = message({"msgtype": "m.file", "body": "see", "url": MXC_URL, "filename": "\u200b"})
    assert found.content["filename"] == "file"


def test_encrypted_media_is_refused_and_says_whose() -> None:
    """Regression: the refusal named no sender, so the room was never told of it."""
    content = {"msgtype": "m.file", "body": "f", "file": {"url": MXC_URL}}
    assert plan(event(content)) == NotRelayed("encrypted media", refused=True, sender=EVE)


@pytest.mark.parametrize("url", [None, "https://evil.org/x", "mxc://a/b/c", 5])
def test_media_without_valid_url_is_skipped(url: object) -> None:
    found = plan(event({"msgtype": "m.video", "body": "v", "url": url}))
    assert isinstance(found, NotRelayed)
    assert not found.refused


def test_sticker_is_an_image() -> None:
    found = message(
        {"body": "cat", "url": MXC_URL, "msgtype": "m.file", "info": {"mimetype": "image/webp"}},
        type_="m.sticker",
    )
    assert found.event_type == "m.sticker"
    assert found.content["msgtype"] == "m.image"
    assert found.media == MediaRef(MXC_URL, "cat", "image/webp", None)


def test_sticker_without_url() -> None:
    assert isinstance(plan(event({"body": "cat"}, type_="m.sticker")), NotRelayed)


# --- mentions ---------------------------------------------------------------------------------


def test_mentions_only_valid_allowed_unique_users() -> None:
    bob = f"@bob:{SERVER}"
    found = message(
        {
            "msgtype": "m.text",
            "body": "x",
            "m.mentions": {
                "room": True,
                "user_ids": [bob, bob, "@mallory:evil.org", "@nocolon", 5, None, EVE + "\n", EVE],
            },
        }
    )
    assert found.mentions == (bob, EVE)


@pytest.mark.parametrize(
    "mentions",
    [None, True, "@room", [EVE], {"room": True}, {"user_ids": EVE}, {"user_ids": {EVE: 1}}],
)
def test_mentions_of_the_wrong_shape(mentions: object) -> None:
    assert message({"msgtype": "m.text", "body": "x", "m.mentions": mentions}).mentions == ()


def test_mentions_are_bounded() -> None:
    users = [f"@u{n}:{SERVER}" for n in range(10_000)]
    found = message({"msgtype": "m.text", "body": "x", "m.mentions": {"user_ids": users}})
    assert len(found.mentions) == 50


# --- properties -------------------------------------------------------------------------------

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=30)
    | st.sampled_from([EVE, OWN, TARGET, MXC_URL, "@eve:evil.org", "org.matrix.custom.html"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
hostile_html = st.lists(
    st.sampled_from(
        [
            "<script>alert(1)</script>",
            "<img src=x onerror=alert(1)>",
            '<a href="javascript:alert(1)">x</a>',
            "<a href=' jAvAsCrIpT:alert(1)'>x</a>",
            '<a href="java\tscript:x">x</a>',
            "<b onclick=x>b</b>",
            "<mx-reply>",
            "</mx-reply>",
            "<scr<script>ipt>",
            "<!--",
            "-->",
            "<svg><script>x</script></svg>",
            "<div>",
            "text",
            "<",
            "&lt;script&gt;",
            "<p ONMOUSEOVER='x'>",
        ]
    )
    | st.text(max_size=10),
    max_size=12,
).map("".join)
# Leaves one level deep keep generation fast; json_values covers deep nesting on its own.
leaf = (
    scalars
    | hostile_html
    | st.lists(scalars, max_size=3)
    | st.dictionaries(st.text(max_size=8), scalars, max_size=3)
)
relates_to = st.fixed_dictionaries(
    {},
    optional={
        "rel_type": st.sampled_from(["m.thread", "m.replace", "m.annotation"]) | leaf,
        "event_id": st.just(TARGET) | leaf,
        "is_falling_back": st.booleans() | leaf,
        "m.in_reply_to": st.fixed_dictionaries({"event_id": st.just(TARGET) | leaf}) | leaf,
        "key": st.text(max_size=5) | leaf,
    },
)
message_content = st.fixed_dictionaries(
    {},
    optional={
        "msgtype": st.sampled_from(["m.text", "m.image", "m.file", "m.emote"]) | leaf,
        "body": st.text(max_size=40) | leaf,
        "format": st.just("org.matrix.custom.html") | leaf,
        "formatted_body": hostile_html | leaf,
        "url": st.just(MXC_URL) | leaf,
        "info": st.fixed_dictionaries({}, optional={"mimetype": leaf, "size": leaf}) | leaf,
        "filename": leaf,
        "m.relates_to": relates_to | leaf,
        "m.mentions": st.fixed_dictionaries(
            {}, optional={"room": leaf, "user_ids": st.lists(leaf, max_size=4) | leaf}
        )
        | leaf,
        "redacts": st.just(TARGET) | leaf,
        "membership": st.sampled_from(["join", "leave", "ban", "invite"]) | leaf,
        "displayname": leaf,
    },
)
message_content = message_content | message_content.map(lambda c: c | {"m.new_content": dict(c)})
skeleton_events = st.fixed_dictionaries(
    {
        "event_id": st.just("$e:" + SERVER) | leaf,
        "sender": st.sampled_from([EVE, OWN, "@eve:evil.org"]) | leaf,
        "type": st.sampled_from(
            [
                "m.room.message",
                "m.sticker",
                "m.reaction",
                "m.room.redaction",
                "m.room.member",
                "m.room.tombstone",
                "m.room.encrypted",
            ]
        )
        | leaf,
        "content": message_content | leaf,
    },
    optional={"state_key": st.sampled_from(["", EVE, OWN]) | leaf, "redacts": leaf},
)


def assert_safe_plan(found: object) -> None:
    assert isinstance(
        found,
        NotRelayed
        | RemoteMessage
        | RemoteReaction
        | RemoteRedaction
        | RemoteMember
        | RemoteRoomChange,
    )
    if isinstance(found, RemoteMessage):
        assert "m.relates_to" not in found.content
        assert "m.mentions" not in found.content
        assert "url" not in found.content
        assert found.sender != OWN
        assert all(u.endswith(":" + SERVER) for u in found.mentions)
        html = found.content.get("formatted_body")
        if html is not None:
            assert_clean_html(html)
        content = agency_message_content(
            found, mapped={TARGET: "$a"}, ghost_of=ghost, media_url="mxc://agence/x"
        )
        assert "room" not in content["m.mentions"]
        for mentions in (
            content["m.mentions"],
            content.get("m.new_content", {}).get("m.mentions"),
        ):
            assert mentions is None or "room" not in mentions


@PROPERTY
@given(json_values)
def test_any_json_value_is_planned_without_raising(value: object) -> None:
    assert_safe_plan(plan(value))


@PROPERTY
@given(skeleton_events)
def test_hostile_leaves_in_a_valid_skeleton(ev: dict[str, Any]) -> None:
    assert_safe_plan(plan(ev))
