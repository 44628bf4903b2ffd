"""``cattune annotate`` under issue 34's probe: no lost output, no leaked credential,
bounded parsing, one line for every mistake.

The endpoint is the scripted fake of tests/fake_openai.py (a real HTTP server on
127.0.0.1, reached through the ``openai`` client).
"""

import json
import time

import pytest

from fake_openai import as_json, completion
from test_annotate import make_records, read_jsonl, write_jsonl
from test_annotate_hostile import KEY, cattune, closed_port, in_process, llm, one_line_error  # noqa: F401

from cattune.annotate.replies import ReplyError, parse_reply
from cattune.annotate.secrets import Redactor

# --------------------------------------------------------------------------- 6: --overwrite


def test_overwrite_keeps_the_finished_output_until_the_new_one_is_done(fake_openai, in_process, tmp_path):
    records, answers = make_records(4)
    server = fake_openai(answers)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert in_process(*llm(server.url, inp, out))[0] == 0
    finished = out.read_bytes()

    # Nothing listens any more: the run fails, the finished output stays as it was.
    url = f"http://127.0.0.1:{closed_port()}/v1"
    code, _, err, _ = in_process(*llm(url, inp, out, "--overwrite"))
    assert code == 1 and "cannot connect" in one_line_error(err)
    assert out.read_bytes() == finished

    # Two records done, then the endpoint fails: the old output is still whole, and the
    # same command resumes the new run's two records and replaces the output at the end.
    prompts = [r["input"] for r in records]
    server = fake_openai({p: {k: v[:1] for k, v in a.items()} for p, a in answers.items()},
                         {p: [lambda request: as_json(401, {"error": {"message": "no"}})] for p in prompts[2:]})
    code, _, err, _ = in_process(*llm(server.url, inp, out, "--overwrite", "--concurrency", "1"))
    assert code == 1 and "HTTP 401" in one_line_error(err)
    assert out.read_bytes() == finished
    server.script.clear()
    assert in_process(*llm(server.url, inp, out, "--overwrite", "--concurrency", "1"))[0] == 0
    assert server.requests[prompts[0]] == server.requests[prompts[1]] == 1  # not asked again
    lines = read_jsonl(out)
    assert [line["cat_id"] for line in lines] == [0, 1, 2, 3]
    assert all(len(next(iter(o.values()))) == 1 for line in lines for o in line["important"])  # the new annotations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.report.json"]


def test_redo_empty_keeps_the_empty_records_until_they_are_redone(fake_openai, in_process, tmp_path):
    records, answers = make_records(3)
    prompts = [r["input"] for r in records]
    server = fake_openai(answers, {prompts[1]: [lambda request: as_json(200, completion("no idea"))] * 3})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert in_process(*llm(server.url, inp, out))[0] == 0
    finished = out.read_bytes()
    url = f"http://127.0.0.1:{closed_port()}/v1"
    assert in_process(*llm(url, inp, out, "--redo-empty"))[0] == 1
    assert out.read_bytes() == finished  # the empty record is still there, with its reason
    assert in_process(*llm(server.url, inp, out, "--redo-empty"))[0] == 0
    assert all("important" in line for line in read_jsonl(out))


# --------------------------------------------------------------------------- 7, 11: replies parsed in bounded time


def nested_content(depth):
    text = json.dumps(completion("X"))
    return 200, "application/json", text.replace('"X"', "[" * depth + "]" * depth).encode()


def test_deeply_nested_replies_are_one_records_failure(fake_openai, in_process, tmp_path):
    records, answers = make_records(4)
    prompts = [r["input"] for r in records]
    deep = "[" * 100_000
    server = fake_openai(answers, {
        prompts[0]: [lambda request: as_json(200, completion(deep))] * 3,  # in the content
        prompts[1]: [lambda request: (200, "application/json", deep.encode())] * 3,  # the HTTP body itself
        prompts[2]: [lambda request: nested_content(990)] * 3,  # content that the client can read, but not text
    })
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    code, _, err, _ = in_process(*llm(server.url, inp, out, "--concurrency", "1"))
    assert code == 0, err
    lines = read_jsonl(out)
    assert [line["cat_id"] for line in lines] == [0, 1, 2, 3]
    assert "unparseable reply" in lines[0]["cat_empty_reason"]
    assert "nested too deeply" in lines[1]["cat_empty_reason"]
    assert "unparseable reply" in lines[2]["cat_empty_reason"]
    assert "important" in lines[3]


def test_think_blocks_are_stripped_in_linear_time():
    from cattune.annotate.replies import strip_think

    # A regex took 42 s for 280 KB of unclosed <think> tags (quadratic).
    started = time.monotonic()
    with pytest.raises(ReplyError):
        parse_reply("<think>" * 40_000)
    assert time.monotonic() - started < 2
    assert strip_think("a<think>x</THINK>b<Think>y</think>c<think>open") == "abc<think>open"
    assert strip_think("<think>a<think>b</think>c</think>d") == "c</think>d"  # as the non-greedy regex did
    assert parse_reply('<think>{"x": ["y"]}</think>{"17": ["12 shells"]}') == [("17", ["12 shells"])]


