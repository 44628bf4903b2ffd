"""``cattune annotate``: write causal annotations for a JSONL file of records.

Three modes:

- assistant LLM (``--model``, ``--demos``): an OpenAI-compatible chat endpoint annotates
  every record from a few human-written demos (``cattune.annotate.llm``);
- rules (``--rule FILE``): ``RuleAnnotator`` for data whose causal graph is known;
- ``--check``: how many annotated pairs of a file align to a tokenizer's tokens.

Annotating is resumable (``cattune.annotate.pipeline``): a killed run, started again
with the same command, does what is left. A report of the run goes next to the output
as ``NAME.report.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from typing import Any, Callable

from ..annotate.llm import (
    MAX_RETRIES, MAX_WAIT_S, STRUCTURED_MODES, EndpointError, LLMAnnotator, Outcome, make_client,
)
from ..annotate.output import check_paths, lock_path_for, report_path_for, work_path_for
from ..annotate.pipeline import annotate_file, check_alignment, rules_annotator
from ..annotate.prompt import load_demos, load_instructions, read_records
from ..annotate.secrets import Redactor
from ..masks import DEFAULT_MAX_LENGTH, DEFAULT_SPAN_COLUMNS, SPAN_COLUMNS
from ..reading import saved_reading
from ..records import Record
from .common import number_option

def _load_tokenizer(args, items):
    if args.tokenizer:
        from transformers import AutoTokenizer

        from ..models import resolve_model

        return AutoTokenizer.from_pretrained(resolve_model(args.tokenizer), use_fast=True), args.tokenizer
    from ..tiny import train_tokenizer

    texts = [record.text for _, record in items]
    tokenizer = train_tokenizer(texts, kind=args.tokenizer_kind, individual_digits=True)
    return tokenizer, f"{args.tokenizer_kind} BPE trained on the input"


def _run_check(args) -> int:
    items = read_records(args.input)
    tokenizer, name = _load_tokenizer(args, items)
    reading = saved_reading(args.tokenizer, chat_template=args.chat_template, span_columns=args.span_columns,
                            max_length=args.max_length, default_max_length=DEFAULT_MAX_LENGTH)
    result = check_alignment(items, tokenizer, reading)
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
    llm.add_argument("--temperature", metavar="T", type=number_option(float, low=0, high=2, none=True), default=0.9,
                     help="sampling temperature; 'none' sends none, for models that refuse it "
                     "(default: %(default)s, as the paper's release)")
    llm.add_argument("--top-p", metavar="P", type=number_option(float, low=0, high=1, none=True), default=0.7,
                     help="nucleus sampling top_p; 'none' sends none (default: %(default)s, as the paper's release)")
    llm.add_argument("--max-tokens", metavar="N", type=number_option(int), default=1024,
                     help="reply length limit (max_tokens); 0 sends none (default: %(default)s)")
    llm.add_argument("--structured", choices=STRUCTURED_MODES, default="auto",
                     help="ask for replies matching a JSON schema of the annotation (response_format json_schema): "
                     "'auto' sends it and, if the endpoint refuses it, drops it for the rest of the run; 'on' stops "
                     "the run on a refusal; 'off' never sends it. Replies are parsed the same way in every mode, "
                     "as some servers accept the field and ignore it (default: %(default)s)")
    llm.add_argument("--json-mode", action="store_true", help="ask for response_format json_object whenever "
                     "json_schema is not sent (--structured off, or after an 'auto' fallback); OpenAI, vLLM and "
                     "Ollama support it (default: off)")
    llm.add_argument("--timeout", metavar="SECONDS", type=number_option(float, strict=True, high=MAX_WAIT_S, unit=" of seconds"), default=120.0, help="seconds before a request counts as timed out "
                     "and is retried (default: %(default)s)")
    llm.add_argument("--concurrency", metavar="N", type=number_option(int, low=1, high=1024), default=4, help="requests in flight at once (default: %(default)s)")
    llm.add_argument("--max-retries", metavar="N", type=number_option(int, high=MAX_RETRIES), default=6, help="retries of a request after 429, 5xx, timeout or "
                     "connection errors; then the record is left out and reported as failed (default: %(default)s)")
    llm.add_argument("--backoff-base", metavar="SECONDS", type=number_option(float, high=MAX_WAIT_S, unit=" of seconds"), default=1.0, help="seconds before the first retry, doubled each "
                     "time, with jitter; a Retry-After header is honoured (default: %(default)s)")
    llm.add_argument("--backoff-max", metavar="SECONDS", type=number_option(float, high=MAX_WAIT_S, unit=" of seconds"), default=60.0, help="longest wait between retries, in seconds (default: %(default)s)")
    llm.add_argument("--reply-retries", metavar="N", type=number_option(int, high=MAX_RETRIES), default=2, help="times a record is asked again when the reply is "
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
    run.add_argument("--limit", type=number_option(int), metavar="N", help="annotate only the first N records (try a prompt cheaply; "
                     "default: all)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    chk = p.add_argument_group("--check")
    chk.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory, Hub name or builtin:NAME model (e.g. builtin:smollm2-135m-instruct) "
                     "(default: a BPE tokenizer trained on the input, see --tokenizer-kind)")
    chk.add_argument("--tokenizer-kind", choices=("bytelevel", "metaspace"), default="bytelevel",
                     help="kind of tokenizer trained when --tokenizer is not given (default: %(default)s)")
    chk.add_argument("--max-length", metavar="N", type=number_option(int, low=1), default=None,
                     help="truncate records to this many tokens, as training does (default: as the --tokenizer "
                     f"model was trained (its cattune.json), else training's default, {DEFAULT_MAX_LENGTH})")
    chk.add_argument("--span-columns", choices=SPAN_COLUMNS, default=None,
                     help="which tokens of a value become columns, as in training (default: as the --tokenizer "
                     f"model was trained, else {DEFAULT_SPAN_COLUMNS})")
    chk.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                     help="records through the tokenizer's chat template, as training with chat_template does "
                     "(default: as the --tokenizer model was trained, else off)")
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


@contextlib.contextmanager
def _redacting(redact: Redactor):
    """Warnings and log records pass through ``redact`` while the command runs: libraries
    print what a server sent (pydantic's warning quoting a field, httpx's request line
    with the URL's query), past every message this command builds itself."""
    show, make_record = warnings.showwarning, logging.getLogRecordFactory()

    def showwarning(message, category, filename, lineno, file=None, line=None):
        show(redact(str(message)), category, filename, lineno, file, line)

    def factory(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            record.msg, record.args = redact(record.getMessage()), None
        except (TypeError, ValueError):  # arguments that do not fit the format: logging says so when it emits
            pass
        return record

    warnings.showwarning = showwarning
    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        warnings.showwarning = show
        logging.setLogRecordFactory(make_record)


def run(args) -> int:
    """``cattune annotate``; every error is one line (``ValueError``/``RuntimeError``), secrets redacted."""
    # Built from the arguments, before any client: a message about a bad URL may quote it.
    redact = Redactor.for_endpoint(os.environ.get(args.api_key_env), _base_url(args))
    try:
        with _redacting(redact):
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
        outputs = [("--output", args.output), ("--report", report), ("lock file", lock_path_for(args.output)),
                   ("work file", work_path_for(args.output))]
        check_paths(inputs, outputs)

    # Everything is read and checked before the output is touched.
    items = read_records(args.input)
    if args.rule:
        from ..annotate.rules import load_rules

        annotate: Callable[[Record], Outcome] = rules_annotator(load_rules(args.rule))
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
