"""Reading the assistant's replies: never trusted.

``parse_reply`` digs the JSON out of whatever came back and ``check_annotation`` keeps
only the pairs that the mask builder can use (KEY and VALUE occur in ``input + target``
as whole words, with an occurrence of VALUE ending before an occurrence of KEY), using
the same ``find_occurrences`` as ``cattune.masks``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..masks import find_occurrences
from ..records import Annotation, Record
from ..text import scalar_text

# Reply fields that wrap the annotation instead of being a KEY of it.
_WRAPPERS = ("important", "annotation", "annotations")


class ReplyError(ValueError):
    """The model's reply holds no JSON annotation we can read."""


_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)```", re.S)
_THINK_OPEN = re.compile(r"<think>", re.I)
_THINK_CLOSE = re.compile(r"</think>", re.I)
# Openings tried when text surrounds the JSON: each try may read to the end of the reply.
_MAX_STARTS = 200


def strip_think(text: str) -> str:
    """``text`` without its ``<think>...</think>`` blocks, in one pass.

    A regex ``<think>.*?</think>`` scans to the end of the text from every unclosed
    ``<think>``: 280 KB of them took 42 s. Once an opening has no closing after it, no
    later one has either, so the search stops there.
    """
    kept, pos = [], 0
    while (opening := _THINK_OPEN.search(text, pos)) and (closing := _THINK_CLOSE.search(text, opening.end())):
        kept.append(text[pos:opening.start()])
        pos = closing.end()
    kept.append(text[pos:])
    return "".join(kept)


def _raw_pairs(obj: Any) -> list[tuple[Any, Any]] | None:
    """The (key, values) items of an accepted reply shape, or None for another shape."""
    if isinstance(obj, dict):
        if len(obj) == 1:
            (name, inner), = obj.items()
            wrapped = isinstance(inner, dict) or (isinstance(inner, list) and inner and isinstance(inner[0], dict))
            if name in _WRAPPERS and wrapped:
                return _raw_pairs(inner)
        return list(obj.items())
    if isinstance(obj, list) and all(isinstance(item, dict) for item in obj):
        return [pair for item in obj for pair in item.items()]
    return None


def preview(text: Any) -> str:
    return repr(str(text).strip()[:80])


NESTED_TOO_DEEPLY = "nested too deeply to read"


def dumps(obj: Any) -> str:
    """JSON text of what a server sent, for a message; ``ReplyError`` when it nests so
    deeply that encoding it would exhaust the stack."""
    try:
        return json.dumps(obj, default=str, ensure_ascii=False)
    except RecursionError:
        raise ReplyError(f"reply {NESTED_TOO_DEEPLY}") from None


def reply_text(content: Any, redact: Callable[[str], str] = str) -> str | None:
    """The text of a message's ``content``: a string, or the text parts of a list of parts.

    The client does not check the type, so a server can hand back anything here; what
    is not text is a ``ReplyError`` for this record, not a crash of the run.
    """
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        texts = [text for text in texts if isinstance(text, str)]
        if not texts:
            raise ReplyError(f"message content has no text part: {preview(redact(dumps(content)))}")
        return "".join(texts)
    shown = dumps(content)
    raise ReplyError(f"message content is {type(content).__name__}, not text: {preview(redact(shown))}")


def parse_reply(text: str | list | None, redact: Callable[[str], str] = str) -> list[tuple[Any, Any]]:
    """The (key, values) pairs of a reply, unchecked; ``ReplyError`` when there are none.

    Accepts a bare JSON object, one inside a fenced code block, one with text before or
    after it, a list of one-key objects, and a ``{"important": ...}`` wrapper. Reasoning
    models' ``<think>...</think>`` preambles are skipped. ``text`` may also be a list of
    content parts (``[{"type": "text", "text": ...}, ...]``): their text is the reply.
    """
    text = reply_text(text, redact)
    if text is None or not text.strip():
        raise ReplyError("empty reply")
    text = strip_think(text)
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        candidate = candidate.strip()
        if (pairs := _decode(decoder, candidate, None)) is not None:
            return pairs
        # Text around the JSON: try each opening bracket until one decodes to a known shape.
        starts = (m.start() for m in re.finditer(r"[{\[]", candidate))
        for _, i in zip(range(_MAX_STARTS), starts):
            if (pairs := _decode(decoder, candidate, i)) is not None:
                return pairs
    raise ReplyError(f"no JSON object in the reply: {preview(redact(text))}")


def _decode(decoder: json.JSONDecoder, text: str, start: int | None) -> list[tuple[Any, Any]] | None:
    """The pairs of the JSON at ``start`` (None: all of ``text``), or None if it is none.

    JSON nested deeper than Python's recursion limit (``[[[[...``) is no annotation:
    the decoder's ``RecursionError`` is this reply's failure, not the run's.
    """
    try:
        obj = json.loads(text) if start is None else decoder.raw_decode(text, start)[0]
        return _raw_pairs(obj)
    except (json.JSONDecodeError, RecursionError):
        return None


# --------------------------------------------------------------------------- validation

NOT_A_STRING = "not a string"
KEY_NOT_FOUND = "key not found in text"
VALUE_NOT_FOUND = "value not found in text"
NOT_BEFORE = "value not before key"
NO_VALUES = "key without values"


@dataclass
class Checked:
    kept: Annotation
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # (key, value, reason)
    repaired: int = 0  # spans kept after fixing spacing or case


def _as_text(x: Any) -> str | None:
    try:
        return scalar_text(x)
    except TypeError:  # a boolean, a list, an object: not a span of the text
        return None


def _shown(value: Any) -> str:
    """A value of the reply as a message shows it (a string as it is, anything else as JSON)."""
    if isinstance(value, str):
        return value
    try:
        return dumps(value)
    except ReplyError:
        return NESTED_TOO_DEEPLY


def _locate(text: str, span: str) -> tuple[str, list[tuple[int, int]]] | None:
    """The spelling of ``span`` found in ``text`` and its occurrences, or None.

    Models often add surrounding spaces or change case; those are repaired to the
    text's own spelling, anything else is not guessed at.
    """
    if span and (occ := find_occurrences(text, span)):
        return span, occ
    stripped = span.strip()
    if not stripped:
        return None
    if stripped != span and (occ := find_occurrences(text, stripped)):
        return stripped, occ
    lowered = text.lower()
    if len(lowered) == len(text):  # case folding kept character positions
        for start, end in find_occurrences(lowered, stripped.lower()):
            spelling = text[start:end]
            if occ := find_occurrences(text, spelling):
                return spelling, occ
    return None


def check_annotation(record: Record, pairs: list[tuple[Any, Any]], dedupe: bool = True) -> Checked:
    """Keep the pairs the mask builder can place; report every other one with a reason.

    A pair is kept when KEY and VALUE occur in ``record.text`` (whole words, as in
    ``cattune.masks``) and some occurrence of VALUE ends before some occurrence of KEY
    starts. Repeated keys are merged; a repeated value is kept once unless ``dedupe``
    is False (rules list one value per matched item, even when two items print alike).
    """
    text = record.text
    # A reply may repeat one span 100k times: each distinct span is looked up once.
    locate = functools.lru_cache(maxsize=None)(lambda span: _locate(text, span))
    merged: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()  # (key, value) kept: a list lookup would be quadratic
    checked = Checked(kept=[])
    for raw_key, raw_values in pairs:
        values = raw_values if isinstance(raw_values, list) else [raw_values]
        key = _as_text(raw_key)
        shown_values = [_shown(v) for v in values] or [""]
        if key is None:
            checked.dropped += [(_shown(raw_key), v, NOT_A_STRING) for v in shown_values]
            continue
        if not values:
            checked.dropped.append((key, "", NO_VALUES))
            continue
        found_key = locate(key)
        if found_key is None:
            checked.dropped += [(key, v, KEY_NOT_FOUND) for v in shown_values]
            continue
        if found_key[0] != key:
            checked.repaired += 1
        key, key_occ = found_key
        last_key_start = max(start for start, _ in key_occ)
        for raw_value, shown in zip(values, shown_values):
            value = _as_text(raw_value)
            if value is None:
                checked.dropped.append((key, shown, NOT_A_STRING))
                continue
            found = locate(value)
            if found is None:
                checked.dropped.append((key, value, VALUE_NOT_FOUND))
                continue
            spelling, value_occ = found
            if min(end for _, end in value_occ) > last_key_start:
                checked.dropped.append((key, value, NOT_BEFORE))
                continue
            if spelling != value:
                checked.repaired += 1
            if not dedupe or (key, spelling) not in seen:
                merged.setdefault(key, []).append(spelling)
                seen.add((key, spelling))
    checked.kept = [(k, vs) for k, vs in merged.items() if vs]
    return checked

