"""Training records in the paper's JSONL format, validated on the way in.

A line is ``{"input": PROMPT, "target": ANSWER, "important": ANNOTATION, ...}``.
``important`` says "when producing KEY, look at VALUE": either a list of one-key
objects ``[{KEY: [VALUE, ...]}, ...]`` or one object ``{KEY: [...], KEY2: [...]}``.
Every other field is kept in ``Record.meta`` and written back. Text is read in Unicode
NFC, so that an annotation typed in another normalisation form matches its prompt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .files import atomic_write_text, check_is_file
from .text import scalar_text

Annotation = list[tuple[str, list[str]]]
logger = logging.getLogger(__name__)


class RecordError(ValueError):
    """A record that does not follow the format; the message names file and line."""


@dataclass
class Record:
    prompt: str
    target: str
    important: Annotation = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # The JSON value ``target`` came from when it was a number (STG_H's answers are
    # ints): written back as that number as long as ``target`` still spells it.
    target_json: Any = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        return self.prompt + self.target

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.meta)
        out["input"] = self.prompt
        out["target"] = self.target
        # The number is written back while JSON writes it as the target's text (80.0, 8);
        # 100000000000000000000000.0 would come out as 1e+23, so it stays the text.
        if isinstance(self.target_json, (int, float)) and not isinstance(self.target_json, bool):
            try:
                if json.dumps(self.target_json, allow_nan=False) == self.target:
                    out["target"] = self.target_json
            except ValueError:
                pass
        if self.important:
            out["important"] = [{key: list(values)} for key, values in self.important]
        else:
            out.pop("important", None)
        return out


def _format_target(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError("a non-finite number")
    return getattr(value, "text", None) or scalar_text(value)


class JSONFloat(float):
    """A JSON number with a fraction or exponent that remembers how it was written: a
    target ``100000000000000000000000.0`` keeps that text (``repr`` gives ``1e+23``)."""

    __slots__ = ("text",)


def _parse_float(text: str) -> JSONFloat:
    number = JSONFloat(text)
    if not math.isfinite(number):  # 1e400: JSON text, but no float holds it
        raise ValueError(f"the number {text[:40]} is too large for a float (it reads as {number})")
    number.text = text
    return number


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is a non-finite number, which JSON does not allow (write it as a string or null)")


# Nesting a record may have: "important" needs 3 levels. JSON nested 100k deep (a hostile
# or broken line) stops here, instead of at the end of Python's stack.
MAX_DEPTH = 100


def normalize_important(raw: Any) -> Annotation:
    """Turn either accepted shape of ``important`` into ``[(key, [values])]``.

    Raises ``ValueError`` with a short reason when the shape is wrong.
    """
    if raw is None:
        return []
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = []
        for i, obj in enumerate(raw):
            if not isinstance(obj, dict) or len(obj) != 1:
                raise ValueError(f"important[{i}] must be an object with exactly one key, got {obj!r:.80}")
            items.extend(obj.items())
    else:
        raise ValueError(f"important must be a list of one-key objects or an object, got {type(raw).__name__}")
    out: Annotation = []
    for key, values in items:
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"important[{key!r}] must be a list of strings, got {values!r:.80}")
        if not key:
            raise ValueError("important has an empty key")
        out.append((key, [v for v in values if v]))
    return out


def record_from_json(obj: Any) -> Record:
    """Build a Record from one parsed JSON object; ``ValueError`` says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for name in ("input", "target"):
        if name not in obj:
            raise ValueError(f"missing field {name!r}")
    if not isinstance(obj["input"], str):
        raise ValueError(f"field 'input' must be a string, got {type(obj['input']).__name__}")
    try:
        target = _format_target(obj["target"])
    except TypeError as e:
        raise ValueError(f"field 'target' must be a string or a number, got {e}") from None
    if not target.strip():  # no answer token: nothing to train on or to check an answer against
        raise ValueError("field 'target' is empty")
    important = normalize_important(obj.get("important"))
    meta = {k: v for k, v in obj.items() if k not in ("input", "target", "important")}
    raw = None if isinstance(obj["target"], str) else obj["target"]
    return Record(prompt=obj["input"], target=target, important=important, meta=meta, target_json=raw)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r} (JSON would silently keep the last value)")
    return obj


