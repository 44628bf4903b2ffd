"""How a record is read for a model: the four settings that decide its tokens, its causal
columns and the attention measured on them, as one frozen object.

Training takes them from its :class:`~cattune.config.CATConfig` (``Reading.of``) and
records them with every saved model in ``cattune.json``; evaluation, the attention
ratio, ``explain`` and the alignment check read a saved model through that record
(:func:`saved_reading`), so that a record is read exactly as training read it unless
the user says otherwise.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write_text
from .masks import DEFAULT_SPAN_COLUMNS, SPAN_COLUMNS, EncodedRecord, encode_record
from .records import Record

TRAINING_INFO = "cattune.json"


class TrainingInfoError(ValueError):
    """A saved model's cattune.json is unreadable or holds a value of the wrong kind."""


@dataclass(frozen=True)
class Reading:
    """``chat_template``: prompt and answer as the user and assistant turns of the
    tokenizer's chat template. ``span_columns``: which tokens of an annotated value are
    causal columns (``masks.SPAN_COLUMNS``). ``layers``: whose attention is averaged
    (None: every layer). ``max_length``: tokens per record, the prompt cut from the left
    past it (None: the model's own limit)."""

    chat_template: bool = False
    span_columns: str = DEFAULT_SPAN_COLUMNS
    layers: tuple[int, ...] | None = None
    max_length: int | None = None

    def __post_init__(self):
        if self.span_columns not in SPAN_COLUMNS:
            raise ValueError(f"span_columns must be one of {SPAN_COLUMNS}, got {self.span_columns!r}")
        if self.layers is not None:  # a tuple, so that the object stays frozen and hashable
            object.__setattr__(self, "layers", tuple(self.layers))

    @classmethod
    def of(cls, config) -> Reading:
        """The reading of a :class:`~cattune.config.CATConfig` (or anything with its fields)."""
        return cls(chat_template=config.chat_template, span_columns=config.cat_span_columns,
                   layers=config.cat_layers, max_length=config.max_length)

    @property
    def layer_list(self) -> list[int] | None:
        return None if self.layers is None else list(self.layers)

    def encode(self, tokenizer, record: Record, add_eos: bool = True) -> EncodedRecord:
        """``masks.encode_record`` with these settings."""
        return encode_record(tokenizer, record, max_length=self.max_length, span_columns=self.span_columns,
                             add_eos=add_eos, chat_template=self.chat_template)

    def to_json(self) -> dict:
        return {"chat_template": self.chat_template, "span_columns": self.span_columns,
                "layers": self.layer_list, "max_length": self.max_length}


# CATConfig fields recorded in cattune.json: the reading's four, and the loss's target and weight.
RECORDED_FIELDS = ("chat_template", "cat_span_columns", "cat_layers", "max_length", "cat_alpha", "cat_gamma")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_RECORDED_CHECKS = (
    ("chat_template", lambda v: isinstance(v, bool), "true or false"),
    ("cat_span_columns", lambda v: v in SPAN_COLUMNS, f"one of {', '.join(SPAN_COLUMNS)}"),
    ("cat_layers", lambda v: isinstance(v, list) and v != [] and all(map(_int, v)), "a list of layer indices"),
    ("max_length", lambda v: _int(v) and v >= 2, "an integer, at least 2"),
    ("cat_alpha", lambda v: isinstance(v, (int, float)) and math.isfinite(v), "a finite number"),
    ("cat_gamma", lambda v: isinstance(v, (int, float)) and math.isfinite(v), "a finite number"),
    ("base_model", lambda v: isinstance(v, str), "a model reference"),
)


def read_training_info(model_dir: str | os.PathLike) -> dict:
    """``cattune.json`` of a saved model directory, or {} (any other model)."""
    path = Path(model_dir) / TRAINING_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingInfoError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict):
        return {}
    for name, ok, expected in _RECORDED_CHECKS:  # read as settings later: a wrong one fails here, in one line
        if info.get(name) is not None and not ok(info[name]):
            raise TrainingInfoError(f"{path}: {name} must be {expected}, got {info[name]!r}; fix it or delete the file")
    return info


def write_training_info(model_dir: str | os.PathLike, config, base_model: str | None = None) -> None:
    info = {name: getattr(config, name) for name in RECORDED_FIELDS if hasattr(config, name)}
    if base_model and Path(base_model).is_dir():
        # A local base is recorded relative to this directory: the pair can move together.
        base_model = os.path.relpath(Path(base_model).resolve(), Path(model_dir).resolve())
    info["base_model"] = base_model
    atomic_write_text(Path(model_dir) / TRAINING_INFO, json.dumps(info, indent=2) + "\n")


ALL_LAYERS = "all"  # a command's --layers all: every layer, whatever the model was trained on


def saved_reading(reference: str | os.PathLike | None, chat_template: bool | None = None,
                  span_columns: str | None = None, layers: list[int] | str | None = None,
                  max_length: int | None = None, default_max_length: int | None = None) -> Reading:
    """How to read records for a model: what the caller gives, else what its
    ``cattune.json`` recorded, else the defaults of a model cattune did not train (no
    chat template, every layer, ``default_max_length``: None = the model's own length
    limit). ``layers``: None = as trained, ``"all"`` = every layer, or a list of indices."""
    info = read_training_info(reference) if reference is not None and Path(reference).is_dir() else {}
    if layers is None:
        layers = info.get("cat_layers")
    elif layers == ALL_LAYERS:
        layers = None
    return Reading(
        chat_template=bool(info.get("chat_template", False)) if chat_template is None else chat_template,
        span_columns=span_columns or info.get("cat_span_columns") or DEFAULT_SPAN_COLUMNS,
        layers=layers,
        max_length=next((v for v in (max_length, info.get("max_length")) if v is not None), default_max_length),
    )
