"""cattune.tasks: registry, loaders (generated, local files, hub mapping), checkers, placebo."""

from __future__ import annotations

import json
import re

import pytest

from cattune import sources, stg, tasks
from cattune.experiment import placebo_records
from cattune.masks import encode_record, find_occurrences
from cattune.records import Record
from cattune.tiny import train_tokenizer

from conftest import DATA_DIR

DATA = DATA_DIR


def test_builtin_registry_and_lookup():
    names = {t.name for t in tasks.list_tasks()}
    assert {"STG_E", "STG_H", "MAWPS", "SVAMP", "GSM8K", "ASDiv", "ARC-E"} <= names
    assert tasks.get_task("arc_e").name == "ARC-E"
    assert tasks.get_task("stg-e") is tasks.get_task("STG_E")
    assert tasks.get_task("gsm8k").checker == "gsm8k"
    assert tasks.get_task("STG_H").checker == "numeric"
    assert tasks.get_task("ARC-E").checker == "mc"
    with pytest.raises(tasks.TaskError, match="unknown task 'nope'.*registered"):
        tasks.get_task("nope")


def test_annotation_defaults():
    assert tasks.get_task("SVAMP").annotate_args() == ["--instructions", "builtin:math", "--demos", "builtin:math"]
    assert tasks.get_task("ARC-E").annotate_args() == ["--instructions", "builtin:generic"]
    assert tasks.get_task("STG_E").rule == stg.E_RULE
    assert tasks.get_task("STG_E").annotate_args()[0] == "--rule"


# --------------------------------------------------------------------------- checkers


def test_gsm8k_checker_on_real_answers():
    t = tasks.get_task("GSM8K")
    target = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
              "altogether in April and May.\n#### 72")
    assert t.check("She sold 24 in May, so 48+24 = 72.\n#### 72", target)
    assert t.check("#### 72.0", target)
    assert t.check("72", target)  # no "####": the number itself
    assert not t.check("... 72 clips.\n#### 71", target)
    assert t.check("#### 1,234", "#### 1234")
    assert not t.check("#### 24", target)


@pytest.mark.parametrize("prediction", ["B", "(B)", "Answer: B", "B) a rock", "The answer is B.", "answer: (B)"])
def test_mc_checker_letters(prediction):
    assert tasks.get_task("ARC-E").check(prediction, "B")


@pytest.mark.parametrize("prediction", ["C", "(C)", "Answer: C", "", "no idea"])
def test_mc_checker_rejects(prediction):
    assert not tasks.get_task("ARC-E").check(prediction, "B")


def test_numeric_checker_formats_and_tolerance():
    t = tasks.get_task("SVAMP")
    assert t.check("84.0", "84") and t.check("84", "84.0") and t.check(" 84 apples", "84.0")
    assert t.check("1,234", "1234.0") and t.check("-3.5", "-3.50")
    assert not t.check("85", "84.0") and not t.check("8.4", "84")
    assert not t.check("no number", "84")
    loose = tasks.task_from_dict({"name": "loose", "source": {"files": {}}, "checker": "numeric",
                                  "checker_options": {"rel_tol": 0.01}})
    assert loose.check("84.5", "84") and not t.check("84.5", "84")
    with pytest.raises(tasks.TaskError, match="checker_options"):
        tasks.task_from_dict({"name": "bad", "source": {"files": {}}, "checker": "numeric",
                              "checker_options": {"tolerance": 1}})
    assert tasks.get_task("STG_E").check("High Risk", "High Risk")
    assert not tasks.get_task("STG_E").check("Low Risk", "High Risk")
    assert tasks.get_task("STG_H").check("57", "57") and not tasks.get_task("STG_H").check("58", "57")


# --------------------------------------------------------------------------- loading


