"""``cattune annotate`` against hostile endpoints and hostile paths.

The fake endpoint (``fake_openai``, tests/fake_openai.py) answers each request with
whatever a test scripts: bodies that are not JSON, JSON that is not a chat completion,
message contents that are not text, errors that echo the request's credentials. The CLI
runs in a subprocess, so a traceback or a leaked secret on stderr is seen as a user would
see it; further variants of a case run in-process (``cli.main``), as each interpreter
takes seconds to import.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_openai import as_json, completion
from test_annotate import make_records, read_jsonl, write_jsonl

from cattune import cli
from cattune.annotate.llm import make_client
from cattune.annotate.prompt import resolve_file
from cattune.annotate.replies import ReplyError, parse_reply
from cattune.annotate.secrets import Redactor

FAST = ["--backoff-base", "0.01", "--backoff-max", "0.05", "--timeout", "5", "--no-progress"]
KEY = "sk-test-echoed-9f3c2a7b"  # what the endpoint sees in Authorization
QUERY_KEY = "q-secret-51d0e8"  # a credential in the base URL's query


def cattune(*argv, cwd=None, timeout=120, key=KEY):
    """``cattune annotate ARGV`` in a subprocess: (exit status, stdout, stderr, seconds)."""
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", CATTUNE_TEST_KEY=key)
    env.pop("OPENAI_BASE_URL", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cattune.cli", "annotate", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


@pytest.fixture
def in_process(monkeypatch, capsys):
    """``cattune`` without a new interpreter (whose imports take seconds), for the variants
    of a case that a subprocess run already covers; an exception fails the test."""

    def run(*argv, cwd=None, timeout=None, key=KEY):
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("CATTUNE_TEST_KEY", key)
        monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        started = time.monotonic()
        try:
            code = cli.main(["annotate", *map(str, argv)])
        except SystemExit as e:  # argparse
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err, time.monotonic() - started

    return run


def llm(url, inp, out, *extra):
    return ["--input", inp, "--output", out, "--base-url", url, "--model", "m", "--demos", "builtin:math",
            "--api-key-env", "CATTUNE_TEST_KEY", *FAST, *extra]


def one_line_error(err):
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cattune annotate: error: "), err
    return lines[0]


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- 1: paths that collide


@pytest.mark.parametrize("case", [
    "report is output", "report is ./output", "report is a link to output", "report is input",
    "report is the demos", "output is the demos", "output is a link to input",
])
def test_an_output_path_that_is_another_path_of_the_command_is_refused(fake_openai, in_process, tmp_path, case):
    records, answers = make_records(2)
    server = fake_openai(answers)
    write_jsonl(tmp_path / "in.jsonl", records)
    demos = tmp_path / "demos.jsonl"
    demos.write_text(resolve_file("builtin:math", "demos").read_text())
    (tmp_path / "out.jsonl").write_text("")
    os.symlink("out.jsonl", tmp_path / "out-link.json")
    os.symlink("in.jsonl", tmp_path / "in-link.jsonl")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    output, report = {
        "report is output": ("out.jsonl", "out.jsonl"),
        "report is ./output": ("out.jsonl", "./out.jsonl"),
        "report is a link to output": ("out.jsonl", "out-link.json"),
        "report is input": ("out.jsonl", str(tmp_path / "in.jsonl")),
        "report is the demos": ("out.jsonl", "demos.jsonl"),
        "output is the demos": ("demos.jsonl", "r.json"),
        "output is a link to input": ("in-link.jsonl", "r.json"),
    }[case]
    argv = llm(server.url, "in.jsonl", output, "--report", report, "--overwrite")
    argv[argv.index("builtin:math")] = "demos.jsonl"
    run = cattune if case == "report is output" else in_process
    code, _, err, _ = run(*argv, cwd=tmp_path)
    assert code in (1, 2)
    assert "is the same file as" in one_line_error(err)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written or replaced
    assert not server.requests


# --------------------------------------------------------------------------- 6: secrets


def echo_auth(status):
    """An error answer that repeats the request's credentials, as some gateways do."""
    def behaviour(request):
        message = f"bad request headers: Authorization: {request['auth']} (url {request['path']})"
        return as_json(status, {"error": {"message": message, "type": "invalid_request_error"}})
    return behaviour


def echo_auth_as_text(request):
    return 200, "text/plain", f"debug: Authorization={request['auth']}".encode()


