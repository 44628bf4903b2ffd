"""Running an experiment: every planned run not yet in ``results.jsonl``, one or more at a time.

Every run trains with :class:`cattune.trainer.CATTrainer` and is evaluated on every test
set of its task. Outputs, in the output directory:

- ``results.jsonl``: one line per finished run, appended and flushed as it finishes. A
  killed experiment started again skips the runs already there, identified by
  (task, model, arm, seed); a half-written last line is dropped.
- ``summary.md`` / ``summary.csv`` / ``runs.csv`` (``cattune.experiment.report``),
  rewritten atomically after every run; summary.md embeds the plots below.
- ``plots/``: per task and model the attention-ratio curves of the first seed's arms,
  and for the first seed each run's heatmap of the first record of its last test set.
- ``logs/RUN.json``: the trainer's log history (loss_ce, loss_attn, attn_ratio, ...),
  readable by ``cattune.explain.plot_ratio_curve``.
- ``predictions/RUN.jsonl`` and ``models/RUN/`` when ``save_predictions`` /
  ``save_models`` are set.
- ``.RUN.partial/``, while a run trains for longer than ``checkpoint_minutes``: its last
  checkpoint (weights, optimizer, RNG states), from which the same command resumes the
  run after a kill; removed once the run's result line is written.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import CATConfig
from ..files import atomic_write_text, output_lock
from ..models import check_model_reference
from ..run import (
    ModelSpec, Run, build_model, evaluate_tests, identity, make_trainer, records_digest, remove_stale, result_summary,
    resume_point, seconds_in, write_identity,
)
from ..records import Record
from .arms import placebo_records
from .config import ConfigError, ExperimentConfig, ModelEntry, RunSpec, TaskEntry, plan, settings_hash, train_args_for
from .report import write_summary

RESULTS = "results.jsonl"


def read_results(path: str | os.PathLike, repair: bool = False) -> tuple[list[dict], int]:
    """Finished runs from a results JSONL, and how many lines were unusable (a line cut
    by a kill). With ``repair``, the file is rewritten without them (atomically)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    raw = path.read_text(encoding="utf-8")
    good, bad, seen = [], 0, set()
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key = (obj["task"], obj["model"], obj["arm"], int(obj["seed"]))
            obj["tests"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
            continue
        if key in seen:  # two processes on one output: keep the first
            bad += 1
            continue
        seen.add(key)
        good.append(obj)
    if repair and (bad or (raw and not raw.endswith("\n"))):
        atomic_write_text(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in good))
    return good, bad