def test_stg_tasks_generate_annotated_splits():
    e = tasks.get_task("STG_E")
    assert e.train_split == "train_M" and e.test_splits == ("iid_test", "ood_test")
    s, m = e.load("train_S"), e.load("train_M")
    assert len(s) == 400 and len(m) == 800 and [r.prompt for r in s] == [r.prompt for r in m[:400]]
    assert all(r.important and r.important[0][0] == r.target for r in s)
    s[0].important = []  # callers get copies: the cache is not touched
    assert e.load("train_S")[0].important
    assert len(e.load("ood_test", limit=7)) == 7
    h = tasks.get_task("STG_H")
    hs, hm = h.load("train_S"), h.load("train_M")
    assert (len(hs), len(hm), len(h.load("train_L"))) == (750, 1500, 3000)
    assert [r.prompt for r in hs] == [r.prompt for r in hm[:750]]
    assert all(len(r.important[0][1]) == 6 for r in hs[:50])
    with pytest.raises(tasks.TaskError, match="unknown split"):
        e.load("train")


def test_svamp_from_shared_files(release_dir):
    t = tasks.get_task("SVAMP").with_files(
        {"train": str(release_dir / "svamp_train_annotated.jsonl"), "test": str(release_dir / "svamp_test.jsonl")})
    train, test = t.load("train"), t.load("test")
    assert len(train) == 600 and len(test) == 200
    assert sum(bool(r.important) for r in train) >= 590 and train[0].prompt.endswith("Answer: ")
    assert train[0].target == "80.0" and t.check("80", train[0].target)
    assert t.checker == "numeric" and tasks.get_task("SVAMP").kind == "release"  # the registry is unchanged


def test_hub_task_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CATTUNE_SHARED_DATA", str(tmp_path))  # no release here: the hub is the fallback

    def offline(name, config, split):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(sources, "_hub_load_dataset", offline)
    with pytest.raises(tasks.TaskError) as err:
        tasks.get_task("GSM8K").load("test")
    msg = str(err.value)
    assert "openai/gsm8k" in msg and "network" in msg and "files:" in msg
    # files override only some splits: the others still come from the hub
    t = tasks.get_task("GSM8K").with_files({"train": str(DATA / "svamp_test.jsonl")})
    assert len(t.load("train")) == len((DATA / "svamp_test.jsonl").read_text().splitlines())
    with pytest.raises(tasks.TaskError, match="network"):
        t.load("test")


def test_hub_row_mapping_for_each_builtin(monkeypatch, tmp_path):
    monkeypatch.setenv("CATTUNE_SHARED_DATA", str(tmp_path))  # no release here: the hub is the fallback
    rows = {
        "openai/gsm8k": {"question": "Natalia sold 48 clips. How many?", "answer": "48/2 = 24\n#### 72"},
        "ChilleD/SVAMP": {"Body": "Randy has 58 blocks.", "Question": "How many blocks", "Answer": 80.0},
        "MU-NLPC/Calc-mawps": {"question": "Joan found 70 shells.", "result": "43"},
        "EleutherAI/asdiv": {"body": "Cody had marbles.", "question": "How many?", "answer": "12 (marbles)"},
        "allenai/ai2_arc": {"question": "Which is a metal?",
                            "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]},
                            "answerKey": "2"},
    }
    seen = []
    monkeypatch.setattr(sources, "_hub_load_dataset", lambda n, c, s: (seen.append((n, c, s)), [rows[n]])[1])
    gsm = tasks.get_task("GSM8K").load("test")[0]
    assert gsm.prompt == "Natalia sold 48 clips. How many? Answer: " and gsm.target.endswith("#### 72")
    sv = tasks.get_task("SVAMP").load("train")[0]
    assert (sv.prompt, sv.target) == ("Randy has 58 blocks.. How many blocks. Answer: ", "80.0")
    assert tasks.get_task("MAWPS").load("test")[0].target == "43"
    assert tasks.get_task("ASDiv").load("train")[0].target == "12"
    arc = tasks.get_task("ARC-E").load("test")[0]
    assert arc.prompt == "Which is a metal?\nA. wood\nB. iron\nC. glass\nAnswer: " and arc.target == "B"
    assert ("EleutherAI/asdiv", "asdiv", "validation[:80%]") in seen and ("openai/gsm8k", "main", "test") in seen


