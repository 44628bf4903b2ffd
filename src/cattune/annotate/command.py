"""``cattune annotate``: write causal annotations for a JSONL file of records.

Three modes:

- assistant LLM (``--model``, ``--demos``): an OpenAI-compatible chat endpoint annotates
  every record from a few human-written demos (``cattune.annotate.llm``);
- rules (``--rule FILE``): ``RuleAnnotator`` for data whose causal graph is known;
- ``--check``: how many annotated pairs of a file align to a tokenizer's tokens.

Annotating is resumable. Each record is appended to the output as soon as it is done
(one flushed line, with its id in ``cat_id``), so a killed run, started again with the
same command, skips what is already there, repairs a half-written last line and does
the rest. When every record has been tried, the output is rewritten (atomically) in
input order. A report of the run goes next to the output as ``NAME.report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..masks import DEFAULT_SPAN_COLUMNS, SPAN_COLUMNS
from ..files import check_distinct_paths, check_writable_file
from ..records import Annotation, Record, RecordError, atomic_write_text, dumps_record
from .llm import (
    STRUCTURED_MODES,
    EndpointError,
    LLMAnnotator,
    Outcome,
    Redactor,
    RequestFailed,
    Stopped,
    check_annotation,
    load_demos,
    load_instructions,
    make_client,
    read_records,
)

ID_KEY = "cat_id"  # meta field holding the record's id in the output
EMPTY_REASON_KEY = "cat_empty_reason"  # meta field saying why an annotation is empty
ID_FIELDS = ("cat_id", "id", "ID")  # tried in this order by --id-field auto
LINE_IDS = ":line"
# Endpoint failures (errors outlasting retries, rejected requests) in a row that stop a
# run: by then the cause is the setup (URL, model, context size), not one record.
MAX_FAILURES_IN_A_ROW = 3


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
            obj = json.loads(tail.decode("utf-8"))
            if isinstance(obj, dict) and obj.get(ID_KEY) in prompts and obj.get("input") == prompts[obj[ID_KEY]]:
                lines.append(tail.decode("utf-8"))
                state.tail_kept = True
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass

    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); only a last line can be left half-written "
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


def _rewrite_in_order(path: Path, order: list[Any]) -> tuple[int, int]:
    """Rewrite the output in input order, one line per id; returns (records, empty ones)."""
    by_id: dict[Any, str] = {}
    empty = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                if obj[ID_KEY] not in by_id:
                    by_id[obj[ID_KEY]] = line.rstrip("\n")
                    empty += not obj.get("important")
    atomic_write_text(path, "".join(by_id[i] + "\n" for i in order if i in by_id))
    return len(by_id), empty


def _prepare_output(output_path: Path, input_path: Path, ids: list[Any], prompts: dict[Any, str],
                    overwrite: bool, redo_empty: bool, log: Callable[[str], None]) -> _Resume:
    """Start an empty output, or check an existing one and repair it for appending."""
    if overwrite or not output_path.exists():
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_text("", encoding="utf-8")
        return _Resume()
    resume = _scan_output(output_path, prompts, input_path, redo_empty)
    if resume.redo or resume.tail_kept:
        order = {record_id: i for i, record_id in enumerate(ids)}
        kept = sorted(resume.done.items(), key=lambda kv: order[kv[0]])
        atomic_write_text(output_path, "".join(line + "\n" for _, line in kept))
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


class _Lock:
    """Refuse a second run writing the same output (its final rewrite would lose lines)."""

    def __init__(self, output: Path):
        self.path = lock_path_for(output)
        self.handle = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks, nothing to guard with
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise RuntimeError(f"another cattune annotate is writing {self.path.name[1:-5]} (lock {self.path})") from None
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()


# --------------------------------------------------------------------------- pipeline


class _Tally:
    """Counts for the report, updated by the writer thread only."""

    def __init__(self):
        self.annotated = self.empty = self.failed = self.rejected = self.kept_existing = 0
        self.retried = self.requests = self.api_retries = self.bad_replies = 0
        self.pairs_kept = self.repaired = 0
        self.dropped: Counter[str] = Counter()
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.failures: list[dict[str, Any]] = []
        self.failures_in_a_row = 0

    def add(self, outcome: Outcome) -> None:
        self.requests += outcome.requests
        self.api_retries += outcome.api_retries
        self.bad_replies += outcome.bad_replies
        self.retried += outcome.requests > 1
        self.repaired += outcome.repaired
        self.dropped.update(reason for _, _, reason in outcome.dropped)
        for name in ("prompt_tokens", "completion_tokens"):
            n = getattr(outcome, name)
            if n is not None:
                setattr(self, name, (getattr(self, name) or 0) + n)
        if outcome.annotation:
            self.annotated += 1
            self.pairs_kept += sum(len(values) for _, values in outcome.annotation)
        else:
            self.empty += 1
            self.rejected += outcome.rejected

    def tokens(self) -> dict[str, int] | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None  # the endpoint never said
        p, c = self.prompt_tokens or 0, self.completion_tokens or 0
        return {"prompt": p, "completion": c, "total": p + c}

    def as_dict(self) -> dict[str, Any]:
        return {
            "annotated": self.annotated,
            "empty": self.empty,
            "failed": self.failed,
            "rejected": self.rejected,
            "kept_existing": self.kept_existing,
            "retried": self.retried,
            "requests": self.requests,
            "api_retries": self.api_retries,
            "bad_replies": self.bad_replies,
            "pairs_kept": self.pairs_kept,
            "spans_repaired": self.repaired,
            "dropped_spans": {"total": sum(self.dropped.values()), "by_reason": dict(self.dropped.most_common())},
            "tokens": self.tokens(),
            "failures": self.failures[:50],
        }


def _run_workers(annotate: Callable[[Record], Outcome], jobs: list[tuple[int, Record]], concurrency: int,
                 stop: threading.Event, results: queue.Queue) -> None:
    """Start daemon threads that annotate ``jobs``; at most ``concurrency`` run at once.

    Daemon threads, not an executor: after Ctrl-C or a fatal error the process must exit
    now, not after the requests in flight time out. Their results are lost, which is
    fine: those records were not written, so the next run does them.
    """
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)

    def work():
        while not stop.is_set():
            try:
                index, record = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((index, annotate(record), None))
            except BaseException as e:  # handed to the writer thread, which decides
                results.put((index, None, e))

    for _ in range(max(1, min(concurrency, len(jobs)))):
        threading.Thread(target=work, daemon=True, name="cattune-annotate").start()


def annotate_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    annotate: Callable[[Record], Outcome],
    *,
    concurrency: int = 1,
    id_field: str = "auto",
    overwrite: bool = False,
    redo_empty: bool = False,
    keep_existing: bool = False,
    limit: int | None = None,
    progress: bool = True,
    report_path: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
    items: list[tuple[int, Record]] | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> dict[str, Any]:
    """Annotate every record of ``input_path`` into ``output_path``; returns the report.

    ``annotate`` maps a record to an ``Outcome`` (``LLMAnnotator`` does; it may raise
    ``RequestFailed``: the record is left out and counted as failed, or ``EndpointError``:
    the run stops); the dict of its ``report_fields()`` method, if it has one, joins the
    report. Resumes from what ``output_path`` already holds unless ``overwrite``.
    The input is read and checked in full before the output is touched. Setting
    ``stop`` (default: the annotator's ``stop`` event) from another thread ends the run
    early; what is written stays valid for a resume. Messages, empty reasons and the
    report pass through the annotator's ``redact`` (if it has one), so that the API key
    an endpoint echoes is never written.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    report_path = Path(report_path) if report_path else report_path_for(output_path)
    check_paths([("--input", input_path)],
                [("--output", output_path), ("--report", report_path), ("lock file", lock_path_for(output_path))])
    if concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    redact: Callable[[str], str] = getattr(annotate, "redact", None) or (lambda text: text)
    items = read_records(input_path) if items is None else items
    ids = assign_ids(items, id_field, input_path)
    prompts = {record_id: record.prompt for record_id, (_, record) in zip(ids, items)}
    # The annotator's own event, so that stopping the run also cuts its backoff sleeps.
    stop = stop or getattr(annotate, "stop", None) or threading.Event()
    stop.clear()
    started = time.monotonic()

    with _Lock(output_path):
        resume = _prepare_output(output_path, input_path, ids, prompts, overwrite, redo_empty, log)
        selected = items if limit is None else items[:limit]
        jobs, passthrough = [], []
        for index, (record_id, (_, record)) in enumerate(zip(ids, selected)):
            if record_id in resume.done:
                continue
            (passthrough if keep_existing and record.important else jobs).append((index, record))

        tally = _Tally()
        finished = False
        try:
            with output_path.open("a", encoding="utf-8") as out:

                def write(index: int, record: Record, annotation: Annotation, reason: str | None = None) -> None:
                    reason = redact(reason) if reason else reason
                    out.write(output_line(record, ids[index], annotation, reason) + "\n")
                    out.flush()  # a kill loses at most the records in flight

                for index, record in passthrough:
                    write(index, record, record.important)
                    tally.kept_existing += 1
                finished = _annotate_jobs(jobs, annotate, write, tally, concurrency, stop, progress, items)
        finally:
            if finished:
                n_out, n_empty = _rewrite_in_order(output_path, ids)
            else:
                n_out, n_empty = len(resume.done) + tally.annotated + tally.empty + tally.kept_existing, None
            report = {
                "input": str(input_path),
                "output": str(output_path),
                **(settings or {}),
                "records": len(items),
                "already_done": len(resume.done),
                **tally.as_dict(),
                "output_records": n_out,
                "output_empty": n_empty,
                "complete": finished and n_out == len(items),
                "stopped_early": not finished,
                "elapsed_s": round(time.monotonic() - started, 3),
                "report": str(report_path),
            }
            # What the annotator settled on during the run (e.g. the response_format it fell back to).
            if callable(report_fields := getattr(annotate, "report_fields", None)):
                report.update(report_fields())
            atomic_write_text(report_path, redact(json.dumps(report, indent=2, ensure_ascii=False)) + "\n")
    return report


def _annotate_jobs(jobs, annotate, write, tally: _Tally, concurrency: int, stop: threading.Event,
                   progress: bool, items) -> bool:
    """Hand ``jobs`` to the workers and write each result as it comes; False if stopped."""
    from tqdm import tqdm

    results: queue.Queue = queue.Queue()
    _run_workers(annotate, jobs, concurrency, stop, results)
    bar = tqdm(total=len(jobs), desc="annotate", unit="rec", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for _ in range(len(jobs)):
            while True:
                try:
                    index, outcome, error = results.get(timeout=0.2)
                    break
                except queue.Empty:
                    if stop.is_set():  # stopped from outside: the workers took no new job
                        return False
            record = items[index][1]
            if isinstance(error, Stopped):
                continue  # not written, not a failure: the next run does it
            if error is not None:
                if isinstance(error, RequestFailed):
                    tally.failed += 1
                    tally.failures.append({"line": items[index][0], "error": str(error) or type(error).__name__})
                    tally.failures_in_a_row += 1
                else:
                    raise error
            else:
                tally.add(outcome)
                write(index, record, outcome.annotation, outcome.empty_reason)
                tally.failures_in_a_row = tally.failures_in_a_row + 1 if outcome.rejected else 0
                if outcome.rejected:
                    tally.failures.append({"line": items[index][0], "error": outcome.empty_reason})
            if tally.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise RuntimeError(
                    f"{tally.failures_in_a_row} records in a row failed at the endpoint, the last with: "
                    f"{tally.failures[-1]['error']}; stopping (what is done is kept, run again to resume)"
                )
            bar.update(1)
            bar.set_postfix(empty=tally.empty, failed=tally.failed, refresh=False)
    except BaseException:
        stop.set()  # workers still running give up at their next request or backoff
        raise
    finally:
        bar.close()
    return True


def _rules_annotator(rules) -> Callable[[Record], Outcome]:
    def annotate(record: Record) -> Outcome:
        checked = check_annotation(record, rules.annotate(record), dedupe=False)
        reason = None if checked.kept else "the rules matched nothing usable"
        return Outcome(annotation=checked.kept, empty_reason=reason, dropped=checked.dropped, repaired=checked.repaired)

    return annotate


# --------------------------------------------------------------------------- --check


def check_alignment(items: list[tuple[int, Record]], tokenizer, max_length: int | None = None,
                    span_columns: str = DEFAULT_SPAN_COLUMNS, examples: int = 3) -> dict[str, Any]:
    """How many annotated (key, value) pairs land on tokens, and why the others do not."""
    from ..masks import encode_record

    pairs = aligned = annotated = 0
    reasons: Counter[str] = Counter()
    shown: dict[str, list[dict[str, Any]]] = {}
    for lineno, record in items:
        if not record.important:
            continue
        annotated += 1
        encoded = encode_record(tokenizer, record, max_length=max_length, span_columns=span_columns)
        pairs += encoded.n_pairs
        aligned += encoded.n_pairs - len(encoded.unaligned)
        for key, value, reason in encoded.unaligned:
            reasons[reason] += 1
            if len(shown.setdefault(reason, [])) < examples:
                shown[reason].append({"line": lineno, "key": key, "value": value})
    return {
        "records": len(items),
        "annotated_records": annotated,
        "pairs": pairs,
        "aligned": aligned,
        "unaligned": pairs - aligned,
        "by_reason": dict(reasons.most_common()),
        "examples": shown,
    }


def _load_tokenizer(args, items):
    if args.tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer, use_fast=True), args.tokenizer
    from ..tiny import train_tokenizer

    texts = [record.text for _, record in items]
    return train_tokenizer(texts, kind=args.tokenizer_kind), f"{args.tokenizer_kind} BPE trained on the input"


def _run_check(args) -> int:
    items = read_records(args.input)
    tokenizer, name = _load_tokenizer(args, items)
    result = check_alignment(items, tokenizer, args.max_length, args.span_columns)
    result["tokenizer"] = name
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        share = f" ({100 * result['aligned'] / result['pairs']:.1f}%)" if result["pairs"] else ""
        print(f"tokenizer: {name}")
        print(f"records:   {result['records']} ({result['annotated_records']} annotated)")
        print(f"pairs:     {result['pairs']} annotated, {result['aligned']} aligned to tokens{share}")
        if result["by_reason"]:
            print("not aligned, by reason:")
            for reason, n in result["by_reason"].items():
                e = result["examples"][reason][0]
                print(f"  {n:6d}  {reason:<30} e.g. line {e['line']}: {e['key']!r} <- {e['value']!r}")
    return 1 if args.strict and result["unaligned"] else 0


# --------------------------------------------------------------------------- CLI


def _float_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cattune annotate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write causal annotations ('important': KEY <- VALUES) for a JSONL file of records.\n\n"
            "  LLM:    cattune annotate --input IN --output OUT --model NAME --demos builtin:math "
            "[--base-url URL]\n"
            "  rules:  cattune annotate --input IN --output OUT --rule RULES.json\n"
            "  check:  cattune annotate --check --input FILE [--tokenizer PATH]\n\n"
            "An interrupted run is resumed by running the same command again. See docs/annotate.md."
        ),
    )
    io = p.add_argument_group("files")
    io.add_argument("--input", required=True, metavar="FILE", help="JSONL records: 'input', 'target', optional 'important'")
    io.add_argument("--output", metavar="FILE", help="JSONL to write (appended record by record, resumed if it exists); "
                    "required except with --check and --show-prompt")
    io.add_argument("--report", metavar="FILE", help="where to write the run's JSON report (default: OUTPUT with "
                    "'.jsonl' replaced by '.report.json')")

    mode = p.add_argument_group("mode (default: assistant LLM)")
    mode.add_argument("--rule", metavar="FILE", help="annotate with rules instead of an LLM: JSON/YAML, "
                      '{"key": "{target}", "values": [REGEX, ...]} or a list of them')
    mode.add_argument("--check", action="store_true", help="only report how many annotated pairs of --input align "
                      "to tokens, by reason; writes nothing")

    llm = p.add_argument_group("assistant LLM (any OpenAI-compatible chat endpoint)")
    llm.add_argument("--base-url", metavar="URL", help="endpoint, e.g. http://localhost:8000/v1 for vLLM or "
                     "http://localhost:11434/v1 for Ollama (default: $OPENAI_BASE_URL, else OpenAI's)")
    llm.add_argument("--model", metavar="NAME", help="model name the endpoint serves (required in LLM mode)")
    llm.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                     help="environment variable holding the API key; the key is never printed or written. "
                     "A variable named here must be set; the default may be unset, then a placeholder is sent, "
                     "as local servers need no key (default: %(default)s)")
    llm.add_argument("--demos", metavar="FILE", help="JSONL of human-annotated demo records, or builtin:math "
                     "(shipped math word problems); every demo pair must be valid (default: none, zero-shot)")
    llm.add_argument("--instructions", default="builtin:generic", metavar="FILE",
                     help="task instructions (Markdown), or builtin:generic / builtin:math (default: %(default)s)")
    llm.add_argument("--temperature", metavar="T", type=_float_or_none, default=0.9,
                     help="sampling temperature; 'none' sends none, for models that refuse it "
                     "(default: %(default)s, as the paper's release)")
    llm.add_argument("--top-p", metavar="P", type=_float_or_none, default=0.7,
                     help="nucleus sampling top_p; 'none' sends none (default: %(default)s, as the paper's release)")
    llm.add_argument("--max-tokens", metavar="N", type=int, default=1024,
                     help="reply length limit (max_tokens); 0 sends none (default: %(default)s)")
    llm.add_argument("--structured", choices=STRUCTURED_MODES, default="auto",
                     help="ask for replies matching a JSON schema of the annotation (response_format json_schema): "
                     "'auto' sends it and, if the endpoint refuses it, drops it for the rest of the run; 'on' stops "
                     "the run on a refusal; 'off' never sends it. Replies are parsed the same way in every mode, "
                     "as some servers accept the field and ignore it (default: %(default)s)")
    llm.add_argument("--json-mode", action="store_true", help="ask for response_format json_object whenever "
                     "json_schema is not sent (--structured off, or after an 'auto' fallback); OpenAI, vLLM and "
                     "Ollama support it (default: off)")
    llm.add_argument("--timeout", metavar="SECONDS", type=_positive_seconds, default=120.0, help="seconds before a request counts as timed out "
                     "and is retried (default: %(default)s)")
    llm.add_argument("--concurrency", metavar="N", type=int, default=4, help="requests in flight at once (default: %(default)s)")
    llm.add_argument("--max-retries", metavar="N", type=int, default=6, help="retries of a request after 429, 5xx, timeout or "
                     "connection errors; then the record is left out and reported as failed (default: %(default)s)")
    llm.add_argument("--backoff-base", metavar="SECONDS", type=float, default=1.0, help="seconds before the first retry, doubled each "
                     "time, with jitter; a Retry-After header is honoured (default: %(default)s)")
    llm.add_argument("--backoff-max", metavar="SECONDS", type=float, default=60.0, help="longest wait between retries, in seconds (default: %(default)s)")
    llm.add_argument("--reply-retries", metavar="N", type=int, default=2, help="times a record is asked again when the reply is "
                     "unparseable or has no valid pair; then it is written with an empty annotation and the reason "
                     "in 'cat_empty_reason' (default: %(default)s)")
    llm.add_argument("--show-prompt", action="store_true", help="print the chat messages for the first record "
                     "and exit, without any request")

    run = p.add_argument_group("run control")
    run.add_argument("--id-field", default="auto", metavar="NAME", help="input field holding a unique record id, "
                     "stored as 'cat_id' in the output; 'auto' takes cat_id, id or ID when every record has a "
                     "unique one, else the 0-based line index; ':line' forces the line index (default: %(default)s)")
    run.add_argument("--overwrite", action="store_true", help="start from scratch instead of resuming an existing output")
    run.add_argument("--redo-empty", action="store_true", help="when resuming, annotate again the records written "
                     "with an empty annotation")
    run.add_argument("--keep-existing", action="store_true", help="copy records that already have an 'important' "
                     "instead of annotating them again")
    run.add_argument("--limit", type=int, metavar="N", help="annotate only the first N records (try a prompt cheaply; "
                     "default: all)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    chk = p.add_argument_group("--check")
    chk.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory or Hub name for AutoTokenizer "
                     "(default: a BPE tokenizer trained on the input, see --tokenizer-kind)")
    chk.add_argument("--tokenizer-kind", choices=("bytelevel", "metaspace"), default="bytelevel",
                     help="kind of tokenizer trained when --tokenizer is not given (default: %(default)s)")
    chk.add_argument("--max-length", metavar="N", type=int, help="truncate records to this many tokens, as training would "
                     "(default: no limit)")
    chk.add_argument("--span-columns", choices=SPAN_COLUMNS, default=DEFAULT_SPAN_COLUMNS,
                     help="which tokens of a value become columns, as in training (default: %(default)s)")
    chk.add_argument("--json", action="store_true", help="print the result as JSON")
    chk.add_argument("--strict", action="store_true", help="exit with status 1 if any pair does not align")
    return p


