"""The annotation output: one JSONL line per record, resumable.

Each record is appended as soon as it is done (one flushed line, with its id in
``cat_id``), so a killed run, started again with the same command, skips what is
already there, repairs a half-written last line and does the rest. When every record
has been tried, the output is rewritten (atomically) in input order.

A run that would drop finished lines (``--overwrite``, or ``--redo-empty`` with empty
records to redo) appends to a work file beside the output instead (``.NAME.partial``)
and replaces the output only when every record has been tried: until then the old
output stays whole, and the same command resumes the work file.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..files import atomic_write_text, check_distinct_paths, check_writable_file
from ..records import Annotation, Record, RecordError, dumps_record, loads_line

ID_KEY = "cat_id"  # meta field holding the record's id in the output
EMPTY_REASON_KEY = "cat_empty_reason"  # meta field saying why an annotation is empty
ID_FIELDS = ("cat_id", "id", "ID")  # tried in this order by --id-field auto
LINE_IDS = ":line"

# --------------------------------------------------------------------------- ids


def _usable_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def assign_ids(items: list[tuple[int, Record]], id_field: str = "auto", path: str | os.PathLike = "input") -> list[Any]:
    """One id per record: ``id_field`` of the record, or its 0-based line index.

    ``"auto"`` takes the first of ``cat_id``, ``id``, ``ID`` that every record has with
    unique values, else the line index; ``":line"`` always takes the line index; any
    other name must be present and unique in every record.
    """
    if id_field == LINE_IDS:
        return [lineno - 1 for lineno, _ in items]
    if id_field == "auto":
        for name in ID_FIELDS:
            ids = [record.meta.get(name) for _, record in items]
            if ids and all(_usable_id(v) for v in ids) and len(set(ids)) == len(ids):
                return ids
        return [lineno - 1 for lineno, _ in items]
    ids, first_line = [], {}
    for lineno, record in items:
        value = record.meta.get(id_field)
        if not _usable_id(value):
            raise RecordError(f"{path}:{lineno}: id field {id_field!r} missing or not a string/integer")
        if value in first_line:
            raise RecordError(f"{path}:{lineno}: duplicate id {value!r} (first on line {first_line[value]})")
        first_line[value] = lineno
        ids.append(value)
    return ids


# --------------------------------------------------------------------------- output file


def report_path_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name((output.stem if output.suffix == ".jsonl" else output.name) + ".report.json")


def lock_path_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


def work_path_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.partial")


def check_paths(inputs: list[tuple[str, str | os.PathLike]], outputs: list[tuple[str, str | os.PathLike]]) -> None:
    """Refuse an output that is another path of the command, or that cannot be written.

    ``inputs`` and ``outputs`` are (option, path) pairs. An output that is also the input,
    the demos or the other output would be silently replaced by it at the end of the run.
    """
    check_distinct_paths({label: [p] for label, p in inputs}, {label: [p] for label, p in outputs})
    for label, path in outputs:
        check_writable_file(path, label)


def output_line(record: Record, record_id: Any, annotation: Annotation, empty_reason: str | None = None) -> str:
    meta = {k: v for k, v in record.meta.items() if k not in (ID_KEY, EMPTY_REASON_KEY)}
    meta[ID_KEY] = record_id
    if not annotation:
        meta[EMPTY_REASON_KEY] = empty_reason or "no annotation"
    return dumps_record(replace(record, important=list(annotation), meta=meta))


class _Resume:
    """What an earlier run left in the output: the complete lines and what to repair."""

    def __init__(self):
        self.done: dict[Any, str] = {}  # id -> its line, first copy only
        self.keep_bytes = 0  # length of the file up to the end of its last complete line
        self.size = 0
        self.tail_kept = False  # the unterminated last line was a whole record
        self.redo: int = 0  # empty annotations dropped for --redo-empty
        self.duplicates = 0
        self.path: Path | None = None  # where this run appends: the output or its work file


def _scan_output(path: Path, prompts: dict[Any, str], input_path: Path, redo_empty: bool) -> _Resume:
    state = _Resume()
    data = path.read_bytes()
    state.size = len(data)
    state.keep_bytes = data.rfind(b"\n") + 1
    complete = data[: state.keep_bytes]
    tail = data[state.keep_bytes :]
    try:
        lines = complete.decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); use --overwrite or another --output") from None

    if tail.strip():
        # An interrupted write leaves a line without its newline: keep it only if whole.
        try:
            obj = loads_line(tail.decode("utf-8"))
            if isinstance(obj, dict) and obj.get(ID_KEY) in prompts and obj.get("input") == prompts[obj[ID_KEY]]:
                lines.append(tail.decode("utf-8"))
                state.tail_kept = True
        except ValueError:  # UnicodeDecodeError is one
            pass

    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = loads_line(line)
        except ValueError as e:
            raise RecordError(
                f"{path}:{lineno}: {e}; only a last line can be left half-written "
                "by an interrupted run, so fix or delete this line (or use --overwrite)"
            ) from None
        record_id = obj.get(ID_KEY) if isinstance(obj, dict) else None
        if record_id is None:
            raise RecordError(f"{path}:{lineno}: no {ID_KEY!r}: not written by cattune annotate; use --overwrite or another --output")
        if not _usable_id(record_id) or record_id not in prompts:
            raise RecordError(
                f"{path}:{lineno}: record id {record_id!r} is not in {input_path}; the output belongs to another "
                "input (or another --id-field): use --overwrite or another --output"
            )
        if obj.get("input") != prompts[record_id]:
            raise RecordError(f"{path}:{lineno}: record id {record_id!r} has another input text than in {input_path}")
        if record_id in state.done:
            state.duplicates += 1
            continue
        if redo_empty and not obj.get("important") and EMPTY_REASON_KEY in obj:
            state.redo += 1
            continue
        state.done[record_id] = line
    return state


def rewrite_in_order(source: Path, order: list[Any], dest: Path | None = None) -> tuple[int, int]:
    """Write ``source``'s lines in input order, one line per id, atomically to ``dest``
    (default: ``source`` itself); returns (records, empty ones)."""
    by_id: dict[Any, str] = {}
    empty = 0
    with source.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                if obj[ID_KEY] not in by_id:
                    by_id[obj[ID_KEY]] = line.rstrip("\n")
                    empty += not obj.get("important")
    atomic_write_text(dest or source, "".join(by_id[i] + "\n" for i in order if i in by_id))
    return len(by_id), empty


def _write_lines(path: Path, ids: list[Any], done: dict[Any, str]) -> None:
    order = {record_id: i for i, record_id in enumerate(ids)}
    atomic_write_text(path, "".join(line + "\n" for _, line in sorted(done.items(), key=lambda kv: order[kv[0]])))


def prepare_output(output_path: Path, input_path: Path, ids: list[Any], prompts: dict[Any, str],
                   overwrite: bool, redo_empty: bool, log: Callable[[str], None]) -> _Resume:
    """Where this run appends (``_Resume.path``) and what is already done there.

    An existing output is checked and repaired for appending; a run that would drop
    finished lines from it works in ``work_path_for(output)`` instead (module docstring).
    """
    output_path.parent.mkdir(parents=True, exist_ok=True)
    work = work_path_for(output_path)
    if work.exists():
        if overwrite or redo_empty:
            try:
                resume = _scan_output(work, prompts, input_path, redo_empty=False)
            except RecordError as e:  # our own scratch file, from another input: start it again
                log(f"{work}: not resumable ({e}); starting it again")
            else:
                if resume.done:
                    log(f"resuming the unfinished run in {work}: {len(resume.done)} of {len(prompts)} records done; "
                        f"{output_path} is replaced when it finishes")
                _write_lines(work, ids, resume.done)
                resume.path = work
                return resume
        else:
            log(f"note: {work} holds an unfinished --overwrite or --redo-empty run; it is left as it is")
    if overwrite:
        atomic_write_text(work, "")
        resume = _Resume()
        resume.path = work
        return resume
    if not output_path.exists():
        output_path.write_text("", encoding="utf-8")
        resume = _Resume()
        resume.path = output_path
        return resume
    resume = _scan_output(output_path, prompts, input_path, redo_empty)
    resume.path = output_path
    if resume.redo:  # the output keeps its empty records until they are redone
        _write_lines(work, ids, resume.done)
        resume.path = work
    elif resume.tail_kept:
        _write_lines(output_path, ids, resume.done)
    elif resume.keep_bytes < resume.size:
        os.truncate(output_path, resume.keep_bytes)
    if resume.keep_bytes < resume.size and not resume.tail_kept:
        log(f"{output_path}: dropped a half-written last line ({resume.size - resume.keep_bytes} bytes); "
            "its record is done again")
    if resume.duplicates:
        log(f"{output_path}: {resume.duplicates} records appear twice; the first copy is kept")
    if resume.done:
        log(f"resuming: {len(resume.done)} of {len(prompts)} records already in {output_path}")
    return resume


class OutputLock:
    """Refuse a second run writing the same output (its final rewrite would lose lines)."""

    def __init__(self, output: Path):
        from filelock import FileLock

        self.path = lock_path_for(output)
        self.lock = FileLock(self.path, timeout=0)

    def __enter__(self):
        from filelock import Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            raise RuntimeError(f"another cattune annotate is writing {self.path.name[1:-5]} (lock {self.path})") from None
        return self

    def __exit__(self, *exc):
        # filelock leaves the file behind on POSIX; a lock file beside the output after
        # the run would look like a run still going.
        self.path.unlink(missing_ok=True)
        self.lock.release()
