"""``cattune annotate`` end to end against a real OpenAI-compatible HTTP server on 127.0.0.1.

The server (``fake_openai``, tests/fake_openai.py) answers each record according to a
script (good, fenced or listed JSON, garbage, 429, 500, 400, a reply slower than the
client timeout, ...) and counts what it served, so the pipeline's report can be checked
against what really happened.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cattune import cli
from cattune.commands import annotate as command
from cattune.records import RecordError

# a 1 s client timeout: the fake endpoint's "slow" reply (fake_openai.SLOW_S) comes after it
FAST = ["--backoff-base", "0.01", "--backoff-max", "0.05", "--timeout", "1.0", "--no-progress"]


def make_records(n, with_id=False):
    records, answers = [], {}
    for i in range(n):
        a = 10 + i
        prompt = f"Case {i}: Ann has {a} apples and gets 3 apples from Bob. How many apples does Ann have? Answer: "
        target = str(a + 3)
        rec = {"input": prompt, "target": target}
        if with_id:
            rec = {"ID": f"q-{i}", **rec}
        records.append(rec)
        answers[prompt] = {"How many apples": [f"{a} apples", "3 apples"], target: [f"{a} apples", "3 apples", "Answer"]}
    return records, answers


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def annotate(*argv):
    args = command.build_parser().parse_args([str(a) for a in argv])
    return command.run(args)


def llm_args(stub, inp, out, *extra):
    return ["--input", inp, "--output", out, "--base-url", stub.url, "--model", "stub-1", "--demos", "builtin:math", *FAST, *extra]


# --------------------------------------------------------------------------- the pipeline


def test_every_kind_of_reply_ends_with_each_record_once_and_the_right_counts(fake_openai, tmp_path, capsys):
    records, answers = make_records(14)
    prompts = [r["input"] for r in records]
    script = {
        prompts[0]: ["fenced"],
        prompts[1]: ["list"],
        prompts[2]: ["garbage", "good"],
        prompts[3]: ["429", "429", "good"],
        prompts[4]: ["500", "fenced"],
        prompts[5]: ["slow", "good"],
        prompts[6]: ["garbage", "garbage", "empty"],  # every reply bad: written empty
        prompts[7]: ["mixed"],  # good pairs plus two invalid ones
        prompts[8]: ["400"],  # rejected: written empty, no retry
        prompts[9]: ["empty", "good"],
        prompts[10]: ["invalid", "good"],  # two invalid pairs, then good
    }
    stub = fake_openai(answers, script)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)

    assert annotate(*llm_args(stub, inp, out, "--concurrency", "4")) == 0

    lines = read_jsonl(out)
    assert [line["cat_id"] for line in lines] == list(range(14))  # input order, each once
    for i, line in enumerate(lines):
        assert line["input"] == prompts[i]
        if i in (6, 8):
            assert "important" not in line
            continue
        assert {k: v for obj in line["important"] for k, v in obj.items()} == answers[prompts[i]], i
        assert "cat_empty_reason" not in line
    assert "unparseable reply" in lines[6]["cat_empty_reason"] or "empty annotation" in lines[6]["cat_empty_reason"]
    assert "3 replies" in lines[6]["cat_empty_reason"]
    assert lines[8]["cat_empty_reason"].startswith("request rejected: HTTP 400")

    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["records"] == 14 and report["output_records"] == 14 and report["complete"]
    assert (report["annotated"], report["empty"], report["failed"], report["rejected"]) == (12, 2, 0, 1)
    assert report["retried"] == 7  # records 2, 3, 4, 5, 6, 9, 10
    assert report["api_retries"] == 4  # two 429s, one 500, one timeout
    assert report["bad_replies"] == 6  # 2 + 3 (record 6) + 9 + 10
    assert report["dropped_spans"] == {
        "total": 4,
        "by_reason": {"value not before key": 2, "key not found in text": 1, "value not found in text": 1},
    }
    replies_200 = sum(n for b, n in stub.served.items() if b not in ("429", "500", "400", "slow"))
    assert report["tokens"] == {"prompt": 100 * replies_200, "completion": 7 * replies_200, "total": 107 * replies_200}
    assert report["requests"] == sum(stub.requests.values())
    assert report["model"] == "stub-1" and report["temperature"] == 0.9 and report["top_p"] == 0.7
    printed = capsys.readouterr().out
    assert "annotated 12 records (7 retried), 2 empty, 0 failed" in printed
    assert "dropped spans: 4" in printed and f"tokens: {100 * replies_200} prompt" in printed


def test_records_that_outlast_the_retries_are_left_out_then_done_by_a_rerun(fake_openai, tmp_path, capsys):
    records, answers = make_records(6, with_id=True)
    prompts = [r["input"] for r in records]
    stub = fake_openai(answers, {prompts[2]: ["always-500"] * 3})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)

    assert annotate(*llm_args(stub, inp, out, "--max-retries", "2")) == 3
    assert "1 records failed" in capsys.readouterr().err
    first = read_jsonl(out)
    assert [line["cat_id"] for line in first] == ["q-0", "q-1", "q-3", "q-4", "q-5"]
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["failed"] == 1 and report["failures"][0]["line"] == 3 and "HTTP 500" in report["failures"][0]["error"]
    assert not report["complete"]

    # The endpoint recovers (the script is used up); the same command finishes the job.
    assert annotate(*llm_args(stub, inp, out, "--max-retries", "2")) == 0
    final = read_jsonl(out)
    assert [line["cat_id"] for line in final] == [f"q-{i}" for i in range(6)]
    assert final[:2] == first[:2] and final[3:] == first[2:]
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert (report["already_done"], report["annotated"], report["complete"]) == (5, 1, True)
    assert stub.requests[prompts[0]] == 1  # nothing done twice


def test_a_refusing_endpoint_stops_the_run_and_the_key_is_never_written(fake_openai, tmp_path, monkeypatch, capsys):
    records, answers = make_records(4)
    stub = fake_openai(answers, {r["input"]: ["401"] for r in records})
    secret = "sk-test-very-secret-1234"
    monkeypatch.setenv("CATTUNE_TEST_KEY", secret)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)

    code = cli.main(["annotate", *map(str, llm_args(stub, inp, out, "--api-key-env", "CATTUNE_TEST_KEY"))])
    assert code == 1
    captured = capsys.readouterr()
    assert "cattune annotate: error: the endpoint answered HTTP 401" in captured.err
    assert stub.auth == {f"Bearer {secret}"}  # the key came from the environment variable
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert secret not in written + captured.out + captured.err
    assert read_jsonl(out) == []


def test_requests_rejected_in_a_row_stop_the_run(fake_openai, tmp_path):
    records, answers = make_records(5)
    stub = fake_openai(answers, {r["input"]: ["400"] for r in records})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    with pytest.raises(RuntimeError, match="3 records in a row failed at the endpoint.*HTTP 400"):
        annotate(*llm_args(stub, inp, out, "--concurrency", "1"))
    assert len(read_jsonl(out)) == 3  # written with the reason, as the rejection is final


def test_resume_skips_done_records_repairs_a_torn_last_line_and_redoes_empty_ones(fake_openai, tmp_path):
    records, answers = make_records(6)
    stub = fake_openai(answers)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert annotate(*llm_args(stub, inp, out)) == 0
    lines = out.read_text().splitlines(keepends=True)

    # A run killed while writing: records 4 and 1 done (any order), record 2 half-written,
    # record 5 written empty.
    empty = json.loads(lines[5])
    empty.pop("important")
    empty["cat_empty_reason"] = "no valid pair"
    out.write_text(lines[4] + lines[1] + json.dumps(empty) + "\n" + lines[2][:25])
    stub.requests.clear()
    assert annotate(*llm_args(stub, inp, out)) == 0
    assert out.read_text().splitlines(keepends=True)[:5] == lines[:5]
    assert read_jsonl(out)[5] == empty  # not asked again without --redo-empty
    assert sorted(stub.requests.values()) == [1, 1, 1] and records[5]["input"] not in stub.requests

    assert annotate(*llm_args(stub, inp, out, "--redo-empty")) == 0
    assert out.read_text().splitlines(keepends=True) == lines


def test_an_output_of_another_input_is_refused_not_mixed(fake_openai, tmp_path):
    records, answers = make_records(3)
    stub = fake_openai(answers)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert annotate(*llm_args(stub, inp, out)) == 0
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [dict(r, input=r["input"].replace("Ann", "Eve")) for r in records])
    stub.answers.update({p.replace("Ann", "Eve"): a for p, a in answers.items()})
    before = out.read_text()
    with pytest.raises(RecordError, match=r"out\.jsonl:1: record id 0 has another input text"):
        annotate(*llm_args(stub, other, out))
    assert out.read_text() == before
    assert annotate(*llm_args(stub, other, out, "--overwrite")) == 0
    assert all("Eve" in line["input"] for line in read_jsonl(out))


def test_broken_input_line_is_reported_with_file_and_line_and_nothing_is_written(fake_openai, tmp_path, capsys):
    records, answers = make_records(3)
    stub = fake_openai(answers)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1]) + "\n" + '{"input": "x", "target": \n')
    code = cli.main(["annotate", *map(str, llm_args(stub, inp, out))])
    assert code == 1
    assert f"cattune annotate: error: {inp}:3: not valid JSON" in capsys.readouterr().err
    assert not out.exists() and sum(stub.requests.values()) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_keep_existing_and_limit(fake_openai, tmp_path):
    records, answers = make_records(5)
    records[1]["important"] = [{"Answer": ["Ann"]}]
    stub = fake_openai(answers)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert annotate(*llm_args(stub, inp, out, "--keep-existing", "--limit", "3")) == 0
    lines = read_jsonl(out)
    assert [line["cat_id"] for line in lines] == [0, 1, 2]
    assert lines[1]["important"] == [{"Answer": ["Ann"]}] and records[1]["input"] not in stub.requests
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert (report["kept_existing"], report["annotated"], report["complete"]) == (1, 2, False)


def test_show_prompt_prints_the_messages_without_a_request(fake_openai, tmp_path, capsys):
    records, answers = make_records(2)
    stub = fake_openai(answers)
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, records)
    argv = ["--input", inp, "--base-url", stub.url, "--model", "m", "--demos", "builtin:math",
            "--instructions", "builtin:math", "--show-prompt"]
    assert annotate(*argv) == 0
    messages = json.loads(capsys.readouterr().out)
    assert messages[0]["role"] == "system" and "word problem" in messages[0]["content"]
    assert records[0]["input"] in messages[-1]["content"] and not stub.requests


def test_kill_midway_then_the_same_command_finishes_every_record_once(fake_openai, tmp_path):
    n, answered = 30, 8
    records, answers = make_records(n, with_id=True)
    stub = fake_openai(answers, delay=0.01)
    stub.gate_after = answered  # later requests hang: the run is stuck midway when killed
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    argv = ["annotate", *map(str, llm_args(stub, inp, out, "--concurrency", "3"))]
    proc = subprocess.Popen([sys.executable, "-m", "cattune.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and len(read_jsonl(out)) == answered):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    stub.gate_after = None
    stub.gate.set()
    with out.open("a") as f:  # as if the kill had hit in the middle of a write
        f.write('{"ID": "q-29", "input": "Case 2')

    assert cli.main(argv) == 0
    lines = read_jsonl(out)
    assert [line["cat_id"] for line in lines] == [f"q-{i}" for i in range(n)]
    for line in lines:
        assert {k: v for obj in line["important"] for k, v in obj.items()} == answers[line["input"]]
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["already_done"] == answered and report["annotated"] == n - answered and report["complete"]


# --------------------------------------------------------------------------- --rule and --check


def test_rule_mode_annotates_without_an_endpoint(tmp_path, capsys):
    records, _ = make_records(3)
    records.append({"input": "Nothing to see here. Answer: ", "target": "0"})
    inp, out, rules = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "rules.yaml"
    write_jsonl(inp, records)
    rules.write_text('- key: "{target}"\n  values: ["\\\\d+ apples", "Bob"]\n')
    assert annotate("--input", inp, "--output", out, "--rule", rules, "--no-progress") == 0
    lines = read_jsonl(out)
    assert lines[0]["important"] == [{"13": ["10 apples", "3 apples", "Bob"]}]
    assert lines[3]["cat_empty_reason"] == "the rules matched nothing usable"
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert (report["mode"], report["annotated"], report["empty"], report["requests"]) == ("rules", 3, 1, 0)
    assert "annotated 3 records" in capsys.readouterr().out


def test_rule_and_llm_options_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--rule annotates without an LLM"):
        annotate("--input", tmp_path / "x", "--output", tmp_path / "y", "--rule", "r.json", "--model", "m")
    with pytest.raises(ValueError, match="give --model"):
        annotate("--input", tmp_path / "x", "--output", tmp_path / "y", "--demos", "builtin:math")


def test_check_counts_aligned_pairs_by_reason(tmp_path, capsys):
    records, answers = make_records(4)
    for rec in records:
        rec["important"] = [{k: v} for k, v in answers[rec["input"]].items()]
    records[0]["important"].append({"Case": ["Bob"]})  # value after key
    records[1]["important"].append({"Zed": ["Ann"]})  # key not in the text
    records.append({"input": "Unannotated. Answer: ", "target": "1"})
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, records)

    assert annotate("--check", "--input", inp) == 0
    printed = capsys.readouterr().out
    assert "records:   5 (4 annotated)" in printed
    assert "pairs:     22 annotated, 20 aligned to tokens (90.9%)" in printed
    assert "value not before key" in printed and "key not found in text" in printed

    assert annotate("--check", "--input", inp, "--json", "--tokenizer-kind", "metaspace", "--strict") == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["pairs"], result["aligned"]) == (22, 20)
    assert result["by_reason"] == {"value not before key": 1, "key not found in text": 1}
    assert result["examples"]["value not before key"] == [{"line": 1, "key": "Case", "value": "Bob"}]


def test_help_documents_every_option_with_its_default():
    text = " ".join(command.build_parser().format_help().split())  # ignore line wrapping
    for option in ("--base-url", "--api-key-env", "--demos", "--instructions", "--temperature", "--top-p",
                   "--concurrency", "--max-retries", "--backoff-base", "--reply-retries", "--timeout", "--rule",
                   "--check", "--tokenizer", "--id-field", "--overwrite", "--redo-empty"):
        assert option in text
    assert "default: 0.7" in text and "default: 0.9" in text and "default: OPENAI_API_KEY" in text


def test_check_loads_a_tokenizer_from_a_local_directory(tmp_path, capsys):
    from cattune.tiny import train_tokenizer

    records, answers = make_records(3)
    for rec in records:
        rec["important"] = [{k: v} for k, v in answers[rec["input"]].items()]
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, records)
    train_tokenizer([r["input"] + r["target"] for r in records], kind="metaspace", vocab_size=200, individual_digits=True).save_pretrained(tmp_path / "tok")
    assert annotate("--check", "--input", inp, "--tokenizer", tmp_path / "tok", "--json", "--strict") == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["pairs"], result["aligned"], result["tokenizer"]) == (15, 15, str(tmp_path / "tok"))


def test_annotate_file_from_python_can_be_stopped_and_resumed(tmp_path):
    from cattune.annotate import Outcome, annotate_file

    records, answers = make_records(10)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    stop = threading.Event()
    seen = []

    def annotator(record):
        seen.append(record.prompt)
        if len(seen) == 3:
            stop.set()
        return Outcome(annotation=list(answers[record.prompt].items()))

    report = annotate_file(inp, out, annotator, stop=stop, progress=False)
    assert report["stopped_early"] and not report["complete"] and len(read_jsonl(out)) == 3
    report = annotate_file(inp, out, annotator, progress=False, concurrency=3)
    assert report["complete"] and report["already_done"] == 3 and len(seen) == 10
    assert [line["cat_id"] for line in read_jsonl(out)] == list(range(10))


# --------------------------------------------------------------------------- --structured


def test_structured_auto_sends_the_annotation_schema(fake_openai, tmp_path):
    from cattune.annotate.llm import ANNOTATION_SCHEMA

    records, answers = make_records(3)
    stub = fake_openai(answers)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert annotate(*llm_args(stub, inp, out)) == 0
    assert len(stub.formats) == 3
    for fmt in stub.formats:
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == ANNOTATION_SCHEMA
        assert fmt["json_schema"]["strict"] is False  # free-text keys cannot be an OpenAI strict schema
    # The schema admits exactly the shape of a good reply: string keys -> non-empty string lists.
    schema = ANNOTATION_SCHEMA["additionalProperties"]
    for answer in answers.values():
        assert all(isinstance(v, list) and len(v) >= schema["minItems"] and all(isinstance(x, str) for x in v)
                   for v in answer.values())
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert (report["structured"], report["response_format"], report["structured_fallback"]) == ("auto", "json_schema", None)


@pytest.mark.parametrize("flags, expected", [(["--structured", "off"], None),
                                             (["--structured", "off", "--json-mode"], "json_object")])
def test_structured_off_sends_no_schema(fake_openai, tmp_path, flags, expected):
    records, answers = make_records(2)
    stub = fake_openai(answers)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert annotate(*llm_args(stub, inp, out, *flags)) == 0
    assert [f and f["type"] for f in stub.formats] == [expected, expected]
    assert json.loads((tmp_path / "out.report.json").read_text())["response_format"] == expected


@pytest.mark.parametrize("refuse", [
    (400, "response_format json_schema is not supported"),  # vLLM-style 400
    (422, "Unexpected fields in the request: {'response_format'}"),  # a strict FastAPI server
    (500, 'response_format type must be one of "text" or "json_object", but got: json_schema'),  # ik_llama.cpp
])
@pytest.mark.parametrize("json_mode", [False, True])
def test_structured_auto_falls_back_once_for_the_rest_of_the_run(fake_openai, tmp_path, capsys, refuse, json_mode):
    records, answers = make_records(6)
    stub = fake_openai(answers, refuse=refuse)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    extra = ["--concurrency", "1"] + (["--json-mode"] if json_mode else [])
    assert annotate(*llm_args(stub, inp, out, *extra)) == 0

    plain = {"type": "json_object"} if json_mode else None
    # One refused request, then the same record and every later one without the schema.
    assert [f and f["type"] for f in stub.formats] == ["json_schema"] + [plain and "json_object"] * 6
    lines = read_jsonl(out)
    assert [line["cat_id"] for line in lines] == list(range(6))
    assert all({k: v for o in line["important"] for k, v in o.items()} == answers[line["input"]] for line in lines)
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert (report["annotated"], report["empty"], report["rejected"], report["api_retries"]) == (6, 0, 0, 0)
    assert report["requests"] == 7 and report["response_format"] == (plain and "json_object")
    assert report["structured_fallback"].startswith(f"HTTP {refuse[0]}")
    captured = capsys.readouterr()
    assert captured.err.count("refuses response_format json_schema") == 1
    assert "structured output: the endpoint refused response_format json_schema" in captured.out


def test_structured_fallback_happens_once_with_concurrent_workers(fake_openai, tmp_path):
    records, answers = make_records(12)
    stub = fake_openai(answers, refuse=(400, "Unsupported response_format type: json_schema"))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert annotate(*llm_args(stub, inp, out, "--concurrency", "4")) == 0
    refused = sum(1 for f in stub.formats if f)
    assert 1 <= refused <= 4  # at most the requests already in flight when the first refusal came
    # every record is then asked once without the schema; requests already built with it
    # may still arrive after the first plain one, so the order is not checked
    assert sum(1 for f in stub.formats if f is None) == 12
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert (report["annotated"], report["requests"]) == (12, 12 + refused)


def test_structured_on_stops_the_run_when_the_schema_is_refused(fake_openai, tmp_path, capsys):
    records, answers = make_records(3)
    stub = fake_openai(answers, refuse=(400, "response_format json_schema is not supported"))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    code = cli.main(["annotate", *map(str, llm_args(stub, inp, out, "--structured", "on", "--concurrency", "1"))])
    assert code == 1
    err = capsys.readouterr().err
    assert "cattune annotate: error: the endpoint refuses response_format json_schema (HTTP 400" in err
    assert "--structured auto" in err and "Traceback" not in err
    # The worker may take the next record before the writer thread stops the run.
    assert read_jsonl(out) == [] and 1 <= len(stub.formats) <= 2


def test_a_rejection_that_does_not_name_the_format_is_not_a_fallback(fake_openai, tmp_path):
    records, answers = make_records(2)
    prompts = [r["input"] for r in records]
    stub = fake_openai(answers)
    stub.script = {prompts[0]: ["400"]}  # "stub says 400": about the record, not the schema
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    assert annotate(*llm_args(stub, inp, out, "--concurrency", "1")) == 0
    assert [f["type"] for f in stub.formats] == ["json_schema", "json_schema"]
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert (report["rejected"], report["structured_fallback"], report["response_format"]) == (1, None, "json_schema")


def test_check_truncates_as_training_does_by_default(tmp_path, capsys):
    # a causal value 300 words before the answer: training (max_length 256) cuts it off,
    # so the check must say so unless told a larger max_length
    filler = " ".join(["word"] * 300)
    rec = {"input": f"Alice: 7. {filler}. Who? Answer: ", "target": "7", "important": [{"7": ["Alice"]}]}
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, [rec])
    assert annotate("--check", "--input", inp, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["by_reason"] == {"cut by max_length": 1}
    assert annotate("--check", "--input", inp, "--json", "--max-length", "1000", "--strict") == 0
    assert json.loads(capsys.readouterr().out)["aligned"] == 1