def test_the_key_and_url_credentials_echoed_by_the_endpoint_are_never_written_or_printed(fake_openai, tmp_path):
    records, answers = make_records(4)
    prompts = [r["input"] for r in records]
    server = fake_openai(answers, {
        prompts[0]: [echo_auth(400)],  # rejected: written empty with the error as the reason
        prompts[1]: [echo_auth(500)] * 2,  # fails after the retries: in the report's failures
        prompts[2]: [echo_auth_as_text] * 3,  # bad replies: written empty with the reply's start
    })
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    url = f"{server.url}?api-key={QUERY_KEY}"

    code, stdout, stderr, _ = cattune(*llm(url, inp, out, "--concurrency", "1", "--max-retries", "1"))
    assert code == 3, stderr
    assert "Traceback" not in stderr
    assert server.auth == {f"Bearer {KEY}"}  # the key was sent, then echoed back
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    for secret in (KEY, QUERY_KEY):
        assert secret not in written + stdout + stderr
    lines = {line["cat_id"]: line for line in read_jsonl(out)}
    assert lines[0]["cat_empty_reason"].startswith("request rejected: HTTP 400")
    assert "Bearer ***" in lines[0]["cat_empty_reason"]
    assert "Bearer ***" in lines[2]["cat_empty_reason"] and "important" in lines[3]
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert [f["line"] for f in report["failures"]] == [1, 2]  # the rejected record, the failed one
    assert "HTTP 500" in report["failures"][1]["error"] and "Bearer ***" in report["failures"][1]["error"]
    assert report["base_url"] == f"{server.url}?api-key=***"
    # The query credential was sent as a query parameter, not glued into the path.
    assert server.paths == {f"/v1/chat/completions?api-key={QUERY_KEY}"}


def test_an_echoed_key_in_a_fatal_answer_is_redacted_on_stderr(fake_openai, tmp_path):
    records, answers = make_records(2)
    server = fake_openai(answers, {r["input"]: [echo_auth(401)] for r in records})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    code, stdout, stderr, _ = cattune(*llm(server.url, inp, out, "--concurrency", "1"))
    assert code == 1
    assert "HTTP 401" in one_line_error(stderr) and "Bearer ***" in stderr
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert KEY not in written + stdout + stderr


def test_redactor_removes_keys_and_key_like_query_parameters():
    redact = Redactor.for_endpoint("sk-live-abcdef", "https://user:pw-1234@gw.example/v1?api-key=K1234&key=K5678&x=1")
    text = "sent sk-live-abcdef to https://user:pw-1234@gw.example/v1?api-key=K1234&key=K5678&x=1 (K5678)"
    cleaned = redact(text)
    for secret in ("sk-live-abcdef", "pw-1234", "K1234", "K5678"):
        assert secret not in cleaned
    assert redact.url("https://gw.example/v1?api_key=K1234&x=1") == "https://gw.example/v1?api_key=***&x=1"
    assert Redactor.for_endpoint("EMPTY", None)("EMPTY reply") == "EMPTY reply"  # the placeholder is no secret


def test_make_client_sends_the_base_url_query_as_query_parameters():
    client = make_client("http://127.0.0.1:9/v1?api-key=K1234", timeout=5)
    assert str(client.base_url) == "http://127.0.0.1:9/v1/" and client.default_query == {"api-key": "K1234"}


# --------------------------------------------------------------------------- 8, 10: 200 answers, not completions


def body(ctype, data):
    return lambda request: (200, ctype, data)


def test_200_answers_that_are_not_a_chat_completion_are_bad_replies_with_the_true_reason(fake_openai, tmp_path):
    records, answers = make_records(6)
    prompts = [r["input"] for r in records]
    truncated = body("application/json", b'{"id": "chatcmpl-1", "choi')
    server = fake_openai(answers, {
        prompts[0]: [truncated] * 3,
        prompts[1]: [body("text/plain", b"<html>502 Bad Gateway from the proxy</html>")] * 3,
        prompts[2]: [body("application/json", b"[1, 2]")] * 3,
        prompts[3]: [body("application/json", b'{"detail": "ok"}')] * 3,
        prompts[4]: [truncated, body("text/plain", b"busy")],  # then a good reply
    })
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)

    code, stdout, stderr, _ = cattune(*llm(server.url, inp, out, "--concurrency", "2"))
    assert code == 0, stderr
    assert "Traceback" not in stderr and "Expecting" not in stderr
    lines = read_jsonl(out)
    assert [line["cat_id"] for line in lines] == list(range(6))
    reasons = [line.get("cat_empty_reason", "") for line in lines]
    assert "reply was not JSON" in reasons[0] and '{"id": "chatcmpl-1", "choi' in reasons[0]
    assert "reply was not JSON" in reasons[1] and "502 Bad Gateway" in reasons[1]
    assert "not a chat completion" in reasons[2]
    assert "no choices" in reasons[3]
    assert all("empty reply" not in r for r in reasons)
    assert all(r.endswith("; 3 replies") for r in reasons[:4])
    assert "important" in lines[4] and "important" in lines[5]
    assert [server.requests[p] for p in prompts] == [3, 3, 3, 3, 3, 1]  # bounded by --reply-retries
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert (report["annotated"], report["empty"], report["bad_replies"]) == (2, 4, 14)


# --------------------------------------------------------------------------- 9: message content that is not a string