def test_task_file_yaml_with_mapping_and_paper_format(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (10, 5)]]
    (tmp_path / "data" / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paper = [{"input": "Tom has 3 apples. Answer: ", "target": "3", "important": [{"3": ["Tom has 3 apples"]}]}]
    (tmp_path / "data" / "paper.jsonl").write_text(json.dumps(paper[0]) + "\n")
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n"
        "  - name: MY_ADD\n"
        "    checker: gsm8k\n"
        "    instructions: builtin:math\n"
        "    source:\n"
        "      files: {train: data/raw.jsonl, test: data/raw.jsonl}\n"
        "      input: \"Q: {question}\\nAnswer: \"\n"
        "      target: answer\n"
        "  - name: MY_PAPER\n"
        "    checker: numeric\n"
        "    source: {files: {train: data/paper.jsonl}}\n"
        "    test_splits: train\n"
    )
    loaded = tasks.load_task_file(tmp_path / "tasks.yaml")
    assert [t.name for t in loaded] == ["MY_ADD", "MY_PAPER"]
    add = tasks.get_task("my_add")
    recs = add.load("train")
    assert len(recs) == 3 and recs[2].prompt == "Q: What is 10 plus 5?\nAnswer: "
    assert add.check("#### 15", recs[2].target) and recs[2].meta["question"] == "What is 10 plus 5?"
    p = tasks.get_task("MY_PAPER")
    assert p.test_splits == ("train",) and p.load("train")[0].important == [("3", ["Tom has 3 apples"])]
    # JSON: a single object
    (tmp_path / "one.json").write_text(json.dumps({"name": "ONE", "checker": "exact",
                                                   "source": {"files": {"test": "data/paper.jsonl"}}}))
    assert tasks.load_task_file(tmp_path / "one.json")[0].load("test")[0].target == "3"


@pytest.mark.parametrize("obj,match", [
    ({"name": "x"}, "needs 'source'"),
    ({"name": "x", "source": {"files": {}}, "checker": "fuzzy"}, "unknown checker"),
    ({"name": "x", "source": {"files": {}}, "colour": 1}, "unknown fields"),
    ({"name": "x", "source": {"hub": "a/b"}}, "input"),
    ({"name": "x", "source": {"hub": "a/b", "files": {}}}, "exactly one"),
    ({"name": "x", "source": {"files": {}, "input": "{q}", "target_transform": "upper"}}, "target_transform"),
])
def test_bad_task_definitions(obj, match):
    with pytest.raises(tasks.TaskError, match=match):
        tasks.task_from_dict(obj)


def test_mapping_errors_name_file_and_line(tmp_path):
    (tmp_path / "raw.jsonl").write_text(json.dumps({"q": "hi", "a": "1"}) + "\n" + json.dumps({"q": "x"}) + "\n")
    t = tasks.task_from_dict({"name": "m", "source": {"files": {"test": str(tmp_path / "raw.jsonl")},
                                                      "input": "{q}", "target": "a"}})
    with pytest.raises(ValueError, match=r"raw.jsonl:2: target field 'a'"):
        t.load("test")
    with pytest.raises(FileNotFoundError):
        t.with_files({"test": "missing.jsonl"}, base_dir=tmp_path).load("test")


# --------------------------------------------------------------------------- placebo


@pytest.fixture(scope="module")
def stg_e_tok():
    return train_tokenizer([r.text for r in tasks.get_task("STG_E").load("train_L")[:400]], vocab_size=500,
                           individual_digits=True)


def _item_spans(prompt, names):
    return [m.span() for n in names for m in re.finditer(rf"{re.escape(n)}: \d+", prompt)]


