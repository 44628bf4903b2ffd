"""Reply parsing, validation, prompt building, demos and ids: no endpoint involved."""

import json

import pytest

from cattune.annotate.output import assign_ids, output_line, report_path_for
from cattune.annotate.prompt import build_messages, load_demos, load_instructions, read_records, resolve_file
from cattune.annotate.replies import (
    KEY_NOT_FOUND,
    NO_VALUES,
    NOT_A_STRING,
    NOT_BEFORE,
    VALUE_NOT_FOUND,
    ReplyError,
    check_annotation,
    parse_reply,
)
from cattune.masks import encode_record
from cattune.records import Record, RecordError, record_from_json
from cattune.tiny import train_tokenizer

REC = Record(
    prompt="Lena has 12 shells and a band. She finds 5 shells more. How many shells does Lena have? Answer: ",
    target="17",
)
GOOD = {"17": ["12 shells", "5 shells", "Answer"], "How many shells": ["12 shells", "5 shells"]}


# --------------------------------------------------------------------------- parse_reply


@pytest.mark.parametrize(
    "reply",
    [
        json.dumps(GOOD),
        "```json\n" + json.dumps(GOOD) + "\n```",
        "Here is the annotation:\n```\n" + json.dumps(GOOD, indent=2) + "\n```\nHope it helps {not json}.",
        "Sure! " + json.dumps(GOOD) + " -- these are the causal links.",
        json.dumps([{k: v} for k, v in GOOD.items()]),
        "Result: " + json.dumps([{k: v} for k, v in GOOD.items()]) + "\nDone.",
        json.dumps({"important": [{k: v} for k, v in GOOD.items()]}),
        "<think>The answer {17} depends on ...</think>" + json.dumps(GOOD),
    ],
)
def test_parse_reply_accepts_the_shapes_models_produce(reply):
    assert dict(parse_reply(reply)) == GOOD


@pytest.mark.parametrize("reply", [None, "", "   ", "I cannot annotate this.", "{broken: json", '["a", "b"]'])
def test_parse_reply_rejects_replies_without_an_annotation(reply):
    with pytest.raises(ReplyError):
        parse_reply(reply)


def test_parse_reply_empty_object_is_an_empty_annotation():
    assert parse_reply("{}") == []
    assert parse_reply("```json\n[]\n```") == []


def test_a_key_named_important_with_string_values_is_not_taken_for_a_wrapper():
    assert parse_reply('{"important": ["x"]}') == [("important", ["x"])]


# --------------------------------------------------------------------------- check_annotation


def test_check_keeps_valid_pairs_and_counts_each_dropped_one():
    pairs = list(GOOD.items()) + [
        ("Lena have", ["How many shells"]),  # fine: the question phrase is before the key
        ("12 shells", ["5 shells"]),  # value after key
        ("99 shells", ["Lena", "band"]),  # key not in text: both values dropped
        ("17", ["seven"]),  # value not in text
        ("and", ["Lena"]),  # "and" also occurs inside "band": whole-word occurrences only
        ("Answer", []),
        ("17", [3.5, None]),
    ]
    checked = check_annotation(REC, pairs)
    assert checked.kept == [
        ("17", ["12 shells", "5 shells", "Answer"]),
        ("How many shells", ["12 shells", "5 shells"]),
        ("Lena have", ["How many shells"]),
        ("and", ["Lena"]),
    ]
    reasons = sorted(r for _, _, r in checked.dropped)
    assert reasons == sorted(
        [NOT_BEFORE, KEY_NOT_FOUND, KEY_NOT_FOUND, VALUE_NOT_FOUND, NO_VALUES, VALUE_NOT_FOUND, NOT_A_STRING]
    )


def test_check_repairs_spacing_and_case_to_the_texts_spelling():
    checked = check_annotation(REC, [(" answer ", ["12 SHELLS", "lena"]), (17, [12])])
    assert checked.kept == [("Answer", ["12 shells", "Lena"]), ("17", ["12"])]
    assert checked.repaired == 3  # key "Answer", "12 shells", "Lena"; numbers are not repairs
    assert not checked.dropped


def test_check_merges_repeated_keys_and_values():
    checked = check_annotation(REC, [("17", ["12 shells"]), ("17", ["12 shells", "5 shells"])])
    assert checked.kept == [("17", ["12 shells", "5 shells"])]
    kept_all = check_annotation(REC, [("17", ["12 shells", "12 shells"])], dedupe=False).kept
    assert kept_all == [("17", ["12 shells", "12 shells"])]


def test_kept_pairs_are_exactly_those_the_mask_builder_places():
    tok = train_tokenizer([REC.text] * 3, vocab_size=300, individual_digits=True)
    noisy = list(GOOD.items()) + [("12 shells", ["5 shells", "Lena"]), ("Lena", ["17"]), ("17", ["band"])]
    kept = check_annotation(REC, noisy).kept
    encoded = encode_record(tok, Record(REC.prompt, REC.target, kept), span_columns="all")
    assert encoded.n_pairs == sum(len(v) for _, v in kept) and not encoded.unaligned


# --------------------------------------------------------------------------- prompt, demos, instructions