def _base_url(args) -> str:
    return args.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"


def _settings(args, redact: Redactor) -> dict[str, Any]:
    if args.rule:
        return {"mode": "rules", "rules": args.rule}
    return {
        "mode": "llm",
        "base_url": redact.url(_base_url(args)),
        "model": args.model,
        "demos": args.demos,
        "instructions": args.instructions,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens or None,
        "json_mode": args.json_mode,
        "structured": args.structured,
    }


def _summary(report: dict[str, Any]) -> str:
    dropped = report["dropped_spans"]
    reasons = ", ".join(f"{reason} {n}" for reason, n in dropped["by_reason"].items())
    lines = [
        f"annotated {report['annotated']} records ({report['retried']} retried), {report['empty']} empty, "
        f"{report['failed']} failed; {report['already_done']} were already done",
        f"dropped spans: {dropped['total']}" + (f" ({reasons})" if reasons else ""),
    ]
    if report.get("structured_fallback"):
        sent = report.get("response_format") or "none"
        lines.append(f"structured output: the endpoint refused response_format json_schema "
                     f"({report['structured_fallback']}); sent {sent} instead")
    if report["tokens"]:
        t = report["tokens"]
        lines.append(f"tokens: {t['prompt']} prompt + {t['completion']} completion = {t['total']}")
    lines.append(f"output: {report['output']} ({report['output_records']} of {report['records']} records)")
    lines.append(f"report: {report['report']}")
    return "\n".join(lines)


