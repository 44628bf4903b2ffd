"""CAT training under DDP: 2 CPU processes (gloo) give what 1 process gives on the same global batch.

The worker script below is written to a temporary folder and launched with
``python -m torch.distributed.run --standalone --nproc_per_node 2`` (per-device batch 4)
and, at the same time, as a plain single process (batch 8). Both train the embedded tiny
Llama (cattune.tiny.build, same seed everywhere) for a few SGD steps of CATTrainer with
cat_gamma > 0 on the same records in the same order, so every optimizer step sees the
same 8 records. The Trainer's logged loss of every step and the final weights must match.
SGD, not Adam: the update is linear in the gradient, so a wrong scale of either loss term
under DDP shows up in the weights instead of being normalised away.

The single process also trains once with twice the attention weight: the test checks that
the difference that makes is far above the tolerance, i.e. that it would catch the
attention loss being scaled by the number of processes.

Records whose numbers of supervised rows differ (SVAMP) check that the attention loss is
the mean over the global batch's rows (not a mean of per-process means), and the logged
``loss_ce``/``loss_attn`` must be the global values, not rank 0's own. A third launch mixes
annotated and plain records so that one rank has no supervised row at all: it must not
hang (the worker has a watchdog) and must still match one process. Last, ``cattune train``
itself runs under the launcher and must exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from cattune.records import save_records

REPO = Path(__file__).resolve().parents[1]
N_RECORDS = 24  # 3 global batches of 8
STEPS = 3

WORKER = textwrap.dedent(
    """
    import faulthandler, json, os, sys, warnings
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from cattune.records import load_records
    from cattune.tiny import build
    from cattune.config import CATConfig
    from cattune.trainer import CATTrainer, end_distributed

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if spec.get("watchdog"):  # a stuck collective: print where every thread is, and exit
        faulthandler.dump_traceback_later(spec["watchdog"], exit=True)
    out, per_device, steps = spec["out"], spec["per_device"], spec["steps"]
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))


    def train_all():
        result = {"world_size": world_size, "runs": {}}
        for run in spec["runs"]:
            name, gamma = run["name"], run["gamma"]
            records = load_records(run["data"])
            model, tok = build([r.text for r in records], seed=0)  # same init in every process
            initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
            args = CATConfig(
                output_dir=os.path.join(out, f"run_{rank}_{name}"),
                per_device_train_batch_size=per_device,
                max_steps=steps,
                optim="sgd",
                learning_rate=0.5,
                lr_scheduler_type="constant",
                weight_decay=0.0,
                max_grad_norm=0.0,
                cat_gamma=gamma,
                cat_gamma_decay=0.0,
                cat_alpha=5.0,
                max_length=128,
                train_sampling_strategy="sequential",  # the same records in the same global batches
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                use_cpu=True,
                # gloo (not MPI) under the launcher; in a single process a backend makes accelerate
                # look for a process group that does not exist, so none is given there.
                ddp_backend="gloo" if world_size > 1 else None,
                dataloader_num_workers=0,
                ddp_find_unused_parameters=False,
                seed=0,
            )
            trainer = CATTrainer(model=model, args=args, train_dataset=records, processing_class=tok)
            trainer.train()
            if rank == 0:
                final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
                torch.save({"initial": initial, "final": final}, os.path.join(out, f"params_{name}.pt"))
                logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
                result["runs"][name] = {"logs": logs}
        return result

    result = train_all()
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    end_distributed()  # train_all returned, so no trainer holds the process group any more
    """
)


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p),
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    return env


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int | None, str]:
    """(exit code, output); None when it ran past ``timeout`` seconds and was killed."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes it on to its workers
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        code = None
    return code, log.read_text(errors="replace")


def _check(proc: subprocess.Popen, log: Path, name: str) -> None:
    code, out = _finish(proc, log, timeout=300)
    if code != 0:
        pytest.fail(f"{name} failed with exit code {code}:\n{out[-6000:]}")


