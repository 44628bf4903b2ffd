"""The cattune CLI end to end on tiny sizes."""

import json
import subprocess
import sys

import pytest

from cattune.cli import main


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cattune.cli", *args], capture_output=True, text=True, timeout=600)


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("stg", "train", "eval", "demo", "annotate", "experiment", "explain"):
        assert f"  {name}" in out


def test_help_keeps_example_commands_on_their_own_lines(monkeypatch):
    from cattune.commands import train

    monkeypatch.setenv("COLUMNS", "60")
    text = train.build_parser().format_help()
    lines = text.splitlines()
    # the launch examples stay whole lines; the prose around them is wrapped to the width
    assert "  torchrun --nproc_per_node 4 -m cattune.cli train --train T.jsonl --model M --out D" in lines
    assert not any(line.startswith("Fine-tune") and len(line) > 60 for line in lines)
    first = next(i for i, line in enumerate(lines) if line.startswith("Options can come from a file"))
    assert lines[first - 1] == ""  # paragraphs keep their blank lines


def test_stg_train_eval(tmp_path):
    r = cli("stg", "--variant", "E", "--out", str(tmp_path / "stg"))
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "stg" / "train_S.jsonl").read_text().splitlines()
    assert len(lines) == 400 and json.loads(lines[0])["important"]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines[:32]) + "\n")

    out = tmp_path / "model"
    r = cli("train", "--train", str(small), "--eval", str(small), "--out", str(out), "--max_steps", "4",
            "--per_device_train_batch_size", "8", "--gamma", "0.5", "--alpha", "3", "--cat_layers", "-1", "--report_to", "none",
            "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true", "--logging_steps", "2")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "train_report.json").read_text())
    assert report["encode"]["train"]["records"] == 32
    assert "eval" in report and 0.0 <= report["eval"]["accuracy"] <= 1.0
    assert any("loss_attn" in h for h in report["log_history"])
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()

    r = cli("eval", "--model", str(out), "--data", str(small), "--data", str(tmp_path / "stg" / "ood_test.jsonl"))
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "ood_test.jsonl" in r.stdout
    res = json.loads((out / "eval_results.json").read_text())
    assert set(res["results"]) == {str(small), str(tmp_path / "stg" / "ood_test.jsonl")}
    assert res["results"][str(small)]["n"] == 32
    # Trained with --cat_layers -1: the saved cattune.json says so, and `cattune eval`
    # measures the last layer's ratio by default, as the training report does;
    # `--layers all` averages every layer instead.
    info = json.loads((out / "cattune.json").read_text())
    assert info["cat_layers"] == [-1] and info["chat_template"] is False and info["base_model"] is None
    assert res["settings"]["layers"] == [-1]
    assert res["results"][str(small)]["attention_ratio"] == pytest.approx(report["eval"]["attention_ratio"], rel=1e-5)
    r = cli("eval", "--model", str(out), "--data", str(small), "--layers", "all", "--out", str(tmp_path / "all.json"))
    assert r.returncode == 0, r.stderr
    every = json.loads((tmp_path / "all.json").read_text())["results"][str(small)]["attention_ratio"]
    assert every != pytest.approx(report["eval"]["attention_ratio"], rel=1e-5)
    # numeric targets: the mean absolute error of the answers that hold a number
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text("".join(json.dumps({"input": json.loads(x)["input"], "target": 7}) + "\n" for x in lines[:32]))
    r = cli("eval", "--model", str(out), "--data", str(numeric), "--checker", "numeric", "--out", str(tmp_path / "n.json"))
    assert r.returncode == 0, r.stderr
    num = json.loads((tmp_path / "n.json").read_text())["results"][str(numeric)]
    assert 0 <= num["unparsed"] <= 32 and (num["abs_error"] is None) == (num["unparsed"] == 32)
    assert ("mean abs error" in r.stdout) == (num["abs_error"] is not None)


