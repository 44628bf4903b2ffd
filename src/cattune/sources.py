"""Where a task's records come from, and how a data row becomes a record.

A source is one of: the Spurious Token Game generator (``{"stg": "E"}``), local JSONL
files (``{"files": {SPLIT: PATH}}``: rows in the paper's format as they are, other rows
through the source's mapping), the CAT release's downstream files found on this machine
(``{"release": {SPLIT: "MAWPS/mawps_train.jsonl"}, "fallback": HUB SOURCE}``), or a
Hugging Face ``datasets`` name/config with a field mapping (``{"hub": "openai/gsm8k",
"config": "main", ...}``). ``cattune.tasks.Task.load`` picks the loader.

The release's data directory is, in this order: ``$CATTUNE_SHARED_DATA`` (the folder
holding ``cat_release/``, or ``cat_release/`` itself), ``shared/data`` beside the checkout
cattune runs from, or beside the repository that checkout was cloned from.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import string
import subprocess
from pathlib import Path
from typing import Any

from .checkers import NUMBER, final_answer
from .records import Record, iter_json_lines, normalize_important, record_from_json
from .text import scalar_text

SOURCE_KINDS = ("stg", "files", "release", "hub")
RELEASE_FOLDER = "cat_release"  # the CAT release's downstream files, inside the shared data directory
DATA_ENV = "CATTUNE_SHARED_DATA"
TARGET_TRANSFORMS = ("none", "final_answer", "number", "choice_letter", "strip")
LETTERS = "ABCDEFGHIJ"
logger = logging.getLogger(__name__)


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
    m = NUMBER.search(text)
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


def move_answer_prefix(record: Record, prefix: str) -> Record:
    """A target written "Answer: 84.0" (MAWPS in the release) becomes the prompt's end:
    prompt "... Answer: ", target "84.0", the format of the task's other files. The
    record's text only gains a space, so its annotations ("Answer", "84.0") still align."""
    if prefix and record.target.startswith(prefix) and record.target[len(prefix):].strip():
        sep = "" if not record.prompt or record.prompt[-1].isspace() else " "
        record.prompt = record.prompt + sep + prefix
        record.target = record.target[len(prefix):]
        record.target_json = None
    return record


def release_annotation(row: dict, dropped: list[int]) -> dict:
    """A release row's ``important`` in the format's shape: the release's few objects with
    several keys (30 of MAWPS's ~10,000) split into one-key objects, and an entry whose
    values are not text (one GSM8K record nests a whole annotation) left out and counted."""
    raw = row.get("important")
    if not isinstance(raw, list):
        return row  # not the release's shape: the record check says what is wrong
    fixed = []
    for obj in raw:
        for key, values in (obj.items() if isinstance(obj, dict) else ()):
            if isinstance(values, str) or (isinstance(values, list) and all(isinstance(v, str) for v in values)):
                fixed.append({key: values})
            else:
                dropped.append(1)
        if not isinstance(obj, dict):
            return row
    return {**row, "important": fixed}


def load_file(path: Path, source: dict, task: str, release: bool = False) -> list[Record]:
    """A JSONL file: rows in the paper's format (``input``/``target``) are read as they
    are; other rows go through the source's ``input`` template and ``target`` field.
    A source's ``answer_prefix`` moves from the start of a target to the prompt's end;
    a file of the CAT release has its annotations put in shape (``release_annotation``)."""
    if not path.is_file():
        raise FileNotFoundError(f"task {task}: {path}: no such file")
    prefix = source.get("answer_prefix", "")
    dropped: list[int] = []

    def parse(row) -> Record:
        if release and isinstance(row, dict):
            row = release_annotation(row, dropped)
        if isinstance(row, dict) and "input" in row and "target" in row:
            return move_answer_prefix(record_from_json(row), prefix)
        if "input" not in source:
            raise ValueError("not in the paper's format (fields 'input' and 'target'), and the task's "
                             "source has no 'input' template to map other fields")
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        return map_row(row, source)

    records = [record for _, record in iter_json_lines(path, parse)]
    if dropped:
        logger.info("%s: left out %d annotation entr%s whose values are not text", path, len(dropped),
                    "y" if len(dropped) == 1 else "ies")
    return records


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The shared data directory (the one holding ``cat_release/``), or None.

    ``explicit``, else ``$CATTUNE_SHARED_DATA``, else ``shared/data`` beside the checkout
    this package runs from (an editable install; CI clones the repository next to
    ``shared/``), else beside the repository that checkout was cloned from. A folder named
    that is ``cat_release/`` itself is taken as its parent."""
    named = explicit if explicit is not None else os.environ.get(DATA_ENV)
    if named:
        path = Path(named).expanduser()
        return path.parent if path.name == RELEASE_FOLDER else path
    return _checkout_data_dir()


@functools.lru_cache(maxsize=1)
def _checkout_data_dir() -> Path | None:
    repo = Path(__file__).resolve().parents[2]  # src/cattune/sources.py -> the checkout
    if not (repo / "pyproject.toml").is_file():  # installed from a wheel: no checkout
        return None
    beside = repo.parent / "shared" / "data"
    if beside.is_dir():
        return beside
    try:  # a clone of a local checkout (e.g. in /tmp): shared/ is beside its origin
        origin = subprocess.run(["git", "-C", str(repo), "remote", "get-url", "origin"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    origin = origin.removeprefix("file://")
    if origin and (repo / origin).is_dir():  # a relative origin is relative to the clone
        candidate = (repo / origin).resolve().parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def release_file(relative: str) -> Path | None:
    """A file of the CAT release (``MAWPS/mawps_train.jsonl``) on this machine, or None."""
    root = find_data_dir()
    path = root / RELEASE_FOLDER / relative if root is not None else None
    return path if path is not None and path.is_file() else None


def load_release(src: dict, task: str, split: str) -> list[Record] | None:
    """One split from the release's files when they are on this machine; None when they
    are not (the caller then falls back to the hub)."""
    files = src["release"]
    if split not in files:
        return None
    path = release_file(files[split])
    if path is None:
        return None
    return load_file(path, src, task, release=True)


def release_missing(task: str, relative: str) -> TaskError:
    root = find_data_dir()
    where = root / RELEASE_FOLDER if root is not None else f"shared/data/{RELEASE_FOLDER} beside the checkout"
    return TaskError(f"task {task}: {relative} of the CAT release is not at {where}, and the hub has no such "
                     f"split: set {DATA_ENV} to the folder holding {RELEASE_FOLDER}/")


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

