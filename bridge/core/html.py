"""Untrusted HTML made safe for Matrix (the spec's allowlist, bounded nesting) and read as text."""

from __future__ import annotations

import html as htmllib
import re
from collections.abc import Iterator, Mapping
from urllib.parse import unquote

import nh3

__all__ = ["MAX_NESTING", "html_to_text", "sanitize_html"]

MAX_NESTING = 100  # the Matrix spec asks clients to limit nesting of tags to 100 levels


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Client-server API, "HTML formatted bodies" (m.room.message).
_TAGS = _names(
    "font del h1 h2 h3 h4 h5 h6 blockquote p a ul ol sup sub li b i u strong em s code hr br div"
    " table thead tbody tr th td caption pre span img details summary"
)
_ATTRIBUTES: dict[str, frozenset[str]] = {
    "font": frozenset({"color", "data-mx-bg-color", "data-mx-color"}),
    "span": frozenset({"data-mx-bg-color", "data-mx-color", "data-mx-spoiler"}),
    "a": frozenset({"href", "target"}),
    "img": frozenset({"width", "height", "alt", "title", "src"}),
    "ol": frozenset({"start"}),
    "code": frozenset({"class"}),
}
# Removed together with their content (nh3 wants this disjoint from _TAGS).
_DROP_CONTENT = _names(
    "script style title iframe noscript noembed noframes template svg object applet"
)
_LINK_SCHEMES = frozenset({"http", "https", "ftp", "mailto", "magnet"})
# nh3 checks schemes before calling the attribute filter, which then decides per tag: links get
# _LINK_SCHEMES, images only cid: URLs the caller mapped to an uploaded mxc:// URL.
_NH3_SCHEMES = _LINK_SCHEMES | {"cid"}

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_URL_IGNORED = re.compile(r"[\t\n\r]")
_C0_SPACE = "".join(map(chr, range(0x21)))
_COLOR = re.compile(r"#[0-9A-Fa-f]{6}|#[0-9A-Fa-f]{3}|[A-Za-z]{3,20}")
_DIGITS = re.compile(r"[0-9]{1,5}")
_OL_START = re.compile(r"-?[0-9]{1,9}")
_LANGUAGE = re.compile(r"language-[A-Za-z0-9_+#.\-]{1,40}")

# ----------------------------------------------------------------------------------------------
# A tokenizer that follows the HTML tokenizer's rules for where tags, comments and raw text
# start and end. Its output is re-serialised (stray "<" escaped, comments and raw-text elements
# dropped), so the parser inside nh3 sees exactly the tags this module counted.

_TEXT, _START, _END, _RAW = 0, 1, 2, 3
_TAG = re.compile(
    r"<(/?)([A-Za-z][^\t\n\f\r />]*+)"
    r"(?:[\t\n\f\r /]*+[^\t\n\f\r />][^\t\n\f\r /=>]*+"
    r"""(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+(?:"[^"]*+"|'[^']*+'|[^\t\n\f\r >]*+)"""
    r"|(?![\t\n\f\r ]*+=)))*+"
    r"[\t\n\f\r /]*+>"
)
# Elements whose content the tokenizer does not parse as markup.
_RAW_ELEMENTS = _names("script style title textarea xmp iframe noembed noframes noscript")
_RAW_KEPT = frozenset({"textarea", "xmp", "plaintext"})  # their content is shown as text
_RAW_END = {
    name: re.compile(r"</" + name + r"(?=[\t\n\f\r />])", re.IGNORECASE | re.ASCII)
    for name in _RAW_ELEMENTS
}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

Token = tuple[int, str, str]  # kind, lowercase tag name ("" for text), source text


def _tokens(source: str) -> Iterator[Token]:
    """Text, start tags, end tags and raw-text content of `source`, in order; linear time."""
    pos = 0
    n = len(source)
    while pos < n:
        lt = source.find("<", pos)
        if lt < 0:
            yield (_TEXT, "", source[pos:])
            return
        if lt > pos:
            yield (_TEXT, "", source[pos:lt])
        nxt = source[lt + 1 : lt + 2]
        if _letter(nxt) or (nxt == "/" and _letter(source[lt + 2 : lt + 3])):
            match = _TAG.match(source, lt)
            if match is None:  # the tag runs to the end of input: the tokenizer drops it
                return
            pos = match.end()
            name = match.group(2).translate(_ASCII_LOWER)
            if match.group(1):
                yield (_END, name, match.group(0))
                continue
            yield (_START, name, match.group(0))
            if name == "plaintext":
                yield (_RAW, name, source[pos:])
                return
            if name in _RAW_ELEMENTS:
                end = _RAW_END[name].search(source, pos)
                yield (_RAW, name, source[pos : end.start() if end else n])
                if end is None:
                    return
                pos = end.start()
            continue
        if source.startswith("<!--", lt):
            pos = _comment_end(source, lt + 4)
        elif nxt in ("!", "?") or (nxt == "/" and lt + 2 < n and source[lt + 2] != ">"):
            close = source.find(">", lt + 2)  # a bogus comment (doctype, CDATA, "</ ...")
            pos = n if close < 0 else close + 1
        elif source.startswith("</>", lt):
            pos = lt + 3
        else:
            yield (_TEXT, "", "<")
            pos = lt + 1


