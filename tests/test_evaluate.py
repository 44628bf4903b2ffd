"""evaluate(): batched greedy decoding, answer checking, attention ratio."""

import pytest
import torch

from cattune import stg
from cattune.checkers import check_exact, check_gsm8k, check_mc, check_numeric, numeric_error
from cattune.evaluate import evaluate
from cattune.tiny import build
from cattune.config import CATConfig
from cattune.trainer import CATTrainer
from cattune.reading import Reading

torch.set_num_threads(1)


def test_checkers_on_real_formats():
    assert check_exact(" High Risk ", "High Risk") and not check_exact("High", "High Risk")
    assert check_numeric("84.0", "84") and check_numeric("1,234", "1234.0") and not check_numeric("83", "84")
    assert check_gsm8k("She pays 3 * 24 = 72 dollars.\n#### 72", "Natalia sold 48 ... #### 72")
    assert not check_gsm8k("#### 71", "#### 72")
    assert check_mc("(B)", "B") and check_mc("Answer: C", "C") and check_mc("D) 12 apples", "D")
    assert not check_mc("B", "C") and not check_mc("no idea", "A")
    # integer answers match exactly, at any scale (GSM8K, MAWPS)
    assert not check_gsm8k("#### 10001", "#### 10000") and not check_numeric("106492.0", "106491.0")
    assert check_numeric("106491", "106491.0") and check_numeric("2.5", "2.50") and not check_numeric("2.51", "2.5")
    # ARC questions whose choices are labelled 1-4
    assert check_mc("2", "2") and check_mc("(3)", "3") and check_mc("Answer: 4", "4")
    assert not check_mc("2", "3") and not check_mc("12 apples", "1")


def test_numeric_error_says_how_far_off_numeric_answers_are():
    # STG_H's exact index: 56 answered 54, 39 answered 39.0, 70 answered with no number
    assert numeric_error(["56", "39", "70"], ["54", "39.0", "no idea"]) == (1.0, 1)
    assert numeric_error(["-2.5", "1,000"], ["-3", "998"]) == (1.25, 0)
    assert numeric_error(["7"], ["?"]) == (None, 1)
    # not a numeric task: a label, or a target that only contains a number
    assert numeric_error(["High Risk", "56"], ["High Risk", "56"]) == (None, 0)
    assert numeric_error(["3 apples"], ["3"]) == (None, 0) and numeric_error([], []) == (None, 0)


def test_evaluate_a_handful_of_records(tmp_path):
    data = stg.generate("E")
    records = data["train_S"][:48]
    model, tok = build([r.text for r in data["train_L"]], seed=0, hidden_size=64, intermediate_size=128)
    args = CATConfig(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=16, learning_rate=3e-3,
                     save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, cat_alpha=5.0,
                     cat_gamma_decay=0.0)
    CATTrainer(model=model, args=args, train_dataset=records, processing_class=tok).train()
    res = evaluate(model, tok, records[:12], batch_size=5, progress=False)
    assert res.n == 12 and len(res.predictions) == 12
    assert res.correct == sum(p["correct"] for p in res.predictions)
    # it has learned the answer format: every prediction is one of the labels
    assert {p["prediction"] for p in res.predictions} <= {"High Risk", "Low Risk", "Middle Risk"}
    assert res.accuracy >= 0.5
    assert res.attention_ratio is not None and res.attention_ratio > 1.0
    assert res.abs_error is None and res.unparsed == 0  # labels, not numbers
    # left-padded batching gives the same answers as one record at a time
    one = evaluate(model, tok, records[:4], batch_size=1, progress=False)
    assert [p["prediction"] for p in one.predictions] == [p["prediction"] for p in res.predictions[:4]]


def test_layers_out_of_range_fail_before_any_answer_is_generated(monkeypatch):
    import importlib

    import pytest

    evaluate_module = importlib.import_module("cattune.evaluate")  # the package exports the function too

    data = stg.generate("E")
    model, tok = build([r.text for r in data["train_S"]], seed=0, hidden_size=32, intermediate_size=64)

    def never(*args, **kwargs):
        raise AssertionError("answers were generated before the layers were checked")

    monkeypatch.setattr(evaluate_module, "generate_answers", never)
    with pytest.raises(ValueError, match=r"layers \[7\] out of range"):
        evaluate(model, tok, data["iid_test"][:2], reading=Reading(layers=[7]), progress=False)


def test_register_checker_serves_tasks_and_refuses_a_silent_replacement():
    from cattune.checkers import CHECKERS, register_checker
    from cattune.tasks import Task

    register_checker("upper", lambda prediction, target: prediction.strip().upper() == target.strip().upper())
    try:
        task = Task(name="UP", source={"files": {"test": "x.jsonl"}}, checker="upper")
        assert task.check(" yes", "YES") and not task.check("no", "YES")
        with pytest.raises(ValueError, match="already registered"):
            register_checker("upper", CHECKERS["exact"])
        with pytest.raises(TypeError, match="callable"):
            register_checker("broken", "exact")
    finally:
        CHECKERS.pop("upper", None)
