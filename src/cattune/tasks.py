"""Task registry: where a task's records come from, how answers are checked, how it is annotated.

A :class:`Task` bundles

- a **source** of records: the Spurious Token Game generator (``{"stg": "E"}``), local
  JSONL files (``{"files": {"train": PATH, "test": PATH}}``: the paper's format, or any
  JSON rows with a field mapping), or a Hugging Face ``datasets`` name/config with a
  field mapping (``{"hub": "openai/gsm8k", "config": "main", ...}``);
- the **answer checker** (``exact``, ``numeric`` with a tolerance, ``gsm8k`` for
  "#### answer", ``mc`` for multiple-choice letters; see ``cattune.evaluate``);
- the default **annotation** for ``cattune annotate``: an instructions/demos name
  (``builtin:math``) or, for synthetic data, a programmatic rule;
- a **placebo** recipe (:func:`placebo_records`): the Re-Attention loss moved to spans
  that carry no causal information, with the same number of values and tokens.

Built in: STG_E, STG_H (generated), SVAMP, GSM8K, MAWPS, ASDiv, ARC-E (hub-based: they
need network at run time, or local files given with ``files``). Add a task from a
YAML/JSON file with :func:`load_task_file` (or ``task_files:`` in an experiment
config); the format is documented in docs/experiments.md::

    name: MY_MATH
    checker: numeric
    checker_options: {abs_tol: 0.001}
    instructions: builtin:math
    demos: builtin:math
    source:
      files: {train: data/train.jsonl, test: data/test.jsonl}   # relative to this file
      # optional mapping for rows not in the paper's format:
      input: "{question}\\nAnswer: "
      target: answer
      target_transform: number
    train_split: train
    test_splits: [test]
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from .evaluate import CHECKERS, final_answer
from .masks import find_occurrences
from .records import Record, iter_json_lines, load_config_file, normalize_important, record_from_json

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
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"non-finite answer {value!r}")
        return str(value)
    if value is None:
        raise ValueError("the answer field is empty")
    return str(value)


def _number_text(text: str) -> str:
    m = re.search(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", text)
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


# --------------------------------------------------------------------------- the task


@dataclass
class Task:
    """A benchmark: records, answer checker, annotation defaults and placebo recipe."""

    name: str
    source: dict
    checker: str = "exact"
    checker_options: dict = field(default_factory=dict)
    train_split: str = "train"
    test_splits: tuple[str, ...] = ("test",)
    instructions: str | None = "builtin:generic"  # cattune annotate --instructions
    demos: str | None = None  # cattune annotate --demos
    rule: dict | None = None  # programmatic annotation (RuleAnnotator rule)
    # placebo recipe: "prefer" regexes give the first placebo spans (e.g. unrelated
    # items); "exclude" regexes mark text never used (e.g. spurious items, which copy
    # the causes in distribution). Then random spans without digits fill the rest.
    placebo: dict = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if self.checker not in CHECKERS:
            raise TaskError(f"task {self.name}: unknown checker {self.checker!r}; choose from {sorted(CHECKERS)}")
        kinds = [k for k in SOURCE_KINDS if k in self.source]
        if len(kinds) != 1:
            raise TaskError(f"task {self.name}: source needs exactly one of {SOURCE_KINDS}, got {sorted(self.source)}")
        transform = self.source.get("target_transform", "none")
        if transform not in TARGET_TRANSFORMS:
            raise TaskError(f"task {self.name}: target_transform must be one of {TARGET_TRANSFORMS}, got {transform!r}")
        if self.kind == "hub" and "input" not in self.source:
            raise TaskError(f"task {self.name}: a hub source needs an 'input' template (e.g. '{{question}} Answer: ')")
        self.test_splits = tuple(self.test_splits)
        if self.checker_options:
            try:
                self.check("1", "1")
            except TypeError as e:
                raise TaskError(f"task {self.name}: bad checker_options {self.checker_options}: {e}") from None

    # -- answers
    @property
    def kind(self) -> str:
        return next(k for k in SOURCE_KINDS if k in self.source)

    @property
    def checker_fn(self) -> Callable[[str, str], bool]:
        fn = CHECKERS[self.checker]
        return functools.partial(fn, **self.checker_options) if self.checker_options else fn

    def check(self, prediction: str, target: str) -> bool:
        return bool(self.checker_fn(prediction, target))

    # -- annotation
    def annotate_args(self) -> list[str]:
        """The ``cattune annotate`` options this task is annotated with by default."""
        if self.rule is not None:
            return ["--rule", f"<a file holding {json.dumps(self.rule)}>"]
        out = []
        if self.instructions:
            out += ["--instructions", self.instructions]
        if self.demos:
            out += ["--demos", self.demos]
        return out

    # -- data
    def split_names(self) -> list[str]:
        if self.kind == "stg":
            return list(_stg_split_sizes(self.source["stg"]))
        return list(self.source.get("files" if self.kind == "files" else "splits", {}))

    def with_files(self, files: dict[str, str], base_dir: str | os.PathLike | None = None) -> "Task":
        """A copy that reads the given splits from local JSONL files (rows in the paper's
        format as they are, other rows through the source's mapping); splits not
        given keep the original source."""
        base = Path(base_dir) if base_dir is not None else None
        resolved = {k: str(base / v) if base is not None and not Path(v).is_absolute() else str(v)
                    for k, v in files.items()}
        src = {k: v for k, v in self.source.items() if k in ("input", "target", "target_transform", "choices_field")}
        src["files"] = resolved
        src["fallback"] = copy.deepcopy(self.source)
        return replace(self, source=src)

    def load(self, split: str, limit: int | None = None) -> list[Record]:
        """Records of one split (the first ``limit`` of them)."""
        if self.kind == "stg":
            records = _stg_split(self.source["stg"], int(self.source.get("seed", 42)), split)
        elif self.kind == "files":
            files = self.source["files"]
            if split in files:
                records = _load_file(Path(files[split]), self.source, self.name)
            elif "fallback" in self.source:
                return replace(self, source=self.source["fallback"]).load(split, limit)
            else:
                raise TaskError(f"task {self.name}: no file for split {split!r}; files given for {sorted(files)}")
        else:
            records = _load_hub(self, split)
        if limit is not None:
            records = records[:limit]
        return records

    def tokenizer_texts(self) -> list[str]:
        """Texts the embedded tiny model's tokenizer is trained on: the largest training
        split for STG (the same vocabulary for every size), else the training split."""
        split = self.source.get("tokenizer_split", self.train_split)
        return [r.text for r in self.load(split)]


# --------------------------------------------------------------------------- loaders


def _load_file(path: Path, source: dict, task: str) -> list[Record]:
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


def _load_hub(task: Task, split: str) -> list[Record]:
    src = task.source
    splits = src.get("splits", {"train": "train", "test": "test"})
    if split not in splits:
        raise TaskError(f"task {task.name}: unknown split {split!r}; hub splits: {sorted(splits)}")
    name, config = src["hub"], src.get("config")
    try:
        ds = _hub_load_dataset(name, config, splits[split])
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds when offline
        raise TaskError(
            f"task {task.name}: cannot load the Hugging Face dataset {name!r}"
            f"{f' (config {config!r})' if config else ''}, split {splits[split]!r}: {type(e).__name__}: {e}. "
            "Hub tasks need network access at run time (or a copy in the datasets cache). Offline, give "
            f"local JSONL files instead: in an experiment config, `files: {{{split}: PATH}}` under the task."
        ) from None
    out = []
    for i, row in enumerate(ds):
        try:
            out.append(map_row(dict(row), src))
        except ValueError as e:
            raise TaskError(f"task {task.name}: {name} {splits[split]} row {i}: {e}") from None
    return out


_STG_CACHE: dict[tuple[str, int], dict[str, list[Record]]] = {}


def _stg_split_sizes(variant: str) -> dict[str, int | None]:
    if variant.upper() == "E":
        return {"train_S": None, "train_M": None, "train_L": None, "iid_test": None, "ood_test": None}
    # STG_H: one 3000-record training set; S/M/L are its nested first quarter, half, all
    # (as STG_E's S/M are the first quarter and half of L).
    return {"train_S": 750, "train_M": 1500, "train_L": 3000, "train": 3000, "iid_test": None, "ood_test": None}


def _stg_split(variant: str, seed: int, split: str) -> list[Record]:
    from . import stg

    variant = variant.upper()
    sizes = _stg_split_sizes(variant)
    if split not in sizes:
        raise TaskError(f"STG_{variant}: unknown split {split!r}; splits: {sorted(sizes)}")
    key = (variant, seed)
    if key not in _STG_CACHE:
        _STG_CACHE[key] = stg.generate(variant, seed=seed)
    data = _STG_CACHE[key]
    base = split if split in data else "train"
    records = data[base][: sizes[split]] if sizes[split] else data[base]
    return [copy.deepcopy(r) for r in records]  # callers may re-annotate them


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {}


def _norm(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).upper()


def register_task(task: Task, overwrite: bool = False) -> Task:
    key = _norm(task.name)
    if key in TASKS and not overwrite:
        raise TaskError(f"a task named {task.name!r} is already registered (pass overwrite=True to replace it)")
    TASKS[key] = task
    return task


def get_task(name: str | Task) -> Task:
    """A registered task by name (case, '-' and '_' ignored: "arc-e" = "ARC_E")."""
    if isinstance(name, Task):
        return name
    key = _norm(str(name))
    if key not in TASKS:
        raise TaskError(f"unknown task {name!r}; registered: {', '.join(t.name for t in TASKS.values())}. "
                        "Define new ones in a YAML/JSON file (task_files: in the experiment config).")
    return TASKS[key]


def list_tasks() -> list[Task]:
    return list(TASKS.values())


_TASK_KEYS = {"name", "source", "checker", "checker_options", "train_split", "test_splits", "instructions",
              "demos", "rule", "placebo", "description"}


def task_from_dict(obj: dict, base_dir: str | os.PathLike | None = None) -> Task:
    """A Task from a parsed YAML/JSON object; relative file paths resolve against ``base_dir``."""
    if not isinstance(obj, dict):
        raise TaskError(f"a task definition must be an object, got {type(obj).__name__}")
    unknown = set(obj) - _TASK_KEYS
    if unknown:
        raise TaskError(f"task {obj.get('name', '?')}: unknown fields {sorted(unknown)}; allowed: {sorted(_TASK_KEYS)}")
    for need in ("name", "source"):
        if need not in obj:
            raise TaskError(f"task definition needs {need!r}: {obj!r:.120}")
    source = copy.deepcopy(obj["source"])
    if not isinstance(source, dict):
        raise TaskError(f"task {obj['name']}: source must be an object")
    if "files" in source and base_dir is not None:
        source["files"] = {k: str(Path(base_dir) / v) if not Path(v).is_absolute() else v
                           for k, v in source["files"].items()}
    kw = {k: v for k, v in obj.items() if k in _TASK_KEYS}
    kw["source"] = source
    if isinstance(kw.get("test_splits"), str):
        kw["test_splits"] = [kw["test_splits"]]
    if "test_splits" in kw:
        kw["test_splits"] = tuple(kw["test_splits"])
    for name in ("checker_options", "placebo"):
        if kw.get(name) is None:
            kw.pop(name, None)
    return Task(**kw)


def load_task_file(path: str | os.PathLike, register: bool = True, overwrite: bool = True) -> list[Task]:
    """Read task definitions from YAML or JSON: one object, a list, or ``{"tasks": [...]}``."""
    path = Path(path)
    data = load_config_file(path, error=TaskError)
    if isinstance(data, dict) and "tasks" in data:
        data = data["tasks"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a task object or a list of them")
    tasks = []
    for obj in data:
        try:
            task = task_from_dict(obj, base_dir=path.parent)
        except TaskError as e:
            raise TaskError(f"{path}: {e}") from None
        tasks.append(register_task(task, overwrite=overwrite) if register else task)
    return tasks


def _builtin() -> None:
    from . import stg

    e_items = (*stg.E_CAUSAL, *stg.E_SPURIOUS)
    register_task(Task(
        name="STG_E",
        description="Spurious Token Game, easy: cancer risk label (docs/method.md section 5)",
        source={"stg": "E", "seed": 42, "tokenizer_split": "train_L"},
        checker="exact",
        train_split="train_M",
        test_splits=("iid_test", "ood_test"),
        instructions=None,
        rule=stg.E_RULE,
        # The unrelated items carry no information in any split; the spurious ones copy
        # the causes in distribution (Hormones = Exercise / 2), so they are never used.
        placebo={"prefer": [rf"\b{re.escape(n)}: \d+" for n in stg.E_UNRELATED],
                 "exclude": [rf"\b{re.escape(n)}: \d+" for n in e_items]},
    ), overwrite=True)
    h_items = [n for n, _ in (*stg.H_CAUSAL, *stg.H_SPURIOUS)]
    register_task(Task(
        name="STG_H",
        description="Spurious Token Game, hard: integer air-quality index (docs/method.md section 5)",
        source={"stg": "H", "seed": 42, "tokenizer_split": "train"},
        checker="numeric",
        train_split="train_M",
        test_splits=("iid_test", "ood_test"),
        instructions=None,
        rule=stg.H_RULE,
        # The irrelevant items' values ("89th", "113.0Mbps": a number glued to letters is
        # only found with them), then random spans of the question text.
        placebo={"prefer": [r"(?<=City Anniversary: )\d+th", r"(?<=Average Internet Speed: )\d+\.\dMbps",
                            r"(?<=Number of Libraries: )\d+"],
                 "exclude": [rf"{re.escape(n)}: -?\d+(?:\.\d+)?%?" for n in h_items]},
    ), overwrite=True)
    math_kw = dict(checker="numeric", instructions="builtin:math", demos="builtin:math")
    register_task(Task(
        name="SVAMP", description="SVAMP arithmetic word problems (paper format: Body. Question. Answer: )",
        source={"hub": "ChilleD/SVAMP", "splits": {"train": "train", "test": "test"},
                "input": "{Body}. {Question}. Answer: ", "target": "Answer"}, **math_kw), overwrite=True)
    register_task(Task(
        name="GSM8K", description="GSM8K grade-school math; the target is the worked answer ending '#### N'",
        source={"hub": "openai/gsm8k", "config": "main", "splits": {"train": "train", "test": "test"},
                "input": "{question}\nAnswer: ", "target": "answer"},
        checker="gsm8k", instructions="builtin:math", demos="builtin:math"), overwrite=True)
    register_task(Task(
        name="MAWPS", description="MAWPS math word problems (the Calc-X copy: question, result)",
        source={"hub": "MU-NLPC/Calc-mawps", "splits": {"train": "train", "test": "test"},
                "input": "{question} Answer: ", "target": "result", "target_transform": "number"},
        **math_kw), overwrite=True)
    register_task(Task(
        name="ASDiv", description="ASDiv word problems (one hub split, cut 80/20 into train/test)",
        source={"hub": "EleutherAI/asdiv", "config": "asdiv",
                "splits": {"train": "validation[:80%]", "test": "validation[80%:]"},
                "input": "{body} {question} Answer: ", "target": "answer", "target_transform": "number"},
        **math_kw), overwrite=True)
    register_task(Task(
        name="ARC-E", description="ARC-Easy science questions, answered with a choice letter",
        source={"hub": "allenai/ai2_arc", "config": "ARC-Easy",
                "splits": {"train": "train", "validation": "validation", "test": "test"},
                "input": "Question: {question}\n{choices}\nAnswer: ", "target": "answerKey",
                "target_transform": "choice_letter"},
        checker="mc", instructions="builtin:generic"), overwrite=True)


_builtin()


# --------------------------------------------------------------------------- placebo

_WORD = re.compile(r"\w+")


class _Lengths:
    """Token counts of character spans of one text: the tokenizer's when given, else
    words and punctuation marks."""

    def __init__(self, text: str, tokenizer=None):
        if tokenizer is not None:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            self.spans = [(s, e) for s, e in enc["offset_mapping"] if e > s]
        else:
            self.spans = [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]

    def count(self, start: int, end: int) -> int:
        return sum(1 for s, e in self.spans if s < end and e > start)


def _overlaps(span: tuple[int, int], spans: Iterable[tuple[int, int]]) -> bool:
    return any(span[0] < e and span[1] > s for s, e in spans)


def _candidates(text: str, limit: int, blocked: list[tuple[int, int]], max_words: int = 8) -> list[tuple[int, int]]:
    """Word-aligned spans of ``text[:limit]`` with no digit that touch no blocked span."""
    words = [m.span() for m in _WORD.finditer(text, 0, limit)]
    out = []
    for i in range(len(words)):
        for j in range(i, min(i + max_words, len(words))):
            span = (words[i][0], words[j][1])
            if span[1] > limit or _overlaps(span, blocked):
                break
            if any(c.isdigit() for c in text[span[0]: span[1]]):
                break
            out.append(span)
    return out


def _word_suffixes(text: str, span: tuple[int, int]) -> list[tuple[int, int]]:
    """``span`` and its shorter versions that start after a space: trimming from the
    left keeps the span's last token (the column "last" uses)."""
    starts = {m.start() for m in re.finditer(r"(?<!\S)\S", text[: span[1]]) if m.start() > span[0]}
    return [(s, span[1]) for s in sorted(starts | {span[0]})]


def placebo_annotation(record: Record, task: Task | None, rng: random.Random, tokenizer=None,
                       counts: dict | None = None):
    """The record's annotation with every value moved to a non-causal span of the same
    token count that precedes the same key (see :func:`placebo_records`)."""
    text = record.text
    recipe = (task.placebo if task is not None else {}) or {}
    lengths = _Lengths(text, tokenizer)
    excluded = [m.span() for p in recipe.get("exclude", []) for m in re.finditer(p, record.prompt)]
    annotated = [span for key, values in record.important for s in [key, *values]
                 for span in find_occurrences(text, s)]
    preferred = sorted({sub for p in recipe.get("prefer", []) for m in re.finditer(p, record.prompt)
                        if m.group(0) for sub in _word_suffixes(text, m.span())})
    counts = counts if counts is not None else {}

    def bump(name):
        counts[name] = counts.get(name, 0) + 1

    def unique(span):  # the text is found exactly there and nowhere else
        return find_occurrences(text, text[span[0]: span[1]]) == [span]

    out = []
    for key, values in record.important:
        key_occ = find_occurrences(text, key)
        # this key's own causal text: never a placebo for it, even in the relaxed pass
        own = key_occ + [span for v in values for span in find_occurrences(text, v)]
        used: list[tuple[int, int]] = []
        new_values = []
        for value in values:
            bump("values")
            pair = [(v, k) for v in find_occurrences(text, value) for k in key_occ if v[1] <= k[0]]
            if not pair:  # the original pair does not align either: no placebo for it
                bump("dropped")
                continue
            (vs, ve), (ks, _) = pair[0]
            want = lengths.count(vs, ve)
            levels = (
                ("preferred", lambda: [s for s in preferred if s[1] <= ks and not _overlaps(s, used + excluded)]),
                # text no annotation mentions
                ("random", lambda: _candidates(text, ks, annotated + excluded + used)),
                # dense annotations (SVAMP's cover most words): text that is not this key's
                ("relaxed", lambda: _candidates(text, ks, own + excluded + used)),
            )
            for how, make in levels:
                pool = [s for s in make() if unique(s)]
                if pool:
                    break
            else:
                bump("dropped")
                continue
            best = min(abs(lengths.count(*s) - want) for s in pool)
            span = rng.choice([s for s in pool if abs(lengths.count(*s) - want) == best])
            if best:
                bump("length_mismatch")
            bump(how)
            used.append(span)
            new_values.append(text[span[0]: span[1]])
        if new_values:
            out.append((key, new_values))
    return out


def placebo_records(records: list[Record], task: Task | str | None = None, seed: int = 0, tokenizer=None,
                    counts: dict | None = None) -> list[Record]:
    """Copies of ``records`` whose causal values are moved to spans with no causal information.

    Keys stay; each value becomes a span that (1) comes before the same key occurrence,
    (2) has the same token count (``tokenizer``'s tokens when given, else words and
    punctuation), (3) touches no annotated key or value, no ``exclude`` pattern of the
    task's placebo recipe and no digit, and (4) occurs once in the text, so it maps to
    exactly one set of columns. The task's ``prefer`` patterns are used first (STG_E:
    the unrelated items "Certain gene: v", "Room size: v"); random word spans fill the
    rest. Deterministic for a seed (each record draws from its own seeded generator).
    A value with no possible placebo is dropped and counted in ``counts["dropped"]``.
    """
    task = get_task(task) if isinstance(task, str) else task
    out = []
    for i, r in enumerate(records):
        rng = random.Random(f"placebo:{seed}:{i}")
        new = copy.deepcopy(r)
        new.important = placebo_annotation(r, task, rng, tokenizer, counts)
        out.append(new)
    return out
