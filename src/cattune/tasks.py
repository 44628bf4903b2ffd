"""Task registry: where a task's records come from, how answers are checked, how it is annotated.

A :class:`Task` bundles

- a **source** of records (``cattune.sources``): the Spurious Token Game generator
  (``{"stg": "E"}``), local JSONL files (``{"files": {"train": PATH, "test": PATH}}``:
  the paper's format, or any JSON rows with a field mapping), or a Hugging Face
  ``datasets`` name/config with a field mapping (``{"hub": "openai/gsm8k", ...}``);
- the **answer checker** (``exact``, ``numeric`` with a tolerance, ``gsm8k`` for
  "#### answer", ``mc`` for multiple-choice letters; see ``cattune.evaluate``);
- the default **annotation** for ``cattune annotate``: an instructions/demos name
  (``builtin:math``) or, for synthetic data, a programmatic rule;
- a **placebo** recipe, used by the experiment's placebo arm
  (:func:`cattune.experiment.arms.placebo_records`): which spans may stand in for the
  causal ones.

Built in: STG_E, STG_H (generated); MAWPS, SVAMP, ARC-E, GSM8K (the CAT release's files
when they are on this machine, ``cattune.sources.find_data_dir``, else the hub); ASDiv
(hub only: network at run time, or local files given with ``files``). The downstream
tasks share one format: the prompt ends with "Answer: ", the target is the bare answer.
Their splits: ``train``, ``val``, ``test`` and, for MAWPS and SVAMP, ``ood``: the other
data set in this one's format, the out-of-distribution test of a model trained on this
one (MAWPS:ood is all of SVAMP; SVAMP:ood all of MAWPS), and ``ood_val``, the other data
set's validation split, for choosing settings (MAWPS:ood_val is svamp_val, 200 of
MAWPS:ood's 1000 records; SVAMP:ood_val is mawps_val). Add a task from a
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
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .checkers import CHECKERS
from .files import load_config_file
from .records import Record
from .sources import (DEFAULT_HUB_SPLITS, SOURCE_KINDS, TARGET_TRANSFORMS, TaskError, load_file, load_hub,
                      load_release, release_missing, stg_split, stg_split_sizes)


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
        if self.kind == "release" and "fallback" in self.source:
            replace(self, source=self.source["fallback"])  # checks the hub source too
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
    def splits(self) -> set[str]:
        """The split names ``load`` accepts (checked when a config is read, not at a run)."""
        source = self.source
        if self.kind == "stg":
            return set(stg_split_sizes(source["stg"]))
        if self.kind in ("files", "release"):
            fallback = replace(self, source=source["fallback"]).splits() if "fallback" in source else set()
            return set(source[self.kind]) | fallback
        return set(source.get("splits", DEFAULT_HUB_SPLITS))

    def with_files(self, files: dict[str, str], base_dir: str | os.PathLike | None = None) -> "Task":
        """A copy that reads the given splits from local JSONL files (rows in the paper's
        format as they are, other rows through the source's mapping); splits not
        given keep the original source."""
        base = Path(base_dir) if base_dir is not None else None
        resolved = {k: str(base / v) if base is not None and not Path(v).is_absolute() else str(v)
                    for k, v in files.items()}
        src = {k: v for k, v in self.source.items()
               if k in ("input", "target", "target_transform", "choices_field", "answer_prefix")}
        src["files"] = resolved
        src["fallback"] = copy.deepcopy(self.source)
        return replace(self, source=src)

    def load(self, split: str, limit: int | None = None) -> list[Record]:
        """Records of one split (the first ``limit`` of them)."""
        if self.kind == "stg":
            records = stg_split(self.source["stg"], int(self.source.get("seed", 42)), split)
        elif self.kind == "files":
            files = self.source["files"]
            if split in files:
                records = load_file(Path(files[split]), self.source, self.name)
            elif "fallback" in self.source:
                return replace(self, source=self.source["fallback"]).load(split, limit)
            else:
                raise TaskError(f"task {self.name}: no file for split {split!r}; files given for {sorted(files)}")
        elif self.kind == "release":
            records = load_release(self.source, self.name, split)
            if records is None:  # not on this machine: the hub's copy, where it has the split
                fallback = self.source.get("fallback")
                if fallback is not None and split in replace(self, source=fallback).splits():
                    return replace(self, source=fallback).load(split, limit)
                if split not in self.source["release"]:
                    raise TaskError(f"task {self.name}: unknown split {split!r}; splits: {sorted(self.splits())}")
                raise release_missing(self.name, self.source["release"][split])
        else:
            records = load_hub(self.source, self.name, split)
        if limit is not None:
            records = records[:limit]
        return records

    def tokenizer_texts(self) -> list[str]:
        """Texts the embedded tiny model's tokenizer is trained on: the largest training
        split for STG (the same vocabulary for every size), else the training split."""
        split = self.source.get("tokenizer_split", self.train_split)
        return [r.text for r in self.load(split)]



# --------------------------------------------------------------------------- data options


def load_data(spec: str, on_error: str = "raise") -> tuple[list[Record], Task | None]:
    """The records a ``--data`` option names: a JSONL file, or TASK:SPLIT from the task
    registry (``MAWPS:test``, ``STG_E:ood_test``), with that task (for its checker)."""
    from .records import load_records

    if Path(spec).exists() or ":" not in spec:
        return load_records(spec, on_error=on_error), None
    name, split = spec.rsplit(":", 1)
    task = get_task(name)
    if split not in task.splits():
        raise TaskError(f"--data {spec}: task {task.name} has no split {split!r}; splits: {sorted(task.splits())}")
    return task.load(split), task


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
        # The irrelevant items' values, then random spans of the question text.
        placebo={"prefer": stg.H_IRRELEVANT_VALUES,
                 "exclude": [rf"{re.escape(n)}: -?\d+(?:\.\d+)?%?" for n in h_items]},
    ), overwrite=True)
    # The downstream tasks: the CAT release's files first (record for record, annotated
    # train/val), the hub otherwise. One format: the prompt ends "Answer: ", the target is
    # the bare answer (MAWPS's "Answer: 84.0" targets lose their prefix to the prompt).
    math_kw = dict(checker="numeric", instructions="builtin:math", demos="builtin:math", test_splits=("test", "ood"))
    register_task(Task(
        name="MAWPS", description="MAWPS math word problems; OOD: SVAMP (all 1000 records, made to defeat "
        "the shallow cues MAWPS-style training teaches)",
        source={"release": {"train": "MAWPS/mawps_train.jsonl", "val": "MAWPS/mawps_val.jsonl",
                            "test": "MAWPS/mawps_test.jsonl", "ood": "SVAMP/svamp_ood.jsonl",
                            "ood_val": "SVAMP/svamp_val.jsonl"},
                "answer_prefix": "Answer: ",
                "fallback": {"hub": "MU-NLPC/Calc-mawps", "splits": {"train": "train", "test": "test"},
                             "input": "{question} Answer: ", "target": "result", "target_transform": "number"}},
        **math_kw), overwrite=True)
    register_task(Task(
        name="SVAMP", description="SVAMP arithmetic word problems (Body. Question. Answer: ); OOD: MAWPS "
        "(all 2065 records, in SVAMP's format)",
        source={"release": {"train": "SVAMP/svamp_train.jsonl", "val": "SVAMP/svamp_val.jsonl",
                            "test": "SVAMP/svamp_test.jsonl", "ood": "MAWPS/mawps_ood.jsonl",
                            "ood_val": "MAWPS/mawps_val.jsonl"},
                "answer_prefix": "Answer: ",  # ood_val is MAWPS's own file
                "fallback": {"hub": "ChilleD/SVAMP", "splits": {"train": "train", "test": "test"},
                             "input": "{Body}. {Question}. Answer: ", "target": "Answer"}},
        **math_kw), overwrite=True)
    register_task(Task(
        name="GSM8K", description="GSM8K grade-school math; the target is the worked answer ending '#### N' "
        "(the release has val and test; train comes from the hub)",
        source={"release": {"val": "GSM8k/gsm8k_val.jsonl", "test": "GSM8k/gsm8k_test.jsonl"},
                "fallback": {"hub": "openai/gsm8k", "config": "main", "splits": {"train": "train", "test": "test"},
                             "input": "{question} Answer: ", "target": "answer"}},
        checker="gsm8k", instructions="builtin:math", demos="builtin:math"), overwrite=True)
    register_task(Task(
        name="ASDiv", description="ASDiv word problems (hub only: one hub split, cut 80/20 into train/test)",
        source={"hub": "EleutherAI/asdiv", "config": "asdiv",
                "splits": {"train": "validation[:80%]", "test": "validation[80%:]"},
                "input": "{body} {question} Answer: ", "target": "answer", "target_transform": "number"},
        checker="numeric", instructions="builtin:math", demos="builtin:math"), overwrite=True)
    register_task(Task(
        name="ARC-E", description="ARC-Easy science questions, answered with a choice letter (no OOD split)",
        source={"release": {"train": "ARC_E/ARC_E_train.jsonl", "val": "ARC_E/ARC_E_val.jsonl",
                            "test": "ARC_E/ARC_E_test.jsonl"},
                "fallback": {"hub": "allenai/ai2_arc", "config": "ARC-Easy",
                             "splits": {"train": "train", "val": "validation", "test": "test"},
                             "input": "{question}\n{choices}\nAnswer: ", "target": "answerKey",
                             "target_transform": "choice_letter"}},
        checker="mc", instructions="builtin:generic"), overwrite=True)


_builtin()
