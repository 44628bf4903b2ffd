"""One run: a model (with LoRA or not), training records, a CATConfig and test sets ->
build, identify, resume, train, save (weights + cattune.json) and evaluate.

``cattune train`` is one run; the experiment runner (``cattune.experiment.runner``)
plans a grid of them and schedules it. Both go through here, so a run is built,
identified and resumed one way:

- :func:`build_model`: load the reference (or build the embedded tiny Llama from the
  data), then wrap it in LoRA if asked, whichever the model.
- :func:`identity`: what makes two runs the same (data by content, model, settings);
  written into the run's directory (``RUN_FILE``) and compared on resume.
- :func:`resume_point`: the checkpoint to continue from, and what must go first.
- :func:`make_trainer`: the :class:`~cattune.trainer.CATTrainer`, with the seconds
  training took over every resumption recorded in each checkpoint; its ``train()`` and
  ``save_model()`` (weights + cattune.json) are the Trainer's own.
- :func:`evaluate_tests`: every test set read as training read its records
  (``CATConfig.reading``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import CATConfig
from .files import atomic_write_text
from .records import Record, dumps_record

RUN_FILE = ".cattune-run.json"  # a run's identity, in its directory: a resume must be the same run
ELAPSED = "cattune_train_seconds.json"  # in each checkpoint: training seconds up to it, over all resumptions
MODEL_FILES = ("config.json", "adapter_config.json")  # one of them in a directory: it holds a saved model
# CATConfig fields that make two runs different. The schedule's length is not among them:
# a resumed run may be given more steps or epochs.
IDENTITY_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
                   "cat_alpha", "cat_gamma", "cat_gamma_decay", "cat_layers", "cat_span_columns", "cat_loss",
                   "chat_template", "max_length")


@dataclass(frozen=True)
class ModelSpec:
    """Which model a run trains. ``reference``: a model directory, hub id, .gguf file or
    builtin:NAME (``cattune.models``); None: the embedded tiny Llama, built from the
    data (``tiny``: its ``cattune.tiny.build`` overrides). ``lora``: ``lora_model``'s
    keyword arguments ({}: the release's setting), or None to train every weight."""

    reference: str | None = None
    lora: dict | None = None
    tiny: dict = field(default_factory=dict)
    trust_remote_code: bool = False


@dataclass
class Run:
    """A run's whole spec. ``config.output_dir`` is where its checkpoints go; ``eval`` is
    the trainer's eval_dataset; ``tests`` are evaluated after training with ``checker``;
    ``tokenizer_texts`` train the tiny model's tokenizer (default: the training texts)."""

    model: ModelSpec
    config: CATConfig
    train: list[Record]
    eval: list[Record] | None = None
    tests: dict[str, list[Record]] = field(default_factory=dict)
    checker: str | Callable = "exact"
    tokenizer_texts: list[str] | None = None


def records_digest(records: list[Record]) -> str:
    """The content of a run's training records: a file changed at the same path is other
    data, and a checkpoint trained on the old records must not be continued on it."""
    blob = "".join(dumps_record(r) + "\n" for r in records)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def identity(run: Run, **extra) -> dict:
    """What makes two runs the same: the training records by content, the model and the
    settings that change what is learned (``IDENTITY_FIELDS``), plus what the caller adds
    (the experiment runner: its own settings hash), as it reads back from JSON."""
    ident = {"train_sha256": records_digest(run.train), "model": run.model.reference, "lora": run.model.lora,
             "tiny": run.model.tiny or None, **{name: getattr(run.config, name) for name in IDENTITY_FIELDS}, **extra}
    return json.loads(json.dumps(ident))


def build_model(run: Run, save_base: str | os.PathLike | None = None):
    """``(model, tokenizer)``: the run's reference loaded, or the tiny model built from its
    ``tokenizer_texts`` (else its training texts), then wrapped in LoRA if the spec says
    so. A tiny model exists nowhere else, so an adapter alone could not be loaded again:
    with ``save_base`` its base (untrained) is written there before LoRA wraps it."""
    from .models import lora_model

    spec = run.model
    if spec.reference is not None:
        from .models import load_model

        model, tokenizer = load_model(spec.reference, trust_remote_code=spec.trust_remote_code)
    else:
        from .tiny import build

        texts = run.tokenizer_texts or [r.text for r in run.train]
        model, tokenizer = build(texts, seed=run.config.seed, **spec.tiny)
        if spec.lora is not None and save_base is not None:
            model.save_pretrained(save_base)
            tokenizer.save_pretrained(save_base)
    if spec.lora is not None:
        model = lora_model(model, **spec.lora)
    return model, tokenizer


def read_identity(directory: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(directory) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_identity(directory: str | os.PathLike, ident: dict) -> None:
    atomic_write_text(Path(directory) / RUN_FILE, json.dumps(ident, indent=2) + "\n")


def resume_point(out: str | os.PathLike, ident: dict, named: str | None = None, overwrite: bool = False,
                 scratch: bool = False) -> tuple[str | None, list[Path], str]:
    """The checkpoint to resume from, what in ``out`` must go before training, and why.

    A ``named`` path is taken as given; ``named`` "true"/"last" means the last complete
    checkpoint in ``out``. Without it, a run started again continues from the last
    complete checkpoint in ``out``, but only if that run is unfinished and had the same
    identity: anything else is an error rather than a silent continuation of another run,
    and a model in ``out`` is not replaced unasked. ``overwrite`` removes an earlier run's
    checkpoints and reports and starts from step 0. A ``scratch`` directory is the
    run's own (the experiment runner's): another run's checkpoints there are removed
    instead, and so is a checkpoint without its time file (``ELAPSED``), whose run's
    time could not be added up. A checkpoint whose save was cut short (no readable
    trainer_state.json) is removed. This only decides: the caller removes once every
    check has passed."""
    from transformers.trainer import TRAINER_STATE_NAME

    from .trainer import checkpoints, complete_checkpoint

    out = Path(out)
    complete, incomplete = checkpoints(out) if out.is_dir() else ([], [])
    if scratch:  # the Trainer's rotation (by step) would otherwise keep it and delete the good ones
        incomplete += [c for c in complete if not (c / ELAPSED).is_file()]
        complete = [c for c in complete if (c / ELAPSED).is_file()]
    earlier = read_identity(out)
    if overwrite or (scratch and earlier != ident):
        if named is not None:
            raise ValueError("--overwrite_output_dir starts from step 0: drop --resume_from_checkpoint")
        stale = complete + incomplete + [out / n for n in ("train_report.json", "eval_results.json", RUN_FILE)]
        why = ("removed {n} file(s) of a run with other settings or data in {out}" if not overwrite else
               "--overwrite_output_dir: removed {n} checkpoint(s) and report(s) of an earlier run in {out}")
        return None, [p for p in stale if p.exists()], why
    cut = (incomplete, "removed {names} in {out}: incomplete, its save was cut short")
    last = str(complete[-1]) if complete else None
    if named is not None and str(named).lower() not in ("true", "1", "yes", "last"):
        if Path(named).is_dir() and not complete_checkpoint(named):
            raise ValueError(f"--resume_from_checkpoint {named}: incomplete (no readable {TRAINER_STATE_NAME}; its "
                             "save was cut short); give an earlier checkpoint")
        return named, *cut
    if named is not None:
        if last is None:
            raise ValueError(f"--resume_from_checkpoint: no complete checkpoint-N directory in --out {out}")
        return last, *cut
    finished = (out / "train_report.json").exists()
    if last is None:
        if finished:  # a finished run saved without checkpoints
            raise ValueError(f"--out {out} holds a finished run (train_report.json); --overwrite_output_dir "
                             "replaces it, or give another --out")
        held = [n for n in MODEL_FILES if (out / n).is_file()]
        if held and earlier != ident:  # not this run's own model, saved just before a kill
            raise ValueError(f"--out {out} holds a model ({held[0]}); --overwrite_output_dir replaces it, or give "
                             "another --out")
        return None, *cut
    hint = "pass --resume_from_checkpoint to continue it anyway, --overwrite_output_dir to start over, or another --out"
    if finished:
        raise ValueError(f"--out {out} holds a finished run (train_report.json, {Path(last).name}); {hint}")
    if earlier != ident:
        differ = sorted(k for k in ident if not isinstance(earlier, dict) or earlier.get(k) != ident[k])
        raise ValueError(f"--out {out} holds checkpoints of another run (it differs in: "
                         f"{', '.join(differ) or 'unknown settings'}); {hint}")
    return last, *cut


def remove_stale(stale: list[Path], message: str, out: str | os.PathLike, log: Callable[[str], None]) -> None:
    """Remove what :func:`resume_point` said must go (one process of several does it)."""
    if not stale or int(os.environ.get("RANK", "0")) != 0:
        return
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    log(message.format(n=len(stale), names=", ".join(p.name for p in stale), out=out))


def seconds_in(checkpoint: str | os.PathLike | None) -> float:
    """The training seconds a checkpoint holds (over all resumptions); 0 without its time file."""
    try:
        return float(json.loads((Path(checkpoint) / ELAPSED).read_text(encoding="utf-8"))["train_seconds"])
    except (TypeError, OSError, ValueError, KeyError):
        return 0.0


def _timing_callback(seconds_before: float, every_minutes: float | None):
    """A TrainerCallback that writes the training seconds into each checkpoint, and with
    ``every_minutes`` saves one that often, and at the last step of a run that took that
    long: a kill costs at most ``every_minutes`` of work."""
    from transformers import TrainerCallback

    class TrainingTime(TrainerCallback):
        def __init__(self):
            self.started = self.last = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if not every_minutes:
                return
            now = time.time()
            if now - self.last >= every_minutes * 60 or (state.global_step >= state.max_steps
                                                         and now - self.started >= every_minutes * 60):
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.last = time.time()
            if args.should_save:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                spent = seconds_before + self.last - self.started
                atomic_write_text(ckpt / ELAPSED, json.dumps({"train_seconds": round(spent, 1)}) + "\n")

    return TrainingTime()


def make_trainer(run: Run, model, tokenizer, base_model: str | None, resume: str | None = None,
                 checkpoint_minutes: float | None = None):
    """The :class:`~cattune.trainer.CATTrainer` of a run, with its time kept in checkpoints."""
    from .trainer import CATTrainer

    trainer = CATTrainer(model=model, args=run.config, train_dataset=run.train, eval_dataset=run.eval,
                         processing_class=tokenizer, base_model=base_model)
    trainer.add_callback(_timing_callback(seconds_in(resume), checkpoint_minutes))
    return trainer


def evaluate_tests(run: Run, model, tokenizer, batch_size: int | None = None, max_new_tokens: int | None = None,
                   progress: bool = False, desc: str = "") -> dict:
    """``{name: EvalResult}`` for each test set, read as training read its records."""
    from .evaluate import EVAL_BATCH_SIZE, evaluate

    return {name: evaluate(model, tokenizer, records, checker=run.checker, batch_size=batch_size or EVAL_BATCH_SIZE,
                           max_new_tokens=max_new_tokens, progress=progress, desc=f"{desc} {name}".strip(),
                           reading=run.config.reading)
            for name, records in run.tests.items()}


def result_summary(res) -> dict:
    """An EvalResult as reports keep it (no per-record predictions)."""
    summary = {"accuracy": res.accuracy, "n": res.n, "correct": res.correct, "attention_ratio": res.attention_ratio}
    if res.abs_error is not None:  # numeric answers: how far off, beyond exact match
        summary.update(abs_error=res.abs_error, unparsed=res.unparsed)
    return summary
