"""cattune experiment: config checks, statistics, and a micro grid that is killed and resumed."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from cattune import cli, experiment
from cattune.experiment import ConfigError, RunSpec, load_config, parse_config, run_experiment

torch.set_num_threads(1)

from conftest import DATA_DIR

DATA = DATA_DIR
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": 300}


def micro(tmp_path: Path, **over) -> Path:
    cfg = {
        "name": "micro",
        "seeds": 2,
        "arms": ["baseline", "cat", "placebo"],
        "models": [{"name": "tiny", "tiny": TINY}],
        "train_from": "builtin:demo",
        "train": {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1, "learning_rate": "3e-3",
                  "use_cpu": True},
        "eval": {"batch_size": 16, "max_new_tokens": 3},
        "tasks": [
            {"task": "STG_E", "label": "E", "train": "train_S", "train_limit": 16, "test_limit": 6},
            {"task": "SVAMP", "files": {"train": str(DATA / "svamp_train_annotated.jsonl"),
                                        "test": str(DATA / "svamp_test.jsonl")},
             "test": ["test"], "train_limit": 16, "test_limit": 6},  # not the task's own ood split
        ],
    }
    cfg.update(over)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# --------------------------------------------------------------------------- config


def test_config_defaults_and_plan(tmp_path):
    cfg = load_config(micro(tmp_path))
    assert cfg.seeds == [0, 1] and cfg.arms == ["baseline", "cat", "placebo"]
    assert cfg.train["learning_rate"] == 3e-3  # "3e-3" from YAML
    assert cfg.train["cat_alpha"] == 2000.0 and cfg.train["cat_layers"] == [-1]  # train_from: builtin:demo
    assert [t.label for t in cfg.tasks] == ["E", "SVAMP"] and cfg.tasks[0].tests == {"iid_test": "iid_test",
                                                                                      "ood_test": "ood_test"}
    assert cfg.tasks[1].task.checker == "numeric" and cfg.tasks[1].tests == {"test": "test"}
    runs = experiment.plan(cfg)
    assert len(runs) == 12 and runs[:3] == [RunSpec("E", "tiny", a, 0) for a in ("baseline", "cat", "placebo")]
    assert experiment.train_args_for(cfg, cfg.tasks[0], "baseline")["cat_gamma"] == 0.0
    assert experiment.train_args_for(cfg, cfg.tasks[0], "placebo")["cat_gamma"] == 1.0
    assert RunSpec("a/b c", "m", "cat", 3).run_id == "a-b-c__m__cat__seed3"


def test_a_task_can_run_its_own_seeds(tmp_path):
    cfg = load_config(micro(tmp_path, seeds=5, arms=["baseline"], tasks=[
        {"task": "STG_E", "label": "E"}, {"task": "STG_H", "label": "H", "seeds": 2}]))
    assert [(r.task, r.seed) for r in experiment.plan(cfg)] == [("E", s) for s in range(5)] + [("H", 0), ("H", 1)]
    assert experiment.select(cfg, seeds=[4])(RunSpec("E", "tiny", "baseline", 4))
    cfg.set_seeds([0])  # cattune experiment --seeds 1
    assert [(r.task, r.seed) for r in experiment.plan(cfg)] == [("E", 0), ("H", 0)]
    with pytest.raises(ConfigError, match=r"tasks\[0\]: seeds"):
        load_config(micro(tmp_path, tasks=[{"task": "STG_E", "seeds": [1, 1]}]))


REPO = Path(__file__).resolve().parents[1]


def assert_committed_results_are(cfg, name: str | Path) -> None:
    """The committed results (the README's figures) are this recipe's: a changed setting must
    come with a re-run, or a re-run of one seed would not be comparable with them."""
    committed = lines(REPO / "docs" / "results" / name / "results.jsonl")
    entries, models = {t.label: t for t in cfg.tasks}, {m.label: m for m in cfg.models}
    assert committed
    for line in committed:
        settings = experiment.settings_hash(cfg, entries[line["task"]], models[line["model"]], line["arm"])
        assert line["settings"] == settings, line


# the validation rounds whose data need no generating first: the downstream ones read the
# shipped release files (the STG rounds of experiments/smollm2 and experiments/gemma3 read
# seed-7 files that a `cattune stg` command in their header writes)
VALIDATION_ROUNDS = sorted(p.relative_to(REPO) for p in (REPO / "experiments" / "downstream").glob("*.yaml"))


@pytest.mark.parametrize("path", VALIDATION_ROUNDS, ids=str)
def test_validation_rounds_load_and_match_their_logs(path, monkeypatch):
    # A validation round's log is what chose a setting: a config edited after it ran would
    # leave the log describing runs the config no longer makes.
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    assert experiment.plan(cfg)
    if (REPO / cfg.output / "results.jsonl").exists():
        assert_committed_results_are(cfg, REPO / cfg.output)


def test_shipped_downstream_config():
    # The paper's second claim: MAWPS <-> SVAMP, each tested IID and on the other data set;
    # the CAT setting validation left standing (experiments/downstream/README.md).
    cfg = load_config("builtin:smollm2_downstream")
    runs = experiment.plan(cfg)
    assert {(r.task, r.arm) for r in runs} == {(t, a) for t in ("MAWPS", "SVAMP") for a in ("baseline", "cat", "placebo")}
    assert len(runs) == 18 and cfg.keeps_model(0) and not cfg.keeps_model(1)
    assert all(t.tests == {"test": "test", "ood": "ood"} for t in cfg.tasks)
    cat = experiment.train_args_for(cfg, cfg.tasks[0], "cat")
    assert (cat["cat_layers"], cat["cat_alpha"], cat["cat_gamma"], cat["cat_gamma_decay"]) == (None, 2.0, 1.0, 1.0)
    assert experiment.train_args_for(cfg, cfg.tasks[1], "baseline")["cat_gamma"] == 0.0
    # 2 epochs on MAWPS's 1239 records, 4 on SVAMP's 600 (validation round val_s2)
    assert [experiment.train_args_for(cfg, t, "cat")["num_train_epochs"] for t in cfg.tasks] == [2, 4]
    assert_committed_results_are(cfg, "smollm2_downstream")


def test_shipped_gemma3_config():
    # STG_E on Gemma 3 270M: SmolLM2's setting on the upper half of its 18 layers, chosen on
    # seed-7 validation data (experiments/gemma3/README.md); runs of ~21 min: 3 seeds
    cfg = load_config("builtin:gemma3_stg")
    runs = experiment.plan(cfg)
    assert len(runs) == 9 and {r.task for r in runs} == {"STG_E"} and cfg.keeps_model(0)
    assert cfg.models[0].path == "builtin:gemma3-270m" and not cfg.train["chat_template"]
    cat = experiment.train_args_for(cfg, cfg.tasks[0], "cat")
    assert (cat["cat_layers"], cat["cat_alpha"], cat["cat_gamma_decay"]) == (list(range(9, 18)), 50.0, 0.0)
    assert_committed_results_are(cfg, "gemma3_stg")


def test_shipped_smollm2_config():
    cfg = load_config("builtin:smollm2_stg")
    runs = experiment.plan(cfg)
    # STG_E: 3 arms x 5 seeds; STG_H, 3x costlier per run: 3 seeds
    assert sum(r.task == "STG_E" for r in runs) == 15 and sum(r.task == "STG_H" for r in runs) == 9
    assert cfg.keeps_model(0) and not cfg.keeps_model(1)
    assert cfg.train["learning_rate"] == 5e-5 and cfg.train["chat_template"] and cfg.train["num_train_epochs"] == 2
    assert cfg.models[0].path == "builtin:smollm2-135m-instruct" and cfg.tasks[1].train_limit == 1000
    # STG_H's budget (chosen on validation): 4 epochs at lr 1e-4, STG_E's CAT setting otherwise
    h = experiment.train_args_for(cfg, cfg.tasks[1], "cat")
    assert (h["num_train_epochs"], h["learning_rate"], h["cat_alpha"]) == (4, 1e-4, 50.0)
    assert experiment.train_args_for(cfg, cfg.tasks[0], "cat")["num_train_epochs"] == 2
    assert_committed_results_are(cfg, "smollm2_stg")


def test_shipped_stg_config():
    cfg = load_config("builtin:stg")
    assert len(cfg.seeds) >= 5 and cfg.arms == ["baseline", "cat", "placebo"]
    assert [t.label for t in cfg.tasks] == ["STG_E_S", "STG_E_M", "STG_E_L", "STG_H_S", "STG_H_M", "STG_H_L"]
    assert all(m.is_tiny for m in cfg.models) and len(experiment.plan(cfg)) == 90
    assert cfg.train["cat_span_columns"] == "last_word" and cfg.train["num_train_epochs"] == 30
    e, h = cfg.tasks[1], cfg.tasks[4]
    assert {k: experiment.train_args_for(cfg, e, "cat")[k] for k in ("cat_alpha", "cat_layers")} \
        == {"cat_alpha": 2000.0, "cat_layers": [-1]}
    keys = ("cat_alpha", "cat_gamma_decay", "num_train_epochs", "cat_layers")
    assert {k: experiment.train_args_for(cfg, h, "cat")[k] for k in keys} \
        == {"cat_alpha": 2.0, "cat_gamma_decay": 1.0, "num_train_epochs": 10, "cat_layers": None}
    assert experiment.train_args_for(cfg, h, "baseline")["cat_gamma"] == 0.0
    with pytest.raises(FileNotFoundError, match="shipped: .*stg"):
        load_config("builtin:nope")


@pytest.mark.parametrize("over,match", [
    ({"colour": 1}, "unknown fields"),
    ({"arms": ["cat", "sham"]}, "arms"),
    ({"train": {"learning_rte": 1}}, "not a CATConfig.*did you mean 'learning_rate'"),
    ({"train": {"cat_aplha": 1}}, "did you mean 'cat_alpha'"),
    ({"train": {"learningrate": 1}}, "did you mean 'learning_rate'"),
    ({"train": {"seed": 3}}, "set by the experiment runner"),
    ({"train": {"learning_rate": "fast"}}, "must be a number"),
    ({"tasks": []}, "'tasks' is required"),
    ({"tasks": ["STG_E", "stg_e"]}, "labels must be unique"),
    ({"tasks": [{"task": "NOPE"}]}, "unknown task"),
    ({"tasks": [{"task": "STG_E", "shots": 3}]}, "unknown task-entry fields"),
    ({"seeds": 0}, "seeds"),
    ({"seeds": [1, 1]}, "repeat"),
    ({"seeds": [0, -3]}, "seeds must be 0 or more, got -3"),  # Python's random: -3 would be seed 3
    ({"tasks": [{"task": "STG_E", "seeds": [-1]}]}, "seeds must be 0 or more"),
    ({"train": {"gradient_accumulation_steps": 0}}, "gradient_accumulation_steps must be at least 1"),
    ({"train": {"max_grad_norm": float("nan")}}, "max_grad_norm must be a finite number"),
    ({"arm_args": {"baseline": {"cat_gamma": 1}}}, "baseline arm always"),
    ({"models": [{"name": "x", "size": 3}]}, "unknown model fields"),
    ({"models": [{"name": "t", "tiny": {"hidden_size": -8}}]}, "tiny: hidden_size must be a number > 0"),
    ({"models": [{"name": "t", "tiny": {}, "lora": {"dropout": float("nan")}}]}, "LoRA dropout must be in"),
    ({"models": [{"name": "t", "tiny": {}, "lora": {"r": 0}}]}, "LoRA r must be an integer >= 1"),
    ({"eval": {"temperature": 0}}, "eval: unknown"),
    # STG_E trains on train_M: a file for "train" would be read by nothing
    ({"tasks": [{"task": "STG_E", "files": {"train": "x.jsonl"}}]}, r"files names split\(s\) \['train'\] that"),
    ({"tasks": [{"task": "STG_E", "files": {"train_M": "nope.jsonl"}}]}, "files: train_M: no such file"),
    ({"tasks": [{"task": "STG_E", "train": "trian_M"}]}, r"unknown split\(s\) \['trian_M'\] of task STG_E"),
    ({"tasks": [{"task": "SVAMP", "test": ["tset"]}]}, r"unknown split\(s\) \['tset'\] of task SVAMP"),
])
def test_config_errors(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(micro(tmp_path, **over))


def test_models_and_task_files(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "1+1?", "a": "2"}) + "\n")
    (tmp_path / "t.yaml").write_text("name: ADD\nchecker: numeric\nsource:\n  files: {train: d.jsonl, test: d.jsonl}\n"
                                     "  input: '{q} Answer: '\n  target: a\n")
    cfg = parse_config({"task_files": ["t.yaml"], "tasks": [{"task": "ADD", "test": {"all": "test"}}],
                        "models": ["tiny", "/models/qwen", {"name": "q", "path": "Qwen/Qwen2.5-0.5B", "lora": True}]},
                       tmp_path / "c.yaml")
    assert [m.label for m in cfg.models] == ["tiny", "qwen", "q"]
    assert cfg.models[0].is_tiny and cfg.models[1].path == "/models/qwen" and cfg.models[2].lora == {}
    assert cfg.tasks[0].tests == {"all": "test"} and cfg.tasks[0].task.load("test")[0].target == "2"
    assert cfg.output == Path("c_results")


# --------------------------------------------------------------------------- statistics


def test_t_interval():
    assert experiment.t_quantile_975(1) == 12.706 and experiment.t_quantile_975(4) == 2.776
    assert abs(experiment.t_quantile_975(60) - 2.000) < 2e-3 and abs(experiment.t_quantile_975(10**6) - 1.96) < 1e-3
    mean, lo, hi = experiment.paired_interval([0.01, 0.02, 0.03])
    assert mean == pytest.approx(0.02) and hi - mean == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    m1, lo1, hi1 = experiment.paired_interval([0.05])
    assert m1 == 0.05 and math.isnan(lo1) and math.isnan(hi1)


def test_summary_tables():
    def res(arm, seed, acc):
        return {"task": "T", "model": "m", "arm": arm, "seed": seed,
                "tests": {"ood": {"accuracy": acc, "n": 100, "correct": int(acc * 100), "attention_ratio": 2.0}}}

    results = [res("baseline", s, a) for s, a in enumerate([0.60, 0.62, 0.64])]
    results += [res("cat", s, a) for s, a in enumerate([0.70, 0.71, 0.75])]
    results += [res("placebo", s, a) for s, a in enumerate([0.66, 0.64])]
    (row,) = experiment.summarize(results)
    assert row["baseline_n"] == 3 and row["baseline_mean"] == pytest.approx(0.62)
    assert row["baseline_std"] == pytest.approx(0.02)
    assert row["cat_minus_baseline"] == pytest.approx(0.1) and row["cat_minus_baseline_pairs"] == 3
    assert row["cat_minus_placebo"] == pytest.approx(0.055) and row["cat_minus_placebo_pairs"] == 2
    assert row["cat_minus_baseline_lo"] < 0.1 < row["cat_minus_baseline_hi"]
    md = experiment.summary_markdown([row], "t")
    assert "| T | m | ood | 3 | 62.0 ± 2.0 | 72.0 ± 2.6 | 65.0 ± 1.4 | +10.0 [" in md
    parsed = list(csv.DictReader(io.StringIO(experiment.summary_csv([row]))))
    assert parsed[0]["cat_mean"] == str(row["cat_mean"]) and parsed[0]["cat_minus_placebo_pairs"] == "2"
    assert list(parsed[0]) == experiment.CSV_COLUMNS
    assert parsed[0]["cat_abs_error"] == "" and "absolute error" not in md  # labels: no error table


def test_summary_of_numeric_answers_gives_their_error():
    def res(arm, seed, acc, err):
        return {"task": "H", "model": "m", "arm": arm, "seed": seed,
                "tests": {"ood": {"accuracy": acc, "n": 100, "correct": int(acc * 100), "attention_ratio": 1.0,
                                  "abs_error": err, "unparsed": 2}}}

    results = [res("baseline", s, 0.05, e) for s, e in enumerate([6.0, 7.0, 8.0])]
    results += [res("cat", s, 0.06, e) for s, e in enumerate([4.0, 4.5, 5.0])]
    (row,) = experiment.summarize(results)
    assert row["baseline_abs_error"] == pytest.approx(7.0) and row["cat_abs_error_std"] == pytest.approx(0.5)
    assert row["cat_minus_baseline_abs_error"] == pytest.approx(-2.5)
    assert row["cat_minus_baseline_abs_error_lo"] < -2.5 < row["cat_minus_baseline_abs_error_hi"] < 0
    assert math.isnan(row["placebo_abs_error"]) and math.isnan(row["cat_minus_placebo_abs_error"])
    md = experiment.summary_markdown([row], "t")
    assert "mean absolute error" in md and "| H | m | ood | 7.00 ± 1.00 | 4.50 ± 0.50 | - | -2.50 [" in md
    runs = list(csv.DictReader(io.StringIO(experiment.report.runs_csv(results))))
    assert runs[0]["abs_error"] == "6.0" and runs[0]["unparsed"] == "2"


def test_summary_plots_follow_the_configs_first_seed(tmp_path):
    # run_one draws heatmaps for config.seeds[0]; the summary's curves must be that seed's too,
    # also when it is not the lowest.
    cfg = load_config(micro(tmp_path, seeds=[5, 3]))
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    results = []
    for seed in (3, 5):
        for arm in ("baseline", "cat"):
            log = f"logs/E__tiny__{arm}__seed{seed}.json"
            history = [{"step": s, "attn_ratio": 1.0 + s * (seed if arm == "cat" else 0)} for s in (10, 20, 30)]
            (out / log).write_text(json.dumps({"log_history": history}))
            results.append({"task": "E", "model": "tiny", "arm": arm, "seed": seed, "log": log})
    md = experiment.summary_plots(out, results, cfg)
    assert "### E, tiny, seed 5" in md and "seed 3" not in md
    assert "![attention ratio during training](plots/E__tiny__ratio.png)" in md
    assert (out / "plots" / "E__tiny__ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### E, tiny, seed 3" in experiment.summary_plots(out, results)  # no config: the lowest seed


def test_read_results_drops_cut_lines(tmp_path):
    p = tmp_path / "results.jsonl"
    good = {"task": "T", "model": "m", "arm": "cat", "seed": 0, "tests": {}}
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "seed": 1})[:30])
    rows, bad = experiment.read_results(p)
    assert len(rows) == 1 and bad == 1 and not p.read_text().endswith("\n")  # reading alone changes nothing
    experiment.read_results(p, repair=True)
    assert p.read_text() == json.dumps(good) + "\n"


# --------------------------------------------------------------------------- a real micro grid


def test_micro_experiment_is_resumable(tmp_path, capsys):
    cfg_path = micro(tmp_path)
    out = tmp_path / "out"
    # 1. a first session stops after 4 runs (as if killed between runs)
    assert cli.main(["experiment", str(cfg_path), "--out", str(out), "--max-runs", "4"]) == 0
    assert len(lines(out / "results.jsonl")) == 4
    # 2. started again: the other 8 runs, nothing trained twice; a killed run's
    #    training directory is cleaned up
    (out / ".E__tiny__cat__seed1.abc123").mkdir()
    cfg = load_config(cfg_path)
    report = run_experiment(cfg, out=out, log=lambda m: None)
    assert len(report.skipped) == 4 and len(report.ran) == 8 and report.complete
    results = lines(out / "results.jsonl")
    keys = {(r["task"], r["model"], r["arm"], r["seed"]) for r in results}
    assert len(results) == 12 and len(keys) == 12
    for r in results:
        assert set(r["tests"]) == ({"iid_test", "ood_test"} if r["task"] == "E" else {"test"})
        assert all(0 <= t["accuracy"] <= 1 and t["n"] == 6 for t in r["tests"].values())
        assert r["steps"] == 2 and r["n_train"] == 16 and (out / r["log"]).is_file()
        assert r["cat_gamma"] == (0.0 if r["arm"] == "baseline" else 1.0)
        assert (r["placebo"] is not None) == (r["arm"] == "placebo")
    placebo_e = next(r for r in results if r["arm"] == "placebo" and r["task"] == "E")
    assert placebo_e["placebo"]["values"] == 48 and placebo_e["placebo"].get("dropped", 0) == 0
    log = json.loads((out / placebo_e["log"]).read_text())
    assert any("attn_ratio" in h for h in log["log_history"])

    # 3. a kill during a run's write: one line lost, the last one cut in half
    text = (out / "results.jsonl").read_text().splitlines()
    victim = json.loads(text[5])
    cut = text[-1][: len(text[-1]) // 2]
    (out / "results.jsonl").write_text("\n".join(text[:5] + text[6:-1] + [cut]))
    report = run_experiment(cfg, out=out, log=lambda m: None)
    rerun = {s.key for s in report.ran}
    last = json.loads(text[-1])
    assert rerun == {(victim["task"], victim["model"], victim["arm"], victim["seed"]),
                     (last["task"], last["model"], last["arm"], last["seed"])}
    assert report.dropped_lines == 1 and len(report.skipped) == 10
    results = lines(out / "results.jsonl")
    assert len(results) == 12 and len({(r["task"], r["arm"], r["seed"]) for r in results}) == 12

    # 4. the summary: both tasks, every arm with 2 seeds, both differences, and its plots
    md = (out / "summary.md").read_text()
    assert "| E | tiny | ood_test | 2 |" in md and "| SVAMP | tiny | test | 2 |" in md
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    # per task: the ratio curve and the heatmap of each of the three arms (seed 0)
    assert sorted(embedded) == sorted([f"plots/{t}__tiny__ratio.png" for t in ("E", "SVAMP")] +
                                      [f"plots/{t}__tiny__{a}__seed0.png" for t in ("E", "SVAMP")
                                       for a in ("baseline", "cat", "placebo")])
    for png in embedded:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    seed0 = [r for r in results if r["seed"] == 0]
    assert all(r["attention_plot"] for r in seed0) and not any(r["attention_plot"] for r in results if r["seed"])
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [(r["task"], r["test"]) for r in rows] == [("E", "iid_test"), ("E", "ood_test"), ("SVAMP", "test")]
    for r in rows:
        assert r["baseline_n"] == r["cat_n"] == r["placebo_n"] == "2"
        assert r["cat_minus_baseline_pairs"] == r["cat_minus_placebo_pairs"] == "2"
        assert r["cat_minus_baseline_lo"] != "" and float(r["cat_minus_baseline_lo"]) <= float(r["cat_minus_baseline_hi"])
    # every run, once per test set, in grid order, with the figures of results.jsonl
    per_run = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert len(per_run) == 6 * 2 + 6 * 1
    assert [(r["task"], r["seed"], r["arm"], r["test"]) for r in per_run[:4]] == [
        ("E", "0", "baseline", "iid_test"), ("E", "0", "baseline", "ood_test"),
        ("E", "0", "cat", "iid_test"), ("E", "0", "cat", "ood_test")]
    by_key = {(r["task"], r["arm"], int(r["seed"])): r for r in results}
    for line in per_run:
        res = by_key[(line["task"], line["arm"], int(line["seed"]))]["tests"][line["test"]]
        assert float(line["accuracy"]) == res["accuracy"] and int(line["correct"]) == res["correct"]
        assert line["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "## Every run" in md and "| E | tiny | 1 | placebo |" in md and "| SVAMP | tiny | 0 | cat |" in md

    # 5. nothing left: a rerun trains nothing; --summary-only and --dry-run only read
    curve = out / "plots" / "E__tiny__ratio.png"
    drawn = curve.stat().st_mtime_ns
    report = run_experiment(cfg, out=out, log=lambda m: None)
    assert not report.ran and len(report.skipped) == 12
    (out / "summary.md").unlink()
    assert cli.main(["experiment", str(cfg_path), "--out", str(out), "--summary-only"]) == 0
    assert (out / "summary.md").read_text() == md
    assert curve.stat().st_mtime_ns == drawn  # no log is newer: the curve is not drawn again
    os.utime(curve, (0, 0))  # older than its logs: drawn again
    assert cli.main(["experiment", str(cfg_path), "--out", str(out), "--summary-only"]) == 0
    assert curve.stat().st_mtime > 0 and (out / "summary.md").read_text() == md
    # --compare puts each run beside the same run of another output directory
    ref = tmp_path / "ref"
    ref.mkdir()
    runs = lines(out / "results.jsonl")
    runs[0]["tests"]["iid_test"]["accuracy"] += 0.05
    runs[1]["settings"] = "0123456789ab"
    (ref / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert cli.main(["experiment", str(cfg_path), "--out", str(out), "--summary-only", "--compare", str(ref)]) == 1
    cmp_md = (out / "comparison.md").read_text()
    assert "| E | tiny | 0 | baseline | iid_test |" in cmp_md and "| -5.0 |" in cmp_md
    assert "1 differs by more than 3 points: E tiny seed 0 baseline iid_test (-5.0)." in cmp_md
    assert f"Not compared, trained with other settings than the reference's: {runs[1]['task']}__tiny__" in cmp_md
    assert cli.main(["experiment", str(cfg_path), "--out", str(out), "--summary-only", "--compare", str(ref),
                     "--tolerance", "6"]) == 0
    assert "All within 6 points." in (out / "comparison.md").read_text()
    assert cli.main(["experiment", str(cfg_path), "--out", str(out), "--compare", str(tmp_path / "nope")]) == 1
    assert "--compare: no results.jsonl in" in capsys.readouterr().err
    # a changed setting is reported, the finished runs are kept
    changed = micro(tmp_path, train={"max_steps": 3, "per_device_train_batch_size": 8, "use_cpu": True})
    report = run_experiment(load_config(changed), out=out, dry_run=True, log=lambda m: None)
    assert len(report.changed) == 12 and not report.ran
    assert cli.main(["experiment", str(cfg_path), "--out", str(out), "--dry-run"]) == 0
    assert not list(out.glob(".*"))  # no temporary training directories left behind


def test_math_experiment_with_a_local_model_directory(tmp_path):
    # What a user with a downloaded checkpoint does: a model directory (config, weights,
    # tokenizer files) named by path, full fine-tuning and LoRA, on SVAMP.
    from transformers import LlamaConfig, LlamaForCausalLM

    from cattune.records import load_records
    from cattune.tiny import train_tokenizer

    train = DATA / "svamp_train_annotated.jsonl"
    tok = train_tokenizer([r.text for r in load_records(train)], "bytelevel", vocab_size=300, individual_digits=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, vocab_size=len(tok)), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model_dir = tmp_path / "my-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    cfg = micro(tmp_path, seeds=1, arms=["baseline", "cat"],
                models=[{"name": "local", "path": str(model_dir)},
                        {"name": "local-lora", "path": str(model_dir), "lora": {"target_modules": ["q_proj", "v_proj"]}}],
                tasks=[{"task": "SVAMP", "files": {"train": str(train), "test": str(DATA / "svamp_test.jsonl")},
                        "train_limit": 16, "test_limit": 4}],
                save_models=True)
    out = tmp_path / "out"
    report = run_experiment(load_config(cfg), out=out, log=lambda m: None)
    assert report.complete and len(report.ran) == 4
    results = lines(out / "results.jsonl")
    assert {(r["model"], r["arm"]) for r in results} == {(m, a) for m in ("local", "local-lora") for a in ("baseline", "cat")}
    for r in results:
        assert r["n_train"] == 16 and r["steps"] == 2 and r["tests"]["test"]["n"] == 4
    cat = next(r for r in results if r["model"] == "local" and r["arm"] == "cat")
    history = json.loads((out / cat["log"]).read_text())["log_history"]
    assert any(h.get("loss_attn", 0) != 0 for h in history)
    # the model directory itself is left as it was
    reloaded = LlamaForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in before.items())
    assert "| SVAMP | local-lora | test | 1 |" in (out / "summary.md").read_text()


def test_an_experiment_with_the_tiny_model_and_lora_trains_adapters(tmp_path):
    # One run module for `cattune train` and the runner: LoRA wraps the tiny model too
    # (the runner once returned it before LoRA was applied, and trained every weight).
    from cattune.models import load_model

    cfg = micro(tmp_path, seeds=1, arms=["cat"], models=[{"name": "tiny", "tiny": TINY, "lora": True}],
                tasks=[{"task": "STG_E", "label": "E", "train": "train_S", "train_limit": 16, "test_limit": 4}],
                save_models=True)
    out = tmp_path / "out"
    assert run_experiment(load_config(cfg), out=out, log=lambda m: None).complete
    saved = out / "models" / "E__tiny__cat__seed0"
    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()
    assert json.loads((saved / "cattune.json").read_text())["base_model"] == "base_model"
    model, _ = load_model(str(saved))  # the adapter finds its base beside it
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert lines(out / "results.jsonl")[0]["steps"] == 2


def test_parallel_jobs_give_the_same_results(tmp_path):
    cfg = load_config(micro(tmp_path, arms=["baseline", "cat"], tasks=[
        {"task": "STG_E", "label": "E", "train": "train_S", "train_limit": 16, "test_limit": 6}]))
    one = run_experiment(cfg, out=tmp_path / "one", log=lambda m: None)
    two = run_experiment(cfg, out=tmp_path / "two", log=lambda m: None, jobs=2)
    assert one.complete and two.complete and len(two.ran) == 4

    def key(r):
        return r["task"], r["arm"], r["seed"]

    a, b = (sorted(lines(tmp_path / d / "results.jsonl"), key=key) for d in ("one", "two"))
    assert [key(r) for r in a] == [key(r) for r in b]
    for x, y in zip(a, b):
        assert x["tests"] == y["tests"] and x["final_loss"] == y["final_loss"] and x["settings"] == y["settings"]
    assert (tmp_path / "one" / "summary.csv").read_text() == (tmp_path / "two" / "summary.csv").read_text()
    with pytest.raises(ValueError, match="jobs"):
        run_experiment(cfg, out=tmp_path / "three", jobs=0)


def test_parallel_failure_keeps_the_runs_that_finish(tmp_path):
    (tmp_path / "nope").mkdir()  # looks like a model directory (so the up-front check passes), but does not load
    (tmp_path / "nope" / "config.json").write_text("{}")
    (tmp_path / "nope" / "tokenizer_config.json").write_text("{}")
    cfg = load_config(micro(tmp_path, arms=["baseline"], seeds=1,
                            models=[{"name": "tiny", "tiny": TINY}, {"name": "broken", "path": str(tmp_path / "nope")}],
                            tasks=[{"task": "STG_E", "label": "E", "train": "train_S", "train_limit": 16,
                                    "test_limit": 6}]))
    messages = []
    with pytest.raises(ValueError, match="cannot load model"):
        run_experiment(cfg, out=tmp_path / "out", log=messages.append, jobs=2)
    kept = lines(tmp_path / "out" / "results.jsonl")
    assert [(r["model"], r["arm"]) for r in kept] == [("tiny", "baseline")]
    assert any("broken__baseline__seed0 failed" in m for m in messages)


# Killed mid-training, or after the last step's checkpoint (while the run is evaluating):
# the resumed run trains the steps left, none in the second case, and ends the same.
@pytest.mark.parametrize("killed_at", [3, 6])
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, killed_at):
    from cattune import run

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    tasks = [{"task": "STG_E", "label": "E", "train": "train_S", "train_limit": 24, "test_limit": 6}]
    train = {"max_steps": 6, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": "3e-3",
             "use_cpu": True}
    whole = run_experiment(load_config(micro(tmp_path / "a", arms=["cat"], seeds=1, tasks=tasks, train=train,
                                             checkpoint_minutes=0)), out=tmp_path / "a", log=lambda m: None)
    assert whole.complete and not list((tmp_path / "a").glob(".*"))  # no checkpoint: nothing left behind

    cfg = load_config(micro(tmp_path / "b", arms=["cat"], seeds=1, tasks=tasks, train=train,
                            checkpoint_minutes=1e-6))  # a checkpoint after every step
    timed = run._timing_callback

    def killed_after_a_save(before, minutes):
        cb = timed(before, minutes)
        on_save = cb.on_save

        def save(args, state, control, **kw):
            on_save(args, state, control, **kw)
            if state.global_step == killed_at:
                raise KeyboardInterrupt
        cb.on_save = save
        return cb

    monkeypatch.setattr(run, "_timing_callback", killed_after_a_save)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out=tmp_path / "b", log=lambda m: None)
    partial = tmp_path / "b" / ".E__tiny__cat__seed0.partial"
    assert [d.name for d in partial.glob("checkpoint-*")] == [f"checkpoint-{killed_at}"]  # only the last is kept
    monkeypatch.setattr(run, "_timing_callback", timed)
    assert run_experiment(cfg, out=tmp_path / "b", log=lambda m: None).complete
    a, b = lines(tmp_path / "a" / "results.jsonl")[0], lines(tmp_path / "b" / "results.jsonl")[0]
    assert b["resumed_at_step"] == killed_at and "resumed_at_step" not in a and b["steps"] == a["steps"] == 6
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4) and b["tests"] == a["tests"]
    history = json.loads((tmp_path / "b" / b["log"]).read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert not partial.exists()  # the result line holds the run now


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    # The runner's scratch directory goes through cattune.run's resume_point, as `cattune train` does.
    from cattune.run import remove_stale, resume_point, seconds_in, write_identity

    def resumed(ident):
        last, stale, why = resume_point(work, ident, scratch=True)
        remove_stale(stale, why, work, log=lambda m: None)
        return last

    work = tmp_path / ".run.partial"
    (work / "checkpoint-2").mkdir(parents=True)
    (work / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (work / "checkpoint-2" / "cattune_train_seconds.json").write_text('{"train_seconds": 5.0}')
    write_identity(work, {"settings": "abc", "train_sha256": "d1"})
    assert resumed({"settings": "abc", "train_sha256": "d1"}) == str(work / "checkpoint-2")
    assert seconds_in(work / "checkpoint-2") == 5.0
    (work / "checkpoint-4").mkdir()  # killed while saving: no state file yet
    assert resumed({"settings": "abc", "train_sha256": "d1"}) == str(work / "checkpoint-2")
    assert not (work / "checkpoint-4").exists()  # else the Trainer's rotation would keep it, not checkpoint-2
    (work / "checkpoint-6").mkdir()  # the Trainer's state written, the time file not yet: the run's time is lost
    (work / "checkpoint-6" / "trainer_state.json").write_text("{}")
    assert resumed({"settings": "abc", "train_sha256": "d1"}) == str(work / "checkpoint-2")
    assert not (work / "checkpoint-6").exists()
    assert resumed({"settings": "abc", "train_sha256": "d2"}) is None  # the task file changed
    assert not list(work.glob("checkpoint-*"))
    (work / "checkpoint-2").mkdir(parents=True)
    (work / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert resumed({"settings": "other", "train_sha256": "d1"}) is None and not list(work.glob("checkpoint-*"))
    with pytest.raises(ConfigError, match="checkpoint_minutes must be a number of minutes"):
        load_config(micro(tmp_path, checkpoint_minutes=-1))


def test_only_some_seeds_arms_and_tasks(tmp_path, capsys):
    # One cell of a grid, as a user reproducing a committed figure would run it.
    cfg_path = micro(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["experiment", str(cfg_path), "--out", str(out), "--only-seeds", "1", "--only-arms", "cat",
                     "--only-tasks", "E"]) == 0
    results = lines(out / "results.jsonl")
    assert [(r["task"], r["arm"], r["seed"]) for r in results] == [("E", "cat", 1)]
    assert "E" in (out / "summary.md").read_text()
    # the rest of the grid is still planned for a plain run
    cfg = load_config(cfg_path)
    report = run_experiment(cfg, out=out, dry_run=True, log=lambda m: None)
    assert len(report.skipped) == 1 and len(report.planned) == 12
    assert cli.main(["experiment", str(cfg_path), "--out", str(out), "--only-arms", "nope"]) == 1
    assert "no arm ['nope'] in the config" in capsys.readouterr().err


def test_settings_hash_of_shipped_configs_is_stable():
    """Finished runs in results.jsonl are matched by this hash: it changes with the
    settings and with nothing else (values recorded when lr 3e-4 became the demo's)."""
    demo_train = {
        "num_train_epochs": 30, "learning_rate": 3e-4, "per_device_train_batch_size": 16, "warmup_steps": 0.1,
        "lr_scheduler_type": "cosine", "cat_alpha": 2000.0, "cat_gamma": 1.0, "cat_gamma_decay": 0.0,
        "cat_layers": [-1], "cat_span_columns": "last_word", "logging_steps": 50}
    assert load_config("builtin:demo").train == demo_train
    cfg = load_config("builtin:stg")
    assert cfg.train == {**demo_train, "use_cpu": True}  # train_from: builtin:demo
    hashes = {(t.label, arm): experiment.settings_hash(cfg, t, cfg.models[0], arm)
              for t in cfg.tasks for arm in cfg.arms}
    assert hashes[("STG_E_M", "baseline")] == "be9cd4a8a126" and hashes[("STG_E_M", "cat")] == "dcf9811a5ac6"
    assert hashes[("STG_H_L", "cat")] == "4e9357ee0a37" and hashes[("STG_E_S", "placebo")] == "95bf7ec5a47e"
    # STG_H keeps its own learning rate, tuned with it
    assert experiment.train_args_for(cfg, cfg.tasks[5], "cat")["learning_rate"] == 1e-3
    e_m = load_config(Path(__file__).resolve().parents[1] / "experiments" / "stg_e_m.yaml")
    assert experiment.settings_hash(e_m, e_m.tasks[0], e_m.models[0], "cat") == "2ad59c764e19"


def test_train_from_starts_the_train_block_from_another_config(tmp_path, capsys):
    # Without train_from nothing but the config's own block: CATConfig's defaults for the rest.
    assert load_config(micro(tmp_path, train_from=None)).train == {
        "max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1, "learning_rate": 3e-3, "use_cpu": True}
    # A file, relative to the config, which itself starts from a shipped recipe; own keys win.
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("train_from: builtin:demo\ntrain: {cat_alpha: 50}\ntasks: [STG_E]\n")
    cfg = load_config(micro(tmp_path / "sub", train_from="../base.yaml", train={"learning_rate": 0.01}))
    assert cfg.train["cat_alpha"] == 50.0 and cfg.train["cat_layers"] == [-1]
    assert cfg.train["learning_rate"] == 0.01 and cfg.train["num_train_epochs"] == 30
    # --dry-run shows what each run will train with
    assert cli.main(["experiment", str(tmp_path / "sub" / "micro.yaml"), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "E / baseline: cat_alpha=50, cat_gamma=0.0," in err and "learning_rate=0.01, " in err
    assert "SVAMP / cat: cat_alpha=50, cat_gamma=1.0, cat_gamma_decay=0.0, cat_layers=[-1]" in err
    for spec, msg in (("builtin:nope", "no shipped experiment named 'nope'"), ("missing.yaml", "no such experiment config"),
                      (3, "train_from must be builtin:NAME")):
        with pytest.raises(ConfigError, match=msg):
            load_config(micro(tmp_path, train_from=spec))
    (tmp_path / "loop.yaml").write_text("train_from: micro.yaml\ntasks: [STG_E]\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(micro(tmp_path, train_from="loop.yaml"))


def test_save_models_can_keep_only_some_seeds(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    cfg = load_config(micro(tmp_path, arms=["baseline"], save_models=[1], tasks=[
        {"task": "STG_E", "label": "E", "train": "train_S", "train_limit": 8, "test_limit": 2}]))
    assert [cfg.keeps_model(s) for s in (0, 1)] == [False, True]
    run_experiment(cfg, out=tmp_path / "out", log=lambda m: None)
    # without --progress, no bars from transformers either (writing the kept model's weights)
    assert "Writing model shards" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    assert sorted(p.name for p in (tmp_path / "out" / "models").iterdir()) == ["E__tiny__baseline__seed1"]
    # each result says where it ran: figures move between CPUs
    ran = lines(tmp_path / "out" / "results.jsonl")[0]["execution"]
    assert ran["device"] == "cpu" and ran["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert ran["threads"] == torch.get_num_threads() and ran["torch"] == torch.__version__
    with pytest.raises(ConfigError, match="save_models must be true, false or a list of seeds"):
        load_config(micro(tmp_path, save_models="seed 0"))


def test_a_train_block_without_cat_gamma_takes_catconfigs_default(tmp_path):
    # issue 34.1: the CAT arm trained and was evaluated, then its result line failed on cat_gamma.
    cfg = load_config(micro(tmp_path, seeds=1, arms=["baseline", "cat"], train_from=None,
                            train={"max_steps": 3, "per_device_train_batch_size": 8, "use_cpu": True},
                            tasks=[{"task": "STG_E", "label": "E", "train": "train_S", "train_limit": 16,
                                    "test_limit": 4}]))
    report = run_experiment(cfg, out=tmp_path / "out", log=lambda m: None)
    assert report.complete
    gammas = {r["arm"]: r["cat_gamma"] for r in lines(tmp_path / "out" / "results.jsonl")}
    assert gammas == {"baseline": 0.0, "cat": 1.0}


@pytest.mark.parametrize("tolerance", [float("nan"), float("inf"), -1.0])
def test_compare_refuses_a_tolerance_that_passes_everything(tolerance):
    with pytest.raises(ValueError, match="tolerance must be a number of points"):
        experiment.compare_results([], [], tolerance)