def _note(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)  # above the progress bar, not through it


def _os_error(e: OSError) -> str:
    if e.filename is None:
        return str(e)
    return f"{e.filename}: {e.strerror or e}"


def run(args) -> int:
    """``cattune annotate``; every error is one line (``ValueError``/``RuntimeError``), secrets redacted."""
    # Built from the arguments, before any client: a message about a bad URL may quote it.
    redact = Redactor.for_endpoint(os.environ.get(args.api_key_env), _base_url(args))
    try:
        return _run(args, redact)
    except BrokenPipeError:
        raise
    except OSError as e:  # a file that cannot be read or written, found mid-run: no traceback
        raise RuntimeError(redact(_os_error(e))) from None
    except (ValueError, RuntimeError) as e:
        message = redact(str(e))
        if message == str(e):
            raise
        raise (ValueError if isinstance(e, ValueError) else RuntimeError)(message) from None


def _run(args, redact: Redactor) -> int:
    if args.check:
        return _run_check(args)
    if args.rule and (args.model or args.demos):
        raise ValueError("--rule annotates without an LLM: drop --model/--demos, or drop --rule")
    if not args.rule and not args.model:
        raise ValueError("give --model (assistant LLM, with --demos), --rule FILE, or --check")
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit must be >= 0")
    if args.output:
        # Before anything is read or sent: a report written over the output, the input or
        # the demos would replace it at the very end of a paid-for run. annotate_file
        # checks its own paths again, but knows nothing of the demos or the rules.
        inputs = [("--input", args.input)] + [
            (option, path) for option, path in (("--demos", args.demos), ("--instructions", args.instructions),
                                                 ("--rule", args.rule))
            if path and not str(path).startswith("builtin:")
        ]
        report = args.report or report_path_for(args.output)
        outputs = [("--output", args.output), ("--report", report), ("lock file", lock_path_for(args.output))]
        check_paths(inputs, outputs)

    # Everything is read and checked before the output is touched.
    items = read_records(args.input)
    if args.rule:
        from .rules import load_rules

        annotate: Callable[[Record], Outcome] = _rules_annotator(load_rules(args.rule))
        concurrency = 1
    else:
        demos = load_demos(args.demos) if args.demos else []
        if not demos:
            print("note: no --demos, the model annotates from the instructions alone (zero-shot); "
                  "a few demos usually give much better annotations", file=sys.stderr)
        instructions = load_instructions(args.instructions)
        # A variable the user named must hold a key; the default may be unset for local servers.
        client = make_client(args.base_url, args.api_key_env, args.timeout, require_key=args.api_key_env != "OPENAI_API_KEY")
        annotate = LLMAnnotator(
            client, args.model, demos, instructions,
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens or None,
            json_mode=args.json_mode, structured=args.structured, reply_retries=args.reply_retries,
            max_retries=args.max_retries, backoff_base=args.backoff_base, backoff_max=args.backoff_max,
            log=_note,
        )
        concurrency = args.concurrency
        if args.show_prompt:
            if not items:
                raise ValueError(f"{args.input}: no records")
            print(json.dumps(annotate.messages(items[0][1]), indent=2, ensure_ascii=False))
            return 0
    if not args.output:
        raise ValueError("--output is required")

    stop = getattr(annotate, "stop", None)
    try:
        report = annotate_file(
            args.input, args.output, annotate,
            concurrency=concurrency, id_field=args.id_field, overwrite=args.overwrite,
            redo_empty=args.redo_empty, keep_existing=args.keep_existing, limit=args.limit,
            progress=not args.no_progress, report_path=args.report, settings=_settings(args, redact),
            stop=stop, items=items,
        )
    except EndpointError as e:
        raise RuntimeError(f"{e} (what is done is kept; run again to resume)") from None
    print(redact(_summary(report)))
    if report["failed"]:
        print(f"{report['failed']} records failed on endpoint errors and are not in the output; "
              "run the same command again to retry them", file=sys.stderr)
        return 3
    return 0