def test_a_reply_of_200k_repeated_pairs_is_checked_in_bounded_time():
    from cattune.annotate.replies import check_annotation
    from cattune.records import Record

    record = Record(prompt="Ann has 12 apples and 3 pears. " * 20 + "How many? Answer: ", target="15")
    reply = json.dumps({"15": ["12 apples", "3 pears", "Ann"] * 60_000, "How many": ["12 apples"] * 60_000})
    started = time.monotonic()
    checked = check_annotation(record, parse_reply(reply))
    assert time.monotonic() - started < 3
    assert checked.kept == [("15", ["12 apples", "3 pears", "Ann"]), ("How many", ["12 apples"])]


# --------------------------------------------------------------------------- 8, 9, 10: credentials


def test_a_reply_whose_fields_hold_the_key_never_shows_it(fake_openai, tmp_path):
    # pydantic's serializer warning about choices of the wrong type quoted the key raw on stderr.
    records, answers = make_records(3)
    prompts = [r["input"] for r in records]
    odd = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": KEY}
    server = fake_openai(answers, {
        prompts[0]: [lambda request: as_json(200, odd)] * 3,
        prompts[1]: [lambda request: as_json(200, {**completion("{}"), "usage": KEY, "model": [KEY]})] * 3,
    })
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    code, stdout, stderr, _ = cattune(*llm(server.url, inp, out), "--concurrency", "1")
    assert code == 0, stderr
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert KEY not in written + stdout + stderr
    assert "reply has no choices" in read_jsonl(out)[0]["cat_empty_reason"]


def test_the_redacting_hook_covers_warnings_and_log_records(capsys):
    import logging
    import warnings

    from cattune.commands.annotate import _redacting

    logger = logging.getLogger("cattune-test-redact")
    logger.addHandler(handler := logging.StreamHandler())
    try:
        with warnings.catch_warnings(record=True) as shown, _redacting(Redactor([KEY])):
            warnings.warn_explicit(f"value {KEY!r}", UserWarning, "x.py", 1)
            logger.warning("HTTP Request: POST /v1?api-key=%s", KEY)
    finally:
        logger.removeHandler(handler)
    assert [str(w.message) for w in shown] == ["value '***'"]
    err = capsys.readouterr().err
    assert "api-key=***" in err and KEY not in err


@pytest.mark.parametrize("url", ["http://user:pass-1234@{host}/v1", "http://sk-in-the-user-name@{host}/v1"])
def test_credentials_in_the_base_url_are_refused_before_any_request(fake_openai, in_process, tmp_path, monkeypatch, url):
    records, answers = make_records(1)
    server = fake_openai(answers)
    write_jsonl(tmp_path / "in.jsonl", records)
    url = url.format(host=server.url.split("//")[1].split("/")[0])
    code, out, err, _ = in_process(*llm(url, tmp_path / "in.jsonl", tmp_path / "out.jsonl"))
    assert code == 1 and "--api-key-env" in one_line_error(err)
    assert "pass-1234" not in out + err and "sk-in-the-user-name" not in out + err
    assert not server.requests and not (tmp_path / "out.jsonl").exists()
    # The same from $OPENAI_BASE_URL, which the client would otherwise read by itself.
    from cattune.annotate.llm import make_client

    monkeypatch.setenv("OPENAI_BASE_URL", url)
    with pytest.raises(ValueError, match="--api-key-env"):
        make_client(None)


def test_a_key_of_three_characters_is_redacted_and_annotations_that_contain_it_survive(fake_openai, in_process, tmp_path):
    from test_annotate_hostile import echo_auth

    records, answers = make_records(3)
    server = fake_openai(answers, {records[0]["input"]: [echo_auth(400)]})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    code, stdout, stderr, _ = in_process(*llm(server.url, inp, out, "--concurrency", "1"), key="app")
    assert code == 0, stderr
    assert server.auth == {"Bearer app"}
    lines = read_jsonl(out)
    assert "Bearer ***" in lines[0]["cat_empty_reason"]
    assert "Bearer app" not in stdout + stderr + "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    # "app" is part of "11 apples": the reply's annotation is read as sent, not redacted first.
    assert {k: v for o in lines[1]["important"] for k, v in o.items()} == answers[records[1]["input"]]
    report = json.loads((tmp_path / "out.report.json").read_text())  # still the report's own field names
    assert report["failures"][0]["line"] == 1 and "Bearer ***" in report["failures"][0]["error"]
    assert Redactor(["k"])('{"k": "Bearer k"}') == '{"***": "Bearer ***"}'