def test_demo_tiny(tmp_path):
    r = cli("demo", "--out", str(tmp_path), "--limit", "24", "--epochs", "1", "--h-epochs", "1", "--batch-size", "8",
            "--variants", "E,H")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(run["variant"], run["arm"]) for run in res["runs"]] == [("E", "baseline"), ("E", "cat"), ("H", "baseline"), ("H", "cat")]
    assert all(0 <= run["ood_test"] <= 1 for run in res["runs"])
    pngs = ["demo.png"] + [f"ratio_STG_{v}.png" for v in "EH"] + \
        [f"attention_STG_{v}_{a}.png" for v in "EH" for a in ("baseline", "cat")]
    for name in pngs:
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    assert [run["attention_plot"] for run in res["runs"]] == pngs[3:]
    assert "| cat" in r.stdout
    assert res["settings"]["layers"] == [-1] and res["settings"]["h_layers"] is None


@pytest.mark.parametrize("value, expected", [("all", None), ("ALL", None), ("-1", [-1]), ("0,1", [0, 1])])
def test_parse_layers(value, expected):
    from cattune.commands.common import parse_layers

    assert parse_layers(value) == expected


def test_demo_rejects_bad_layers(tmp_path):
    r = cli("demo", "--out", str(tmp_path), "--layers", "last")
    assert r.returncode == 2 and "comma-separated layer indices" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--train", "/nonexistent.jsonl", "--out", "/tmp/x"], "no such file"),
    (["eval", "--model", "/nonexistent-model-dir", "--data", "DATA"], "cannot load model"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "a ", "target": "b"}\n')
    args = [str(data) if a == "DATA" else a for a in args]
    r = cli(*args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_broken_record_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "a ", "target": "b"}\n{"input": "a "}\n')
    r = cli("train", "--train", str(data), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and f"{data}:2: missing field 'target'" in r.stderr


def test_format_ratio():
    from cattune.text import format_ratio

    assert format_ratio(2.345) == "2.35" and format_ratio(9999.0) == "9999.00" and format_ratio(3.21e11) == "3.2e+11"


def test_train_refuses_an_output_it_cannot_write_before_training(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"input": "a b ", "target": "c", "important": [{"c": ["a"]}]}) + "\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("train", "--train", str(data), "--out", str(blocker), "--max_steps", "1", "--use_cpu")
    assert r.returncode == 1 and "exists and is not a directory" in r.stderr and "Traceback" not in r.stderr
    # a place nobody can create a directory in, even root (a chmod'ed one would not stop root)
    r = cli("train", "--train", str(data), "--out", "/proc/cattune-test/run", "--max_steps", "1", "--use_cpu")
    assert r.returncode == 1 and "cannot write there" in r.stderr and "Traceback" not in r.stderr


def test_train_config_file_with_command_line_overrides(tmp_path):
    from cattune.commands import train

    cfg = tmp_path / "run.yaml"
    cfg.write_text("train: data.jsonl\nout: run/\nlearning_rate: 1e-3\ncat_layers: [-1]\nlora: 'true'\n"
                   "num_train_epochs: 3\n")
    parser = train.build_parser()
    targs, config = train.parse(parser, ["--config", str(cfg), "--num_train_epochs", "1", "--alpha", "5"])
    assert targs.train == "data.jsonl" and targs.lora is True
    assert config.output_dir == "run/" and config.learning_rate == 1e-3 and config.cat_layers == [-1]
    assert config.num_train_epochs == 1 and config.cat_alpha == 5.0  # the command line wins

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: data.jsonl\nout: run/\nlerning_rate: 0.1\n")
    with pytest.raises(ValueError, match="lerning_rate.*not a cattune train option"):
        train.parse(train.build_parser(), ["--config", str(bad)])
    bad.write_text("train: data.jsonl\nout: run/\nnum_train_epochs: many\n")
    with pytest.raises(ValueError, match="num_train_epochs must be a number"):
        train.parse(train.build_parser(), ["--config", str(bad)])