def test_shipped_demos_are_valid_original_and_align_to_tokens():
    demos = load_demos("builtin:math")
    assert len(demos) >= 4
    for kind in ("bytelevel", "metaspace"):
        tok = train_tokenizer([d.text for d in demos], kind=kind, vocab_size=300, individual_digits=True)
        for demo in demos:
            encoded = encode_record(tok, demo, span_columns="all")
            assert not encoded.unaligned, (kind, encoded.unaligned)
            assert any(key == demo.target for key, _ in demo.important)  # the answer is analysed
    svamp_words = ("Randy", "Danny", "wrappers", "bottle caps")
    assert not any(w in d.prompt for d in demos for w in svamp_words)


def test_shipped_instructions_state_the_papers_hint():
    text = load_instructions("builtin:generic").lower()
    for phrase in ("entities, values and operation words", "later tokens only see earlier ones", "answer must be analysed"):
        assert phrase in text
    assert "word problem" in load_instructions("builtin:math")


def test_unknown_builtin_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped: math"):
        resolve_file("builtin:chemistry", "demos")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_demos(tmp_path / "nope.jsonl")


def test_a_demo_with_an_invalid_pair_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "demos.jsonl"
    good = {"input": REC.prompt, "target": REC.target, "important": [{"17": ["12 shells"]}]}
    bad = dict(good, important=[{"12 shells": ["5 shells"]}])
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"demos\.jsonl:3: demo pair '12 shells' <- '5 shells': value not before key"):
        load_demos(path)


def test_messages_are_system_then_demo_turns_then_the_record():
    demos = load_demos("builtin:math")[:2]
    messages = build_messages(REC, demos, "INSTRUCTIONS HERE")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "INSTRUCTIONS HERE" in messages[0]["content"] and "JSON object" in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {k: v for k, v in demos[0].important}
    last = json.loads(messages[-1]["content"].split("\n", 1)[1])
    assert last == {"input": REC.prompt, "target": REC.target}


# --------------------------------------------------------------------------- ids and output lines


def _items(*metas):
    return [(i + 1, Record("p", "t", [], dict(m))) for i, m in enumerate(metas)]


def test_ids_auto_prefer_an_existing_unique_field_else_the_line_index():
    assert assign_ids(_items({"ID": "a"}, {"ID": "b"})) == ["a", "b"]
    assert assign_ids(_items({"id": 7, "ID": "a"}, {"id": 8, "ID": "b"})) == [7, 8]
    assert assign_ids(_items({"ID": "a"}, {"ID": "a"})) == [0, 1]  # duplicates: not an id
    assert assign_ids(_items({"ID": "a"}, {})) == [0, 1]
    items = [(3, Record("p", "t")), (5, Record("q", "t"))]  # blank lines in between
    assert assign_ids(items) == [2, 4]
    assert assign_ids(_items({"ID": "a"}, {"ID": "b"}), ":line") == [0, 1]


def test_explicit_id_field_must_exist_and_be_unique():
    assert assign_ids(_items({"uid": "x"}, {"uid": "y"}), "uid") == ["x", "y"]
    with pytest.raises(RecordError, match=r"in.jsonl:2: id field 'uid' missing"):
        assign_ids(_items({"uid": "x"}, {}), "uid", "in.jsonl")
    with pytest.raises(RecordError, match=r"in.jsonl:2: duplicate id 'x' \(first on line 1\)"):
        assign_ids(_items({"uid": "x"}, {"uid": "x"}), "uid", "in.jsonl")


def test_output_line_keeps_meta_and_explains_an_empty_annotation():
    record = record_from_json({"input": "a b", "target": 3, "ID": "q1", "cat_empty_reason": "old"})
    line = json.loads(output_line(record, "q1", [("3", ["a"])]))
    assert line == {"ID": "q1", "cat_id": "q1", "input": "a b", "target": 3, "important": [{"3": ["a"]}]}
    empty = json.loads(output_line(record, "q1", [], "no valid pair"))
    assert empty["cat_empty_reason"] == "no valid pair" and "important" not in empty


def test_report_sits_next_to_the_output(tmp_path):
    assert report_path_for(tmp_path / "train.jsonl") == tmp_path / "train.report.json"
    assert report_path_for(tmp_path / "train.out") == tmp_path / "train.out.report.json"


def test_read_records_names_file_and_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n\n{"input": "a"\n')
    with pytest.raises(RecordError, match=r"in\.jsonl:3: not valid JSON"):
        read_records(path)


def test_zero_shot_messages_have_no_demo_turns():
    messages = build_messages(REC, [], "")
    assert [m["role"] for m in messages] == ["system", "user"]


def test_a_named_key_variable_must_be_set(monkeypatch):
    from cattune.annotate.llm import make_client

    monkeypatch.delenv("CATTUNE_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="CATTUNE_UNSET_KEY is not set"):
        make_client("http://127.0.0.1:9/v1", "CATTUNE_UNSET_KEY", require_key=True)
    assert make_client("http://127.0.0.1:9/v1", "CATTUNE_UNSET_KEY").max_retries == 0


@pytest.mark.parametrize("url", ["127.0.0.1:9/v1", "htp://host/v1", "localhost:8000", "http:///v1"])
def test_a_base_url_without_scheme_or_host_fails_at_once(url):
    from cattune.annotate.llm import make_client

    with pytest.raises(ValueError, match="must start with http:// or https:// and name a host"):
        make_client(url)
    with pytest.raises(ValueError) as info:  # a password in it is not repeated
        make_client("ftp://user:s3cr3t-pass@host/v1")
    assert "s3cr3t-pass" not in str(info.value)