def _letter(char: str) -> bool:
    return char.isascii() and char.isalpha()


def _comment_end(source: str, start: int) -> int:
    if source.startswith(">", start):
        return start + 1
    if source.startswith("->", start):
        return start + 2
    ends = [i + len(mark) for mark in ("-->", "--!>") if (i := source.find(mark, start)) >= 0]
    return min(ends) if ends else len(source)


# ----------------------------------------------------------------------------------------------
# A model of the parser's stack of open elements, close enough to bound its depth: an element
# is opened only while the model is below MAX_NESTING. Deeper start tags are dropped together
# with their end tags (their text stays). The parser (html5ever) walks its stack for many
# tags, so unbounded depth makes it quadratic: measured 3 s for 50,000 and 13 s for 100,000
# unclosed <div>. Where the model is unsure it errs deeper, which only costs fidelity.

_VOID = _names(
    "area base basefont bgsound br col embed frame hr image img input keygen link meta param"
    " source track wbr"
)
_IGNORED = frozenset({"html", "head", "body", "frameset"})
_SPECIAL = _names(
    "address applet area article aside base basefont bgsound blockquote body br button caption"
    " center col colgroup dd details dir div dl dt embed fieldset figcaption figure footer form"
    " frame frameset h1 h2 h3 h4 h5 h6 head header hgroup hr html iframe img input keygen li"
    " link listing main marquee menu meta nav noembed noframes noscript object ol p param"
    " plaintext pre script search section select source style summary table tbody td template"
    " textarea tfoot th thead title tr track ul wbr xmp mi mo mn ms mtext annotation-xml"
    " foreignobject desc"
)
_SCOPE = _names(
    "applet caption html table td th marquee object template mi mo mn ms mtext annotation-xml"
    " foreignobject desc title"
)
_MARKERS = frozenset({"applet", "caption", "marquee", "object", "template", "td", "th"})
_FORMATTING = _names("a b big code em font i nobr s small strike strong tt u")
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_CLOSES_P = _HEADINGS | _names(
    "address article aside blockquote center details dialog dir div dl fieldset figcaption"
    " figure footer header hgroup main menu nav ol p search section summary ul pre listing form"
    " table hr xmp li dd dt"
)
_NO_RECONSTRUCT = _CLOSES_P | _names("td th tr tbody thead tfoot caption colgroup col")
_MAX_ELEMENTS = 20_000  # opened elements per message: a backstop should the model be wrong
_MAX_ADOPTIONS = 500  # misnested formatting end tags modelled per message (then: deeper)

# Barrier categories: "the topmost X is above the topmost barrier" is how the parser decides
# whether an end tag (or an implied one) closes X.
_ITEM_KINDS = {"li": ("li",), "dd": ("dd", "dt"), "dt": ("dd", "dt")}
_ITEM_STOPS = {"li": ("dd", "dt"), "dd": ("li",), "dt": ("li",)}
_SECTIONS = ("tbody", "thead", "tfoot")
_ROW_KINDS = {"td": ("td", "th"), "th": ("td", "th"), "tr": ("tr",)} | dict.fromkeys(
    ("tbody", "thead", "tfoot", "caption", "colgroup"), _SECTIONS
)
_TABLE_PARTS = _names("td th tr tbody thead tfoot caption colgroup")
# The scope an element must be in for its end tag to close it.
_END_SCOPE = {"li": "list", "p": "button"} | {name: "table" for name in _TABLE_PARTS | {"table"}}
_BARRIERS = ("special", "item", "scope", "button", "list", "table")


def _categories(name: str) -> tuple[str, ...]:
    found = {
        "special": name in _SPECIAL,
        # what stops an implied </li>, </dd> or </dt> (besides the other kind of item)
        "item": name in _SPECIAL and name not in ("address", "div", "p", "li", "dd", "dt"),
        "scope": name in _SCOPE,
        "button": name in _SCOPE or name == "button",
        "list": name in _SCOPE or name in ("ol", "ul"),
        "table": name in ("html", "table", "template"),
    }
    return tuple(category for category, member in found.items() if member)