def _decode_lines(path: Path) -> Iterator[tuple[int, str | UnicodeDecodeError]]:
    """``(line number, text)`` per line; a line that is not UTF-8 comes as its error.

    UTF-8 with or without a byte-order mark, and UTF-16 with one (what Windows tools
    write), are read; anything else is reported at its line instead of failing the file.
    """
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise RecordError(f"{path}: starts with a UTF-16 byte-order mark but is not UTF-16 ({e.reason})") from None
        # split on "\n" only: splitlines() would also cut at U+2028 and other characters
        # that may stand raw inside a JSON string
        yield from enumerate((line.rstrip("\r") for line in text.split("\n")), start=1)
        return
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, e


def _check_unicode(obj: Any, depth: int = 0) -> Any:
    """Reject lone surrogates (``"\\ud800"`` parses, but no tokenizer or file can encode
    it) and bring text to NFC, so that an annotation typed in another normalisation form
    than the prompt (e.g. NFD from macOS) still matches it. Refuse nesting deeper than
    ``MAX_DEPTH``."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"contains a lone surrogate ({obj[e.start]!r} at position {e.start} of a string): "
                             "not valid Unicode") from None
        return unicodedata.normalize("NFC", obj) if not obj.isascii() else obj
    if isinstance(obj, list):
        return [_check_unicode(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        out = {_check_unicode(k, depth + 1): _check_unicode(v, depth + 1) for k, v in obj.items()}
        if len(out) != len(obj):
            raise ValueError("two keys differ only in Unicode normalisation (NFC vs NFD)")
        return out
    return obj


def iter_json_lines(path: str | os.PathLike, parse=record_from_json,
                    on_error: str = "raise") -> Iterator[tuple[int, Any]]:
    """``(line number, parse(object))`` for each non-blank line of a JSONL file.

    A line that is not UTF-8 or not JSON, has a duplicate key, or that ``parse`` rejects
    with ``ValueError``, raises RecordError naming the file and the line. With
    ``on_error="skip"`` such lines are left out instead and reported in one warning at the
    end (how many, and where).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    check_is_file(path)
    skipped: list[tuple[int, str]] = []
    for lineno, line in _decode_lines(path):
        if isinstance(line, str) and not line.strip():
            continue
        try:
            record = parse(_parse_line(line))
        except ValueError as e:
            if on_error == "raise":
                raise RecordError(f"{path}:{lineno}: {e}") from None
            skipped.append((lineno, str(e)))
            continue
        yield lineno, record
    if skipped:
        shown = "; ".join(f"line {n}: {why}" for n, why in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d broken record(s): %s", path, len(skipped), shown)


def _parse_line(line: str | UnicodeDecodeError) -> Any:
    if isinstance(line, UnicodeDecodeError):
        raise ValueError(f"not UTF-8 (byte 0x{line.object[line.start]:02x} at column {line.start + 1})")
    return _check_unicode(loads_line(line))


def loads_line(line: str) -> Any:
    """One JSONL line, as strictly as JSON says: ``ValueError`` for a syntax error, a
    duplicate key, NaN or Infinity, or nesting deeper than Python's stack allows."""
    try:
        return json.loads(line, object_pairs_hook=_reject_duplicate_keys, parse_float=_parse_float,
                          parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None


def iter_records(path: str | os.PathLike, with_lines: bool = False, on_error: str = "raise") -> Iterator:
    """Records of a JSONL file, or ``(line number, Record)`` pairs with ``with_lines``."""
    for lineno, record in iter_json_lines(path, on_error=on_error):
        yield (lineno, record) if with_lines else record


def load_records(path: str | os.PathLike, on_error: str = "raise") -> list[Record]:
    """Read a JSONL file of records. A broken line raises RecordError naming file and
    line; ``on_error="skip"`` leaves broken lines out and logs how many and where."""
    return list(iter_records(path, on_error=on_error))


def dumps_record(record: Record) -> str:
    try:
        return json.dumps(record.to_json(), ensure_ascii=False, allow_nan=False)
    except ValueError:  # a NaN set in code: JSON has no way to write it
        raise ValueError(f"record {record.prompt[:40]!r}...: a field holds NaN or Infinity, which JSON cannot hold") from None


def save_records(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write records as JSONL, atomically (temp file + rename)."""
    atomic_write_text(path, "".join(dumps_record(r) + "\n" for r in records))
