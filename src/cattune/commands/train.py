"""cattune train: fine-tune with CAT. Every CATConfig / TrainingArguments field is an option."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..config import CATConfig, check_lora
from ..records import load_records
from ..run import (
    ModelSpec, Run, build_model, evaluate_tests, identity, make_trainer, remove_stale, result_summary, resume_point,
    write_identity,
)
from ..trainer import end_distributed
from ..fields import typed_fields
from ..files import check_distinct_paths, check_writable_dir, load_config_file, model_inputs, output_lock
from ..models import lora_model
from .common import HelpFormatter, write_json

CONFIG_HINT = """\
Options can come from a file: `cattune train --config run.yaml --num_train_epochs 1`, with
run.yaml holding e.g. {train: data/train_M.jsonl, out: run/, cat_alpha: 2000.0, cat_layers: [-1],
cat_gamma_decay: 0}."""

LAUNCH_HINT = """\
Several GPUs or processes: the same command runs under torchrun or accelerate, e.g.
  torchrun --nproc_per_node 4 -m cattune.cli train --train T.jsonl --model M --out D
  accelerate launch --num_processes 4 -m cattune.cli train --train T.jsonl --model M --out D
FSDP / DeepSpeed: pass --fsdp / --deepspeed CONFIG as for any Trainer (docs/distributed.md)."""


# lora_model's own defaults (the release's setting), so that they are written once
LORA = {k: p.default for k, p in inspect.signature(lora_model).parameters.items() if k != "model"}


@dataclass
class TrainArguments:
    train: str = field(metadata={"help": "Training records (JSONL: input, target, important)."})
    eval: str | None = field(
        default=None, metadata={"help": "Held-out records: accuracy after training (on the main process), and the "
                                "eval_dataset of --eval_strategy steps/epoch (eval_accuracy, eval_attn_ratio, ...)."}
    )
    model: str | None = field(
        default=None,
        metadata={"help": "A causal LM: local directory, hub id, .gguf file, or builtin:NAME "
                  "(builtin:smollm2-135m-instruct, builtin:gemma3-270m: GGUF weights from installed packages, "
                  "offline; docs/models.md). Default: the embedded tiny Llama, built from a config with a "
                  "tokenizer trained on --train."},
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=LORA["r"], metadata={"help": "LoRA rank (the release: 64)."})
    lora_alpha: int = field(default=LORA["alpha"], metadata={"help": "LoRA alpha (the release: 32)."})
    lora_dropout: float = field(default=LORA["dropout"], metadata={"help": "LoRA dropout (the release: 0.1)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub repository."})
    skip_invalid: bool = field(
        default=False, metadata={"help": "Leave out broken records (reported with file and line) instead of stopping."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start from step 0 even when --out holds checkpoints of an earlier run (by default "
                  "training resumes from the last one)."},
    )


    def __post_init__(self):
        check_lora(self.lora_r, self.lora_alpha, self.lora_dropout)


class _Parser(HfArgumentParser):
    def error(self, message):  # the usage of every TrainingArguments field is 120 lines: it would bury the error
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists the options)\n")


def build_parser():
    p = _Parser((TrainArguments, CATConfig), formatter_class=HelpFormatter)
    p.description = ("Fine-tune a causal LM with Causal Attention Tuning: loss = CE(answer) + gamma(t) * "
                     "Re-Attention loss. --gamma 0 trains the plain fine-tuning baseline. Every "
                     "transformers TrainingArguments field is accepted too (--learning_rate, --num_train_epochs, "
                     "--per_device_train_batch_size, --resume_from_checkpoint, ...).\n\n" + CONFIG_HINT
                     + "\n\n" + LAUNCH_HINT)
    p.add_argument("--config", metavar="FILE.yaml", help="options from a YAML/JSON file (field: value, the "
                   "names of the options listed here); options on the command line override it")
    for action in p._actions:  # HfArgumentParser gives --no_X the help (and a default) of --X
        if action.const is False and any(o.startswith("--no_") for o in action.option_strings):
            action.help = f"Turn --{action.dest} off."
            action.default = argparse.SUPPRESS  # --X's action sets the default
    return p


def apply_config(parser, argv: list[str]) -> list[str]:
    """``--config FILE`` taken out of ``argv``: its values become the parser's defaults, so
    that the command line overrides them (as TRL's parser does)."""
    argv = list(argv)
    given = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    if not given:
        return argv
    if len(given) > 1:  # which one would win is a guess: say so rather than drop one
        parser.error("--config is given more than once: put the settings in one file (options on the command "
                     "line override it)")
    i = given[0]
    arg = argv[i]
    path = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
    del argv[i: i + (1 if "=" in arg else 2)]
    if not path:
        parser.error("--config needs a file")
    values = load_config_file(path)
    if not isinstance(values, dict):
        parser.error(f"{path}: expected a mapping of option names to values")
    if "out" in values and "output_dir" in values:
        parser.error(f"{path}: gives both out and output_dir (the same option); keep one")
    values = {("output_dir" if k == "out" else k): v for k, v in values.items()}
    types = {}
    for cls in (TrainArguments, CATConfig):
        types.update(typing.get_type_hints(cls))
    values = typed_fields(values, types, str(path), what="cattune train option")
    parser.set_defaults(**values)
    for action in parser._actions:  # a value the file gives is no longer required on the command line
        if action.dest in values:
            action.required = False
    return argv


def parse(parser, argv):
    argv = apply_config(parser, argv)
    names = {a.split("=", 1)[0] for a in argv}
    if parser.get_default("output_dir") is None and not names & {"--out", "--output_dir", "--output-dir", "-h",
                                                                  "--help"}:
        parser.error("--out DIR is required")
    for i, arg in enumerate(argv):  # a bare --resume_from_checkpoint means "the last one in --out"
        if arg in ("--resume_from_checkpoint", "--resume-from-checkpoint") and (
                i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "true")
            break
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        targs, config = parsed[:2]  # then the namespace of --config, already applied
    except ValueError as e:  # a CATConfig value out of range
        parser.error(str(e))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return targs, config


def run(args) -> int:
    code = _train(*args)
    end_distributed()  # after _train returned: no trainer (and its DDP wrapper) is left
    return code


def _train(targs, config) -> int:
    check_distinct_paths(inputs={"--train": [targs.train], "--eval": [targs.eval],
                                 "--model": model_inputs(targs.model, results=())},
                         outputs={"--out": [config.output_dir]})
    check_writable_dir(config.output_dir, "--out")
    # A second run into the same --out would train beside this one and replace its model.
    with output_lock(config.output_dir, "cattune train"):
        return _train_locked(targs, config)


def model_spec(targs) -> ModelSpec:
    lora = {"r": targs.lora_r, "alpha": targs.lora_alpha, "dropout": targs.lora_dropout} if targs.lora else None
    return ModelSpec(reference=targs.model, lora=lora, trust_remote_code=targs.trust_remote_code)


def _train_locked(targs, config) -> int:
    on_error = "skip" if targs.skip_invalid else "raise"
    train_records = load_records(targs.train, on_error=on_error)
    if not train_records:
        raise ValueError(f"{targs.train}: no records")
    eval_records = load_records(targs.eval, on_error=on_error) if targs.eval else None
    if targs.eval and not eval_records:
        raise ValueError(f"--eval {targs.eval}: no records")
    spec = model_spec(targs)
    job = Run(model=spec, config=config, train=train_records, eval=eval_records,
              tests={targs.eval: eval_records} if eval_records else {}, checker=config.eval_checker)
    ident = identity(job)
    resume, stale, why = resume_point(config.output_dir, ident, named=config.resume_from_checkpoint,
                                      overwrite=targs.overwrite_output_dir)
    base_model, staged = targs.model, None
    if targs.model is None and targs.lora:
        # The embedded model is built from the data: its (frozen) base is kept beside the
        # adapter, referenced from cattune.json, put in place once every check has passed.
        base_model = str(Path(config.output_dir, "base_model").resolve())
        if not resume and int(os.environ.get("RANK", "0")) == 0:
            staged = tempfile.mkdtemp(prefix=".base_model.", dir=config.output_dir)
    try:
        model, tokenizer = build_model(job, save_base=staged)
        trainer = make_trainer(job, model, tokenizer, base_model, resume=resume)
    except BaseException:
        if staged:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    # Every check has passed: only now is anything in --out removed or replaced.
    remove_stale(stale, why, config.output_dir, log=lambda msg: print(msg, file=sys.stderr))
    if staged:
        shutil.rmtree(base_model, ignore_errors=True)
        os.replace(staged, base_model)
    if trainer.is_world_process_zero():
        write_identity(config.output_dir, ident)
        print(f"data: {json.dumps(trainer.encode_stats)}", file=sys.stderr)
        if resume:
            print(f"resuming from {resume}" + ("" if config.resume_from_checkpoint else
                  " (found in --out; --overwrite_output_dir starts again from step 0)"), file=sys.stderr)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    report = {"encode": trainer.encode_stats, "warnings": trainer.cat_warnings,
              "log_history": trainer.state.log_history}
    if eval_records and trainer.is_world_process_zero():
        res = evaluate_tests(job, trainer.model, tokenizer, progress=True)[targs.eval]
        report["eval"] = result_summary(res)
        error = "" if res.abs_error is None else f", mean abs error {res.abs_error:.2f}"
        print(f"eval accuracy on {targs.eval}: {res.accuracy:.3f} ({res.correct}/{res.n}){error}")
    if trainer.is_world_process_zero():
        write_json(Path(config.output_dir) / "train_report.json", report)
        print(f"model saved to {config.output_dir}")
    return 0