def _delta(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@dataclass
class Runs:
    one: Path  # the single process's output folder
    two: Path  # rank 0's output folder of the 2-process run
    two_mixed: Path  # the same for the records half without annotation
    mixed_exit: tuple[int | None, str]  # exit code and output of that launch
    cli: Path  # `cattune train` run by the launcher on 2 processes
    cli_exit: tuple[int | None, str]
    seconds: float

    def result(self, which: str) -> dict:
        return json.loads((getattr(self, which) / "result.json").read_text())

    def logs(self, which: str, name: str) -> list[dict]:
        return self.result(which)["runs"][name]["logs"]

    def params(self, which: str, name: str) -> dict:
        return torch.load(getattr(self, which) / f"params_{name}.pt")


@pytest.fixture(scope="module")
def runs(stg_e_released, svamp_train, tmp_path_factory) -> Runs:
    """Launched side by side: 2 processes x batch 4 (twice) and 1 process x batch 8."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "worker.py").write_text(WORKER)
    data = {"stg": tmp / "stg_e.jsonl", "svamp": tmp / "svamp.jsonl", "mixed": tmp / "mixed.jsonl"}
    # STG_E: every record has the same number of supervised rows (the answer's tokens).
    stg = stg_e_released["train_S"][:N_RECORDS]
    save_records(data["stg"], stg)
    # SVAMP: between 0 and 44 supervised rows per record.
    save_records(data["svamp"], svamp_train[:N_RECORDS])
    # Annotated and plain records: in every global batch of 8, the 4 that rank 1 gets have
    # no annotation, so rank 1 has no supervised row (and no CAT metric) at all.
    save_records(data["mixed"], [r if i % 8 < 4 else replace(r, important=[]) for i, r in enumerate(stg)])
    env = _env()
    start = time.monotonic()

    def launch(which, per_device, runs_, watchdog=None):
        out = tmp / which
        out.mkdir()
        spec = {"out": str(out), "per_device": per_device, "steps": STEPS,
                "runs": [{"name": f"{d}_{g}", "data": str(data[d]), "gamma": g} for d, g in runs_]}
        if watchdog:
            spec["watchdog"] = watchdog
        (tmp / f"{which}.json").write_text(json.dumps(spec))
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if which != "one" else []
        # Output to a file, not a pipe: a worker left behind must not keep the test waiting.
        with open(tmp / f"{which}.log", "w") as log:
            return subprocess.Popen(
                [sys.executable, *launcher, str(tmp / "worker.py"), str(tmp / f"{which}.json")],
                cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)

    one = launch("one", 8, [("stg", 1.0), ("stg", 2.0), ("svamp", 1.0), ("mixed", 1.0)])
    # The two torchrun launches run one after the other: --standalone probes for a free port,
    # and two launchers probing at once can pick the same one.
    two = launch("two", 4, [("stg", 1.0), ("svamp", 1.0)])
    _check(two, tmp / "two.log", "torch.distributed.run with 2 processes")
    # seconds: it needs ~5; a hang ends here instead of never
    two_mixed = launch("two_mixed", 4, [("mixed", 1.0)], watchdog=60)
    _check(one, tmp / "one.log", "single process")
    mixed = _finish(two_mixed, tmp / "two_mixed.log", timeout=150)
    # The documented way to train on several processes: the CLI under the launcher.
    with open(tmp / "cli.log", "w") as log:
        cli = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "cattune.cli", "train", "--train", str(data["mixed"]), "--output_dir", str(tmp / "cli"),
             "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none",
             "--save_strategy", "no", "--disable_tqdm", "true", "--cat_gamma", "1", "--logging_steps", "1"],
            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    cli_exit = _finish(cli, tmp / "cli.log", timeout=150)
    runs = Runs(one=tmp / "one", two=tmp / "two", two_mixed=tmp / "two_mixed", mixed_exit=mixed,
                cli=tmp / "cli", cli_exit=cli_exit, seconds=time.monotonic() - start)
    assert runs.result("one")["world_size"] == 1 and runs.result("two")["world_size"] == 2
    return runs


def _tolerance(moved: float) -> float:
    return 1e-5 + 1e-4 * moved


def test_ddp_two_processes_match_one_process(runs):
    # The same loss at every step: CE + gamma * attention loss over the same 8 records.
    ref_logs, dist_logs = runs.logs("one", "stg_1.0"), runs.logs("two", "stg_1.0")
    assert [h["step"] for h in ref_logs] == [h["step"] for h in dist_logs] == list(range(1, STEPS + 1))
    for r, d in zip(ref_logs, dist_logs):
        assert d["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-5), (r, d)
        assert r["loss_attn"] != 0.0, "the attention loss must be active for this test to mean anything"

    p1, r1, r2 = runs.params("two", "stg_1.0"), runs.params("one", "stg_1.0"), runs.params("one", "stg_2.0")
    assert _delta(p1["initial"], r1["initial"]) == 0.0, "every process must start from the same weights"
    moved = _delta(r1["final"], r1["initial"])
    mismatch = _delta(p1["final"], r1["final"])
    sensitivity = _delta(r2["final"], r1["final"])  # what a 2x attention loss would change
    assert moved > 1e-3
    assert mismatch <= _tolerance(moved), f"DDP weights differ by {mismatch:.2e} (update size {moved:.2e})"
    assert sensitivity > 100 * _tolerance(moved), "the test could not tell a 2x attention loss apart"
    print(f"\nDDP check ({runs.seconds:.1f}s for both launches): weights moved {moved:.3e}, "
          f"2 procs vs 1 {mismatch:.2e}, 2x attention loss would give {sensitivity:.2e}")


def test_ddp_matches_one_process_with_uneven_rows(runs):
    r, p = runs.params("one", "svamp_1.0"), runs.params("two", "svamp_1.0")
    moved = _delta(r["final"], r["initial"])
    assert _delta(p["final"], r["final"]) <= _tolerance(moved)


def test_ddp_logged_cat_metrics_are_global(runs):
    for r, d in zip(runs.logs("one", "stg_1.0"), runs.logs("two", "stg_1.0")):
        assert d["loss_ce"] == pytest.approx(r["loss_ce"], rel=1e-4)
        assert d["loss_attn"] == pytest.approx(r["loss_attn"], rel=1e-4)


def test_ddp_rank_without_supervised_rows(runs):
    # Annotated and plain records mixed so that one rank's batches have no supervised row:
    # that rank must still join every collective of the step and of the logging (it once
    # skipped CATTrainer.log's reduction and the other rank waited for ever).
    code, out = runs.mixed_exit
    stuck = out[out.find("Timeout ("):][:1500] if "Timeout (" in out else out[-3000:]  # the watchdog's stacks
    assert code == 0, f"2 processes, rank 1 without annotated records: exit {code}\n{stuck}"
    r, p = runs.params("one", "mixed_1.0"), runs.params("two_mixed", "mixed_1.0")
    moved = _delta(r["final"], r["initial"])
    assert _delta(p["final"], r["final"]) <= _tolerance(moved)
    for a, b in zip(runs.logs("one", "mixed_1.0"), runs.logs("two_mixed", "mixed_1.0")):
        for key in ("loss", "loss_ce", "loss_attn"):  # rank 1's CE still counts, its rows are none
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)


def test_ddp_cli_train_exits_cleanly(runs):
    # `cattune train` under torchrun: one saved model and report (rank 0), and exit 0. Without
    # end_distributed() one rank aborted at interpreter exit in 3 of 8 launches, after saving.
    code, out = runs.cli_exit
    assert code == 0, f"cattune train under torchrun: exit {code}\n{out[-3000:]}"
    report = json.loads((runs.cli / "train_report.json").read_text())
    assert report["encode"]["train"]["records"] == N_RECORDS
    assert [h["step"] for h in report["log_history"] if "loss" in h and "train_runtime" not in h] == [1, 2]
    assert (runs.cli / "model.safetensors").stat().st_size > 0
    assert out.count("model saved to") == 1