def test_stg_e_placebo_uses_unrelated_items_same_token_count(stg_e_tok):
    task = tasks.get_task("STG_E")
    records = task.load("train_S", limit=40)
    counts = {}
    placebo = placebo_records(records, task, seed=3, tokenizer=stg_e_tok, counts=counts)
    assert counts["values"] == 120 and counts.get("dropped", 0) == 0 and counts["preferred"] == 80
    for r, p in zip(records, placebo):
        assert [k for k, _ in p.important] == [r.target] and len(p.important[0][1]) == 3
        informative = _item_spans(r.prompt, stg.E_CAUSAL + stg.E_SPURIOUS)
        for value in p.important[0][1]:
            occ = find_occurrences(r.prompt, value)
            assert len(occ) == 1 and not any(s < occ[0][1] and occ[0][0] < e for s, e in informative), value
            assert not any(c.isdigit() for c in value) or re.search(r"(gene|size): \d+$", value)
        assert p.prompt == r.prompt and p.target == r.target
        for columns in ("last", "all"):
            real, fake = encode_record(stg_e_tok, r, span_columns=columns), encode_record(stg_e_tok, p, span_columns=columns)
            assert fake.rows == real.rows and not fake.unaligned
            if columns == "last":
                assert len(fake.pairs) == len(real.pairs)
    assert all(r.important == task.load("train_S", limit=40)[i].important for i, r in enumerate(records))
    # the same seed gives the same placebo, another seed another one
    again = placebo_records(records, task, seed=3, tokenizer=stg_e_tok)
    other = placebo_records(records, "STG_E", seed=4, tokenizer=stg_e_tok)
    assert [p.important for p in again] == [p.important for p in placebo]
    assert [p.important for p in other] != [p.important for p in placebo]


def test_stg_h_placebo_avoids_causal_and_spurious_items():
    task = tasks.get_task("STG_H")
    records = task.load("train_S", limit=15)
    counts = {}
    placebo = placebo_records(records, task, seed=0, counts=counts)
    assert counts["values"] == 90 and counts.get("dropped", 0) == 0 and counts["preferred"] >= 40
    names = [n for n, _ in (*stg.H_CAUSAL, *stg.H_SPURIOUS)]
    for r, p in zip(records, placebo):
        bad = [m.span() for n in names for m in re.finditer(rf"{re.escape(n)}: -?[\d.]+%?", r.prompt)]
        assert p.important[0][0] == r.important[0][0] and len(p.important[0][1]) == 6
        for value in p.important[0][1]:
            (s, e), = find_occurrences(r.text, value)
            assert e <= len(r.prompt) and not any(a < e and s < b for a, b in bad), value


def test_placebo_on_svamp_keeps_keys_and_moves_values(svamp_train, tokenizers):
    tok = tokenizers["bytelevel"]
    records = svamp_train[:60]
    counts = {}
    placebo = placebo_records(records, "SVAMP", seed=0, tokenizer=tok, counts=counts)
    placed = counts["random"] + counts.get("relaxed", 0)
    assert placed >= 0.7 * counts["values"], counts
    for r, p in zip(records, placebo):
        own = dict(r.important)
        keys = [k for k, _ in r.important]
        for key, values in p.important:
            assert key in keys
            key_start = find_occurrences(r.text, key)
            for v in values:
                assert not any(c.isdigit() for c in v)
                (s, e), = find_occurrences(r.text, v)  # found exactly once
                assert any(e <= k for k, _ in key_start)  # before an occurrence of its key
                causal = [o for c in own[key] for o in find_occurrences(r.text, c)]
                assert not any(a < e and s < b for a, b in causal)  # never this key's causal text
        real, fake = encode_record(tok, r, span_columns="all"), encode_record(tok, p, span_columns="all")
        assert set(fake.rows) <= set(real.rows)
    # without a tokenizer the length is counted in words and punctuation marks
    no_tok = placebo_records(records[:5], "SVAMP", seed=0)
    assert all(p.important for p in no_tok)


def test_placebo_generic_record_without_task():
    r = Record(prompt="The cat sat on the red mat near a big dog. Answer: ", target="mat",
               important=[("mat", ["red mat"])])
    (p,) = placebo_records([r], None, seed=1)
    (key, (value,)), = p.important
    assert key == "mat" and value != "red mat" and len(value.split()) == 2
    assert find_occurrences(r.text, value)[0][1] <= len(r.prompt)
    rng_values = {placebo_records([r], None, seed=s)[0].important[0][1][0] for s in range(10)}
    assert len(rng_values) >= 2
