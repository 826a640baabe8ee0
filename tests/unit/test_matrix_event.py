"""Reading a hostile Matrix message event: IDs, relations, media, reply fallbacks, edits."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bridge.core.matrix_event import (
    MAX_TEXT,
    MediaRef,
    NotSent,
    Relations,
    edit_content,
    event_id_of,
    has_caption,
    mapped_relation,
    matrix_id,
    read_media,
    read_relations,
    server_of,
    show,
    strip_html_fallback,
    strip_text_fallback,
)

ROOT = "$root:interieur.example.org"
REPLY = "$reply:interieur.example.org"
OLD = "$old:interieur.example.org"
MXC_URL = "mxc://interieur.example.org/AbC_12-x"

# --- matrix_id, event_id_of, server_of ---------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "@eve:interieur.example.org",
        "@attacker@protonmail.com@presidence.gouv.fr:interieur.example.org",
        "@x:[::1]:8448",
        "@" + "a" * 254,
    ],
)
def test_matrix_id_accepts(value: str) -> None:
    assert matrix_id(value, "@") == value


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        4.2,
        True,
        ["@eve:interieur.example.org"],
        {"@eve:interieur.example.org": 1},
        b"@eve:interieur.example.org",
        "",
        "@",  # the sigil alone is accepted by matrix_id; see below
        "eve:interieur.example.org",
        "$eve:interieur.example.org",
        "@eve:interieur.example.org\n",
        "\n@eve:interieur.example.org",
        "@eve :interieur.example.org",
        "@eve\t:interieur.example.org",
        "@eve\u200b:interieur.example.org",  # zero-width space (Cf)
        "@eve\u202e:interieur.example.org",  # bidi override (Cf)
        "@eve\x00:interieur.example.org",
        "@eve\u2028:interieur.example.org",  # line separator
        "@eve\u00a0:interieur.example.org",  # no-break space
        "@" + "a" * 255,  # 256 characters
        "@" + "é" * 128,  # 129 characters but 257 UTF-8 bytes
        "@eve:\udcff",  # a lone surrogate
    ],
)
def test_matrix_id_refuses(value: object) -> None:
    if value == "@":
        assert matrix_id(value, "@") == "@"  # callers also require a colon
        return
    assert matrix_id(value, "@") is None


def test_matrix_id_counts_bytes_not_characters() -> None:
    assert matrix_id("@" + "é" * 127, "@") is not None  # 255 bytes
    assert matrix_id("@" + "€" * 85, "@") is None  # 256 bytes


def test_event_id_of() -> None:
    assert event_id_of("$abc") == "$abc"
    assert event_id_of("@abc") is None
    assert event_id_of(None) is None
    assert event_id_of({"event_id": "$abc"}) is None


@pytest.mark.parametrize(
    ("user_id", "server"),
    [
        ("@eve:interieur.example.org", "interieur.example.org"),
        ("@eve:interieur.example.org:8448", "interieur.example.org:8448"),
        ("@a@protonmail.com@presidence.gouv.fr:evil.org", "evil.org"),
        ("@evil:evil.org@interieur.example.org", "evil.org@interieur.example.org"),
        ("@no-colon", ""),
    ],
)
def test_server_of_is_everything_after_the_first_colon(user_id: str, server: str) -> None:
    assert server_of(user_id) == server


# --- read_relations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relates",
    [None, "m.thread", 5, [], [{"rel_type": "m.thread"}], {}, {"rel_type": 5}],
)
def test_no_or_malformed_relation_is_none(relates: object) -> None:
    assert read_relations({"body": "x", "m.relates_to": relates}) == Relations()


def test_no_relates_to_key() -> None:
    assert read_relations({}) == Relations()


def test_plain_reply() -> None:
    content = {"m.relates_to": {"m.in_reply_to": {"event_id": REPLY}}}
    assert read_relations(content) == Relations(reply_to=REPLY)


@pytest.mark.parametrize(
    "in_reply_to",
    [REPLY, [REPLY], None, {}, {"event_id": 5}, {"event_id": "reply"}, {"event_id": "$a\nb"}],
)
def test_malformed_reply_is_ignored(in_reply_to: object) -> None:
    content = {"m.relates_to": {"m.in_reply_to": in_reply_to}}
    assert read_relations(content) == Relations()


def test_thread_falling_back_reply_is_not_a_reply() -> None:
    content = {
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": ROOT,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": REPLY},  # the thread's latest event, elsewhere
        }
    }
    assert read_relations(content) == Relations(thread_root=ROOT)


@pytest.mark.parametrize("falling_back", [False, None, "true", 1, "missing"])
def test_thread_reply_that_is_not_falling_back(falling_back: object) -> None:
    relates: dict[str, Any] = {
        "rel_type": "m.thread",
        "event_id": ROOT,
        "m.in_reply_to": {"event_id": REPLY},
    }
    if falling_back != "missing":
        relates["is_falling_back"] = falling_back
    assert read_relations({"m.relates_to": relates}) == Relations(thread_root=ROOT, reply_to=REPLY)


def test_is_falling_back_outside_a_thread_is_meaningless() -> None:
    relates = {"is_falling_back": True, "m.in_reply_to": {"event_id": REPLY}}
    assert read_relations({"m.relates_to": relates}) == Relations(reply_to=REPLY)


@pytest.mark.parametrize("root", [None, 5, "root", "$a b", ["$x"]])
def test_thread_with_invalid_root(root: object) -> None:
    relates = {"rel_type": "m.thread", "event_id": root, "is_falling_back": True}
    assert read_relations({"m.relates_to": relates}) == Relations()


def test_edit_keeps_only_replaces() -> None:
    relates = {
        "rel_type": "m.replace",
        "event_id": OLD,
        "m.in_reply_to": {"event_id": REPLY},
    }
    assert read_relations({"m.relates_to": relates}) == Relations(replaces=OLD)


@pytest.mark.parametrize("event_id", [None, 0, "", "old", "@old:x", "$old\n", {"id": OLD}])
def test_edit_without_a_valid_target(event_id: object) -> None:
    relates = {"rel_type": "m.replace", "event_id": event_id}
    found = read_relations({"m.relates_to": relates})
    assert isinstance(found, NotSent)
    assert "edit" in found.reason


def test_relations_event_ids_are_unique_and_ordered() -> None:
    assert Relations(thread_root=ROOT, reply_to=ROOT, replaces=OLD).event_ids() == (ROOT, OLD)
    assert Relations().event_ids() == ()


# --- read_media, has_caption ------------------------------------------------------------------


def test_read_media() -> None:
    source = {"url": MXC_URL, "info": {"mimetype": "image/png", "size": 12}, "filename": "a.png"}
    assert read_media(source, "m.image", "caption") == MediaRef(
        url=MXC_URL, filename="a.png", content_type="image/png", size=12
    )


def test_encrypted_media() -> None:
    found = read_media({"file": {"url": MXC_URL}, "url": MXC_URL}, "m.file", "x")
    assert found == NotSent("encrypted media")


@pytest.mark.parametrize(
    "url",
    [
        None,
        5,
        [MXC_URL],
        "",
        "https://evil.org/a.png",
        "mxc://",
        "mxc://server",
        "mxc://server/",
        "mxc://server/a/b",
        "mxc://server/../etc",
        "mxc://server/id\n",
        "mxc://ser ver/id",
        "MXC://server/id",
        "mxc://server/id?x=1",
        "mxc://" + "a" * 256 + "/id",
        "mxc://server/" + "a" * 256,
        "mxc://sérvér/id",
    ],
)
def test_media_without_a_valid_url(url: object) -> None:
    found = read_media({"url": url}, "m.image", "x")
    assert isinstance(found, NotSent)
    assert "mxc://" in found.reason


@pytest.mark.parametrize("filename", [None, "", 5, ["a"], {"a": 1}])
def test_media_filename_falls_back_to_body(filename: object) -> None:
    found = read_media({"url": MXC_URL, "filename": filename}, "m.file", "body.txt")
    assert isinstance(found, MediaRef)
    assert found.filename == "body.txt"


def test_media_filename_is_bounded() -> None:
    found = read_media({"url": MXC_URL, "filename": "a" * (MAX_TEXT + 10)}, "m.file", "x")
    assert isinstance(found, MediaRef)
    assert len(found.filename) == MAX_TEXT


@pytest.mark.parametrize(
    ("info", "mimetype", "size"),
    [
        (None, "application/octet-stream", None),
        ("image/png", "application/octet-stream", None),
        ([{"mimetype": "image/png"}], "application/octet-stream", None),
        ({"mimetype": 5, "size": "12"}, "application/octet-stream", None),
        ({"mimetype": "x" * 1000, "size": True}, "x" * 255, None),
        ({"size": -1}, "application/octet-stream", None),
        ({"size": 1.5}, "application/octet-stream", None),
        ({"size": 0}, "application/octet-stream", 0),
        ({"size": 10**30}, "application/octet-stream", 10**30),
    ],
)
def test_media_info_is_hostile(info: object, mimetype: str, size: int | None) -> None:
    found = read_media({"url": MXC_URL, "info": info}, "m.file", "x")
    assert isinstance(found, MediaRef)
    assert (found.content_type, found.size) == (mimetype, size)


@pytest.mark.parametrize(
    ("filename", "body", "caption"),
    [
        ("a.png", "a.png", False),
        ("a.png", "look at this", True),
        (None, "look", False),
        ("", "look", False),
        (5, "look", False),
    ],
)
def test_has_caption(filename: object, body: str, caption: bool) -> None:
    assert has_caption({"filename": filename}, body) is caption


# --- show -------------------------------------------------------------------------------------


def test_show() -> None:
    assert show("m.text") == "'m.text'"
    assert show(None) == "missing"
    assert show(5) == "<int>"
    assert show({"a": 1}) == "<dict>"
    long = show("x" * 10_000)
    assert long.endswith("…")
    assert len(long) < 50
    assert "\n" not in show("a\nb\u202e")
    assert "\u202e" not in show("a\nb\u202e")


# --- reply fallbacks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stripped"),
    [
        ("> <@a:b> original\n> second line\n\nmy answer", "my answer"),
        ("> * <@a:b> edited original\n\nanswer", "answer"),
        ("> <@a:b> original\n>\n> more\n\n\n\nanswer", "answer"),
        ("> <@a:b> only a quote\n\n", ""),
        ("> <@a:b> no blank line\nanswer", "> <@a:b> no blank line\nanswer"),
        ("> not a fallback\n\nanswer", "> not a fallback\n\nanswer"),
        ("answer\n> <@a:b> later\n\nx", "answer\n> <@a:b> later\n\nx"),
        ("", ""),
        ("> <", "> <"),
    ],
)
def test_strip_text_fallback(text: str, stripped: str) -> None:
    assert strip_text_fallback(text) == stripped


@pytest.mark.parametrize(
    ("html", "stripped"),
    [
        ("<mx-reply><blockquote>old</blockquote></mx-reply>new", "new"),
        ("<MX-REPLY>old</Mx-Reply>new", "new"),
        ('<mx-reply class="x">old</mx-reply >new', "new"),
        ("<mx-reply>a<mx-reply>b</mx-reply>c</mx-reply>new", "new"),
        ("<mx-reply>never closed, runs to the end", ""),
        ("before<mx-reply class=x", "before"),  # an unterminated tag drops the rest
        ("before<mx-reply", "before<mx-reply"),  # not a tag yet (the sanitizer drops it)
        ("a</mx-reply>b", "ab"),  # a stray end tag
        ("<mx-replyx>kept</mx-replyx>", "<mx-replyx>kept</mx-replyx>"),
        ("<b>no fallback</b>", "<b>no fallback</b>"),
        ("x<mx-reply>1</mx-reply>y<mx-reply>2</mx-reply>z", "xyz"),
    ],
)
def test_strip_html_fallback(html: str, stripped: str) -> None:
    assert strip_html_fallback(html) == stripped


@pytest.mark.parametrize(
    "html",
    ["<mx-reply>" * 100_000, "</mx-reply>" * 100_000, "<mx-reply" * 100_000 + ">"],
    ids=["open", "close", "unterminated"],
)
def test_strip_html_fallback_is_linear(html: str) -> None:
    started = time.monotonic()
    strip_html_fallback(html)
    assert time.monotonic() - started < 1


# --- mapped_relation, edit_content ------------------------------------------------------------


def test_mapped_thread_and_reply() -> None:
    relations = Relations(thread_root=ROOT, reply_to=REPLY)
    assert mapped_relation(relations, {ROOT: "$r2", REPLY: "$p2"}) == {
        "rel_type": "m.thread",
        "event_id": "$r2",
        "is_falling_back": False,
        "m.in_reply_to": {"event_id": "$p2"},
    }


@pytest.mark.parametrize("mapped", [{ROOT: "$r2", REPLY: None}, {ROOT: "$r2"}])
def test_mapped_thread_without_the_reply_falls_back_to_the_root(
    mapped: dict[str, str | None],
) -> None:
    relations = Relations(thread_root=ROOT, reply_to=REPLY)
    assert mapped_relation(relations, mapped) == {
        "rel_type": "m.thread",
        "event_id": "$r2",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$r2"},
    }


def test_unmapped_thread_root_with_a_mapped_reply_is_a_plain_reply() -> None:
    relations = Relations(thread_root=ROOT, reply_to=REPLY)
    assert mapped_relation(relations, {ROOT: None, REPLY: "$p2"}) == {
        "m.in_reply_to": {"event_id": "$p2"}
    }


@pytest.mark.parametrize(
    ("relations", "mapped"),
    [
        (Relations(), {}),
        (Relations(reply_to=REPLY), {REPLY: None}),
        (Relations(reply_to=REPLY), {}),
        (Relations(thread_root=ROOT), {ROOT: None}),
        (Relations(replaces=OLD), {OLD: "$o2"}),  # edits are edit_content's
    ],
)
def test_nothing_mapped_goes_plainly(relations: Relations, mapped: dict[str, str | None]) -> None:
    assert mapped_relation(relations, mapped) is None


def test_edit_content() -> None:
    new = {
        "msgtype": "m.text",
        "body": "new",
        "format": "org.matrix.custom.html",
        "formatted_body": "<b>new</b>",
        "m.mentions": {"user_ids": ["@a:b"]},
        "url": MXC_URL,
        "filename": "f",
    }
    edit = edit_content(new, "$orig")
    assert edit["body"] == "* new"
    assert edit["formatted_body"] == "* <b>new</b>"
    assert edit["m.new_content"] is new
    assert edit["m.mentions"] == {}  # the original pinged them; the edit pings nobody again
    assert edit["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$orig"}
    assert "url" not in edit
    assert "filename" not in edit
    assert new["body"] == "new"  # not mutated


def test_edit_content_without_body_or_mentions() -> None:
    edit = edit_content({"msgtype": "m.text"}, "$orig")
    assert edit["body"] == "* "
    assert "m.mentions" not in edit
    assert "formatted_body" not in edit
