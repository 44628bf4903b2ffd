"""The annotation prompt: the system rules, the task's instructions and the demos.

The prompt is a system message (our fixed rules plus the task's instructions), then
each demo as a user turn (the record) and an assistant turn (its annotation as JSON),
then the record to annotate. The model answers ``{KEY: [VALUE, ...]}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import read_text_file
from ..records import Annotation, Record, RecordError, iter_records
from ..shipped import is_builtin, shipped_file
from .replies import check_annotation

SYSTEM_PROMPT = """\
You annotate training records for Causal Attention Tuning. A record is a prompt \
("input") followed by its answer ("target"); a language model reads the text \
input + target from left to right. For spans of that text (KEYS) you list the earlier \
spans (VALUES) that a careful reader must look at to produce the KEY.

Rules:
- Reply with a single JSON object {"KEY": ["VALUE", ...], ...} and nothing else.
- Copy every KEY and VALUE character for character from input + target: same \
spelling, case, spacing and number format.
- Every VALUE must occur in the text before its KEY.
"""


def resolve_file(spec: str | os.PathLike, kind: str) -> Path:
    """A user's path, or ``builtin:NAME`` for a file shipped with cattune.

    ``kind`` is ``"demos"`` (``NAME_demos.jsonl``) or ``"instructions"``
    (``NAME_instructions.md``).
    """
    spec = str(spec)
    if not is_builtin(spec):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file ({kind})")
        return path
    suffix = {"demos": "jsonl", "instructions": "md"}[kind]
    return shipped_file(spec, "annotate", f"{{name}}_{kind}.{suffix}", kind)


def load_instructions(spec: str | os.PathLike) -> str:
    text = read_text_file(resolve_file(spec, "instructions")).strip()
    if not text:
        raise ValueError(f"{spec}: the instructions file is empty")
    return text


def load_demos(spec: str | os.PathLike) -> list[Record]:
    """Read the human-written demos; every pair must pass ``check_annotation``.

    A demo with a pair the pipeline would drop teaches the model to produce it, so a
    bad demo is an error (file:line and the pair), not a warning.
    """
    path = resolve_file(spec, "demos")
    demos = []
    for lineno, record in read_records(path):
        if not record.important:
            raise RecordError(f"{path}:{lineno}: a demo needs a non-empty 'important'")
        checked = check_annotation(record, record.important)
        if checked.dropped or checked.repaired:
            key, value, reason = (checked.dropped or [("?", "?", "needs repair (spacing or case)")])[0]
            raise RecordError(f"{path}:{lineno}: demo pair {key!r} <- {value!r}: {reason}")
        demos.append(record)
    if not demos:
        raise ValueError(f"{path}: no demos in the file")
    return demos


def read_records(path: str | os.PathLike) -> list[tuple[int, Record]]:
    """``(line number, Record)`` for every non-blank line: ids and messages need the line."""
    return list(iter_records(path, with_lines=True))


# --------------------------------------------------------------------------- prompt


def _as_object(annotation: Annotation) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for key, values in annotation:
        bucket = merged.setdefault(key, [])
        bucket.extend(v for v in values if v not in bucket)
    return merged


def format_record(record: Record) -> str:
    # JSON strings make leading/trailing spaces and quotes in the text unambiguous.
    body = json.dumps({"input": record.prompt, "target": record.target}, ensure_ascii=False)
    return f"Record:\n{body}"


def build_messages(record: Record, demos: list[Record], instructions: str = "") -> list[dict[str, str]]:
    system = SYSTEM_PROMPT if not instructions else f"{SYSTEM_PROMPT}\n{instructions}"
    messages = [{"role": "system", "content": system}]
    for demo in demos:
        messages.append({"role": "user", "content": format_record(demo)})
        messages.append({"role": "assistant", "content": json.dumps(_as_object(demo.important), ensure_ascii=False)})
    messages.append({"role": "user", "content": format_record(record)})
    return messages

