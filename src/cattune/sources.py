"""Where a task's records come from, and how a data row becomes a record.

A source is one of: the Spurious Token Game generator (``{"stg": "E"}``), local JSONL
files (``{"files": {SPLIT: PATH}}``: rows in the paper's format as they are, other rows
through the source's mapping), or a Hugging Face ``datasets`` name/config with a field
mapping (``{"hub": "openai/gsm8k", "config": "main", ...}``). ``cattune.tasks.Task.load``
picks the loader.
"""

from __future__ import annotations

import copy
import json
import math
import string
from pathlib import Path
from typing import Any

from .evaluate import _NUMBER, final_answer
from .records import Record, iter_json_lines, normalize_important, record_from_json
from .text import scalar_text

SOURCE_KINDS = ("stg", "files", "hub")
TARGET_TRANSFORMS = ("none", "final_answer", "number", "choice_letter", "strip")
LETTERS = "ABCDEFGHIJ"


class TaskError(ValueError):
    """A task definition or its data is unusable; the message says what to change."""


# --------------------------------------------------------------------------- mapping


class _RowFormatter(string.Formatter):
    """``str.format`` over a data row; a ``{"text": [...], "label": [...]}`` field (ARC's
    choices) renders as lettered lines "A. first\\nB. second"."""

    def format_field(self, value, format_spec):
        if isinstance(value, dict) and isinstance(value.get("text"), list):
            return render_choices(value)
        if isinstance(value, list):
            return "\n".join(str(v) for v in value)
        return super().format_field(value, format_spec)


def render_choices(choices: dict) -> str:
    """ARC-style choices as "A. text" lines, lettered by position (some ARC questions
    label their choices 1-4; the letters keep the ``mc`` checker's format)."""
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(choices["text"]))


def _format_value(value: Any) -> str:
    if value is None:
        raise ValueError("the answer field is empty")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite answer {value!r}")
    if isinstance(value, bool):  # a data row's yes/no answer: "True" / "False"
        return str(value)
    try:
        return scalar_text(value)
    except TypeError:  # a list or object field, as Python writes it
        return str(value)


def _number_text(text: str) -> str:
    m = _NUMBER.search(text)
    if not m:
        raise ValueError(f"no number in answer {text!r:.60}")
    return m.group(0).replace(",", "")


def map_row(row: dict, source: dict) -> Record:
    """One data row -> Record, by the source's ``input`` template and ``target`` field."""
    try:
        prompt = _RowFormatter().format(source["input"], **row)
    except KeyError as e:
        raise ValueError(f"input template names field {e.args[0]!r}, the row has {sorted(row)}") from None
    target_field = source.get("target", "answer")
    if target_field not in row:
        raise ValueError(f"target field {target_field!r} not in the row (fields: {sorted(row)})")
    value = row[target_field]
    transform = source.get("target_transform", "none")
    if transform == "choice_letter":
        choices = row.get(source.get("choices_field", "choices"))
        if not isinstance(choices, dict) or "label" not in choices:
            raise ValueError("target_transform choice_letter needs a choices field with a 'label' list")
        labels = [str(x) for x in choices["label"]]
        if str(value) not in labels:
            raise ValueError(f"answer {value!r} is not one of the choice labels {labels}")
        target = LETTERS[labels.index(str(value))]
    else:
        target = _format_value(value)
        if transform == "final_answer":
            target = final_answer(target)
        elif transform == "number":
            target = _number_text(target)
        elif transform == "strip":
            target = target.strip()
    meta = {k: v for k, v in row.items() if k not in ("input", "target", "important") and _jsonable(v)}
    important = normalize_important(row.get("important")) if "important" in row else []
    return Record(prompt=prompt, target=target, important=important, meta=meta)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False

# --------------------------------------------------------------------------- loaders


def load_file(path: Path, source: dict, task: str) -> list[Record]:
    """A JSONL file: rows in the paper's format (``input``/``target``) are read as they
    are; other rows go through the source's ``input`` template and ``target`` field."""
    if not path.is_file():
        raise FileNotFoundError(f"task {task}: {path}: no such file")

    def parse(row) -> Record:
        if isinstance(row, dict) and "input" in row and "target" in row:
            return record_from_json(row)
        if "input" not in source:
            raise ValueError("not in the paper's format (fields 'input' and 'target'), and the task's "
                             "source has no 'input' template to map other fields")
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        return map_row(row, source)

    return [record for _, record in iter_json_lines(path, parse)]


def _hub_load_dataset(name: str, config: str | None, split: str):
    import datasets

    return datasets.load_dataset(name, config, split=split)


DEFAULT_HUB_SPLITS = {"train": "train", "test": "test"}  # a hub source without "splits"


def load_hub(src: dict, task: str, split: str) -> list[Record]:
    """One split of a hub dataset, each row mapped by the source's fields."""
    splits = src.get("splits", DEFAULT_HUB_SPLITS)
    if split not in splits:
        raise TaskError(f"task {task}: unknown split {split!r}; hub splits: {sorted(splits)}")
    name, config = src["hub"], src.get("config")
    try:
        ds = _hub_load_dataset(name, config, splits[split])
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds when offline
        raise TaskError(
            f"task {task}: cannot load the Hugging Face dataset {name!r}"
            f"{f' (config {config!r})' if config else ''}, split {splits[split]!r}: {type(e).__name__}: {e}. "
            "Hub tasks need network access at run time (or a copy in the datasets cache). Offline, give "
            f"local JSONL files instead: in an experiment config, `files: {{{split}: PATH}}` under the task."
        ) from None
    out = []
    for i, row in enumerate(ds):
        try:
            out.append(map_row(dict(row), src))
        except ValueError as e:
            raise TaskError(f"task {task}: {name} {splits[split]} row {i}: {e}") from None
    return out


_STG_CACHE: dict[tuple[str, int], dict[str, list[Record]]] = {}


def stg_split_sizes(variant: str) -> dict[str, int | None]:
    if variant.upper() == "E":
        return {"train_S": None, "train_M": None, "train_L": None, "iid_test": None, "ood_test": None}
    # STG_H: one 3000-record training set; S/M/L are its nested first quarter, half, all
    # (as STG_E's S/M are the first quarter and half of L).
    return {"train_S": 750, "train_M": 1500, "train_L": 3000, "train": 3000, "iid_test": None, "ood_test": None}


def stg_split(variant: str, seed: int, split: str) -> list[Record]:
    from . import stg

    variant = variant.upper()
    sizes = stg_split_sizes(variant)
    if split not in sizes:
        raise TaskError(f"STG_{variant}: unknown split {split!r}; splits: {sorted(sizes)}")
    key = (variant, seed)
    if key not in _STG_CACHE:
        _STG_CACHE[key] = stg.generate(variant, seed=seed)
    data = _STG_CACHE[key]
    base = split if split in data else "train"
    records = data[base][: sizes[split]] if sizes[split] else data[base]
    return [copy.deepcopy(r) for r in records]  # callers may re-annotate them

