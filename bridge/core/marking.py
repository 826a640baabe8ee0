"""Classification markings: normalising a label, ranking it, a mail's marking, whether it may
be posted on a link, and the marking line of a room's topic. Pure: no config, I/O or database."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A mail may carry at most this many marking labels that are looked at; more is hostile and
# counts as an unknown marking (refused), never as "the first ones were enough".
MAX_LABELS = 50
# A label longer than this is no level of any scheme: unknown (refused), never cut to fit.
MAX_LABEL = 200
# Subject text looked at for tags; a longer subject's tail counts as an unknown marking.
MAX_SUBJECT = 16 * 1024

_SPACES = re.compile(r"[\s_\-\u2010-\u2015\u2212]+")
_TAG = re.compile(rf"\[([^\[\]]{{1,{MAX_LABEL}}})\]")

# Letters of other scripts drawn like Latin ones (after casefold), from Unicode TR39's
# confusables: a label that only matches a level once they are read as Latin is a disguise.
_CONFUSABLES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o",
        "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j",
        "ѕ": "s", "ԁ": "d", "ӏ": "l", "ԛ": "q", "ԝ": "w", "ɡ": "g", "һ": "h", "ѵ": "v",
        # Greek
        "α": "a", "β": "b", "ε": "e", "ζ": "z", "η": "h", "ι": "i", "κ": "k", "μ": "m",
        "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ϲ": "c", "ϳ": "j",
        # Latin look-alikes outside ASCII
        "ı": "i", "ȷ": "j", "ℓ": "l", "ß": "ss",
    }
)  # fmt: skip


def normalise(label: str) -> str:
    """A label as levels are compared: NFKC, invisible format characters (zero-width, bidi
    controls, soft hyphen) removed, accents dropped, casefolded, blanks, "_" and dashes as one
    space, trimmed. "Très  secret", "TRES-SECRET" and "ＴＲÈＳ SECRET" agree."""
    text = unicodedata.normalize("NFKC", label)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    decomposed = unicodedata.normalize("NFD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    folded = unicodedata.normalize("NFC", bare).casefold()
    return _SPACES.sub(" ", folded).strip()


def _skeleton(normalised: str) -> str:
    return normalised.translate(_CONFUSABLES)


@dataclass(frozen=True)
class Levels:
    """The ordered levels, lowest first, as the configuration spells them."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        keys = [normalise(name) for name in self.names]
        if not self.names or not all(keys):
            raise ValueError("levels must be a non-empty list of labels")
        if len(set(keys)) != len(keys):
            raise ValueError("two levels are the same once normalised")

    def rank(self, label: str) -> int | None:
        """0 for the lowest level, …; None when `label` is none of them."""
        if len(label) > MAX_LABEL:
            return None
        key = normalise(label)
        for rank, name in enumerate(self.names):
            if normalise(name) == key:
                return rank
        return None

    def canonical(self, label: str) -> str | None:
        """The configured spelling of `label`'s level, or None when it is none of them."""
        rank = self.rank(label)
        return None if rank is None else self.names[rank]

    def disguised(self, label: str) -> bool:
        """Not a level, but one once look-alike letters of other scripts are read as Latin."""
        if len(label) > MAX_LABEL or self.rank(label) is not None:
            return False
        skeleton = _skeleton(normalise(label))
        return any(_skeleton(normalise(name)) == skeleton for name in self.names)

    def mentioned(self, label: str) -> bool:
        """Not a level, but holds one above the lowest as whole words ("SECRET DÉFENSE",
        "Projet très secret"), even disguised: a tag that claims more than nothing."""
        if len(label) > MAX_LABEL or self.rank(label) is not None:
            return False
        words = f" {_skeleton(normalise(label))} "
        return any(f" {_skeleton(normalise(name))} " in words for name in self.names[1:])


# A mail's marking: None when it carries none; UNKNOWN when it carries one that is not a level
# (ranked above every level: fail closed).
UNKNOWN = -1


@dataclass(frozen=True)
class MailMarking:
    """What a mail says of its classification: the highest level it carries (rank and
    spelling), or `unknown` (a label that is no level), or nothing."""

    rank: int | None
    label: str | None
    unknown: tuple[str, ...] = ()  # the labels that are no level, shown (cut) to the room

    @property
    def marked(self) -> bool:
        return self.rank is not None or bool(self.unknown)