def append_result(path: Path, result: dict) -> None:
    """One line, flushed and synced: a kill leaves at most this line half-written."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())



@dataclass
class TaskData:
    train: list[Record]
    tests: dict[str, list[Record]]
    tokenizer_texts: list[str]


def load_task_data(entry: TaskEntry, need_tokenizer_texts: bool = True) -> TaskData:
    train = entry.task.load(entry.train_split, limit=entry.train_limit)
    if not train:
        raise ConfigError(f"task {entry.label}: the training split {entry.train_split!r} is empty")
    tests = {name: entry.task.load(split, limit=entry.test_limit) for name, split in entry.tests.items()}
    texts = entry.task.tokenizer_texts() if need_tokenizer_texts else []
    return TaskData(train=train, tests=tests, tokenizer_texts=texts or [r.text for r in train])


PARTIAL = ".{}.partial"  # a run's checkpoint directory, named by its run id


def run_of(config: ExperimentConfig, entry: TaskEntry, model_entry: ModelEntry, spec: RunSpec, data: TaskData,
           work: Path, progress: bool = False) -> Run:
    """The :class:`cattune.run.Run` of one planned run, before placebo annotations."""
    # save_strategy "no": checkpoints come only from the timer (cattune.run), and only the last is kept.
    kw = {"disable_tqdm": not progress, **train_args_for(config, entry, spec.arm), "output_dir": str(work),
          "seed": spec.seed, "save_strategy": "no", "save_total_limit": 1, "report_to": []}
    return Run(model=ModelSpec(reference=model_entry.path, lora=model_entry.lora, tiny=model_entry.tiny,
                               trust_remote_code=model_entry.trust_remote_code),
               config=CATConfig(**kw), train=data.train, tests=data.tests, checker=entry.task.checker_fn,
               tokenizer_texts=data.tokenizer_texts)


def run_one(config: ExperimentConfig, entry: TaskEntry, model_entry: ModelEntry, spec: RunSpec, data: TaskData,
            out: Path, progress: bool = False) -> dict:
    """Train one arm on one seed and evaluate it on every test set: the result line.

    Without ``progress``, transformers' own bars (loading and writing weights) are off
    too, so that a log of many runs (or of parallel jobs) holds only the runner's lines.
    """
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return _run_one(config, entry, model_entry, spec, data, out, progress)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _run_one(config: ExperimentConfig, entry: TaskEntry, model_entry: ModelEntry, spec: RunSpec, data: TaskData,
             out: Path, progress: bool) -> dict:
    started = time.time()
    keep = config.keeps_model(spec.seed)
    model_dir = out / "models" / spec.run_id
    # The tiny model exists nowhere else: an adapter trained on it keeps its base beside it.
    base = model_dir / "base_model" if keep and model_entry.is_tiny and model_entry.lora is not None else None
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)
    placebo_counts: dict[str, int] = {}
    settings = settings_hash(config, entry, model_entry, spec.arm)
    resume, work, scratch = None, out / PARTIAL.format(spec.run_id), None
    try:
        if not config.checkpoint_minutes:  # no checkpoints to keep: a directory for this try only
            work = scratch = Path(tempfile.mkdtemp(prefix=f".{spec.run_id}.", dir=out))
        job = run_of(config, entry, model_entry, spec, data, work, progress)
        ident = identity(job, settings=settings)  # the task's records: placebo spans follow from the seed
        model, tok = build_model(job, save_base=base)
        if spec.arm == "placebo":
            job.train = placebo_records(data.train, entry.task, seed=spec.seed, tokenizer=tok, counts=placebo_counts)
        if config.checkpoint_minutes:
            resume, stale, why = resume_point(work, ident, scratch=True)
            remove_stale(stale, why, work, log=lambda msg: None)
            work.mkdir(parents=True, exist_ok=True)
            write_identity(work, ident)
        trainer = make_trainer(job, model, tok, str(base) if base is not None else model_entry.path, resume=resume,
                               checkpoint_minutes=config.checkpoint_minutes)
        # Without progress bars the Trainer prints every log line; they go to logs/RUN.json instead.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    train_seconds = seconds_in(resume) + time.time() - started
    history = trainer.state.log_history
    if keep:
        trainer.save_model(str(model_dir))
    evaluated = evaluate_tests(job, model, tok, batch_size=config.eval["batch_size"],
                               max_new_tokens=config.eval["max_new_tokens"], progress=progress, desc=spec.run_id)
    tests = {name: result_summary(res) for name, res in evaluated.items()}
    attention_plot = None
    if spec.seed == config.seeds_of(spec.task)[0]:  # one heatmap per task, model and arm
        from ..explain import plot_record

        name, records = list(data.tests.items())[-1]
        if records:
            path = plot_record(model, tok, records[0], out / "plots" / f"{spec.run_id}.png",
                               title=f"{spec.run_id}, {name} record 0", reading=job.config.reading, record_index=0)
            attention_plot = str(path.relative_to(out))
    log_path = out / "logs" / f"{spec.run_id}.json"
    atomic_write_text(log_path, json.dumps({"run": dataclasses.asdict(spec), "encode": trainer.encode_stats,
                                            "log_history": history}, indent=1) + "\n")
    if config.save_predictions:
        atomic_write_text(out / "predictions" / f"{spec.run_id}.jsonl", "".join(
            json.dumps({"test": name, **p}, ensure_ascii=False) + "\n"
            for name, res in evaluated.items() for p in res.predictions))
    ratios = [h["attn_ratio"] for h in history if "attn_ratio" in h]
    resumed = {"resumed_at_step": int(resume.rpartition("-")[2])} if resume else {}
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "task": spec.task, "model": spec.model, "arm": spec.arm, "seed": spec.seed,
        "tests": tests,
        "train_split": entry.train_split, "n_train": len(job.train),
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "final_train_attn_ratio": ratios[-1] if ratios else None,
        "cat_gamma": trainer.args.cat_gamma,  # CATConfig's default when the config sets none
        "placebo": placebo_counts or None,
        "encode": trainer.encode_stats.get("train"),
        "settings": settings,
        "train_data": records_digest(data.train),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - started, 1),
        "log": str(log_path.relative_to(out)),
        "attention_plot": attention_plot,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "execution": execution(trainer.args.device),
        **resumed,
    }


def execution(device) -> dict:
    """What decides a run's floating-point results besides its settings: the same run on
    another CPU (other vector kernels, other reduction orders) can end elsewhere."""
    import platform

    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)}


@dataclass
class ExperimentReport:
    out: Path
    planned: list[RunSpec]
    ran: list[RunSpec] = field(default_factory=list)
    skipped: list[RunSpec] = field(default_factory=list)
    dropped_lines: int = 0
    changed: list[RunSpec] = field(default_factory=list)  # finished under other settings
    rows: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.ran) + len(self.skipped) == len(self.planned)


def _init_worker(threads: int, parent: int) -> None:
    """Start of a worker process for ``jobs > 1``."""
    import threading

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    # A parent killed with SIGKILL cannot stop its workers: each leaves on its own once it
    # is orphaned, instead of training on and writing into the output afterwards.
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def run_experiment(config: ExperimentConfig, out: str | os.PathLike | None = None, max_runs: int | None = None,
                   dry_run: bool = False, log: Callable[[str], None] | None = None,
                   progress: bool = False, jobs: int = 1,
                   only: Callable[[RunSpec], bool] | None = None) -> ExperimentReport:
    """Run every planned run not yet in ``OUT/results.jsonl``; see the module docstring.

    ``jobs > 1`` trains that many runs at once, each in its own (spawned) process with
    ``config.threads`` torch threads, 1 if unset; results are appended as runs finish, in
    any order. If a run fails, no new run starts, the running ones finish and are kept,
    then the error is raised. A script that calls this with ``jobs > 1`` needs the usual
    ``if __name__ == "__main__":`` guard of multiprocessing's spawn. ``only``: run only the
    planned runs it accepts (:func:`select`); the summary still covers every finished run.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if max_runs is not None and max_runs < 0:
        raise ValueError(f"max_runs must be 0 or more, got {max_runs}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out) if out is not None else config.output
    if dry_run:
        return _run_experiment(config, out, max_runs, dry_run, log, progress, jobs, only)
    # A second runner on the same output would train every run again and append it twice.
    with output_lock(out, "cattune experiment"):
        return _run_experiment(config, out, max_runs, dry_run, log, progress, jobs, only)


def _run_experiment(config: ExperimentConfig, out: Path, max_runs: int | None, dry_run: bool,
                    log: Callable[[str], None], progress: bool, jobs: int,
                    only: Callable[[RunSpec], bool] | None) -> ExperimentReport:
    results_path = out / RESULTS
    runs = [spec for spec in plan(config) if only is None or only(spec)]
    report = ExperimentReport(out=out, planned=runs)
    done, bad = read_results(results_path, repair=not dry_run)
    report.dropped_lines = bad
    if bad:
        log(f"{results_path}: dropped {bad} unusable line(s) (a run cut off mid-write); those runs run again")
    finished = {(r["task"], r["model"], r["arm"], int(r["seed"])): r for r in done}
    entries = {t.label: t for t in config.tasks}
    models = {m.label: m for m in config.models}
    todo = []
    for spec in runs:
        if spec.key in finished:
            report.skipped.append(spec)
            expected = settings_hash(config, entries[spec.task], models[spec.model], spec.arm)
            if finished[spec.key].get("settings") not in (None, expected):
                report.changed.append(spec)
        else:
            todo.append(spec)
    if report.changed:
        log(f"warning: {len(report.changed)} finished run(s) used other settings than the config now has "
            f"(e.g. {report.changed[0].run_id}); they are kept. Delete their lines from {results_path} or use "
            "another output directory to run them again.")
    for label in sorted({spec.model for spec in (runs if dry_run else todo)}):  # before hours of other runs
        if not models[label].is_tiny:
            check_model_reference(models[label].path)
    log(f"experiment {config.name}: {len(runs)} runs, {len(report.skipped)} already finished, {len(todo)} to run "
        f"-> {out}")
    if dry_run:
        log("training settings (the config's train: block, its train_from, task train_args and arm_args; "
            "CATConfig's defaults for the rest):")
        for entry in config.tasks:
            for arm in config.arms:
                args = train_args_for(config, entry, arm)
                log(f"  {entry.label} / {arm}: " + ", ".join(f"{k}={args[k]}" for k in sorted(args)))
        for spec in runs:
            log(f"  {'done' if spec.key in finished else 'todo'}  {spec.run_id}")
        return report
    out.mkdir(parents=True, exist_ok=True)
    for spec in todo:  # training directories of runs killed last time, but not their checkpoints
        for stale in out.glob(f".{glob.escape(spec.run_id)}.*"):
            if stale.name != PARTIAL.format(spec.run_id):
                shutil.rmtree(stale, ignore_errors=True)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if max_runs is not None:
        todo = todo[:max_runs]
    cache: dict[str, TaskData] = {}
    results = list(done)
    started = time.time()

    def task_data(spec: RunSpec) -> TaskData:
        if spec.task not in cache:
            cache.clear()  # one task's data loaded at a time (runs are ordered by task)
            cache[spec.task] = load_task_data(entries[spec.task],
                                              need_tokenizer_texts=any(m.is_tiny for m in config.models))
        return cache[spec.task]

    def finished_run(spec: RunSpec, result: dict) -> None:
        append_result(results_path, result)
        shutil.rmtree(out / PARTIAL.format(spec.run_id), ignore_errors=True)  # the result holds the run now
        results.append(result)
        report.ran.append(spec)
        accs = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result["tests"].items())
        log(f"[{time.time() - started:6.0f}s] done {len(report.ran)}/{len(todo)}: {spec.run_id}: {accs} "
            f"({result['seconds']:.0f}s)")
        report.rows = write_summary(out, results, config)

    if jobs == 1:
        for i, spec in enumerate(todo, 1):
            log(f"[{time.time() - started:6.0f}s] run {i}/{len(todo)}: {spec.run_id}")
            result = run_one(config, entries[spec.task], models[spec.model], spec, task_data(spec), out,
                             progress=progress)
            finished_run(spec, result)
    elif todo:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        if progress:
            log("note: --progress shows no bars with more than one job")
        # spawn, not fork: the workers must not inherit torch's or the tokenizers' thread pools
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(config.threads or 1, os.getpid()))
        queue, running, error = list(todo), {}, None
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    spec = queue.pop(0)
                    log(f"[{time.time() - started:6.0f}s] start {spec.run_id}")
                    running[pool.submit(run_one, config, entries[spec.task], models[spec.model], spec,
                                        task_data(spec), out, False)] = spec
                done_now, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done_now:
                    spec = running.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as e:  # let the other running runs finish and keep them
                        if error is None:
                            error = e
                            log(f"{spec.run_id} failed ({type(e).__name__}: {e}); starting no more runs, "
                                f"waiting for the {len(running)} still running")
                        queue.clear()
                        continue
                    finished_run(spec, result)
        except BaseException:  # Ctrl-C: the workers get the signal too; do not wait for them
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if error is not None:
            raise error
    if not report.ran:  # nothing new: still (re)write the summary of what is there
        report.rows = write_summary(out, results, config) if results else []
    return report