_CATEGORIES = {name: _categories(name) for name in _SPECIAL | {"button", "ol", "ul"}}


class _OpenElements:
    """The parser's stack of open elements, and the formatting elements it will reopen."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.where: dict[str, list[int]] = {}
        self.barriers: dict[str, list[int]] = {category: [] for category in _BARRIERS}
        # Formatting elements closed by another element's end tag stay "active": the parser
        # reopens them at the next text or inline tag. A cell, caption or object (a "marker")
        # sets the ones from outside aside until it closes, and forgets its own.
        self.pending: list[str] = []
        self.set_aside: list[list[str]] = []
        self.waiting = 0  # len(pending) plus everything set aside
        self.opened = 0
        self.adoptions = 0

    def depth(self) -> int:
        return len(self.names) + self.waiting

    def topmost(self, name: str) -> int:
        found = self.where.get(name)
        return found[-1] if found else -1

    def barrier(self, category: str) -> int:
        found = self.barriers[category]
        return found[-1] if found else -1

    def _index(self, name: str) -> None:
        index = len(self.names)
        self.names.append(name)
        self.where.setdefault(name, []).append(index)
        for category in _CATEGORIES.get(name, ()):
            self.barriers[category].append(index)

    def push(self, name: str) -> None:
        self._index(name)
        if name in _MARKERS:
            self.set_aside.append(self.pending)
            self.pending = []

    def _pop(self) -> str:
        name = self.names.pop()
        self.where[name].pop()
        for category in _CATEGORIES.get(name, ()):
            self.barriers[category].pop()
        if name in _MARKERS:
            self.waiting -= len(self.pending)
            self.pending = self.set_aside.pop()
        return name

    def pop_to(self, index: int) -> None:
        """Close the element at `index` and everything above it."""
        closed = [self._pop() for _ in range(len(self.names) - index)]
        closed.reverse()
        markers = [i for i, name in enumerate(closed) if name in _MARKERS]
        for name in closed[1 : markers[0] if markers else len(closed)]:
            if name in _FORMATTING:
                self.pending.append(name)
                self.waiting += 1

    def reconstruct(self) -> None:
        pending, self.pending = self.pending, []
        self.waiting -= len(pending)
        for name in pending:
            self.push(name)

    def adopt(self, index: int) -> bool:
        """The adoption agency algorithm for the formatting element at `index`, closely enough
        for depth: it moves above each special element that follows it, leaving behind only
        formatting elements, and is closed once none follows. False when over budget."""
        if self.adoptions >= _MAX_ADOPTIONS:
            return False
        self.adoptions += 1
        for _ in range(8):  # the algorithm's outer loop limit
            names = self.names
            block = next((i for i in range(index + 1, len(names)) if names[i] in _SPECIAL), -1)
            if block < 0:
                self.pop_to(index)
                return True
            kept = [name for name in names[index + 1 : block] if name in _FORMATTING]
            rebuilt = names[:index] + kept + [names[block], names[index]] + names[block + 1 :]
            self.names, self.where = [], {}
            self.barriers = {category: [] for category in _BARRIERS}
            for name in rebuilt:  # markers are special: their order, and set_aside, still hold
                self._index(name)
            index += len(kept) + 1
        return True

    def void(self, name: str) -> None:
        """A void element: it may close a <p> and reopen formatting, but is never open."""
        if name in _CLOSES_P:
            self._close_p()
        else:
            self.reconstruct()

    def _close_p(self) -> None:
        p = self.topmost("p")
        if p > self.barrier("button"):
            self.pop_to(p)

    def start(self, name: str) -> bool:
        """Apply a start tag's implied end tags, then open it if the depth allows."""
        if name in _ITEM_KINDS:
            item = max(self.topmost(kind) for kind in _ITEM_KINDS[name])
            stop = max(self.barrier("item"), *(self.topmost(k) for k in _ITEM_STOPS[name]))
            if item > stop:
                self.pop_to(item)
        if name in _CLOSES_P:
            self._close_p()
        if name in _HEADINGS and self.names and self.names[-1] in _HEADINGS:
            self.pop_to(len(self.names) - 1)
        elif name in _TABLE_PARTS:
            table = self.topmost("table")
            if table < 0:
                return False  # outside a table the parser ignores them
            row = max(self.topmost(kind) for kind in _ROW_KINDS[name])
            if row > table:
                self.pop_to(row)
        elif name == "a" and not self._forget("a"):
            a = self.topmost("a")
            if a >= 0 and a > max((self.topmost(m) for m in _MARKERS), default=-1):
                self.adopt(a)
        if name not in _NO_RECONSTRUCT:
            self.reconstruct()
        if self.depth() >= MAX_NESTING or self.opened >= _MAX_ELEMENTS:
            return False
        self.opened += 1
        self.push(name)
        return True

    def _forget(self, name: str) -> bool:
        """Drop a pending formatting element (its end tag came before it was reopened)."""
        for i in range(len(self.pending) - 1, -1, -1):
            if self.pending[i] == name:
                del self.pending[i]
                self.waiting -= 1
                return True
        return False

    def end(self, name: str) -> bool:
        """Apply an end tag; False when the parser ignores it (or the model gives up)."""
        if name in _HEADINGS:
            index = max(self.topmost(heading) for heading in _HEADINGS)
        else:
            index = self.topmost(name)
        if index < 0:
            if name == "br":  # the parser reads </br> as <br>
                self.reconstruct()
            return name in ("p", "br") or self._forget(name)  # </p> makes an empty <p>
        if name in _SPECIAL:
            if index < self.barrier(_END_SCOPE.get(name, "scope")):
                return name == "p"
        elif name in _FORMATTING and index > self.barrier("scope"):
            if index < self.barrier("special"):
                return self.adopt(index)
        elif index < self.barrier("special"):
            return False
        self.pop_to(index)
        return True