def subject_tags(subject: str, levels: Levels) -> tuple[list[str], list[str]]:
    """The levels tagged `[LEVEL]` anywhere in `subject` (NFKC first, so full-width brackets
    count), and the tags that are no level but a disguised one or one that mentions a level
    above the lowest ("[SECRET DÉFENSE]"): unknown. Other bracketed words ("[Achats]") are not
    markings."""
    text = unicodedata.normalize("NFKC", subject[: MAX_SUBJECT + 1])
    found: list[str] = []
    disguised: list[str] = []
    for match in _TAG.finditer(text):
        inner = match.group(1)
        if levels.rank(inner) is not None:
            found.append(inner)
        elif levels.disguised(inner) or levels.mentioned(inner):
            disguised.append(inner)
    if len(subject) > MAX_SUBJECT:
        disguised.append("(subject too long to read whole)")
    return found, disguised


def mail_marking(headers: Sequence[str], subjects: Iterable[str], levels: Levels) -> MailMarking:
    """The marking of a mail from the values of its marking header (every occurrence, RFC 2047
    already decoded) and its Subject(s): the highest of the levels found. A header value that
    is no level (blank, misspelt, a homoglyph, another scheme, too long) and a subject tag that
    is a disguised level or mentions one make the marking unknown, above every level."""
    unknown: list[str] = []
    best: tuple[int, str] | None = None
    labels: list[str] = []
    for value in headers:
        if levels.rank(value) is None:
            unknown.append(value)
        else:
            labels.append(value)
    for subject in subjects:
        found, disguised = subject_tags(subject, levels)
        labels.extend(found)
        unknown.extend(disguised)
    if len(labels) + len(unknown) > MAX_LABELS:
        unknown.append(f"({len(labels) + len(unknown)} marking labels)")
    for label in labels[:MAX_LABELS]:
        rank = levels.rank(label)
        if rank is not None and (best is None or rank > best[0]):
            best = (rank, levels.names[rank])
    return MailMarking(
        rank=None if best is None else best[0],
        label=None if best is None else best[1],
        unknown=tuple(_shown(u) for u in unknown[:5]),
    )


def _shown(label: str) -> str:
    """A label safe to quote in a notice: printable, one line, short."""
    text = "".join(c if c.isprintable() else "?" for c in label[:60])
    return text + ("…" if len(label) > 60 else "")


@dataclass(frozen=True)
class Verdict:
    """Whether a mail may be posted on a link; `reason` says why not, for the room."""

    allowed: bool
    reason: str = ""


def may_post(link_marking: str | None, mail: MailMarking, levels: Levels) -> Verdict:
    """A link takes unmarked mail and mail marked at its level or lower; a mail marked higher,
    or with an unknown marking, is refused. A link without a marking is at the lowest level
    (an unmarked room is no place for DIFFUSION RESTREINTE). A link whose own marking is no
    longer a level (the levels changed) takes only unmarked mail."""
    if link_marking is None:
        link_marking = levels.names[0]
    if mail.unknown:
        shown = ", ".join(f"“{u}”" for u in mail.unknown)
        return Verdict(False, f"its marking {shown} is not a known level")
    if mail.rank is None:
        return Verdict(True)
    link_rank = levels.rank(link_marking)
    if link_rank is None:
        return Verdict(False, f"this link's marking “{_shown(link_marking)}” is not a known level")
    if mail.rank > link_rank:
        return Verdict(False, f"it is marked {mail.label}, above this room's {link_marking}")
    return Verdict(True)


def highest(markings: Iterable[str], levels: Levels) -> str | None:
    """The highest of a room's link markings (one that is no level counts as highest)."""
    best: tuple[int, str] | None = None
    for marking in markings:
        rank = levels.rank(marking)
        rank = len(levels.names) if rank is None else rank
        if best is None or rank > best[0]:
            best = (rank, marking)
    return None if best is None else best[1]


def topic_line(marking: str) -> str:
    return f"[{marking}]"


def marked_topic(topic: str, marking: str | None, levels: Levels) -> str:
    """`topic` with its first line the room's marking line, `[LEVEL]`: an existing marking line
    (any level, or the same marking) is replaced, never doubled; marking None removes it."""
    lines = topic.split("\n")
    first = lines[0].strip()
    if first.startswith("[") and first.endswith("]") and first[1:-1]:
        inner = first[1:-1]
        if levels.rank(inner) is not None or (
            marking is not None and normalise(inner) == normalise(marking)
        ):
            lines = lines[1:]
    rest = "\n".join(lines)
    if marking is None:
        return rest
    return topic_line(marking) + ("\n" + rest if rest.strip() else "")