# --------------------------------------------------------------------------- 12, 14: numbers


def test_retry_after_is_honoured_beyond_backoff_max_and_a_huge_one_fails_the_record(fake_openai, in_process, tmp_path):
    records, answers = make_records(3)
    prompts = [r["input"] for r in records]
    seen = []

    def busy(retry_after):
        def behaviour(request):
            seen.append(time.monotonic())
            return 429, "application/json", b'{"error": {"message": "slow down"}}', {"Retry-After": retry_after}
        return behaviour

    server = fake_openai(answers, {prompts[0]: [busy("1.2")], prompts[1]: [busy("1e12")], prompts[2]: [busy("nan")]})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    # FAST's --backoff-max is 0.05 s: the server's 1.2 s wins, as the docs promise.
    code, _, err, seconds = in_process(*llm(server.url, inp, out, "--concurrency", "1"))
    assert code == 3, err
    assert server.requests[prompts[0]] == 2 and seconds >= 1.2
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert [f["line"] for f in report["failures"]] == [2]  # asked to wait 1e12 s: failed at once
    assert "asks to wait 1e+12 s" in report["failures"][0]["error"]
    assert server.requests[prompts[1]] == 1 and server.requests[prompts[2]] == 2  # "nan": the backoff's wait


@pytest.mark.parametrize("option, value", [
    ("--max-tokens", "-5"), ("--temperature", "-3"), ("--top-p", "5"), ("--temperature", "nan"),
    ("--backoff-max", "nan"), ("--backoff-base", "inf"), ("--backoff-max", "inf"), ("--timeout", "inf"),
    ("--max-retries", "-1"), ("--reply-retries", "1e9"), ("--concurrency", "0"), ("--limit", "-1"),
])
def test_number_options_out_of_range_are_refused_before_any_request(fake_openai, in_process, tmp_path, option, value):
    records, answers = make_records(1)
    server = fake_openai(answers)
    write_jsonl(tmp_path / "in.jsonl", records)
    code, _, err, _ = in_process(*llm(server.url, tmp_path / "in.jsonl", tmp_path / "out.jsonl", option, value))
    assert code == 2 and "Traceback" not in err
    assert f"argument {option}: must be " in err and repr(value) in err
    assert not server.requests and not (tmp_path / "out.jsonl").exists()


def test_check_refuses_a_max_length_of_0(in_process, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", make_records(1)[0])
    code, _, err, _ = in_process("--check", "--input", tmp_path / "in.jsonl", "--max-length", "0")
    assert code == 2 and "argument --max-length: must be an integer >= 1, got '0'" in err


def test_the_library_refuses_the_same_numbers():
    from cattune.annotate.llm import LLMAnnotator, make_client

    client = make_client("http://127.0.0.1:9/v1", timeout=5)
    for bad in ({"backoff_max": float("nan")}, {"backoff_base": float("inf")}, {"temperature": -3},
                {"top_p": 5}, {"max_tokens": -5}, {"max_retries": -1}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            LLMAnnotator(client, "m", [], **bad)


def test_token_counts_that_are_not_counts_are_left_out_and_counted(fake_openai, in_process, tmp_path):
    records, answers = make_records(3)
    prompts = [r["input"] for r in records]

    def usage(prompt, prompt_tokens):
        reply = completion(json.dumps(answers[prompt]))
        reply["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": 0}
        return lambda request: as_json(200, reply)

    server = fake_openai(answers, {p: [usage(p, n)] for p, n in zip(prompts, [-1_000_000, 100, "many"])})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert in_process(*llm(server.url, inp, out))[0] == 0
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["tokens"] == {"prompt": 100, "completion": 5, "total": 105}
    assert report["replies_with_bad_usage"] == 2


# --------------------------------------------------------------------------- 13: one line, not a traceback


@pytest.mark.parametrize("key", ["{target.x}", "{target[0]}", "{target!r}", "{target:>99999999999}", "{0}"])
def test_a_rule_key_with_more_than_target_or_prompt_is_one_line(in_process, tmp_path, key):
    write_jsonl(tmp_path / "in.jsonl", make_records(2)[0])
    (tmp_path / "rules.json").write_text(json.dumps({"key": key, "values": ["\\d+ apples"]}))
    code, _, err, _ = in_process("--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl",
                                 "--rule", tmp_path / "rules.json", "--no-progress")
    assert code == 1 and "bad key template" in one_line_error(err) and "rules.json" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_an_output_line_nested_100k_deep_is_one_line_with_file_and_line(fake_openai, in_process, tmp_path):
    records, answers = make_records(2)
    server = fake_openai(answers)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    out.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    code, _, err, _ = in_process(*llm(server.url, inp, out))
    assert code == 1 and f"{out}:1: nested more than" in one_line_error(err)
    assert not server.requests