def test_train_no_flags_turn_their_option_off_from_any_default(tmp_path):
    from cattune.commands import train

    parser = train.build_parser()
    (no_eval,) = [a for a in parser._actions if "--no_eval_accuracy" in a.option_strings]
    assert no_eval.help == "Turn --eval_accuracy off."  # not --eval_accuracy's own help
    base = ["--train", "data.jsonl", "--out", "run/"]
    assert train.parse(train.build_parser(), base)[1].eval_accuracy is True
    assert train.parse(train.build_parser(), [*base, "--no_eval_accuracy"])[1].eval_accuracy is False
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train: data.jsonl\nout: run/\neval_accuracy: false\n")
    assert train.parse(train.build_parser(), ["--config", str(cfg)])[1].eval_accuracy is False
    assert train.parse(train.build_parser(), ["--config", str(cfg), "--eval_accuracy", "true"])[1].eval_accuracy


def test_train_evaluates_during_training_and_keeps_the_best_checkpoint(tmp_path):
    from cattune import stg
    from cattune.records import save_records

    splits = stg.generate("E")
    save_records(tmp_path / "train.jsonl", splits["train_S"][:16])
    save_records(tmp_path / "val.jsonl", splits["iid_test"][:8])
    out = tmp_path / "run"
    r = cli("train", "--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "val.jsonl"), "--out", str(out),
            "--max_steps", "4", "--per_device_train_batch_size", "4", "--eval_strategy", "steps", "--eval_steps", "2",
            "--save_strategy", "steps", "--save_steps", "2", "--metric_for_best_model", "accuracy",
            "--load_best_model_at_end", "true", "--checker", "exact", "--report_to", "none", "--use_cpu",
            "--disable_tqdm", "true")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "train_report.json").read_text())
    evals = [h for h in report["log_history"] if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all("eval_attn_ratio" in h and "eval_loss_attn" in h for h in evals)
    assert report["eval"]["accuracy"] == max(h["eval_accuracy"] for h in evals)


def _demo_runs(*rows):
    return [{"variant": "E", "arm": arm, "seed": seed, "iid_test": iid, "ood_test": ood} for arm, seed, iid, ood in rows]


def test_demo_prints_its_run_beside_the_readme_range():
    from cattune.commands.demo import build_parser, reference_lines

    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    recipe = {"reference": {"command": "cattune experiment builtin:demo", "runs": "10 runs", "tasks": {"STG_E": {
        "cat": {"ood_test": [85.0, 80.0, 90.0]},
        "cat_minus_baseline": {"ood_test": [20.0, 14.0, 26.0]}}}}}
    runs = _demo_runs(("baseline", 0, 0.74, 0.64), ("cat", 0, 0.9, 0.835))
    lines = reference_lines(recipe, parser.parse_args(["--seeds", "1", "--out", "x"]), defaults, runs)
    assert lines[1] == "  STG_E cat ood_test: this run 83.5; README 85.0 (80.0 to 90.0): within the measured range"
    assert lines[2].startswith("  STG_E cat minus baseline ood_test: this run +19.5; README +20.0 (+14.0 to +26.0)")
    low = _demo_runs(("baseline", 0, 0.74, 0.64), ("cat", 0, 0.9, 0.70), ("baseline", 1, 0.7, 0.6), ("cat", 1, 0.9, 0.8))
    lines = reference_lines(recipe, parser.parse_args([]), defaults, low)
    assert "this run 70.0, 80.0" in lines[1] and "1 of 2 outside the measured range" in lines[1]
    # Other settings measure something else: no comparison, and it says why.
    other = reference_lines(recipe, parser.parse_args(["--alpha", "5", "--lr", "0.01"]), defaults, runs)
    assert other == ["Not compared with the README's figures: --lr, --alpha differ from the recipe's settings."]
    assert reference_lines({}, parser.parse_args([]), defaults, runs) == []


def test_a_malformed_reference_block_is_a_config_error():
    from cattune.experiment.config import ConfigError, parse_config

    base = {"tasks": ["STG_E"], "reference": {"command": "c", "runs": "r", "tasks": {"STG_E": {"cat": {"ood_test": [1, 2]}}}}}
    with pytest.raises(ConfigError, match="reference: tasks.STG_E.cat"):
        parse_config(base)
    base["reference"]["tasks"]["STG_E"]["cat"]["ood_test"] = [85.0, 80, 90]
    parse_config(base)


def test_demo_rejects_zero_jobs(tmp_path):
    r = cli("demo", "--out", str(tmp_path), "--jobs", "0")
    assert r.returncode != 0 and "--jobs must be at least 1" in r.stderr and "Traceback" not in r.stderr


def test_eval_takes_task_split_with_the_tasks_checker(tmp_path):
    r = cli("stg", "--variant", "E", "--out", str(tmp_path / "stg"))
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join((tmp_path / "stg" / "train_S.jsonl").read_text().splitlines()[:16]) + "\n")
    out = tmp_path / "model"
    assert main(["train", "--train", str(small), "--out", str(out), "--max_steps", "1", "--report_to", "none",
                 "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true"]) == 0
    # STG_H's answers are numbers: its task checks them with the numeric checker
    r = cli("eval", "--model", str(out), "--data", "STG_H:ood_test", "--out", str(tmp_path / "h.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "h.json").read_text())["results"]["STG_H:ood_test"]
    assert res["checker"] == "numeric" and res["n"] == 1000 and "abs_error" in res
    r = cli("eval", "--model", str(out), "--data", "STG_H:nope", "--out", str(tmp_path / "x.json"))
    assert r.returncode != 0 and "no split 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_a_chat_template_model_is_read_everywhere_as_training_read_it(tmp_path, capsys):
    # One reading-settings object (cattune.reading): a model trained with a chat template,
    # last-token columns, the last layer and a max_length that cuts every record is read
    # the same way by annotate --check, eval and explain, without repeating any flag.
    from cattune import stg
    from cattune.evaluate import causal_attention_ratio
    from cattune.models import load_model
    from cattune.reading import Reading, saved_reading
    from cattune.records import save_records
    from cattune.tiny import build

    records = stg.generate("E", seed=0)["train_S"][:16]
    data = tmp_path / "train.jsonl"
    save_records(data, records)
    model, tok = build([r.text for r in records], seed=0)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}" + tok.eos_token
                         + "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    whole = Reading(chat_template=True, span_columns="last", layers=[-1])
    longest = max(len(whole.encode(tok, r).input_ids) for r in records)
    reading = Reading(chat_template=True, span_columns="last", layers=[-1], max_length=longest - 8)
    out = tmp_path / "model"
    assert main(["train", "--train", str(data), "--model", str(base), "--out", str(out), "--chat_template",
                 "--cat_span_columns", "last", "--cat_layers", "-1", "--max_length", str(reading.max_length),
                 "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--use_cpu",
                 "--disable_tqdm", "true"]) == 0
    trained = json.loads((out / "train_report.json").read_text())["encode"]["train"]
    assert trained["truncated"] > 0
    assert saved_reading(out) == reading  # what cattune.json recorded
    capsys.readouterr()

    assert main(["annotate", "--check", "--input", str(data), "--tokenizer", str(out), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)
    assert (check["pairs"], check["unaligned"]) == (trained["annotated_pairs"], trained["unaligned_pairs"])

    assert main(["eval", "--model", str(out), "--data", str(data), "--out", str(tmp_path / "eval.json")]) == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["settings"] == reading.to_json()
    model, tok = load_model(str(out))
    ratio = causal_attention_ratio(model, tok, records, reading=reading)
    assert res["results"][str(data)]["attention_ratio"] == pytest.approx(ratio, rel=1e-5)

    assert main(["explain", "--model", str(out), "--data", str(data), "--record", "0", "--out",
                 str(tmp_path / "r0.png"), "--json", str(tmp_path / "r0.json")]) == 0
    expl = json.loads((tmp_path / "r0.json").read_text())
    encoded = reading.encode(tok, records[0], add_eos=False)
    n_prompt = sum(1 for x in encoded.labels if x == -100)
    assert expl["truncated"] > 0 and len(expl["prompt_tokens"]) == n_prompt  # the prompt as training cut it
    assert expl["layers"] == [-1]
    assert expl["attn_ratio"] == pytest.approx(causal_attention_ratio(model, tok, records[:1], reading=reading),
                                               rel=1e-5)