def _rebuild(source: str) -> str:
    """`source` re-serialised from its tokens, with the open-element depth bounded."""
    out: list[str] = []
    stack = _OpenElements()
    dropped: dict[str, int] = {}  # start tags dropped for depth, by name, awaiting their end
    for kind, name, text in _tokens(source):
        if kind == _TEXT:
            stack.reconstruct()
            out.append(text.replace("<", "&lt;"))
        elif kind == _RAW:
            if name in _RAW_KEPT:
                stack.reconstruct()
                out.append(text.replace("<", "&lt;") if name == "textarea" else _escape(text))
        elif name in _IGNORED or name in _RAW_ELEMENTS or name == "plaintext":
            continue
        elif kind == _START:
            if name in _VOID:
                stack.void(name)
                out.append(text)
            elif stack.start(name):
                out.append(text)
            else:
                dropped[name] = dropped.get(name, 0) + 1
        elif dropped.get(name):
            dropped[name] -= 1
        else:
            # Kept even when the model ignores it: an end tag never opens an element, so the
            # parser's stack can only get shallower than the model's.
            stack.end(name)
            out.append(text)
    return "".join(out)


def _escape(text: str) -> str:
    return htmllib.escape(text, quote=False)


# ----------------------------------------------------------------------------------------------
# After nh3: its output is canonical (attribute values quoted and escaped, text "<" escaped),
# so a regular expression reads its tags exactly.

_OUT_TAG = re.compile(r"<(/?)([a-z0-9]+)([^<>]*)>")
_OUT_ATTR = re.compile(r'\s([a-z-]+)="([^"]*)"')
_OUT_VOID = frozenset({"br", "hr", "img"})


def _finish(cleaned: str) -> str:
    """Images without an accepted src become their alt text; nesting is cut at MAX_NESTING."""
    out: list[str] = []
    kept: list[bool] = []
    pos = 0
    for match in _OUT_TAG.finditer(cleaned):
        out.append(cleaned[pos : match.start()])
        pos = match.end()
        closing, name, attrs = match.groups()
        if name in _OUT_VOID:
            if name == "img":
                found = dict(_OUT_ATTR.findall(attrs))
                if "src" not in found:
                    out.append(_escape(htmllib.unescape(found.get("alt", ""))))
                    continue
            out.append(match.group(0))
        elif closing:
            if kept and kept.pop():
                out.append(match.group(0))
        else:
            keep = len(kept) < MAX_NESTING
            kept.append(keep)
            if keep:
                out.append(match.group(0))
    out.append(cleaned[pos:])
    return "".join(out)


def _has_content(fragment: str) -> bool:
    if "<img " in fragment:
        return True
    return bool(htmllib.unescape(_OUT_TAG.sub("", fragment)).strip())


