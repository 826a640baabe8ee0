"""core.marking: normalising and ranking labels, a mail's marking, the posting verdict, topics."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core.marking import (
    MAX_LABEL,
    MAX_SUBJECT,
    Levels,
    MailMarking,
    mail_marking,
    marked_topic,
    may_post,
    normalise,
)

LEVELS = Levels(("NON PROTÉGÉ", "DIFFUSION RESTREINTE", "SECRET", "TRÈS SECRET"))
DR = "DIFFUSION RESTREINTE"


def marking(*headers: str, subject: str = "") -> MailMarking:
    return mail_marking(list(headers), [subject], LEVELS)


def verdict(*headers: str, subject: str = "", link: str | None = DR) -> bool:
    return may_post(link, marking(*headers, subject=subject), LEVELS).allowed


# --- normalisation and ranking -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "rank"),
    [
        ("DIFFUSION RESTREINTE", 1),
        ("diffusion restreinte", 1),
        ("  Diffusion\t  Restreinte ", 1),
        ("DIFFUSION_RESTREINTE", 1),
        ("Diffusion-Restreinte", 1),
        ("TRES SECRET", 3),
        ("Très Secret", 3),
        ("TRE\u0300S SECRET", 3),  # decomposed accent
        ("ＳＥＣＲＥＴ", 2),  # full-width: NFKC
        ("non protege", 0),
        ("SECRET DÉFENSE", None),
        ("CONFIDENTIEL DÉFENSE", None),
        ("S\u0435CRET", None),  # Cyrillic е
        ("", None),
        ("SECRET" + " " * 500, None),  # too long to be a level
    ],
)
def test_rank(label: str, rank: int | None) -> None:
    assert LEVELS.rank(label) == rank


def test_levels_refuse_duplicates_once_normalised() -> None:
    with pytest.raises(ValueError, match="same"):
        Levels(("Secret", "SECRET"))
    with pytest.raises(ValueError, match="non-empty"):
        Levels(())


_LEVEL = st.sampled_from(LEVELS.names)


@st.composite
def respelt(draw: st.DrawFn) -> tuple[str, str]:
    """A level, and the same level as a person might type it: case, accents, blanks."""
    name = draw(_LEVEL)
    out = []
    for c in name:
        if c == " ":
            out.append(draw(st.sampled_from([" ", "  ", "\t", "_", "-", "\u00a0", "\u2009"])))
            continue
        c = draw(st.sampled_from([c, c.lower(), c.upper()]))
        if draw(st.booleans()):
            c = unicodedata.normalize("NFD", c)
        if draw(st.booleans()):
            c = unicodedata.normalize("NFD", c)[0]  # accent dropped
        out.append(c)
    pad = draw(st.sampled_from(["", " ", "\t"]))
    return name, pad + "".join(out) + pad


@settings(max_examples=300)
@given(respelt())
def test_a_respelt_level_is_that_level(pair: tuple[str, str]) -> None:
    name, spelt = pair
    assert LEVELS.canonical(spelt) == name


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_normalise_is_idempotent_and_ranks_agree(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once
    assert LEVELS.rank(text) == LEVELS.rank(once)


@settings(max_examples=200)
@given(_LEVEL, _LEVEL)
def test_comparison_follows_the_configured_order(a: str, b: str) -> None:
    ra, rb = LEVELS.rank(a), LEVELS.rank(b)
    assert ra is not None
    assert rb is not None
    assert may_post(b, marking(a), LEVELS).allowed == (ra <= rb)


@settings(max_examples=200)
@given(st.lists(_LEVEL, min_size=1, max_size=6), st.lists(_LEVEL, max_size=3))
def test_several_markings_the_highest_counts(headers: list[str], tags: list[str]) -> None:
    subject = " ".join(f"[{t}]" for t in tags) + " Réunion"
    found = marking(*headers, subject=subject)
    expected = max(LEVELS.rank(x) or 0 for x in headers + tags)
    assert found.rank == expected
    assert found.label == LEVELS.names[expected]


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_any_header_value_that_is_no_level_is_refused(value: str) -> None:
    if LEVELS.rank(value) is None:
        assert not verdict(value)
        assert not verdict(value, link="TRÈS SECRET")


# --- a mail's marking --------------------------------------------------------------------------


def test_unmarked_and_lower_or_equal_mail_is_posted() -> None:
    assert verdict()
    assert verdict(subject="Réunion [Achats] budget")
    assert verdict("NON PROTÉGÉ")
    assert verdict(DR)
    assert verdict(subject="[diffusion restreinte] Réunion")
    assert verdict("Non protégé", subject="Re: [NON PROTEGE] point")


def test_higher_mail_is_refused_by_header_or_subject_tag() -> None:
    assert not verdict("SECRET")
    assert not verdict(subject="[SECRET] Réunion")
    assert not verdict(subject="Fwd: Réunion [Très Secret]")
    assert not verdict(DR, subject="[SECRET]")
    reason = may_post(DR, marking("SECRET"), LEVELS).reason
    assert "SECRET" in reason
    assert DR in reason


def test_a_link_without_marking_is_at_the_lowest_level() -> None:
    assert verdict(link=None)
    assert verdict("NON PROTÉGÉ", link=None)
    assert not verdict(DR, link=None)
    assert not verdict("TRÈS SECRET", link=None)
    assert not verdict(subject="[SECRET] Réunion", link=None)
    assert not verdict("gibberish", link=None)


@pytest.mark.parametrize(
    "header",
    [
        "",  # present but empty
        "SECRET DÉFENSE",
        "S\u0415CRET",  # Cyrillic Е
        "\u0405ECRET",  # Cyrillic Ѕ
        "SECRET, TRÈS SECRET",
        "DIFFUSION RESTREINTE (copie)",
        "=?utf-8?q?SECRET?=",  # not decoded here: the parser decodes, an encoded word is text
        "X" * 100_000,
    ],
)
def test_an_unknown_header_marking_fails_closed(header: str) -> None:
    found = marking(header)
    assert found.unknown
    assert all(len(u) <= 61 for u in found.unknown)
    assert not may_post(DR, found, LEVELS).allowed
    assert not may_post("TRÈS SECRET", found, LEVELS).allowed


@pytest.mark.parametrize(
    "subject",
    [
        "[S\u0415CRET] Réunion",  # Cyrillic Е
        "[ЅЕСRЕТ]",  # mostly Cyrillic
        "Réunion [ΤRÈS SECRET]",  # Greek Tau
        "［SЕCRET］",  # full-width brackets and Cyrillic
        "[SEC\u200bRET]",  # a zero-width space inside
        "[SECRET DÉFENSE] Réunion",  # the old scheme
        "[Projet très secret]",
    ],
)
def test_a_disguised_subject_tag_fails_closed(subject: str) -> None:
    assert not verdict(subject=subject)


def test_invisible_characters_do_not_hide_a_level() -> None:
    assert LEVELS.rank("DIFFUSION\u200b RESTREINTE\u202e") == 1
    assert not verdict(subject="[\u2066SECRET\u2069]")


def test_a_tag_mentioning_only_the_lowest_level_is_not_a_marking() -> None:
    assert verdict(subject="[NON PROTÉGÉ - interne] Réunion")


def test_full_width_brackets_are_tags() -> None:
    assert not verdict(subject="［SECRET］ Réunion")


def test_a_subject_too_long_to_read_whole_is_refused() -> None:
    subject = "a" * (MAX_SUBJECT + 10) + "[SECRET]"
    assert not verdict(subject=subject)
    assert not verdict(subject=subject, link=None)


def test_many_labels_fail_closed() -> None:
    assert not verdict(*["NON PROTÉGÉ"] * 60)
    assert verdict(*["NON PROTÉGÉ"] * 10)


def test_bracketed_words_that_are_not_levels_are_not_markings() -> None:
    assert not marking(subject="[Achats] [URGENT] [" + "x" * (MAX_LABEL + 5) + "]").marked


def test_a_link_whose_marking_is_no_longer_a_level_takes_only_unmarked_mail() -> None:
    assert may_post("CONFIDENTIEL DÉFENSE", marking(), LEVELS).allowed
    assert not may_post("CONFIDENTIEL DÉFENSE", marking("NON PROTÉGÉ"), LEVELS).allowed


# --- the room's topic --------------------------------------------------------------------------


def test_topic_gets_the_marking_line_once() -> None:
    topic = marked_topic("Achats du ministère", DR, LEVELS)
    assert topic == "[DIFFUSION RESTREINTE]\nAchats du ministère"
    assert marked_topic(topic, DR, LEVELS) == topic
    assert marked_topic("", DR, LEVELS) == "[DIFFUSION RESTREINTE]"


def test_topic_marking_line_is_replaced_or_removed() -> None:
    topic = "[NON PROTÉGÉ]\nAchats"
    assert marked_topic(topic, "SECRET", LEVELS) == "[SECRET]\nAchats"
    assert marked_topic(topic, None, LEVELS) == "Achats"
    other = marked_topic("[Achats] réunions", DR, LEVELS)
    assert other == "[DIFFUSION RESTREINTE]\n[Achats] réunions"


@settings(max_examples=200)
@given(st.text(max_size=80), _LEVEL)
def test_marking_a_topic_is_idempotent(topic: str, level: str) -> None:
    once = marked_topic(topic, level, LEVELS)
    assert once.startswith(f"[{level}]")
    assert marked_topic(once, level, LEVELS) == once
