"""cattune explain: attention heatmaps of one record and attention-ratio curves, as PNG files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from cattune import cli, explain, tasks
from cattune.records import Record, save_records
from cattune.tiny import build
from cattune.config import CATConfig
from cattune.trainer import CATTrainer
from cattune.reading import Reading

torch.set_num_threads(1)

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "vocab_size": 400}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR" and len(data) > 2000
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def stg_e():
    return tasks.get_task("STG_E")


@pytest.fixture(scope="module")
def trained(stg_e, tmp_path_factory):
    """A tiny model trained a few CAT steps (so that it has a log history), saved to disk."""
    model, tok = build([r.text for r in stg_e.load("train_L")[:400]], seed=0, **SMALL)
    out = tmp_path_factory.mktemp("model")
    args = CATConfig(output_dir=str(out / "run"), max_steps=6, per_device_train_batch_size=8, logging_steps=2,
                     learning_rate=3e-3, cat_gamma=1.0, cat_alpha=5.0, cat_gamma_decay=0.0, save_strategy="no",
                     report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = CATTrainer(model=model, args=args, train_dataset=stg_e.load("train_S", limit=48), processing_class=tok)
    trainer.train()
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    report = out / "train_report.json"
    report.write_text(json.dumps({"encode": trainer.encode_stats, "log_history": trainer.state.log_history}))
    return {"dir": out / "model", "model": model, "tok": tok, "report": report,
            "history": trainer.state.log_history}


def test_explain_cli_heatmap(trained, stg_e, tmp_path):
    data = tmp_path / "ood.jsonl"
    records = stg_e.load("ood_test", limit=5)
    save_records(data, records)
    out, js = tmp_path / "figs" / "rec3.png", tmp_path / "rec3.json"
    assert cli.main(["explain", "--model", str(trained["dir"]), "--data", str(data), "--record", "3",
                     "--span-columns", "all", "--out", str(out), "--json", str(js)]) == 0
    w, h = png_size(out)
    assert 600 <= w <= 5000 and 200 <= h <= 2000
    info = json.loads(js.read_text())
    target = records[3].target
    n_answer = len(trained["tok"](target, add_special_tokens=False)["input_ids"])
    assert info["target"] == target and info["answer_source"] == "target"
    assert len(info["weights"]) == n_answer == len(info["answer_tokens"])
    assert all(len(row) == len(info["prompt_tokens"]) for row in info["weights"])
    # rows are softmax rows over the whole sequence: their prompt part sums to at most 1
    assert all(0.5 < sum(row) <= 1.0 + 1e-4 for row in info["weights"])
    # the marked columns are the tokens of the three causal "Name: v" items, and only those
    text = records[3].prompt
    marked = "".join(info["prompt_tokens"][i] for i in info["causal_columns"])
    for span in records[3].important[0][1]:
        assert span.replace(" ", "") in marked.replace("␣", "")
    assert info["heatmap_ratio"] > 0 and info["attn_ratio"] > 0 and not info["unaligned"]
    assert "Smoking" in text
    # TASK:SPLIT instead of a file; the whole-span vs last-token choice changes the marks
    last = tmp_path / "last.json"
    assert cli.main(["explain", "--model", str(trained["dir"]), "--data", "STG_E:ood_test", "--record", "3",
                     "--out", str(tmp_path / "last.png"), "--span-columns", "last", "--json", str(last)]) == 0
    assert len(json.loads(last.read_text())["causal_columns"]) == 3
    png_size(tmp_path / "last.png")


def test_explain_record_with_prediction(trained, stg_e, tmp_path, monkeypatch):
    import importlib

    ev = importlib.import_module("cattune.evaluate")  # the package exports a function of that name

    rec = stg_e.load("ood_test", limit=1)[0]
    wrong = "Low Risk" if rec.target != "Low Risk" else "High Risk"
    monkeypatch.setattr(ev, "generate_answers", lambda *a, **k: [wrong])
    expl = explain.explain_record(trained["model"], trained["tok"], rec, use_prediction=True, record_index=0)
    assert expl.answer_source == "prediction" and expl.prediction == wrong
    assert "".join(expl.answer_tokens).replace("␣", " ").strip().replace(" ", "") == wrong.replace(" ", "")
    assert len(expl.causal_columns) > 0  # the marks come from the record's own annotation
    png_size(explain.plot_explanation(expl, tmp_path / "pred.png", show_special=True))


def test_explain_long_prompt_and_unannotated_record(trained, tmp_path):
    rec = Record(prompt="word " * 300 + "Answer: ", target="Low Risk")
    expl = explain.explain_record(trained["model"], trained["tok"], rec)
    assert expl.causal_columns == [] and expl.heatmap_ratio is None
    w, h = png_size(explain.plot_explanation(expl, tmp_path / "long.png"))
    assert w <= 48 * 100 and h <= 20 * 100


def test_ratio_curve_from_history_file_and_several_runs(trained, tmp_path):
    hist = trained["history"]
    assert sum("attn_ratio" in h for h in hist) == 3
    w, h = png_size(explain.plot_ratio_curve(hist, tmp_path / "a.png", alpha=5))
    assert 500 <= w <= 1000 and 300 <= h <= 600
    png_size(explain.plot_ratio_curve(trained["report"], tmp_path / "b.png"))
    png_size(explain.plot_ratio_curve(str(trained["report"]), tmp_path / "c.png"))
    # an experiment's logs/RUN.json and an overlay of two runs, through the CLI
    run_log = tmp_path / "E__tiny__cat__seed0.json"
    run_log.write_text(json.dumps({"run": {}, "log_history": hist}))
    other = tmp_path / "E__tiny__placebo__seed0.json"
    other.write_text(json.dumps([{**h, "attn_ratio": h["attn_ratio"] / 2} for h in hist if "attn_ratio" in h]))
    assert cli.main(["explain", "--log", str(run_log), "--log", str(other), "--out", str(tmp_path / "d.png"),
                     "--alpha", "5"]) == 0
    png_size(tmp_path / "d.png")
    assert not list(tmp_path.glob(".*.tmp"))


def test_errors(trained, tmp_path):
    with pytest.raises(ValueError, match="no attn_ratio"):
        explain.plot_ratio_curve([{"loss": 1.0, "step": 1}], tmp_path / "x.png")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"eval": {}}))
    with pytest.raises(ValueError, match="log_history"):
        explain.plot_ratio_curve(bad, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        explain.plot_ratio_curve(tmp_path / "missing.json", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    data = tmp_path / "one.jsonl"
    save_records(data, [Record(prompt="a b Answer: ", target="c")])
    assert cli.main(["explain", "--model", str(trained["dir"]), "--data", str(data), "--record", "4",
                     "--out", str(tmp_path / "y.png")]) == 1
    assert cli.main(["explain", "--data", str(data), "--out", str(tmp_path / "y.png")]) == 1
    assert not (tmp_path / "y.png").exists()


def test_explain_layers(trained, stg_e):
    # The heatmap of both layers is the mean of each layer's heatmap (the model has two).
    record = stg_e.load("ood_test", limit=1)[0]
    model, tok = trained["model"], trained["tok"]
    both = explain.explain_record(model, tok, record).weights
    first = explain.explain_record(model, tok, record, reading=Reading(layers=[0])).weights
    last = explain.explain_record(model, tok, record, reading=Reading(layers=[-1])).weights
    for b, f, l in zip(both, first, last):
        assert b == pytest.approx([(x + y) / 2 for x, y in zip(f, l)], abs=1e-6)
    assert max(abs(x - y) for f, l in zip(first, last) for x, y in zip(f, l)) > 1e-3
    with pytest.raises(ValueError, match="out of range"):
        explain.explain_record(model, tok, record, reading=Reading(layers=[2]))


def test_explain_shows_a_long_record_as_training_cut_it(trained, stg_e):
    # max_length cuts the prompt from the left after BOS; an answer longer than max_length
    # alone is cut from the right, as encode_record does in training, and explain says so.
    model, tok = trained["model"], trained["tok"]
    record = stg_e.load("ood_test", limit=1)[0]
    whole = Reading().encode(tok, record)
    n_prompt = sum(1 for x in whole.labels if x == -100)
    uncut = explain.explain_record(model, tok, record)
    lead = next(i for i in range(n_prompt) if i not in uncut.special_columns)  # BOS, if the tokenizer adds one
    uncut = uncut.prompt_tokens
    for max_length in (len(whole.input_ids) - 3, 3):
        reading = Reading(max_length=max_length)
        expl = explain.explain_record(model, tok, record, reading=reading)
        trained_as = reading.encode(tok, record)
        kept_prompt = sum(1 for x in trained_as.labels if x == -100)
        assert expl.truncated == n_prompt - kept_prompt > 0
        assert len(expl.prompt_tokens) == kept_prompt
        assert expl.prompt_tokens == uncut[:lead] + uncut[lead + expl.truncated:]
        assert len(expl.prompt_tokens) + len(expl.answer_tokens) <= max_length


@pytest.mark.parametrize("ratios, scale", [([1.0, 3.0, 20.0], "linear"), ([1.0, 5e3, 1e12], "log")])
def test_ratio_curve_goes_log_when_the_ratio_explodes(tmp_path, monkeypatch, ratios, scale):
    scales = []
    monkeypatch.setattr(explain, "save_png", lambda fig, path: scales.append(fig.axes[0].get_yscale()) or Path(path))
    history = [{"attn_ratio": r, "step": 10 * i} for i, r in enumerate(ratios)]
    explain.plot_ratio_curve(history, tmp_path / "r.png", alpha=5.0)
    assert scales == [scale]


def test_explain_prints_the_ratio_cattune_eval_reports(trained, stg_e, tmp_path, capsys):
    # One quantity for users: the ratio of one record in `cattune explain` is the ratio
    # `cattune eval` gives on a file holding only that record (same layers, same columns).
    data = tmp_path / "one.jsonl"
    save_records(data, stg_e.load("ood_test", limit=4)[2:3])
    js, res = tmp_path / "e.json", tmp_path / "r.json"
    assert cli.main(["explain", "--model", str(trained["dir"]), "--data", str(data), "--layers", "-1",
                     "--out", str(tmp_path / "e.png"), "--json", str(js)]) == 0
    assert "attn_ratio" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(trained["dir"]), "--data", str(data), "--layers", "-1",
                     "--out", str(res)]) == 0
    evaluated = json.loads(res.read_text())["results"][str(data)]["attention_ratio"]
    assert json.loads(js.read_text())["attn_ratio"] == pytest.approx(evaluated, rel=1e-6)
