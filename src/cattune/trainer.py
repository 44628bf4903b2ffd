"""CATTrainer: the Hugging Face Trainer plus one idea, the Re-Attention loss (its settings:
``cattune.config.CATConfig``).

loss = CE(answer tokens) + gamma(t) * L_attn, with L_attn computed on the attention rows
that produce annotated keys (docs/method.md section 3). With ``cat_gamma=0`` the loss is
exactly plain supervised fine-tuning.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .attention import AttentionProbe, resolve_layers, use_row_probe
from .config import CATConfig
from .loss import attention_ratio, counted_rows, row_loss, row_terms, visible_columns
from .masks import EncodedRecord, collate
from .models import prepare_tokenizer, takes_logits_to_keep
from .reading import Reading, write_training_info
from .records import Record, record_from_json

logger = logging.get_logger(__name__)


class CATTrainingError(RuntimeError):
    pass


def to_records(data) -> list[Record]:
    """Records from a list of Records or a `datasets.Dataset` with input/target/important."""
    if data is None:
        return []
    if isinstance(data, Sequence) and (not data or isinstance(data[0], Record)):
        return list(data)
    return [record_from_json(_unarrow(dict(row))) for row in data]


def _unarrow(row: dict) -> dict:
    # Arrow unifies the schema of a list of one-key objects: [{"A": [..]}, {"B": [..]}]
    # comes back as [{"A": [..], "B": None}, {"A": None, "B": [..]}]. Drop the fillers.
    important = row.get("important")
    if isinstance(important, list):
        row["important"] = [{k: v for k, v in obj.items() if v is not None} for obj in important]
    elif isinstance(important, dict):
        row["important"] = {k: v for k, v in important.items() if v is not None}
    return row


class EncodedDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[EncodedRecord]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def encode_dataset(tokenizer, records: list[Record], reading: Reading) -> tuple[EncodedDataset, dict]:
    items = [reading.encode(tokenizer, r) for r in records]
    reasons: dict[str, int] = defaultdict(int)
    for e in items:
        for *_, reason in e.unaligned:
            reasons[reason] += 1
    stats = {
        "records": len(items),
        "truncated": sum(e.truncated for e in items),
        "annotated_pairs": sum(e.n_pairs for e in items),
        "unaligned_pairs": sum(len(e.unaligned) for e in items),
        "unaligned_reasons": dict(reasons),
        "supervised_rows": sum(len(e.rows) for e in items),
        "records_with_supervised_rows": sum(bool(e.pairs) for e in items),
    }
    return EncodedDataset(items), stats


class CATCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[EncodedRecord]) -> dict[str, torch.Tensor]:
        b = collate(features, self.pad_token_id, padding_side="right")
        return {
            "input_ids": b.input_ids,
            "attention_mask": b.attention_mask,
            "labels": b.labels,
            "cat_rows": b.rows,
            "cat_causal": b.causal,
        }


class CATTrainer(Trainer):
    """`transformers.Trainer` with the Re-Attention loss.

    ``train_dataset``/``eval_dataset``: lists of `Record` or `datasets.Dataset`s with
    ``input``/``target``/``important`` columns; they are tokenized here with
    ``processing_class`` (the tokenizer). ``base_model``: the reference the model was
    loaded from, recorded with every saved model (``cattune.json``).
    """

    def __init__(self, model=None, args: CATConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, base_model: str | None = None, **kwargs):
        if args is None:
            args = CATConfig(output_dir="cattune_out")
        if not isinstance(args, CATConfig):
            raise TypeError("CATTrainer needs a CATConfig (a TrainingArguments subclass with CAT's fields)")
        if processing_class is None:
            raise ValueError("CATTrainer needs the tokenizer as processing_class")
        if args.n_gpu > 1:
            raise ValueError(
                f"{args.n_gpu} GPUs in one process (torch DataParallel) are not supported: the attention probe needs "
                "one batch per process. Launch with torchrun or accelerate launch (DDP), see docs/distributed.md"
            )
        tokenizer = prepare_tokenizer(processing_class)
        # The model reference (e.g. builtin:smollm2-135m-instruct) saved in cattune.json,
        # so that a LoRA adapter finds its base model on another machine.
        self.base_model = base_model
        self.encode_stats: dict[str, dict] = {}
        self.cat_warnings: list[str] = []  # what the user should know about the data (train_report.json)
        train_records = to_records(train_dataset)
        if train_dataset is not None and not train_records:
            raise ValueError("the training set is empty")
        encoded_train = self._encode("train", tokenizer, train_records, args) if train_records else None
        encoded_eval = None
        self._eval_records: list[Record] = []  # decoded for eval_accuracy
        if eval_dataset is not None:
            self._eval_records = to_records(eval_dataset)
            encoded_eval = self._encode("eval", tokenizer, self._eval_records, args)
        use_row_probe(model)
        self.cat_layers = resolve_layers(model, args.cat_layers)
        if self.cat_layers is not None and len(self.cat_layers) != len(args.cat_layers):
            # -1 and n-1 are one layer: averaged once, not the weight the list suggests.
            raise ValueError(f"cat_layers {args.cat_layers} names one layer twice on this model "
                             "(negative indices count from the last layer, -1)")
        if args.answer_logits_only and not takes_logits_to_keep(model):
            raise ValueError(f"answer_logits_only needs a model whose forward takes logits_to_keep; "
                             f"{type(model).__name__} does not")
        kwargs.setdefault("data_collator", CATCollator(tokenizer.pad_token_id))
        super().__init__(model=model, args=args, train_dataset=encoded_train, eval_dataset=encoded_eval,
                         processing_class=tokenizer, **kwargs)
        self._cat_metrics: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self._cat_eval_metrics: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self._eval_records_now = self._eval_records
        self._cat_step_rows: int | None = None  # counted rows of the current optimizer step

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # the count belongs to the loop: a later compute_loss must not reuse it
            self._cat_step_rows = None

    def _encode(self, name, tokenizer, records, args):
        data, stats = encode_dataset(tokenizer, records, args.reading)
        self.encode_stats[name] = stats
        kept = stats["records_with_supervised_rows"]
        reasons = stats["unaligned_reasons"] or "no annotations"
        if name == "train" and args.cat_gamma > 0 and kept == 0 and not args.cat_allow_unsupervised:
            # The Re-Attention loss only acts on records with a supervised row: without any,
            # "CAT" would be plain fine-tuning under another name.
            raise ValueError(f"no training record keeps a supervised row (unaligned pairs by reason: {reasons}), so "
                             "the Re-Attention loss would never act. Check the annotations, train the baseline with "
                             "cat_gamma 0, or set cat_allow_unsupervised")
        if name == "train" and args.cat_gamma > 0 and kept * 2 < stats["records"]:
            self._warn(f"{name}: only {kept} of {stats['records']} records keep a supervised row (unaligned pairs by "
                       f"reason: {reasons}); the Re-Attention loss acts on those alone")
        if stats["truncated"]:
            self._warn(f"{name}: {stats['truncated']} of {stats['records']} records longer than "
                       f"max_length={args.max_length} were truncated (prompt cut from the left)")
        if stats["annotated_pairs"] and stats["unaligned_pairs"]:
            logger.info("%s: %d of %d annotated pairs could not be aligned to tokens",
                        name, stats["unaligned_pairs"], stats["annotated_pairs"])
        return data

    def _warn(self, message: str) -> None:
        self.cat_warnings.append(message)
        logger.warning(message)

    def cat_gamma_now(self) -> float:
        args = self.args
        if args.cat_gamma == 0:
            return 0.0
        t = self.state.global_step if args.cat_gamma_decay_unit == "step" else math.floor(self.state.epoch or 0)
        return args.cat_gamma * math.exp(-args.cat_gamma_decay * t)

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: when the CE is already normalised over the whole
        # accumulated batch the Trainer does not divide by the accumulation steps.
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # As the Trainer counts a step's answer tokens for the CE, count the rows the
        # Re-Attention loss averages over across the step's micro-batches and processes:
        # L_attn is then the mean over the global batch's rows, however they are split.
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        rows = 0
        for batch in batch_samples:
            if "cat_rows" in batch and batch["cat_rows"].numel():
                visible = visible_columns(batch["cat_rows"], batch["cat_causal"].shape[-1], batch["attention_mask"])
                rows += int(counted_rows(batch["cat_causal"], visible).sum())
        if self.args.world_size > 1:
            rows = int(self.accelerator.reduce(torch.tensor(rows, device=device), reduction="sum"))
        self._cat_step_rows = rows
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop("cat_rows", None)
        causal = inputs.pop("cat_causal", None)
        training = model.training
        # In eval mode the loss is the answer's CE (eval_loss); CAT's terms are measured beside it.
        gamma = self.cat_gamma_now() if training else 0.0
        supervised = rows is not None and rows.numel() > 0
        if training and self.args.answer_logits_only and "labels" in inputs:
            # The loss only reads the logits that predict labels: project those alone and
            # hand the loss their targets (the model's loss takes shift_labels as given).
            shifted = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
            keep = shifted != -100
            inputs = {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}
        # With gamma = 0 the probe runs detached: the ratio is logged, the loss is plain CE.
        probe = AttentionProbe(rows, detach=gamma == 0, layers=self.cat_layers) if supervised else None
        extra = {"cat_probe": probe} if supervised else {}
        loss, outputs = super().compute_loss(model, {**inputs, **extra}, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        scaled = self._loss_scaled_for_ga(num_items_in_batch)
        ga = getattr(self, "current_gradient_accumulation_steps", 1)  # set by the training loop

        # Logged as (sum, count) pairs so that averages over steps and processes are
        # exact. The CE the Trainer returns carries its own scalings (accumulation,
        # processes): undo them to get this micro-batch's sum over answer tokens.
        tokens = int(inputs["labels"][..., 1:].ne(-100).sum())
        if scaled and num_items_in_batch is not None:
            proc = self.args.world_size if self.args.average_tokens_across_devices else 1
            ce_sum = loss.detach().item() / proc * float(num_items_in_batch)
        else:
            ce_sum = loss.detach().item() * (ga if scaled else 1) * tokens
        values = {"loss_ce": (ce_sum, tokens), "gamma": (gamma, 1)}
        total = loss
        if supervised:
            probe.close()
            attn = probe.result()
            visible = visible_columns(rows, attn.shape[-1], inputs.get("attention_mask"))
            a1, a0, counted = row_terms(attn, causal, visible)
            l_sum = row_loss(a1, a0, counted, self.args.cat_alpha, self.args.cat_loss, reduction="sum")
            step_rows = self._cat_step_rows if training else None
            if step_rows is None:  # compute_loss called outside the training loop
                step_rows, ga_rows = int(counted.sum()), 1
            else:  # the step's count covers every micro-batch; undo the Trainer's division by ga
                ga_rows = 1 if scaled else ga
            if gamma > 0:
                # DDP averages gradients over processes: multiply back so that the sum over
                # processes divided by the global row count is what each gradient carries.
                total = loss + gamma * l_sum * (self.args.world_size * ga_rows / max(step_rows, 1))
            n_ok = int((counted & (a0.detach() > 0)).sum())
            values["loss_attn"] = (l_sum.detach().item(), int(counted.sum()))
            values["attn_ratio"] = (attention_ratio(a1.detach(), a0.detach(), counted).item() * n_ok, n_ok)
        if not training:
            for k in ("loss_attn", "attn_ratio"):
                if k in values:
                    self._cat_eval_metrics[k].append(values[k])
            return (total, outputs) if return_outputs else total
        # Only the losses stop training; the ratio is a diagnostic and may be huge.
        if not all(math.isfinite(values[k][0]) for k in ("loss_ce", "loss_attn") if k in values):
            step = self.state.global_step + 1
            attn_value = values.get("loss_attn", (0.0, 1))
            raise CATTrainingError(
                f"non-finite loss at step {step} (CE {loss.item()}, attention sum {attn_value[0]}); "
                f"training stopped. Checkpoints already written in {self.args.output_dir} are kept; "
                "lower the learning rate or cat_gamma, or check the data."
            )
        for k, pair in values.items():
            self._cat_metrics[k].append(pair)
        return (total, outputs) if return_outputs else total

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The Trainer's evaluation plus ``eval_accuracy``, ``eval_loss_attn`` and
        ``eval_attn_ratio``. ``eval_dataset`` may be records (or a ``datasets.Dataset``
        with input/target/important), as for training."""
        records = self._eval_records
        if eval_dataset is not None and not isinstance(eval_dataset, EncodedDataset):
            records = to_records(eval_dataset)
            eval_dataset = self._encode(metric_key_prefix, self.processing_class, records, self.args)
        self._eval_records_now = records
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_records_now = self._eval_records

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        self._cat_eval_metrics.clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        metrics = dict(output.metrics)
        sums = [[sum(p[i] for p in self._cat_eval_metrics.get(k, ())) for i in (0, 1)]
                for k in ("loss_attn", "attn_ratio")]
        records = self._eval_records_now
        if self.args.eval_accuracy and records and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            # Sharded models gather weights in every forward: processes decoding different
            # numbers of batches would wait on each other for ever.
            if not getattr(self, "_warned_sharded_accuracy", False):
                logger.warning("eval_accuracy is not computed with FSDP or DeepSpeed; evaluate the saved model "
                               "with `cattune eval` instead")
                self._warned_sharded_accuracy = True
            records = []
        if self.args.eval_accuracy and records:
            # Every process decodes its own share of the records; the counts are summed.
            share = records[self.args.process_index::self.args.world_size]
            correct = 0
            if share:
                from .evaluate import evaluate as decode_and_check

                res = decode_and_check(self.model, self.processing_class, share, checker=self.args.eval_checker,
                                       batch_size=self.args.per_device_eval_batch_size, progress=False,
                                       reading=self.args.reading, attention=False)
                correct = res.correct
            sums.append([correct, len(share)])
        totals = torch.tensor(sums, dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        for key, (num, den) in zip(("loss_attn", "attn_ratio", "accuracy"), totals.tolist()):
            if den > 0:
                metrics[f"{metric_key_prefix}_{key}"] = round(num / den, 6)
        self._cat_eval_metrics.clear()
        return output._replace(metrics=metrics)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # A finite loss can still back-propagate inf/nan (an overflow in a backward pass):
        # stop before the optimizer applies it, so no checkpoint holds broken weights.
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            raise CATTrainingError(
                f"non-finite gradient at step {self.state.global_step + 1}; training stopped before applying it. "
                f"Checkpoints already written in {self.args.output_dir} are kept and hold finite weights; "
                "lower the learning rate or cat_gamma, or check the data."
            )
        return loss

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        existed = folder.exists()
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            failure = save_failure(e, folder)
            if not existed and self.args.should_save:  # frees the space; it could never be resumed from
                shutil.rmtree(folder, ignore_errors=True)
            if failure is e:
                raise
            raise failure from None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # TrainingArguments are pickled into training_args.bin: never with the hub token.
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        except Exception as e:
            failure = save_failure(e, Path(output_dir or self.args.output_dir))
            if failure is e:
                raise
            raise failure from None
        finally:
            self.args.hub_token = token
        if self.args.should_save:
            directory = output_dir or self.args.output_dir
            write_training_info(directory, self.args, base_model=self.base_model)
            _uniform_modes(directory)

    LOGGED = ("attn_ratio", "gamma", "loss_attn", "loss_ce")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Averages of CAT's terms since the last log, next to the Trainer's own loss. With
        # several processes every rank joins the reduction (a rank without supervised rows
        # too, or the others would wait for it), over the same keys in the same order.
        if "loss" in logs and (self._cat_metrics or self.args.world_size > 1):
            sums = torch.tensor([[sum(p[i] for p in self._cat_metrics.get(k, ())) for i in (0, 1)]
                                 for k in self.LOGGED], dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            logs.update({k: round(num / den, 6) for k, (num, den) in zip(self.LOGGED, sums.tolist()) if den > 0})
            self._cat_metrics.clear()
        super().log(logs, start_time)


class DiskFullError(OSError):
    pass


def save_failure(error: Exception, directory: Path) -> Exception:
    """What a failed save raises: a full disk as one line naming the directory, whatever
    the writer made of it (torch: "[enforce fail at inline_container.cc:672] unexpected
    pos", safetensors: "IoError(... StorageFull ...)"); any other error unchanged."""
    if isinstance(error, DiskFullError):
        return error
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    existing = Path(os.path.abspath(directory))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        free = None
    # The writers' messages do not say why; what is left on the disk right after does.
    if not (full or "No space left" in str(error) or "StorageFull" in str(error)
            or (free is not None and free < LOW_SPACE)):
        return error
    left = "" if free is None else f", {free / 2**20:.1f} MiB free"
    return DiskFullError(errno.ENOSPC, f"no space left on {directory}{left}: saving failed. Free some space and "
                         "run the command again")


LOW_SPACE = 64 * 2**20  # less than this left after a failed save: the disk filled up


def checkpoints(directory: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The ``checkpoint-N`` directories in ``directory``, by step: (complete, incomplete).
    The Trainer writes ``trainer_state.json`` last, so a checkpoint without a readable one
    was cut short (a kill, a full disk) and cannot be resumed from."""
    found = sorted((p for p in Path(directory).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                    if p.is_dir() and p.name.rpartition("-")[2].isdigit()),
                   key=lambda p: int(p.name.rpartition("-")[2]))
    return [p for p in found if complete_checkpoint(p)], [p for p in found if not complete_checkpoint(p)]


def complete_checkpoint(path: str | os.PathLike) -> bool:
    try:
        json.loads((Path(path) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def _uniform_modes(directory: str) -> None:
    """Give every file of a saved model the mode a plain ``open()`` gives (some writers,
    safetensors among them, create theirs 0600 through a temporary file)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(directory).iterdir():
        if path.is_file() and not path.name.startswith("."):
            os.chmod(path, 0o666 & ~umask)


def end_distributed() -> None:
    """Leave the process group of a torchrun/accelerate job; a no-op in a single process.

    Call it once no trainer is referenced any more (return from the function that used it
    first): a Trainer's DDP wrapper holds gloo's process group, and a group that is only
    freed during interpreter exit can abort one rank ("terminate called without an active
    exception") after all the work is saved, so the launcher reports a failure
    (docs/distributed.md has the counts).
    """
    if not torch.distributed.is_initialized():
        return
    import gc

    gc.collect()  # the wrapper sits in reference cycles (trainer <-> accelerator)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