def test_message_content_that_is_not_a_string(fake_openai, tmp_path):
    records, answers = make_records(5)
    prompts = [r["input"] for r in records]
    half = json.dumps(answers[prompts[2]])
    parts = [{"type": "text", "text": half[:10]}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": half[10:]}]

    def content(value):
        return lambda request: as_json(200, completion(value))

    server = fake_openai(answers, {
        prompts[0]: [content(17)] * 3,
        prompts[1]: [content(answers[prompts[1]])] * 3,  # a dict, not its JSON text
        prompts[2]: [content(parts)],  # content parts: their text is the reply
        prompts[3]: [content([{"type": "image_url", "image_url": {"url": "x"}}])] * 3,
    })
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)

    code, _, stderr, _ = cattune(*llm(server.url, inp, out))
    assert code == 0, stderr
    assert "Traceback" not in stderr
    lines = read_jsonl(out)
    assert "message content is int, not text" in lines[0]["cat_empty_reason"]
    assert "message content is dict, not text" in lines[1]["cat_empty_reason"]
    assert {k: v for o in lines[2]["important"] for k, v in o.items()} == answers[prompts[2]]
    assert "no text part" in lines[3]["cat_empty_reason"]
    assert "important" in lines[4]


@pytest.mark.parametrize("content, reason", [(5, "int"), ({"a": ["b"]}, "dict"), (["x"], "no text part"),
                                             ([{"type": "text", "text": 3}], "no text part")])
def test_parse_reply_rejects_contents_that_are_not_text(content, reason):
    with pytest.raises(ReplyError, match=reason):
        parse_reply(content)


def test_parse_reply_joins_the_text_parts_of_a_content_list():
    reply = [{"type": "text", "text": '{"17": ["12 '}, {"type": "refusal", "refusal": "no"},
             {"type": "text", "text": 'shells"]}'}]
    assert parse_reply(reply) == [("17", ["12 shells"])]


# --------------------------------------------------------------------------- 11: nothing listening


def test_a_closed_port_fails_fast_and_names_the_url_without_its_credentials(tmp_path):
    records, _ = make_records(3)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    # The default retries and backoff: they took 50 s to give up on a closed port.
    argv = ["--input", inp, "--output", out, "--base-url", f"{url}?key={QUERY_KEY}", "--model", "m",
            "--demos", "builtin:math", "--api-key-env", "CATTUNE_TEST_KEY", "--no-progress"]
    code, stdout, stderr, seconds = cattune(*argv, timeout=40)
    assert code == 1
    message = one_line_error(stderr)
    assert f"cannot connect to {url}" in message and "refused" in message.lower()
    assert seconds < 15  # Python's start included
    assert QUERY_KEY not in stdout + stderr + "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())


# --------------------------------------------------------------------------- 19: --timeout


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_timeout_that_is_not_positive_is_refused_by_the_parser(fake_openai, in_process, tmp_path, value):
    records, answers = make_records(1)
    server = fake_openai(answers)
    write_jsonl(tmp_path / "in.jsonl", records)
    argv = llm(server.url, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--max-retries", "0", "--timeout", value)
    code, _, stderr, _ = (cattune if value == "0" else in_process)(*argv)
    assert code == 2 and "Traceback" not in stderr
    assert "argument --timeout: must be a positive number of seconds" in stderr
    assert not server.requests and not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------- 20: paths that cannot be written


@pytest.mark.parametrize("case", ["output is a directory", "report is a directory", "output under a file"])
def test_an_output_that_cannot_be_written_is_a_one_line_error_before_any_request(fake_openai, in_process, tmp_path, case):
    records, answers = make_records(2)
    server = fake_openai(answers)
    write_jsonl(tmp_path / "in.jsonl", records)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    output, report, named = {
        "output is a directory": ("adir", None, "adir"),
        "report is a directory": ("out.jsonl", "adir", "adir"),
        "output under a file": ("afile/out.jsonl", None, "afile"),
    }[case]
    extra = ["--report", report] if report else []
    run = cattune if case == "output is a directory" else in_process
    code, _, stderr, _ = run(*llm(server.url, "in.jsonl", output, *extra), cwd=tmp_path)
    assert code == 1
    assert named in one_line_error(stderr)
    assert not server.requests and not (tmp_path / "out.jsonl").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_output_in_a_read_only_directory_is_a_one_line_error(fake_openai, tmp_path):
    records, answers = make_records(2)
    server = fake_openai(answers)
    write_jsonl(tmp_path / "in.jsonl", records)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        code, _, stderr, _ = cattune(*llm(server.url, "in.jsonl", "ro/out.jsonl"), cwd=tmp_path)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert code == 1 and "ro" in one_line_error(stderr) and not server.requests


def test_a_place_that_takes_no_files_is_found_before_any_request(fake_openai, in_process, tmp_path):
    # /proc refuses new files even to root (a chmod'ed directory would not stop root).
    records, answers = make_records(2)
    server = fake_openai(answers)
    write_jsonl(tmp_path / "in.jsonl", records)
    code, _, stderr, _ = in_process(*llm(server.url, tmp_path / "in.jsonl", "/proc/cattune-test/out.jsonl"))
    assert code == 1 and "cannot write there" in one_line_error(stderr)
    assert not server.requests
