"""JSON from another server, parsed so that no value can stall the bridge: strict constants,
and anything nested deeper than a bound replaced by null instead of failing the whole answer
(one hostile event must not make a /sync answer unreadable forever)."""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

MAX_DEPTH = 100  # Matrix content needs a handful; Synapse itself refuses events past ~128

# A JSON string (escapes included), or one bracket: what changes the nesting depth.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"JSON constant {name} is not allowed")


def loads(raw: bytes | str) -> Any:
    """Parse strictly (no NaN/Infinity); ValueError for anything that is not JSON. A document
    nested deeper than MAX_DEPTH has its too-deep values replaced by null."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    if _too_deep(text):
        text = flatten(text, MAX_DEPTH)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError as e:  # pragma: no cover - flatten bounds the depth
        raise ValueError("JSON nested too deeply") from e


def _too_deep(text: str) -> bool:
    depth = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


def flatten(text: str, limit: int) -> str:
    """`text` with every array or object that opens deeper than `limit` replaced by null.
    Invalid JSON stays invalid (the parser then says so)."""
    out: list[str] = []
    depth = 0
    skip_from: int | None = None  # where the value being replaced started
    pos = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth == limit + 1 and skip_from is None:
                out.append(text[pos : match.start()])
                skip_from = match.start()
        elif token in ("]", "}"):
            if depth == limit + 1 and skip_from is not None:
                out.append("null")
                pos = match.end()
                skip_from = None
            depth -= 1
    if skip_from is not None:
        return text  # unbalanced: leave it to the parser to refuse
    out.append(text[pos:])
    return "".join(out)