class _AttributeFilter:
    """nh3's per-attribute callback: per-tag URL schemes, cid: images, value syntax."""

    def __init__(self, image_urls: Mapping[str, str]) -> None:
        self.image_urls = image_urls

    def __call__(self, tag: str, attribute: str, value: str) -> str | None:
        try:
            return self._filter(tag, attribute, value)
        except Exception:  # nh3 would only report it through sys.unraisablehook
            return None

    def _filter(self, tag: str, attribute: str, value: str) -> str | None:
        if tag == "a":
            if attribute == "href":
                return value if _scheme(value) in _LINK_SCHEMES else None
            if attribute == "target":
                return "_blank" if value.strip().lower() == "_blank" else None
            return None
        if tag == "img":
            if attribute == "src":
                return self._image(value)
            if attribute in ("alt", "title"):
                return value
            if attribute in ("width", "height"):
                return value if _DIGITS.fullmatch(value.strip()) else None
            return None
        if attribute in ("color", "data-mx-color", "data-mx-bg-color"):
            return value if _COLOR.fullmatch(value.strip()) else None
        if tag == "span" and attribute == "data-mx-spoiler":
            return value
        if tag == "ol" and attribute == "start":
            return value if _OL_START.fullmatch(value.strip()) else None
        if tag == "code" and attribute == "class":
            languages = [c for c in value.split() if _LANGUAGE.fullmatch(c)]
            return languages[0] if languages else None
        return None

    def _image(self, value: str) -> str | None:
        if _scheme(value) != "cid":
            return None  # remote (tracking) images, data: URIs, mxc:// chosen by the sender
        url = _url(value)
        content_id = unquote(url[4:]).strip().removeprefix("<").removesuffix(">")
        mapped = self.image_urls.get(content_id)
        if mapped is None or not mapped.startswith("mxc://"):
            return None
        return mapped


def _url(value: str) -> str:
    """`value` as a URL parser reads it: tabs and newlines removed, C0 and spaces trimmed."""
    return _URL_IGNORED.sub("", value).strip(_C0_SPACE)


def _scheme(url: str) -> str | None:
    match = _SCHEME.match(_url(url))
    return match.group(1).lower() if match else None


def sanitize_html(html: str, *, image_urls: Mapping[str, str], max_input: int) -> str:
    """`html` reduced to the Matrix spec's allowlist for formatted bodies, or "" if nothing is
    left.

    The input is cut to `max_input` characters first. Links keep http(s), ftp, mailto and
    magnet URLs; an image survives only as `cid:X` with `image_urls[X]` an mxc:// URL (the
    caller's upload), anything else becomes its alt text. No style, scripts or event handlers;
    nesting is limited to MAX_NESTING levels, deeper tags are dropped and their text kept.
    """
    source = html[: max(max_input, 0)]
    cleaned = nh3.clean(
        _rebuild(source),
        tags=_TAGS,
        clean_content_tags=_DROP_CONTENT,
        attributes=_ATTRIBUTES,
        attribute_filter=_AttributeFilter(image_urls),
        strip_comments=True,
        link_rel=None,  # "rel" is not among the spec's attributes of <a>
        url_schemes=_NH3_SCHEMES,
        url_relative="deny",
    )
    finished = _finish(cleaned)
    return finished if _has_content(finished) else ""


# ----------------------------------------------------------------------------------------------
# Plain text from HTML, for a message that has no plain-text version.

_BLOCKS = _HEADINGS | _names(
    "p div br li ul ol dl dt dd tr table thead tbody tfoot caption blockquote pre hr section"
    " article header footer address center form fieldset figure figcaption main nav aside"
    " details summary listing"
)
_CELLS = frozenset({"td", "th"})
_SPACES = re.compile(r"[\t\n\f\r \xa0]+")
_LINE_SPACES = re.compile(r"[\t\f\r \xa0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def html_to_text(html: str) -> str:
    """The text of `html`: tags stripped (blocks become line breaks), entities unescaped,
    whitespace collapsed. Scripts, styles and the like are dropped. Linear time."""
    parts: list[str] = []
    in_pre = 0
    skipping = False
    for kind, name, text in _tokens(html):
        if kind == _TEXT:
            if not skipping:
                text = htmllib.unescape(text)
                parts.append(text if in_pre else _SPACES.sub(" ", text))
        elif kind == _RAW:
            if name in _RAW_KEPT:
                parts.append(htmllib.unescape(text) if name == "textarea" else text)
        elif name in _BLOCKS:
            parts.append("\n")
            if name == "pre":
                in_pre = in_pre + 1 if kind == _START else max(in_pre - 1, 0)
        elif name in _CELLS:
            parts.append(" ")
        elif name in ("svg", "object", "applet", "template"):
            skipping = kind == _START
    lines = (_LINE_SPACES.sub(" ", line).strip() for line in "".join(parts).split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
