"""Records: reading the paper's JSONL format, validation messages, lossless and atomic writes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cattune.records import Record, RecordError, load_records, normalize_important, record_from_json, save_records

from conftest import FIXTURE_DIR


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- the two shapes of `important` ------------------------------------------------------


def test_both_important_shapes_normalise_to_the_same_pairs():
    as_list = [{"High Risk": ["Smoking: 8", "Weight: 4"]}, {"Answer": ["Exercise: 2"]}]
    as_object = {"High Risk": ["Smoking: 8", "Weight: 4"], "Answer": ["Exercise: 2"]}
    expected = [("High Risk", ["Smoking: 8", "Weight: 4"]), ("Answer", ["Exercise: 2"])]
    assert normalize_important(as_list) == expected
    assert normalize_important(as_object) == expected


def test_important_lenient_forms():
    # A single string stands for a one-element list; empty strings would match everywhere
    # and are dropped; a missing annotation is an empty one.
    assert normalize_important({"k": "v"}) == [("k", ["v"])]
    assert normalize_important([{"k": ["a", "", "b"]}]) == [("k", ["a", "b"])]
    assert normalize_important(None) == []
    # The same key twice in the list form is two entries, not a merge.
    assert normalize_important([{"k": ["a"]}, {"k": ["b"]}]) == [("k", ["a"]), ("k", ["b"])]


@pytest.mark.parametrize(
    "raw, reason",
    [
        ([{"a": ["x"], "b": ["y"]}], "exactly one key"),
        (["a"], "exactly one key"),
        ([{}], "exactly one key"),
        ("a string", "got str"),
        (42, "got int"),
        ({"k": [1, 2]}, "list of strings"),
        ({"k": {"nested": "x"}}, "list of strings"),
        ({"": ["x"]}, "empty key"),
    ],
)
def test_wrong_shaped_important_is_rejected_with_a_reason(raw, reason):
    with pytest.raises(ValueError, match=reason):
        normalize_important(raw)


def test_load_accepts_both_shapes_in_one_file(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [
        json.dumps({"input": "Smoking: 8 Answer: ", "target": "High", "important": [{"High": ["Smoking: 8"]}]}),
        json.dumps({"input": "Smoking: 8 Answer: ", "target": "High", "important": {"High": ["Smoking: 8"]}}),
    ])
    a, b = load_records(path)
    assert a.important == b.important == [("High", ["Smoking: 8"])]
    assert a.text == "Smoking: 8 Answer: High"


# --- targets ----------------------------------------------------------------------------


def test_numeric_targets_become_strings_and_are_written_back_as_numbers(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"input": "p ", "target": 8}),
        json.dumps({"input": "p ", "target": 80.0}),
        json.dumps({"input": "p ", "target": -3}),
        json.dumps({"input": "p ", "target": "8"}),
    ])
    records = load_records(src)
    assert [r.target for r in records] == ["8", "80.0", "-3", "8"]
    save_records(tmp_path / "out.jsonl", records)
    written = [json.loads(line)["target"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == [8, 80.0, -3, "8"]
    assert [type(t) for t in written] == [int, float, int, str]


def test_a_changed_target_is_written_as_the_new_text(tmp_path):
    # The remembered JSON number must not overwrite an edit of the target.
    (record,) = load_records(write_lines(tmp_path / "in.jsonl", [json.dumps({"input": "p ", "target": 8})]))
    record.target = "9 apples"
    save_records(tmp_path / "out.jsonl", [record])
    assert json.loads((tmp_path / "out.jsonl").read_text())["target"] == "9 apples"


def test_released_stg_h_round_trips_byte_for_byte(tmp_path, data_dir):
    # STG_H's targets are JSON ints: they must survive load -> save unchanged.
    src = data_dir / "stg_paper" / "STG_H_train.jsonl"
    records = load_records(src)
    assert records[0].target == "32" and records[0].important == [
        ("Answer: 32", ["47.9", "28.9", "41.9%", "19.2", "73.8%", "74.0"])
    ]
    save_records(tmp_path / "out.jsonl", records)
    assert (tmp_path / "out.jsonl").read_bytes() == src.read_bytes()


def test_released_svamp_round_trips_with_every_extra_field(tmp_path, data_dir):
    src = data_dir / "svamp_train_annotated.jsonl"
    records = load_records(src)
    first = records[0]
    assert first.meta == {
        "Answer": 80.0,
        "Question": "How many blocks did he use to build the tower and the house altogether?",
        "Equation": "( 27.0 + 53.0 )",
        "Body": "Randy has 58 blocks. He uses 27 blocks to build a tower and 53 blocks to build a house.",
        "Type": "Addition",
        "ID": "chal-690",
        "idx": 695,
    }
    assert first.target == "80.0"
    save_records(tmp_path / "out.jsonl", records)
    original = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()]
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(written) == len(original) and (len(original) == 600 or data_dir == FIXTURE_DIR)
    for before, after in zip(original, written):
        # The annotation is written in its normal form: a bare string value becomes a
        # one-element list (some SVAMP lines have them) and an empty one is left out.
        pairs = normalize_important(before.pop("important", None))
        if pairs:
            before["important"] = [{key: values} for key, values in pairs]
        assert after == before
        assert list(after) == list(before)  # field order too


def test_plain_object_important_is_written_as_the_list_form(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"input": "a b ", "target": "c", "important": {"c": ["a", "b"]}})])
    save_records(tmp_path / "out.jsonl", load_records(src))
    assert json.loads((tmp_path / "out.jsonl").read_text())["important"] == [{"c": ["a", "b"]}]


# --- errors name file and line ----------------------------------------------------------

GOOD = json.dumps({"input": "p ", "target": "t"})


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"input": "p ", "target": ', "not valid JSON"),
        ("not json at all", "not valid JSON"),
        (json.dumps({"target": "t"}), "missing field 'input'"),
        (json.dumps({"input": "p "}), "missing field 'target'"),
        (json.dumps({"input": 3, "target": "t"}), "field 'input' must be a string"),
        (json.dumps({"input": "p ", "target": None}), "field 'target' must be a string or a number"),
        (json.dumps({"input": "p ", "target": True}), "field 'target' must be a string or a number"),
        (json.dumps({"input": "p ", "target": [1]}), "field 'target' must be a string or a number"),
        (json.dumps({"input": "p ", "target": ""}), "field 'target' is empty"),
        (json.dumps({"input": "p ", "target": "  "}), "field 'target' is empty"),
        ('{"input": "p ", "target": NaN}', "non-finite"),
        (json.dumps(["input", "target"]), "expected a JSON object"),
        (json.dumps({"input": "p ", "target": "t", "important": [{"a": ["x"], "b": ["y"]}]}), "exactly one key"),
        (json.dumps({"input": "p ", "target": "t", "important": "x"}), "important must be"),
        ('{"input": "p ", "target": "t", "target": "u"}', "duplicate key 'target'"),
        ('{"input": "p \\ud800", "target": "t"}', "lone surrogate"),
        (b'{"input": "p \xe9", "target": "t"}', "not UTF-8 (byte 0xe9 at column 14)"),
    ],
)
def test_broken_line_raises_record_error_naming_file_and_line(tmp_path, bad, reason):
    # Line 4, after a blank line: line numbers count every physical line of the file.
    lines = [GOOD.encode(), GOOD.encode(), b"", bad if isinstance(bad, bytes) else bad.encode(), GOOD.encode()]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(RecordError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ")
    assert reason in message
    # The lenient mode keeps the three good records and says where the broken one was.
    with _captured("cattune.records") as logged:
        assert len(load_records(path, on_error="skip")) == 3
    assert f"{path}: skipped 1 broken record(s): line 4: " in logged.getvalue()


def _captured(name):
    import contextlib
    import io
    import logging

    @contextlib.contextmanager
    def cm():
        buf, logger = io.StringIO(), logging.getLogger(name)
        handler = logging.StreamHandler(buf)
        logger.addHandler(handler)
        try:
            yield buf
        finally:
            logger.removeHandler(handler)

    return cm()


def test_utf16_files_are_read(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes((GOOD + "\r\n" + json.dumps({"input": "é ", "target": "t"}) + "\r\n").encode("utf-16"))
    assert [r.prompt for r in load_records(path)] == ["p ", "é "]


def test_annotation_in_another_normalisation_form_matches_the_prompt(tmp_path):
    import unicodedata

    nfc = "Le café coûte 3 euros. Prix: "
    line = {"input": nfc, "target": "3", "important": [{"3": [unicodedata.normalize("NFD", "café")]}]}
    record = load_records(write_lines(tmp_path / "d.jsonl", [json.dumps(line)]))[0]
    assert record.important[0][1][0] in record.prompt


def test_the_papers_gsm8k_nested_value_is_skipped_in_lenient_mode(tmp_path):
    # The release's GSM8K file has one record whose annotation value is an object.
    bad = {"input": "q ", "target": "1", "important": [{"1": [{"nested": "x"}]}]}
    path = write_lines(tmp_path / "gsm.jsonl", [GOOD, json.dumps(bad), GOOD])
    with pytest.raises(RecordError, match=":2: .*must be a list of strings"):
        load_records(path)
    assert len(load_records(path, on_error="skip")) == 2


def test_record_error_is_a_value_error():
    # Callers (the CLI) catch ValueError to print a one-line error.
    assert issubclass(RecordError, ValueError)


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_records(tmp_path / "absent.jsonl")
    with pytest.raises(FileNotFoundError, match="is a directory, not a file"):
        load_records(tmp_path)


def test_config_files_name_themselves_when_unreadable(tmp_path):
    from cattune.files import load_config_file

    bad = tmp_path / "run.yaml"
    bad.write_bytes(b"train: caf\xe9.jsonl\n")
    with pytest.raises(ValueError, match=r"run.yaml: not UTF-8 \(byte 0xe9 at offset 10\)"):
        load_config_file(bad)
    with pytest.raises(FileNotFoundError, match="is a directory, not a file"):
        load_config_file(tmp_path)


def test_every_config_file_refuses_a_key_twice(tmp_path):
    """Task files and annotate rules too, not only train and experiment configs."""
    from cattune.annotate.rules import load_rules
    from cattune.tasks import TaskError, load_task_file

    task = tmp_path / "task.yaml"
    task.write_text("name: T\nchecker: exact\nchecker: numeric\nsource: {files: {test: t.jsonl}}\n")
    with pytest.raises(TaskError, match=r"task.yaml:3: key 'checker' appears twice"):
        load_task_file(task)
    rule = tmp_path / "rule.json"
    rule.write_text('{"{target}": ["a"], "{target}": ["b"]}')
    with pytest.raises(ValueError, match=r"rule.json: key '\{target\}' appears twice"):
        load_rules(rule)


def test_blank_lines_and_a_byte_order_mark_are_fine(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n\n   \n" + GOOD).encode())
    assert [r.prompt for r in load_records(path)] == ["p ", "p "]


def test_record_from_json_without_important_has_no_annotation():
    r = record_from_json({"input": "p ", "target": "t", "note": [1, 2]})
    assert r == Record(prompt="p ", target="t", important=[], meta={"note": [1, 2]})
    assert r.to_json() == {"note": [1, 2], "input": "p ", "target": "t"}


# --- atomic save ------------------------------------------------------------------------


def _old_file(tmp_path):
    path = tmp_path / "records.jsonl"
    save_records(path, [Record("old ", "1")])
    return path, path.read_bytes()


def test_save_that_fails_while_serialising_leaves_the_old_file(tmp_path):
    path, before = _old_file(tmp_path)
    records = [Record("new ", "2"), Record("bad ", "3", meta={"obj": object()}), Record("never ", "4")]
    with pytest.raises(TypeError):
        save_records(path, records)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["records.jsonl"]


def test_save_that_fails_while_writing_leaves_the_old_file_and_no_temp_file(tmp_path):
    # A lone surrogate serialises (ensure_ascii=False) but cannot be encoded as UTF-8:
    # the failure happens with the temporary file already open.
    path, before = _old_file(tmp_path)
    with pytest.raises(UnicodeEncodeError):
        save_records(path, [Record("new ", "2"), Record("bad \ud800 ", "3")])
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["records.jsonl"]


def test_save_takes_a_generator_and_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "out.jsonl"
    save_records(path, (Record(f"p{i} ", str(i)) for i in range(3)))
    assert [r.target for r in load_records(path)] == ["0", "1", "2"]
    assert sorted(os.listdir(path.parent)) == ["out.jsonl"]


def test_saved_files_get_ordinary_permissions(tmp_path):
    # The temporary file behind the atomic write is created 0600; the result must not be.
    umask = os.umask(0o022)
    try:
        new = tmp_path / "new.jsonl"
        save_records(new, [Record("p ", "t")])
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        existing = tmp_path / "existing.jsonl"
        existing.write_text("")
        existing.chmod(0o640)
        save_records(existing, [Record("p ", "t")])
        assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


# --- issue 34: nesting, non-finite numbers, numbers as written ---------------------------


@pytest.mark.parametrize("bad, reason", [
    ('{"input": "p ", "target": "t", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 100 levels"),
    ('{"input": "p ", "target": "t", "x": ' + "[" * 150 + "]" * 150 + "}", "nested more than 100 levels"),
    ('{"input": "p ", "target": "t", "x": NaN}', "NaN is a non-finite number"),
    ('{"input": "p ", "target": "t", "x": {"y": -Infinity}}', "-Infinity is a non-finite number"),
    ('{"input": "p ", "target": "t", "x": 1e400}', "too large for a float"),
])
def test_deep_nesting_and_non_finite_numbers_are_a_broken_line_that_can_be_skipped(tmp_path, bad, reason):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([GOOD, bad, GOOD]) + "\n")
    with pytest.raises(RecordError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}:2: ") and reason in str(info.value)
    assert len(load_records(path, on_error="skip")) == 2


def test_a_number_keeps_the_text_it_was_written_with(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        '{"input": "p ", "target": 100000000000000000000000.0, "w": 0.10}',
        '{"input": "p ", "target": 0.10}',
        '{"input": "p ", "target": 80.0}',
    ])
    records = load_records(src)
    assert [r.target for r in records] == ["100000000000000000000000.0", "0.10", "80.0"]
    save_records(tmp_path / "out.jsonl", records)
    assert [r.target for r in load_records(tmp_path / "out.jsonl")] == [r.target for r in records]
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [w["target"] for w in written] == ["100000000000000000000000.0", "0.10", 80.0]
    assert written[0]["w"] == 0.1


def test_a_nan_set_in_code_is_refused_when_written_not_written_as_non_json(tmp_path):
    record = Record(prompt="p ", target="t", meta={"score": float("nan")})
    with pytest.raises(ValueError, match="NaN or Infinity"):
        save_records(tmp_path / "out.jsonl", [record])
    assert not (tmp_path / "out.jsonl").exists()
