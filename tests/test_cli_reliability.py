"""The CLI as a careless or hostile user meets it: nothing is lost, nothing leaks, no
traceback. Every case runs the real command in a subprocess."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

UNWRITABLE = "/proc/cattune-test"  # not even root can create anything there


def cli(*args, env=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cattune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def ok(r):
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def fails(r, message):
    assert r.returncode in (1, 2), (r.returncode, r.stderr)  # 2: a usage error, from the parser
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


TRAIN = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu",
         "--disable_tqdm", "true", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from cattune import stg
    from cattune.records import save_records

    d = tmp_path_factory.mktemp("data")
    splits = stg.generate("E")
    save_records(d / "train.jsonl", splits["train_S"][:16])
    save_records(d / "test.jsonl", splits["iid_test"][:8])
    save_records(d / "ood.jsonl", splits["ood_test"][:8])
    return d


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    ok(cli("train", "--train", data / "train.jsonl", "--out", out, "--save_strategy", "no", *TRAIN))
    return out


# --- 1, 20: outputs that would destroy an input, or cannot be written -----------------------


def test_eval_refuses_to_write_over_its_data(model, data, tmp_path):
    copy = tmp_path / "test.jsonl"
    copy.write_bytes((data / "test.jsonl").read_bytes())
    before = copy.read_bytes()
    fails(cli("eval", "--model", model, "--data", copy, "--out", tmp_path / "." / "test.jsonl"), "is the same file as")
    link = tmp_path / "link.json"
    link.symlink_to(copy)
    fails(cli("eval", "--model", model, "--data", copy, "--out", link), "is the same file as")
    assert copy.read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["stg", "--out", f"{UNWRITABLE}/stg"], "cannot write there"),
    (["demo", "--out", f"{UNWRITABLE}/demo", "--limit", "8"], "cannot write there"),
    (["eval", "--model", "MODEL", "--data", "TEST", "--out", f"{UNWRITABLE}/r.json"], "cannot write there"),
    (["eval", "--model", "MODEL", "--data", "TEST", "--out", "DIR"], "is a directory"),
    (["explain", "--model", "MODEL", "--data", "TEST", "--out", f"{UNWRITABLE}/x.png"], "cannot write there"),
    (["explain", "--model", "MODEL", "--data", "TEST", "--out", "TEST"], "is the same file as"),
    (["train", "--train", "TEST", "--out", "TEST"], "is the same file as"),
    (["train", "--train", "TEST", "--model", "MODEL", "--out", "MODEL"], "is the same file as"),
    (["eval", "--model", "MODEL", "--data", "TEST", "--out", "MODEL_CONFIG"], "is the same file as"),
])
def test_outputs_are_checked_before_the_work(model, data, tmp_path, argv, message):
    subst = {"MODEL": model, "TEST": data / "test.jsonl", "DIR": tmp_path, "MODEL_CONFIG": model / "config.json"}
    before = (data / "test.jsonl").read_bytes()
    fails(cli(*[subst.get(a, a) for a in argv]), message)
    assert (data / "test.jsonl").read_bytes() == before


# --- 3: a killed training run is resumed, not restarted over its checkpoints -----------------


def test_train_resumes_from_the_last_checkpoint_in_out(data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--train", data / "train.jsonl", "--out", out, "--save_strategy", "steps", "--save_steps", "1"]
    ok(cli(*args, *TRAIN))  # steps 1-2
    (out / "train_report.json").unlink()  # as if killed after step 2 of 4
    r = ok(cli(*args, *TRAIN[:1], "4", *TRAIN[2:]))
    assert f"resuming from {out / 'checkpoint-2'}" in r.stderr
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    # A finished run, or checkpoints of a run with other settings, are never continued silently.
    fails(cli(*args, *TRAIN[:1], "5", *TRAIN[2:]), "holds a finished run")
    (out / "train_report.json").unlink()
    fails(cli(*args, *TRAIN[:1], "5", *TRAIN[2:], "--learning_rate", "1e-2"), "differs in: learning_rate")
    # Asked for: a bare --resume_from_checkpoint means the last checkpoint.
    r = ok(cli(*args, *TRAIN[:1], "5", *TRAIN[2:], "--resume_from_checkpoint"))
    assert f"resuming from {out / 'checkpoint-4'}" in r.stderr
    # --overwrite_output_dir removes the earlier run, so no old checkpoint is resumed or kept later.
    r = ok(cli(*args, *TRAIN, "--overwrite_output_dir"))
    assert "resuming" not in r.stderr and "removed 7 checkpoint(s) and report(s)" in r.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    fails(cli("train", "--train", data / "train.jsonl", "--out", tmp_path / "empty", *TRAIN,
              "--resume_from_checkpoint", "true"), "no complete checkpoint-N directory")
    # A finished run saved without checkpoints is not overwritten unasked either.
    done = tmp_path / "done"
    ok(cli("train", "--train", data / "train.jsonl", "--out", done, *TRAIN, "--save_strategy", "no"))
    weights = (done / "model.safetensors").read_bytes()
    fails(cli("train", "--train", data / "train.jsonl", "--out", done, *TRAIN, "--save_strategy", "no"),
          "holds a finished run")
    assert (done / "model.safetensors").read_bytes() == weights


# --- 4, 15: eval keeps earlier results, cuts long prompts as training does ------------------


def test_eval_keeps_results_per_data_file_and_truncates(model, data, tmp_path):
    ok(cli("eval", "--model", model, "--data", data / "test.jsonl"))
    r = ok(cli("eval", "--model", model, "--data", data / "ood.jsonl"))
    assert "kept earlier results for 1 other data file" in r.stdout
    res = json.loads((model / "eval_results.json").read_text())
    assert set(res["results"]) == {str(data / "test.jsonl"), str(data / "ood.jsonl")}
    # Weights trained again into the directory: the earlier model's results are not kept.
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    r = ok(cli("eval", "--model", model, "--data", data / "ood.jsonl"))
    assert "earlier results are of other weights" in r.stderr
    assert set(json.loads((model / "eval_results.json").read_text())["results"]) == {str(data / "ood.jsonl")}
    # A huge record: cut from the left to max_length, counted, and no memory blow-up.
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"input": "Smoking: 8. " * 20000 + "Answer: ", "target": "8"}) + "\n")
    r = ok(cli("eval", "--model", model, "--data", huge, "--out", tmp_path / "h.json"))
    assert "1 of 1 prompts longer than max_length were cut from the left" in r.stderr
    assert json.loads((tmp_path / "h.json").read_text())["results"][str(huge)]["truncated"] == 1


# --- 13, 16, 18, 19: data and models that would silently do the wrong thing ----------------


def test_cat_without_any_supervised_row_fails_and_skip_invalid_reports(data, tmp_path):
    plain = tmp_path / "plain.jsonl"
    lines = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    plain.write_text("".join(json.dumps({"input": x["input"], "target": x["target"]}) + "\n" for x in lines))
    fails(cli("train", "--train", plain, "--out", tmp_path / "o", *TRAIN), "no training record keeps a supervised row")
    broken = tmp_path / "broken.jsonl"
    broken.write_text((data / "train.jsonl").read_text() + '{"input": "x", "target": "y", "target": "z"}\n')
    fails(cli("train", "--train", broken, "--out", tmp_path / "o", *TRAIN), f"{broken}:17: duplicate key 'target'")
    r = ok(cli("train", "--train", broken, "--out", tmp_path / "o", *TRAIN, "--save_strategy", "no", "--skip_invalid"))
    assert f"{broken}: skipped 1 broken record(s): line 17: duplicate key" in r.stderr


def test_lora_on_the_embedded_model_loads_again_offline(data, tmp_path):
    out = tmp_path / "lora"
    ok(cli("train", "--train", data / "train.jsonl", "--out", out, "--lora", "--lora_r", "4", "--save_strategy",
           "no", *TRAIN))
    moved = tmp_path / "elsewhere"
    out.rename(moved)  # the adapter and its base travel together
    r = ok(cli("eval", "--model", moved, "--data", data / "test.jsonl", "--out", tmp_path / "e.json"))
    assert "accuracy" in r.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "--train", "TRAIN", "--out", "OUT", "--max_length", "0"], "max_length must be at least 2"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--max_length", "1"], "max_length must be at least 2"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--gamma", "nan"], "cat_gamma must be a finite number"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--cat_gamma_decay", "-1"], "cat_gamma_decay must be >= 0"),
    (["demo", "--alpha", "0", "--out", "OUT"], "invalid option --alpha / --h-alpha: task STG_E, arm baseline: "
     "cat_alpha must be > 0"),
    (["demo", "--batch-size", "0", "--out", "OUT"], "invalid option --batch-size:"),
    (["eval", "--model", "EMPTY", "--data", "TRAIN"], "not a model directory"),
    (["eval", "--model", "NOTOKENIZER", "--data", "TRAIN"], "holds a model but no tokenizer"),
    (["eval", "--model", "MODEL", "--data", "TRAIN", "--batch-size", "0"], "--batch-size must be a positive"),
    (["experiment", "builtin:stg", "--max-runs", "-1", "--out", "OUT"], "max_runs must be 0 or more"),
    (["explain", "--model", "MODEL", "--data", "TRAIN", "--record", "99", "--out", "OUT/x.png"], "out of range"),
    (["train", "--train", "UTF16BAD", "--out", "OUT"], "not UTF-8"),
])
def test_bad_values_are_one_line_errors(model, data, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"input": "caf\xe9 ", "target": "t"}\n')
    (tmp_path / "no_tokenizer").mkdir()
    shutil.copy(model / "config.json", tmp_path / "no_tokenizer")
    subst = {"TRAIN": data / "train.jsonl", "OUT": tmp_path / "out", "EMPTY": tmp_path / "empty", "MODEL": model,
             "UTF16BAD": bad, "NOTOKENIZER": tmp_path / "no_tokenizer"}
    fails(cli(*[str(subst.get(a, a)).replace("OUT", str(tmp_path / "out")) for a in argv]), message)


@pytest.mark.parametrize("model, message", [
    ("./no_such_model", "./no_such_model: no such model directory"),  # not hours into a grid
    ("builtin:nope", "unknown built-in model builtin:nope"),
    ("no_model.gguf", "no_model.gguf: no such GGUF file"),
])
def test_experiment_checks_its_models_before_any_run(tmp_path, capsys, model, message):
    from cattune import cli as cattune_cli

    config = {"name": "x", "tasks": [{"task": "STG_E", "train_limit": 8, "test_limit": 4}], "models": [model]}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    assert cattune_cli.main(["experiment", str(tmp_path / "c.yaml"), "--dry-run"]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--cat_loss", "foo"], "invalid choice: 'foo'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--config", "BADCONFIG"], "cat_loss must be one of"),
])
def test_train_option_errors_are_not_buried_under_the_usage(tmp_path, capsys, argv, message):
    from cattune import cli as cattune_cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("cat_loss: foo\n")
    with pytest.raises(SystemExit) as exit_:
        cattune_cli.main(["train", "--train", "x.jsonl", "--out", str(tmp_path / "o"),
                          *[str(bad) if a == "BADCONFIG" else a for a in argv]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    assert "usage:" not in err and len(err.splitlines()) == 2, err


def test_experiment_max_runs_zero_writes_no_table_and_says_so(tmp_path):
    r = ok(cli("experiment", "builtin:stg", "--max-runs", "0", "--out", tmp_path / "x"))
    assert "no finished run yet, so no table" in r.stderr and not (tmp_path / "x" / "summary.md").exists()


@pytest.mark.parametrize("field, value, message", [
    ("models", [{"name": "t", "tiny": {}, "trust_remote_code": "maybe"}], "trust_remote_code must be true or false"),
    ("train", {"num_train_epochs": [1, 2]}, "num_train_epochs must be a number"),
    ("train", {"max_steps": 2.5}, "max_steps must be an integer"),
    ("eval", {"batch_size": 0}, "eval.batch_size must be a positive integer"),
    ("eval", {"batch_size": "big"}, "eval.batch_size must be a positive integer"),
])
def test_experiment_config_types_fail_before_any_run(tmp_path, field, value, message):
    import yaml

    config = {"name": "x", "output": str(tmp_path / "o"), "tasks": [{"task": "STG_E", "train_limit": 8,
                                                                     "test_limit": 4}], field: value}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    fails(cli("experiment", path, "--dry-run"), message)


# --- 5: workers die with their parent --------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc")
def test_experiment_workers_exit_when_the_runner_is_killed(tmp_path):
    import yaml

    config = {"name": "k", "output": str(tmp_path / "o"), "seeds": [0, 1], "arms": ["baseline"],
              "tasks": [{"task": "STG_E", "train": "train_L", "test_limit": 4}], "train": {"num_train_epochs": 50}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "cattune.cli", "experiment", str(path), "--jobs", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(1)
            workers = [c for c in _children(proc.pid)
                       if b"spawn" in Path(f"/proc/{c}/cmdline").read_bytes() and _children(c) == []]
        assert len(workers) >= 2, "the workers did not start"
        time.sleep(3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.5)
        alive = [w for w in workers if Path(f"/proc/{w}").exists() and
                 Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, f"workers {alive} outlived the runner"
    finally:
        for pid in _children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("name", ["stg", "annotate", "train", "eval", "demo", "experiment", "explain"])
def test_every_command_meets_garbage_without_a_traceback(name, tmp_path):
    from cattune.cli import COMMANDS

    assert name in COMMANDS
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\xff\xfe\x00garbage\n{not json\n")
    for argv in (["--no-such-option", "x"], [str(junk), "--out", str(junk)]):
        r = cli(name, *argv)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr


def test_demo_never_clears_an_experiments_results(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"task": "x"}\n')
    fails(cli("demo", "--out", tmp_path, "--limit", "8"), "holds an experiment's results.jsonl")
    assert (tmp_path / "results.jsonl").read_text() == '{"task": "x"}\n'


# --- issue 34: no lost training, one line for every mistake ----------------------------------


def test_an_incomplete_checkpoint_is_skipped_and_removed(data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--train", data / "train.jsonl", "--out", out, "--save_strategy", "steps", "--save_steps", "1"]
    ok(cli(*args, *TRAIN))
    (out / "train_report.json").unlink()
    (out / "checkpoint-2" / "trainer_state.json").unlink()  # killed (or the disk filled) mid-save
    r = ok(cli(*args, *TRAIN[:1], "3", *TRAIN[2:]))
    assert f"resuming from {out / 'checkpoint-1'}" in r.stderr
    assert "removed checkpoint-2" in r.stderr and "incomplete" in r.stderr
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    fails(cli("train", "--train", data / "train.jsonl", "--out", tmp_path / "other", *TRAIN,
              "--resume_from_checkpoint", _cut(out / "checkpoint-3")), "checkpoint-3: incomplete")


def _cut(checkpoint: Path) -> Path:
    (checkpoint / "trainer_state.json").write_text('{"global_st')  # cut while writing the state itself
    return checkpoint


def _unshare_tmpfs_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _unshare_tmpfs_works(), reason="needs unshare and a tmpfs mount (a small full disk)")
@pytest.mark.parametrize("size_kb", [1000, 2500])  # the weights' save fails (safetensors), or the optimizer's (torch)
def test_a_full_disk_is_one_line_and_leaves_no_checkpoint(data, tmp_path, size_kb):
    disk = tmp_path / "disk"
    disk.mkdir()
    argv = [sys.executable, "-m", "cattune.cli", "train", "--train", data / "train.jsonl", "--out", disk / "run",
            "--save_strategy", "steps", "--save_steps", "1", *TRAIN]
    script = f"mount -t tmpfs -o size={size_kb}k tmpfs {disk} && exec " + " ".join(map(str, argv))
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    fails(r, f"no space left on {disk / 'run' / 'checkpoint-1'}")
    assert "enforce fail" not in r.stderr and "SafetensorError" not in r.stderr


def _held(directory: Path):
    from filelock import FileLock

    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(directory / ".cattune.lock"), timeout=0)


def test_two_writers_of_one_output_exclude_each_other(data, tmp_path):
    out = tmp_path / "run"
    with _held(out):  # a run writing there now
        fails(cli("train", "--train", data / "train.jsonl", "--out", out, *TRAIN), f"another cattune train is "
              f"writing {out}")
        assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
    exp = tmp_path / "exp"
    with _held(exp):
        fails(cli("experiment", "builtin:stg", "--max-runs", "0", "--out", exp),
              f"another cattune experiment is writing {exp}")
    assert not (exp / "results.jsonl").exists()
    with _held(tmp_path / "stg"):
        fails(cli("stg", "--out", tmp_path / "stg", "--seed", "3"), "another cattune stg is writing")
    ok(cli("stg", "--out", tmp_path / "stg", "--seed", "3"))
    ok(cli("stg", "--out", tmp_path / "stg", "--seed", "3"))  # the same splits again: fine
    fails(cli("stg", "--out", tmp_path / "stg", "--seed", "4"), "holds STG_E seed 3's splits")
    fails(cli("stg", "--out", tmp_path / "stg", "--seed", "3", "--variant", "H"), "holds STG_E seed 3's splits")
    demo = tmp_path / "demo"
    demo.mkdir()
    for name in ("results.jsonl", "results.json"):  # a demo's earlier runs, which a new demo clears
        (demo / name).write_text("{}\n")
    with _held(demo):  # ... but not while another demo is writing them
        fails(cli("demo", "--out", demo, "--seeds", "1"), "another cattune demo is writing")
    assert (demo / "results.jsonl").exists()
    ok(cli("train", "--train", data / "train.jsonl", "--out", out, *TRAIN, "--save_strategy", "no"))
    assert not (out / ".cattune.lock").exists()  # released: the next run may write


def test_resume_keys_on_the_training_data_not_its_path(data, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes((data / "train.jsonl").read_bytes())
    out = tmp_path / "run"
    args = ["train", "--train", train, "--out", out, "--save_strategy", "steps", "--save_steps", "1"]
    ok(cli(*args, *TRAIN))
    (out / "train_report.json").unlink()
    train.write_bytes((data / "test.jsonl").read_bytes())  # other records, same path
    fails(cli(*args, *TRAIN[:1], "3", *TRAIN[2:]), "differs in: train_sha256")


def test_train_never_replaces_a_model_unasked_nor_removes_before_its_checks(model, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(model, out)
    for name in ("train_report.json", ".cattune-run.json"):  # a model from elsewhere, not a run killed here
        (out / name).unlink()
    weights = (out / "model.safetensors").read_bytes()
    fails(cli("train", "--train", data / "train.jsonl", "--out", out, *TRAIN), f"--out {out} holds a model")
    assert (out / "model.safetensors").read_bytes() == weights
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    # Asked to start over, but with a mistake only the model reveals: nothing is removed.
    fails(cli("train", "--train", data / "train.jsonl", "--out", out, *TRAIN, "--overwrite_output_dir",
              "--cat_layers", "7"), "out of range")
    assert (out / "checkpoint-1" / "trainer_state.json").exists() and (out / "model.safetensors").exists()
    fails(cli("train", "--train", data / "train.jsonl", "--out", out, *TRAIN, "--overwrite_output_dir",
              "--gradient_accumulation_steps", "0"), "gradient_accumulation_steps must be at least 1")
    assert (out / "checkpoint-1" / "trainer_state.json").exists()


@pytest.mark.parametrize("argv, files, message", [
    (["train", "--train", "TRAIN", "--out", "OUT", "--gradient_accumulation_steps", "0"], {},
     "gradient_accumulation_steps must be at least 1"),
    (["train", "--config", "A.yaml", "--train", "TRAIN"], {"A.yaml": "out: OUT\ngradient_accumulation_steps: 0\n"},
     "gradient_accumulation_steps must be at least 1"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--max_grad_norm", "nan"], {}, "max_grad_norm must be a finite"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--seed", "-1"], {}, "seed must be 0 or more"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--save_steps", "0"], {}, "save_steps must be > 0"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--lora", "--lora_dropout", "nan"], {}, "LoRA dropout must be in"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--eval", "E.jsonl"], {"E.jsonl": ""}, "--eval"),
    (["train", "--config", "A.yaml", "--train", "TRAIN"], {"A.yaml": "out: OUT\nlearning_rate: 1\nlearning_rate: 2\n"},
     "A.yaml:3: key 'learning_rate' appears twice"),
    (["train", "--config", "A.yaml", "--train", "TRAIN"], {"A.yaml": "out: OUT\noutput_dir: OUT2\n"},
     "gives both out and output_dir"),
    (["train", "--config", "A.yaml", "--config", "B.yaml", "--train", "TRAIN"],
     {"A.yaml": "out: OUT\n", "B.yaml": "max_steps: 1\n"}, "--config is given more than once"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--cat_layers", "0", "0", "-2"], {}, "names a layer twice"),
    (["train", "--train", "TRAIN", "--out", "OUT", "--cat_layers", "0", "-2"], {}, "names one layer twice"),
    (["explain", "--log", "L.json", "--alpha", "nan", "--out", "OUT.png"], {"L.json": "{}"},
     "--alpha: must be a positive number, got 'nan'"),
    (["experiment", "builtin:stg", "--summary-only", "--compare", "OUT", "--tolerance", "nan"], {},
     "--tolerance: must be a number >= 0, got 'nan'"),
    (["stg", "--seed", "-42", "--out", "OUT"], {}, "--seed: must be an integer >= 0, got '-42'"),
    (["experiment", "builtin:stg", "--only-seeds", "-1", "--out", "OUT"], {}, "--only-seeds: seeds must be 0 or more"),
    (["experiment", "C.yaml", "--dry-run"], {"C.yaml": "tasks: [STG_E]\nseeds: [0, -1]\n"},
     "seeds must be 0 or more, got -1"),
    (["experiment", "C.yaml", "--dry-run"], {"C.yaml": "tasks: [STG_E]\ntrain: {gradient_accumulation_steps: 0}\n"},
     "gradient_accumulation_steps must be at least 1"),
    (["experiment", "C.yaml", "--dry-run"], {"C.yaml": "tasks: [STG_E]\nseeds: 1\nseeds: 2\n"},
     "key 'seeds' appears twice"),
])
def test_issue_34_mistakes_are_one_line_errors(data, tmp_path, argv, files, message):
    subst = {"TRAIN": str(data / "train.jsonl"), "OUT2": str(tmp_path / "out2"), "OUT": str(tmp_path / "out")}

    def fill(text):
        for key in sorted(subst, key=len, reverse=True):
            text = text.replace(key, subst[key])
        return text

    for name, text in files.items():
        (tmp_path / name).write_text(fill(text))
    fails(cli(*[str(tmp_path / a) if a in files else fill(a) for a in argv]), message)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot load model"),
    ({"cat_layers": "abc"}, "cattune.json: cat_layers must be a list of layer indices, got 'abc'"),
    ({"max_length": -1}, "cattune.json: max_length must be an integer, at least 2, got -1"),
    ({"chat_template": "no"}, "cattune.json: chat_template must be true or false"),
])
def test_a_damaged_model_directory_is_a_one_line_error(model, data, tmp_path, damage, message):
    broken = tmp_path / "m"
    shutil.copytree(model, broken)
    if damage == "truncate":  # a copy cut short
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        info = json.loads((broken / "cattune.json").read_text())
        (broken / "cattune.json").write_text(json.dumps({**info, **damage}))
    fails(cli("eval", "--model", broken, "--data", data / "test.jsonl", "--out", tmp_path / "r.json"), message)
    assert not (tmp_path / "r.json").exists()
