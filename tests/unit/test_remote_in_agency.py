"""Remote → agency, the agency event: its content (relations remapped, no pings beyond ghosts)
and the name a remote user is shown under (which cannot pass for anyone else)."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.core.matrix_event import MediaRef, Relations
from bridge.core.remote_in import (
    RemoteMessage,
    agency_message_content,
    file_note,
    relayed_name,
    unrelayed_reaction_content,
)

SERVER = "interieur.example.org"
EVE = f"@eve:{SERVER}"
TARGET = f"$target:{SERVER}"
MXC_URL = f"mxc://{SERVER}/media1"
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- agency_message_content -------------------------------------------------------------------


def ghost(user_id: str) -> str:
    return "@_remote_" + user_id.lstrip("@").replace(":", "_") + ":agence.example.org"


def remote_message(
    relations: Relations = Relations(),  # noqa: B008
    *,
    media: MediaRef | None = None,
    mentions: tuple[str, ...] = (),
    content: dict[str, Any] | None = None,
) -> RemoteMessage:
    return RemoteMessage(
        "$m:" + SERVER,
        EVE,
        None,
        content or {"msgtype": "m.text", "body": "hi"},
        relations,
        media,
        mentions,
    )


def test_agency_content_plain_never_pings() -> None:
    msg = remote_message()
    content = agency_message_content(msg, mapped={}, ghost_of=ghost, media_url=None)
    assert content == {"msgtype": "m.text", "body": "hi", "m.mentions": {}}
    assert msg.content == {"msgtype": "m.text", "body": "hi"}  # not mutated


def test_agency_content_mentions_ghosts_only() -> None:
    bob = f"@bob:{SERVER}"
    content = agency_message_content(
        remote_message(mentions=(bob,)), mapped={}, ghost_of=ghost, media_url=None
    )
    assert content["m.mentions"] == {"user_ids": [ghost(bob)]}


def test_agency_content_media_url() -> None:
    media = MediaRef(MXC_URL, "f", "image/png", None)
    content = agency_message_content(
        remote_message(media=media), mapped={}, ghost_of=ghost, media_url="mxc://agence/copy"
    )
    assert content["url"] == "mxc://agence/copy"
    content = agency_message_content(
        remote_message(media=media), mapped={}, ghost_of=ghost, media_url=None
    )
    assert "url" not in content
    content = agency_message_content(
        remote_message(), mapped={}, ghost_of=ghost, media_url="mxc://agence/copy"
    )
    assert "url" not in content


def test_agency_content_reply() -> None:
    msg = remote_message(Relations(reply_to=TARGET))
    content = agency_message_content(msg, mapped={TARGET: "$a"}, ghost_of=ghost, media_url=None)
    assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$a"}}


@pytest.mark.parametrize("mapped", [{}, {TARGET: None}])
def test_agency_content_reply_to_never_relayed_goes_plainly(
    mapped: dict[str, str | None],
) -> None:
    for relations in (Relations(reply_to=TARGET), Relations(thread_root=TARGET)):
        content = agency_message_content(
            remote_message(relations), mapped=mapped, ghost_of=ghost, media_url=None
        )
        assert "m.relates_to" not in content
        assert content["body"] == "hi"


def test_agency_content_thread() -> None:
    msg = remote_message(Relations(thread_root=TARGET))
    content = agency_message_content(msg, mapped={TARGET: "$a"}, ghost_of=ghost, media_url=None)
    assert content["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": "$a",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$a"},
    }


def test_agency_content_edit() -> None:
    msg = remote_message(Relations(replaces=TARGET), mentions=(EVE,))
    content = agency_message_content(msg, mapped={TARGET: "$a"}, ghost_of=ghost, media_url=None)
    assert content["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$a"}
    assert content["body"] == "* hi"
    assert content["m.new_content"] == {
        "msgtype": "m.text",
        "body": "hi",
        "m.mentions": {"user_ids": [ghost(EVE)]},
    }


def test_agency_content_edit_of_never_relayed_is_the_new_text() -> None:
    msg = remote_message(Relations(replaces=TARGET))
    content = agency_message_content(msg, mapped={TARGET: None}, ghost_of=ghost, media_url=None)
    assert content == {"msgtype": "m.text", "body": "hi", "m.mentions": {}}


# --- relayed_name -----------------------------------------------------------------------------

SUFFIX = "(Intérieur)"
RESERVED = ("(Intérieur)", "(Finances)", "(Agence)")


def name(
    display: str | None, user_id: str = EVE, *, agency: tuple[str, ...] = (), suffix: str = SUFFIX
) -> str:
    return relayed_name(
        display, user_id, suffix=suffix, reserved_suffixes=RESERVED, agency_names=agency
    )


@pytest.mark.parametrize(
    ("display", "shown"),
    [
        ("Alice Martin", "Alice Martin (Intérieur)"),
        ("Alice Martin\u202e(Agence)", "Alice Martin (Intérieur)"),
        ("Alice (Agence)", "Alice (Intérieur)"),
        ("Alice （Ａｇｅｎｃｅ）", "Alice (Intérieur)"),  # fullwidth
        ("Alice (AGENCE)", "Alice (Intérieur)"),
        ("Alice (Ag\u200bence)", "Alice (Intérieur)"),  # zero-width inside
        ("Alice (INTＥ\u0301RIEUR)", "Alice (Intérieur)"),  # fullwidth E + combining acute
        ("Alice (Inte\u0301rieur)", "Alice (Intérieur)"),  # decomposed
        ("Alice (Fin(Agence)ances)", "Alice (Intérieur)"),  # removal joins another copy
        ("Alice\n(Agence)\u2028", "Alice (Intérieur)"),
        ("\u200b\u202e", "eve (Intérieur)"),  # nothing visible: the localpart
        (None, "eve (Intérieur)"),
        ("(Agence)", "eve (Intérieur)"),
        ("A" * 500, "A" * 100 + " (Intérieur)"),
    ],
)
def test_relayed_name(display: str | None, shown: str) -> None:
    assert name(display) == shown


def test_nested_suffixes_are_removed_however_deep() -> None:
    # Two short suffixes nested alternately need more rounds than a fixed bound would allow.
    reserved = ("(MI)", "(MEF)")
    nested = ""
    while len(nested) < 90:
        for suffix in reserved:
            nested = suffix[:2] + nested + suffix[2:]
    found = relayed_name(
        "Bob " + nested[:96], EVE, suffix="(MI)", reserved_suffixes=reserved, agency_names=()
    )
    head = found.removesuffix("(MI)").casefold()
    assert "(mi)" not in head
    assert "(mef)" not in head


def test_localpart_fallback_cannot_carry_a_suffix() -> None:
    assert name(None, f"@(Agence):{SERVER}") == "? (Intérieur)"
    assert name("", f"@x(agence)y:{SERVER}") == "xy (Intérieur)"


@pytest.mark.parametrize(
    ("display", "agency"),
    [
        ("ALICE MARTIN", ("alice martin",)),
        ("Alice Martin", ("Alice  Martin ",)),
        ("Ａｌｉｃｅ", ("alice",)),
        ("Alice (Agence)", ("Alice",)),
        ("Alice", ("Alice (Intérieur)",)),  # an agency member named like a remote one
    ],
)
def test_clash_with_an_agency_member_adds_the_user_id(
    display: str, agency: tuple[str, ...]
) -> None:
    found = name(display, agency=agency)
    assert found.endswith(f"({EVE}) (Intérieur)")
    assert all(found.casefold() != a.casefold() for a in agency)


@pytest.mark.parametrize("display", ["eve@interieur.example.org", "eve＠interieur", "@admin"])
def test_name_that_looks_like_an_address_adds_the_user_id(display: str) -> None:
    assert name(display).endswith(f"({EVE}) (Intérieur)")


def test_no_clash_with_other_agency_names() -> None:
    assert name("Alice", agency=("Bob", "", "Alicia")) == "Alice (Intérieur)"


# --- properties ---

suffix_words = st.text(
    st.characters(categories=["Lu", "Ll", "Nd"], max_codepoint=0x2FF), min_size=1, max_size=6
)
suffixes = suffix_words.map(lambda w: f"({w})")


def _variant(text: str) -> st.SearchStrategy[str]:
    """`text` written differently but folding to the same thing."""
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)
    decomposed = unicodedata.normalize("NFD", text)
    spaced = "\u200b".join(text)
    return st.sampled_from([text, text.upper(), fullwidth, decomposed, spaced, text.swapcase()])


@st.composite
def hostile_names(draw: st.DrawFn, reserved: list[str]) -> str:
    parts = draw(
        st.lists(
            st.sampled_from(reserved).flatmap(_variant)
            | st.text(max_size=6)
            | st.sampled_from(["\u202e", "\u200d", "\u2066", "\n", "@", "Alice", " "]),
            max_size=12,
        )
    )
    if draw(st.booleans()) and reserved:  # nested: one suffix inside another
        inner, outer = draw(st.sampled_from(reserved)), draw(st.sampled_from(reserved))
        parts.append(outer[:2] + inner + outer[2:])
    return "".join(parts)


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


@PROPERTY
@given(data=st.data(), own=suffixes, others=st.lists(suffixes, min_size=1, max_size=3))
def test_relayed_name_cannot_pass_for_anyone(
    data: st.DataObject, own: str, others: list[str]
) -> None:
    reserved = [own, *others]
    display = data.draw(st.none() | hostile_names(reserved))
    user_id = data.draw(st.from_regex(r"@[a-z0-9._=/-]{1,12}:[a-z0-9.-]{1,12}", fullmatch=True))
    agency = data.draw(
        st.lists(st.sampled_from(reserved).flatmap(_variant) | hostile_names(reserved), max_size=3)
    )
    if display is not None and data.draw(st.booleans()):
        agency.append(display)
    plain = relayed_name(display, user_id, suffix=own, reserved_suffixes=others, agency_names=())
    if user_id not in plain and data.draw(st.booleans()):
        agency.append(plain)  # an agency member already named what the remote user would be
    found = relayed_name(
        display, user_id, suffix=own, reserved_suffixes=others, agency_names=agency
    )
    assert found.endswith(own)
    assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in found)
    assert _fold(found) not in {_fold(a) for a in agency if a}
    head = _fold(found.removesuffix(own))
    for suffix in reserved:
        assert _fold(suffix) not in head, (found, suffix)


def test_notices_name_files_and_reactions_cleanly() -> None:
    """Regression: a reaction key or a file name with bidi controls or line breaks went into
    the bot-side notice as is, and could make it read differently."""
    notice = unrelayed_reaction_content("👍\u202e\nFAKE")
    assert "\u202e" not in notice["body"]
    assert "\n" not in notice["body"]
    msg = RemoteMessage(
        event_id="$e",
        sender="@bob:s",
        ts=None,
        content={"msgtype": "m.file", "body": "rapport\u202efdp.exe\nligne"},
        relations=Relations(),
        media=None,
        mentions=(),
    )
    note = file_note(msg, "too large")
    assert "\u202e" not in note
    assert "\n" not in note
