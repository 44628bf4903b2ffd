"""``annotate_file``: every record of a JSONL file through an annotator, resumably.

Worker threads call the annotator (an ``LLMAnnotator``, or rules); one writer appends
each result to the output (``cattune.annotate.output``) and counts it for the report,
which goes next to the output as ``NAME.report.json``. ``check_alignment`` says how
many annotated pairs of a file land on a tokenizer's tokens.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..files import atomic_write_text
from ..reading import Reading
from ..records import Annotation, Record
from .llm import Outcome, RequestFailed, Stopped
from .output import (
    OutputLock, assign_ids, check_paths, lock_path_for, output_line, prepare_output, report_path_for, rewrite_in_order,
    work_path_for,
)
from .prompt import read_records
from .replies import check_annotation
from .secrets import Redactor

# Endpoint failures (errors outlasting retries, rejected requests) in a row that stop a
# run: by then the cause is the setup (URL, model, context size), not one record.
MAX_FAILURES_IN_A_ROW = 3


class _Tally:
    """Counts for the report, updated by the writer thread only."""

    def __init__(self):
        self.annotated = self.empty = self.failed = self.rejected = self.kept_existing = 0
        self.retried = self.requests = self.api_retries = self.bad_replies = self.bad_usage = 0
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
        self.bad_usage += outcome.bad_usage
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
            "replies_with_bad_usage": self.bad_usage,  # token counts that were not counts, left out of "tokens"
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
                [("--output", output_path), ("--report", report_path), ("lock file", lock_path_for(output_path)),
                 ("work file", work_path_for(output_path))])
    if concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    redact: Redactor = getattr(annotate, "redact", None) or Redactor()
    items = read_records(input_path) if items is None else items
    ids = assign_ids(items, id_field, input_path)
    prompts = {record_id: record.prompt for record_id, (_, record) in zip(ids, items)}
    # The annotator's own event, so that stopping the run also cuts its backoff sleeps.
    stop = stop or getattr(annotate, "stop", None) or threading.Event()
    stop.clear()
    started = time.monotonic()

    with OutputLock(output_path):
        resume = prepare_output(output_path, input_path, ids, prompts, overwrite, redo_empty, log)
        selected = items if limit is None else items[:limit]
        jobs, passthrough = [], []
        for index, (record_id, (_, record)) in enumerate(zip(ids, selected)):
            if record_id in resume.done:
                continue
            (passthrough if keep_existing and record.important else jobs).append((index, record))

        tally = _Tally()
        finished = False
        try:
            with resume.path.open("a", encoding="utf-8") as out:

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
                n_out, n_empty = rewrite_in_order(resume.path, ids, output_path)
                if resume.path != output_path:
                    resume.path.unlink()
            else:
                n_out, n_empty = len(resume.done) + tally.annotated + tally.empty + tally.kept_existing, None
            report = {
                "input": str(input_path),
                "output": str(output_path),
                # Stopped early with --overwrite or --redo-empty: the output is untouched, this run's records are here.
                **({"partial_output": str(resume.path)} if not finished and resume.path != output_path else {}),
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
            atomic_write_text(report_path, json.dumps(redact.values(report), indent=2, ensure_ascii=False) + "\n")
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


def rules_annotator(rules) -> Callable[[Record], Outcome]:
    def annotate(record: Record) -> Outcome:
        checked = check_annotation(record, rules.annotate(record), dedupe=False)
        reason = None if checked.kept else "the rules matched nothing usable"
        return Outcome(annotation=checked.kept, empty_reason=reason, dropped=checked.dropped, repaired=checked.repaired)

    return annotate



def check_alignment(items: list[tuple[int, Record]], tokenizer, reading: Reading, examples: int = 3) -> dict[str, Any]:
    """How many annotated (key, value) pairs land on tokens, and why the others do not,
    the records read as training reads them (``reading``: e.g. ``CATConfig().reading``)."""
    pairs = aligned = annotated = 0
    reasons: Counter[str] = Counter()
    shown: dict[str, list[dict[str, Any]]] = {}
    for lineno, record in items:
        if not record.important:
            continue
        annotated += 1
        encoded = reading.encode(tokenizer, record)
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
