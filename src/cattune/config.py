"""CATConfig: every `TrainingArguments` field plus CAT's own, documented in one place."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .checkers import CHECKERS
from .loss import DEFAULT_ALPHA, LOSS_KINDS
from .masks import DEFAULT_MAX_LENGTH, DEFAULT_SPAN_COLUMNS, SPAN_COLUMNS
from .reading import Reading


def check_lora(r: int = 64, alpha: float = 32, dropout: float = 0.1, **_) -> None:
    """LoRA settings (``cattune.models.lora_model``'s), checked before a model loads."""
    if not (isinstance(r, int) and r >= 1) or not 0 < alpha < math.inf:
        raise ValueError(f"LoRA r must be an integer >= 1 and alpha a number > 0, got r={r!r}, alpha={alpha!r}")
    if not 0 <= dropout < 1:  # nan fails this too
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


# TrainingArguments fields whose out-of-range values it takes without a word (or with a
# traceback hours later): (name, test, what the message asks for).
RANGES = (
    ("gradient_accumulation_steps", lambda v: v >= 1, "at least 1"),
    ("eval_accumulation_steps", lambda v: v >= 1, "at least 1"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    # Python's random takes the absolute value: -42 would silently be seed 42.
    ("seed", lambda v: v >= 0, "0 or more"),
    ("data_seed", lambda v: v >= 0, "0 or more"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_epsilon", lambda v: v > 0, "> 0"),
    ("label_smoothing_factor", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("dataloader_num_workers", lambda v: v >= 0, "0 or more"),
    # The Trainer takes step % interval: 0 fails hours in, a negative one means nothing.
    ("logging_steps", lambda v: v > 0, "> 0 (below 1: a fraction of the training steps)"),
    ("save_steps", lambda v: v > 0, "> 0 (below 1: a fraction of the training steps)"),
    ("eval_steps", lambda v: v > 0, "> 0 (below 1: a fraction of the training steps)"),
    ("save_total_limit", lambda v: v >= 1, "at least 1 (unset keeps every checkpoint)"),
    ("max_steps", lambda v: v > 0 or v == -1, "> 0, or -1 to train num_train_epochs"),
)


@dataclass
class CATConfig(TrainingArguments):
    r"""Configuration for [`CATTrainer`]: every `TrainingArguments` field plus CAT's own.

    Parameters:
        > Re-Attention loss

        cat_alpha (`float`, *optional*, defaults to `2.0`):
            A supervised row is satisfied when its mean attention on causal columns is at
            least `cat_alpha` times its mean attention on the other visible columns.
        cat_gamma (`float`, *optional*, defaults to `1.0`):
            Weight of the Re-Attention loss. `0` trains plain supervised fine-tuning (the
            baseline).
        cat_gamma_decay (`float`, *optional*, defaults to `1.0`):
            gamma(t) = cat_gamma * exp(-cat_gamma_decay * t), as in the paper's release.
        cat_gamma_decay_unit (`str`, *optional*, defaults to `"epoch"`):
            What t counts: completed `"epoch"`s (the paper) or optimizer `"step"`s.
        cat_loss (`str`, *optional*, defaults to `"div"`):
            Per-row loss: `"div"`, `"div2"`, `"nll"` or `"hinge"`.
        cat_span_columns (`str`, *optional*, defaults to `"last_word"`):
            Which tokens of an annotated value span become causal columns: `"last_word"`
            (the tokens of the span's last word: "8" of "Smoking: 8", all of "41.9%"),
            `"numbers"` (the words that hold a digit: "89" of "89 apples"; else the last
            word), `"last"` (the span's last token only) or `"all"` (every token, the
            paper's choice). In a left-to-right model the "Smoking:" before the value cannot carry
            it, yet attention on it satisfies the loss: docs/method.md, "Spans to columns".
        cat_layers (`list[int]`, *optional*):
            Decoder layers whose attention the loss averages (0 = the first, -1 = the
            last). Default: every layer, as in the paper. A model's first layer sees only
            token identities and positions, so it cannot tell the "8" of "Smoking: 8" from
            any other "8"; in a model of a few layers, asking it to attend to causal values
            makes it read every number (docs/method.md, "Choosing alpha and the layers").
        cat_allow_unsupervised (`bool`, *optional*, defaults to `False`):
            With `cat_gamma > 0` and no training record keeping a supervised row, training
            would silently be plain fine-tuning: an error unless this is set. Fewer than
            half the records keeping one gives a warning (also in `cat_warnings`).

        > Data

        max_length (`int`, *optional*, defaults to `256`):
            Longer records lose prompt tokens from the left; the count is logged.
        answer_logits_only (`bool`, *optional*, defaults to `False`):
            Project onto the vocabulary only the hidden states that predict a label token
            (`logits_to_keep` with a boolean mask): the loss is the same, the LM head's cost
            drops from every position to the few answer positions.
        chat_template (`bool`, *optional*, defaults to `False`):
            Train through the tokenizer's chat template: a record's input is the user turn,
            its target the assistant turn; the loss covers the assistant turn and its
            end-of-turn token. Use it for instruct models; evaluation renders prompts the
            same way. Saved models record it (`cattune.json`), so `cattune eval` follows.

        > Evaluation during training (`eval_strategy`, `eval_steps`, an `eval_dataset`)

        eval_accuracy (`bool`, *optional*, defaults to `True`):
            Each evaluation also decodes the eval records' answers greedily, as `cattune
            eval` does, and reports `eval_accuracy`, so that `metric_for_best_model:
            accuracy` with `load_best_model_at_end` keeps the most accurate checkpoint.
            Next to `eval_loss` (the answer's cross-entropy) come `eval_loss_attn` (the
            Re-Attention loss, per supervised row) and `eval_attn_ratio`, measured in eval
            mode as training logs them.
        eval_checker (`str`, *optional*, defaults to `"exact"`):
            `"exact"`, `"numeric"`, `"gsm8k"` or `"mc"` (see `cattune.evaluate`).
    """

    output_dir: str | None = field(
        default=None, metadata={"help": "Where checkpoints and the final model go (`cattune train` requires it).", "aliases": ["--out"]}
    )
    cat_alpha: float = field(
        default=DEFAULT_ALPHA, metadata={"help": "Target ratio of causal to other attention.", "aliases": ["--alpha"]}
    )
    cat_gamma: float = field(
        default=1.0, metadata={"help": "Weight of the Re-Attention loss; 0 = plain fine-tuning.", "aliases": ["--gamma"]}
    )
    cat_gamma_decay: float = field(default=1.0, metadata={"help": "gamma(t) = cat_gamma * exp(-decay * t)."})
    cat_gamma_decay_unit: str = field(
        default="epoch", metadata={"help": "Unit of t in the decay.", "choices": ["epoch", "step"]}
    )
    cat_loss: str = field(default="div", metadata={"help": "Per-row loss.", "choices": list(LOSS_KINDS)})
    cat_span_columns: str = field(
        default=DEFAULT_SPAN_COLUMNS,
        metadata={"help": "Value tokens that become causal columns.", "choices": list(SPAN_COLUMNS)},
    )
    cat_allow_unsupervised: bool = field(
        default=False,
        metadata={"help": "Train even when no training record keeps a supervised row (no annotation aligns): the "
                  "Re-Attention loss then never acts and CAT is plain fine-tuning. Without it that is an error."},
    )
    cat_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Layers whose attention the loss averages (0 = first, -1 = last); default all, as in the paper."},
    )
    max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Maximum tokens per record (prompt cut from the left)."})
    answer_logits_only: bool = field(
        default=False,
        metadata={"help": "Compute the LM head (logits over the vocabulary) only at the positions that predict a "
                  "label token: the same loss, less compute when the vocabulary is large (SmolLM2's output layer is "
                  "about a fifth of its multiply-adds per token)."},
    )
    chat_template: bool = field(
        default=False,
        metadata={"help": "Render each record through the tokenizer's chat template (input = user turn, "
                  "target = assistant turn); for instruct models."},
    )
    eval_accuracy: bool = field(
        default=True,
        metadata={"help": "At each evaluation, also decode the eval records' answers greedily and report "
                  "eval_accuracy (usable as metric_for_best_model); off = losses and attention only."},
    )
    eval_checker: str = field(
        default="exact",
        metadata={"help": "How an answer is compared with its target (eval_accuracy, and --eval after training).",
                  "choices": sorted(CHECKERS), "aliases": ["--checker"]},
    )
    report_to: None | str | list[str] = field(
        default="auto",
        metadata={"help": "Where logs go: 'auto' = TensorBoard when installed, else none; or any "
                  "TrainingArguments value ('none', 'tensorboard', 'wandb', ...)."},
    )
    # Trainer defaults that suit this data: our collator needs every field it gets.
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Off here: the collator needs the records' causal-structure fields, which no model's forward takes."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    @property
    def reading(self) -> Reading:
        """How this training reads a record (chat template, span columns, layers, max length):
        recorded in the saved model's cattune.json, so that evaluation and explain read it alike."""
        return Reading.of(self)

    def __post_init__(self):
        if self.report_to == "auto":
            import importlib.util

            self.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
        super().__post_init__()
        if self.cat_loss not in LOSS_KINDS:
            raise ValueError(f"cat_loss must be one of {LOSS_KINDS}, got {self.cat_loss!r}")
        if self.cat_span_columns not in SPAN_COLUMNS:
            raise ValueError(f"cat_span_columns must be one of {SPAN_COLUMNS}, got {self.cat_span_columns!r}")
        if self.cat_gamma_decay_unit not in ("epoch", "step"):
            raise ValueError(f"cat_gamma_decay_unit must be 'epoch' or 'step', got {self.cat_gamma_decay_unit!r}")
        if isinstance(self.cat_layers, int) and not isinstance(self.cat_layers, bool):
            self.cat_layers = [self.cat_layers]
        if self.cat_layers is not None and not (
            isinstance(self.cat_layers, (list, tuple))
            and all(isinstance(i, int) and not isinstance(i, bool) for i in self.cat_layers)
        ):
            raise ValueError(f"cat_layers must be a list of layer indices (e.g. [-1]) or None, got {self.cat_layers!r}")
        if self.cat_layers is not None and len(set(self.cat_layers)) != len(self.cat_layers):
            raise ValueError(f"cat_layers names a layer twice: {self.cat_layers}")
        for f in dataclasses.fields(self):  # nan compares False everywhere: clipping, CAT, ... silently off
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        for name, ok, expected in RANGES:
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"{name} must be {expected}, got {value}")
        if self.cat_alpha <= 0:
            raise ValueError(f"cat_alpha must be > 0, got {self.cat_alpha}")
        # A negative decay would grow the Re-Attention weight without bound over training.
        for name in ("cat_gamma", "cat_gamma_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_checker not in CHECKERS:
            raise ValueError(f"eval_checker must be one of {sorted(CHECKERS)}, got {self.eval_checker!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a prompt token and an answer token), got {self.max_length}")
        # Trainer would run 0 steps and save the untrained model as if it had trained.
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0 (or give max_steps > 0), got {self.num_train_epochs}")
        if not (self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number >= 0, got {self.learning_rate}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
