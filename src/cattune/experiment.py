"""``cattune experiment CONFIG.yaml``: a grid of tasks x models x arms x seeds.

Arms: ``baseline`` (plain fine-tuning, cat_gamma 0), ``cat`` (the Re-Attention loss on
the causal annotation) and ``placebo`` (the same loss, the columns moved to spans that
carry no causal information: :func:`cattune.tasks.placebo_records`). Every run trains
with :class:`cattune.trainer.CATTrainer` and is evaluated on every test set of its task.

Outputs, in the output directory:

- ``results.jsonl``: one line per finished run, appended and flushed as it finishes. A
  killed experiment started again skips the runs already there, identified by
  (task, model, arm, seed); a half-written last line is dropped.
- ``summary.md`` / ``summary.csv``: mean and standard deviation over seeds per arm,
  and the paired CAT - baseline and CAT - placebo differences with a 95% t-interval
  over seeds (rewritten atomically after every run); summary.md embeds the plots below.
- ``plots/``: per task and model the attention-ratio curves of the first seed's arms,
  and for the first seed each run's heatmap of the first record of its last test set.
- ``logs/RUN.json``: the trainer's log history (loss_ce, loss_attn, attn_ratio, ...),
  readable by ``cattune.explain.plot_ratio_curve``.
- ``predictions/RUN.jsonl`` and ``models/RUN/`` when ``save_predictions`` /
  ``save_models`` are set.

The config format is documented in docs/experiments.md; ``builtin:stg`` is the shipped
STG configuration (src/cattune/resources/experiments/stg.yaml).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import enum
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import types as pytypes
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .commands.common import format_ratio
from .masks import DEFAULT_SPAN_COLUMNS
from .records import Record, atomic_write_text, load_config_file
from .tasks import Task, TaskError, get_task, load_task_file, placebo_records

ARMS = ("baseline", "cat", "placebo")
# The STG demo's settings (cattune.commands.demo), chosen on seed-7 validation data.
DEFAULT_TRAIN = {
    "num_train_epochs": 30,
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 16,
    "warmup_steps": 0.1,
    "lr_scheduler_type": "cosine",
    "cat_alpha": 2000.0,
    "cat_gamma": 1.0,
    "cat_gamma_decay": 0.0,
    "cat_layers": [-1],
    "cat_span_columns": DEFAULT_SPAN_COLUMNS,
    "logging_steps": 50,
}
# Set by the runner itself: a config that sets them is refused.
RESERVED_TRAIN = ("output_dir", "seed", "save_strategy", "report_to")
DEFAULT_EVAL = {"batch_size": 32, "max_new_tokens": None}
RESULTS = "results.jsonl"

_CONFIG_KEYS = {"name", "output", "seeds", "arms", "models", "tasks", "task_files", "train", "arm_args", "eval",
                "save_models", "save_predictions", "threads", "description"}
_TASK_ENTRY_KEYS = {"task", "label", "train", "test", "files", "train_limit", "test_limit", "train_args"}
_MODEL_KEYS = {"name", "path", "tiny", "lora", "trust_remote_code"}


class ConfigError(ValueError):
    """The experiment config is wrong; the message names the config file and the field."""


# --------------------------------------------------------------------------- config


@dataclass
class TaskEntry:
    label: str
    task: Task
    train_split: str
    tests: dict[str, str]  # test-set name -> split of the task
    train_limit: int | None = None
    test_limit: int | None = None
    train_args: dict = field(default_factory=dict)
    raw: Any = None


@dataclass
class ModelEntry:
    label: str
    path: str | None = None  # None: the embedded tiny model
    tiny: dict = field(default_factory=dict)  # cattune.tiny.build overrides (hidden_size, vocab_size, ...)
    lora: dict | None = None  # cattune.trainer.lora_model kwargs; {} = the release's LoRA setting
    trust_remote_code: bool = False
    raw: Any = None

    @property
    def is_tiny(self) -> bool:
        return self.path is None


@dataclass
class ExperimentConfig:
    name: str
    output: Path
    seeds: list[int]
    arms: list[str]
    models: list[ModelEntry]
    tasks: list[TaskEntry]
    train: dict
    arm_args: dict[str, dict]
    eval: dict
    save_models: bool = False
    save_predictions: bool = False
    threads: int | None = None
    path: Path | None = None


@dataclass(frozen=True)
class RunSpec:
    task: str
    model: str
    arm: str
    seed: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.task, self.model, self.arm, self.seed)

    @property
    def run_id(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.task}__{self.model}__{self.arm}__seed{self.seed}")


def resolve_config_path(spec: str | os.PathLike) -> Path:
    """A path, or ``builtin:NAME`` for a config shipped in cattune/resources/experiments."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        shipped = Path(str(resources.files("cattune") / "resources" / "experiments"))
        path = shipped / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in shipped.glob("*.yaml"))
            raise FileNotFoundError(f"no shipped experiment named {name!r}; shipped: {', '.join(known) or 'none'}")
        return path
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such experiment config (shipped ones: builtin:stg)")
    return path


def _coerce_train_args(args: dict, where: str) -> dict:
    """Check names and value types against CATConfig, before any run trains; YAML strings
    such as "1e-3" or "false" become the number or boolean the field takes."""
    from .trainer import CATConfig

    types = typing.get_type_hints(CATConfig)
    out = {}
    for k, v in args.items():
        if k not in types:
            close = [n for n in types if n.replace("_", "") == k.replace("_", "")]
            raise ConfigError(f"{where}: {k!r} is not a CATConfig/TrainingArguments field"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        if k in RESERVED_TRAIN:
            raise ConfigError(f"{where}: {k!r} is set by the experiment runner (per run)")
        try:
            out[k] = _typed(v, types[k])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {k} must be {_type_name(types[k])}, got {v!r}") from None
    return out


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _typed(value: Any, tp: Any) -> Any:
    """``value`` as a field of type ``tp`` takes it; TypeError/ValueError when it cannot.
    Ints stay ints in float fields (the settings hash of finished runs depends on them)."""
    origin, members = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, pytypes.UnionType):
        exact = [m for m in members if _matches(value, m)]
        if exact:
            return _typed(value, exact[0])
        for m in members:  # a string spelling a number or a boolean
            try:
                return _typed(value, m)
            except (TypeError, ValueError):
                continue
        raise TypeError(value)
    if tp is type(None):
        if value is None:
            return None
        raise TypeError(value)
    if origin is typing.Literal:
        if value in members:
            return value
        raise ValueError(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError(value)
    if tp in (int, float):
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, str):
            return tp(value.strip())
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return value
        raise TypeError(value)
    if tp is str or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        if isinstance(value, str):
            return value
        raise TypeError(value)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise TypeError(value)
        return [_typed(v, members[0]) for v in value] if members else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    return value  # a library type (e.g. ParallelismConfig): TrainingArguments checks it


def _matches(value: Any, tp: Any) -> bool:
    base = typing.get_origin(tp) or tp
    if tp is type(None):
        return value is None
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(base, type) and isinstance(value, base) and not (base is not bool and isinstance(value, bool))


def _type_name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, pytypes.UnionType) else (tp,)
    return " or ".join(names.get(m, getattr(m, "__name__", str(m))) for m in members)


def _check_train_args(config: "ExperimentConfig", where: str) -> None:
    """Build every run's CATConfig once, so that a value TrainingArguments rejects fails now,
    not after the first runs trained."""
    from .trainer import CATConfig

    for entry in config.tasks:
        for arm in config.arms:
            try:
                CATConfig(**{**train_args_for(config, entry, arm), "output_dir": "unused", "report_to": []})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: task {entry.label}, arm {arm}: {e}") from None


def _positive_int(value: Any, where: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def _flag(value: Any, where: str) -> bool:
    try:
        return _typed(value, bool)
    except TypeError:
        raise ConfigError(f"{where} must be true or false, got {value!r}") from None


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: seeds must be a count or a list of integers")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where}: seeds must be >= 1")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: seeds repeat: {value}")
        return list(value)
    raise ConfigError(f"{where}: seeds must be a count or a non-empty list of integers, got {value!r}")


def _model_entry(obj: Any, where: str) -> ModelEntry:
    if isinstance(obj, str):
        obj = {"name": obj} if obj == "tiny" else {"name": Path(obj).name or obj, "path": obj}
    if not isinstance(obj, dict) or "name" not in obj:
        raise ConfigError(f"{where}: a model is 'tiny', a path/hub id, or an object with 'name'")
    unknown = set(obj) - _MODEL_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown model fields {sorted(unknown)}; allowed: {sorted(_MODEL_KEYS)}")
    path = obj.get("path")
    if path is None and obj["name"] != "tiny" and "tiny" not in obj:
        path = obj["name"]  # a bare name that is not "tiny" is a directory or hub id
    lora = obj.get("lora")
    if lora is True:
        lora = {}
    elif lora is False:
        lora = None
    return ModelEntry(label=str(obj["name"]), path=path, tiny=dict(obj.get("tiny") or {}), lora=lora,
                      trust_remote_code=_flag(obj.get("trust_remote_code", False), f"{where}: trust_remote_code"),
                      raw=obj)


def _task_entry(obj: Any, where: str, base_dir: Path) -> TaskEntry:
    if isinstance(obj, str):
        obj = {"task": obj}
    if not isinstance(obj, dict) or "task" not in obj:
        raise ConfigError(f"{where}: a task entry is a task name or an object with 'task'")
    unknown = set(obj) - _TASK_ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown task-entry fields {sorted(unknown)}; allowed: {sorted(_TASK_ENTRY_KEYS)}")
    try:
        task = get_task(obj["task"])
    except TaskError as e:
        raise ConfigError(f"{where}: {e}") from None
    if obj.get("files"):
        if not isinstance(obj["files"], dict):
            raise ConfigError(f"{where}: files must map split names to JSONL paths")
        task = task.with_files({k: str(v) for k, v in obj["files"].items()}, base_dir=base_dir)
    train_split = obj.get("train", task.train_split)
    test = obj.get("test", list(task.test_splits))
    if isinstance(test, str):
        test = [test]
    if isinstance(test, list):
        tests = {str(s): str(s) for s in test}
    elif isinstance(test, dict):
        tests = {str(k): str(v) for k, v in test.items()}
    else:
        raise ConfigError(f"{where}: test must be a split name, a list of them or a {{name: split}} object")
    if not tests:
        raise ConfigError(f"{where}: no test set")
    label = str(obj.get("label", task.name if train_split == task.train_split else f"{task.name}_{train_split}"))
    for name in ("train_limit", "test_limit"):
        v = obj.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{where}: {name} must be a positive integer")
    train_args = _coerce_train_args(dict(obj.get("train_args") or {}), f"{where} train_args")
    return TaskEntry(label=label, task=task, train_split=str(train_split), tests=tests,
                     train_limit=obj.get("train_limit"), test_limit=obj.get("test_limit"),
                     train_args=train_args, raw=obj)


def parse_config(data: dict, path: Path | None = None) -> ExperimentConfig:
    where = str(path) if path else "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the config must be a mapping")
    unknown = set(data) - _CONFIG_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown fields {sorted(unknown)}; allowed: {sorted(_CONFIG_KEYS)}")
    base_dir = path.parent if path else Path.cwd()
    for tf in data.get("task_files") or []:
        tf_path = Path(tf) if Path(tf).is_absolute() else base_dir / tf
        try:
            load_task_file(tf_path)
        except (TaskError, FileNotFoundError) as e:
            raise ConfigError(f"{where}: task_files: {e}") from None
    name = str(data.get("name") or (path.stem if path else "experiment"))
    arms = data.get("arms", list(ARMS))
    if isinstance(arms, str):
        arms = [arms]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms or len(set(arms)) != len(arms):
        raise ConfigError(f"{where}: arms must be distinct names from {ARMS}, got {arms}")
    models = data.get("models", ["tiny"])
    if isinstance(models, (str, dict)):
        models = [models]
    model_entries = [_model_entry(m, f"{where}: models[{i}]") for i, m in enumerate(models)]
    if "tasks" not in data or not data["tasks"]:
        raise ConfigError(f"{where}: 'tasks' is required (a list of task names or entries)")
    task_list = data["tasks"] if isinstance(data["tasks"], list) else [data["tasks"]]
    task_entries = [_task_entry(t, f"{where}: tasks[{i}]", base_dir) for i, t in enumerate(task_list)]
    for kind, labels in (("task", [t.label for t in task_entries]), ("model", [m.label for m in model_entries])):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"{where}: {kind} labels must be unique, repeated: {dup} (set 'label'/'name')")
    train = dict(DEFAULT_TRAIN)
    train.update(_coerce_train_args(dict(data.get("train") or {}), f"{where}: train"))
    arm_args = {}
    for arm, args in (data.get("arm_args") or {}).items():
        if arm not in ARMS:
            raise ConfigError(f"{where}: arm_args: unknown arm {arm!r}")
        arm_args[arm] = _coerce_train_args(dict(args or {}), f"{where}: arm_args.{arm}")
    if "cat_gamma" in arm_args.get("baseline", {}):
        raise ConfigError(f"{where}: the baseline arm always has cat_gamma 0")
    ev = dict(DEFAULT_EVAL)
    ev_raw = data.get("eval") or {}
    if set(ev_raw) - set(DEFAULT_EVAL):
        raise ConfigError(f"{where}: eval: unknown fields {sorted(set(ev_raw) - set(DEFAULT_EVAL))}")
    ev.update(ev_raw)
    ev["batch_size"] = _positive_int(ev["batch_size"], f"{where}: eval.batch_size", allow_none=False)
    ev["max_new_tokens"] = _positive_int(ev["max_new_tokens"], f"{where}: eval.max_new_tokens")
    output = Path(data.get("output") or f"{name}_results")
    config = ExperimentConfig(
        name=name, output=output, seeds=_seeds(data.get("seeds", 1), f"{where}: seeds"), arms=list(arms),
        models=model_entries, tasks=task_entries, train=train, arm_args=arm_args, eval=ev,
        save_models=_flag(data.get("save_models", False), f"{where}: save_models"),
        save_predictions=_flag(data.get("save_predictions", False), f"{where}: save_predictions"),
        threads=_positive_int(data.get("threads"), f"{where}: threads"), path=path,
    )
    _check_train_args(config, where)
    return config


def load_config(spec: str | os.PathLike) -> ExperimentConfig:
    """Read and check an experiment config (YAML or JSON; ``builtin:NAME`` for shipped ones)."""
    path = resolve_config_path(spec)
    return parse_config(load_config_file(path, error=ConfigError), path)


def plan(config: ExperimentConfig) -> list[RunSpec]:
    """Every run, in execution order: task, model, seed, then arm (so that the arms of a
    seed finish together and paired differences grow run by run)."""
    return [RunSpec(t.label, m.label, arm, seed)
            for t in config.tasks for m in config.models for seed in config.seeds for arm in config.arms]


def train_args_for(config: ExperimentConfig, entry: TaskEntry, arm: str) -> dict:
    args = dict(config.train)
    args.update(entry.train_args)
    args.update(config.arm_args.get(arm, {}))
    if arm == "baseline":
        args["cat_gamma"] = 0.0
    return args


def settings_hash(config: ExperimentConfig, entry: TaskEntry, model: ModelEntry, arm: str) -> str:
    blob = json.dumps({"task": entry.raw, "model": model.raw, "train": train_args_for(config, entry, arm),
                       "eval": config.eval}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- results file


def read_results(path: str | os.PathLike, repair: bool = False) -> tuple[list[dict], int]:
    """Finished runs from a results JSONL, and how many lines were unusable (a line cut
    by a kill). With ``repair``, the file is rewritten without them (atomically)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    raw = path.read_text(encoding="utf-8")
    good, bad, seen = [], 0, set()
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key = (obj["task"], obj["model"], obj["arm"], int(obj["seed"]))
            obj["tests"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
            continue
        if key in seen:  # two processes on one output: keep the first
            bad += 1
            continue
        seen.add(key)
        good.append(obj)
    if repair and (bad or (raw and not raw.endswith("\n"))):
        atomic_write_text(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in good))
    return good, bad


def append_result(path: Path, result: dict) -> None:
    """One line, flushed and synced: a kill leaves at most this line half-written."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- statistics

# Two-sided 95% quantiles of Student's t, df 1..30.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile; < 1e-3 off for df > 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% t-interval (NaN bounds with one pair)."""
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(diffs)
    if n == 1:
        return mean, math.nan, math.nan
    half = t_quantile_975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def summarize(results: list[dict], config: ExperimentConfig | None = None) -> list[dict]:
    """One row per (task, model, test set): each arm's mean/std over seeds, the mean
    test-set attention ratio, and the paired differences CAT - baseline / CAT - placebo."""
    groups: dict[tuple[str, str, str], dict[str, dict[int, dict]]] = {}
    for r in results:
        for test, res in r["tests"].items():
            groups.setdefault((r["task"], r["model"], test), {}).setdefault(r["arm"], {})[int(r["seed"])] = res

    def order(key):
        if config is None:
            return (0, key)
        tasks = [t.label for t in config.tasks]
        models = [m.label for m in config.models]
        t = tasks.index(key[0]) if key[0] in tasks else len(tasks)
        m = models.index(key[1]) if key[1] in models else len(models)
        tests = next((list(e.tests) for e in config.tasks if e.label == key[0]), [])
        s = tests.index(key[2]) if key[2] in tests else len(tests)
        return (t, m, s, key)

    rows = []
    for key in sorted(groups, key=order):
        arms = groups[key]
        row: dict[str, Any] = {"task": key[0], "model": key[1], "test": key[2]}
        for arm in ARMS:
            by_seed = arms.get(arm, {})
            accs = [v["accuracy"] for v in by_seed.values()]
            ratios = [v["attention_ratio"] for v in by_seed.values() if v.get("attention_ratio") is not None]
            row[f"{arm}_n"] = len(accs)
            row[f"{arm}_mean"] = statistics.fmean(accs) if accs else math.nan
            row[f"{arm}_std"] = statistics.stdev(accs) if len(accs) > 1 else math.nan
            row[f"{arm}_attn_ratio"] = statistics.fmean(ratios) if ratios else math.nan
        for other in ("baseline", "placebo"):
            a, b = arms.get("cat", {}), arms.get(other, {})
            seeds = sorted(set(a) & set(b))
            mean, lo, hi = paired_interval([a[s]["accuracy"] - b[s]["accuracy"] for s in seeds])
            row[f"cat_minus_{other}"] = mean
            row[f"cat_minus_{other}_lo"] = lo
            row[f"cat_minus_{other}_hi"] = hi
            row[f"cat_minus_{other}_pairs"] = len(seeds)
        rows.append(row)
    return rows


CSV_COLUMNS = (["task", "model", "test"]
               + [f"{a}_{s}" for a in ARMS for s in ("n", "mean", "std", "attn_ratio")]
               + [f"cat_minus_{o}{s}" for o in ("baseline", "placebo") for s in ("", "_lo", "_hi", "_pairs")])


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:+.1f}"


def summary_markdown(rows: list[dict], title: str = "Experiment", arms: list[str] | None = None) -> str:
    arms = arms or list(ARMS)
    head = ["task", "model", "test", "seeds"] + [a for a in arms]
    diffs = [o for o in ("baseline", "placebo") if "cat" in arms and o in arms]
    head += [f"CAT - {o} [95% CI]" for o in diffs]
    lines = [f"# {title}", "",
             "Accuracy in %: mean ± standard deviation over seeds. Differences are paired by seed, "
             "with a 95% t-interval over the seeds (needs at least 2 pairs).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["task"], r["model"], r["test"], str(max(r[f"{a}_n"] for a in arms))]
        for a in arms:
            if r[f"{a}_n"] == 0:
                cells.append("-")
            else:
                std = "" if math.isnan(r[f"{a}_std"]) else f" ± {_pct(r[f'{a}_std'])}"
                cells.append(f"{_pct(r[f'{a}_mean'])}{std}")
        for o in diffs:
            m, lo, hi = r[f"cat_minus_{o}"], r[f"cat_minus_{o}_lo"], r[f"cat_minus_{o}_hi"]
            ci = "" if math.isnan(lo) else f" [{_signed(lo)}, {_signed(hi)}]"
            cells.append(f"{_signed(m)}{ci}")
        lines.append("| " + " | ".join(cells) + " |")
    ratio_arms = [a for a in arms if any(not math.isnan(r[f"{a}_attn_ratio"]) for r in rows)]
    if ratio_arms:
        lines += ["", "Mean causal/non-causal attention ratio on each test set's annotation (docs/method.md "
                  "section 3: a1/a0 over the rows that produce annotated keys):", "",
                  "| task | model | test | " + " | ".join(ratio_arms) + " |",
                  "|---|---|---|" + "|".join("---" for _ in ratio_arms) + "|"]
        for r in rows:
            vals = ["-" if math.isnan(r[f"{a}_attn_ratio"]) else format_ratio(r[f"{a}_attn_ratio"]) for a in ratio_arms]
            lines.append(f"| {r['task']} | {r['model']} | {r['test']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def summary_plots(out: Path, results: list[dict], config: ExperimentConfig | None = None) -> str:
    """Markdown embedding, per task and model, the attention-ratio curves of the first
    seed's arms (drawn here from ``logs/``) and each arm's heatmap (drawn by the run)."""
    from .explain import plot_ratio_curve

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["model"]), []).append(r)
    entries = {t.label: t for t in config.tasks} if config else {}
    parts = []
    for (task, model), runs in groups.items():
        seeds = {int(r["seed"]) for r in runs}
        # The config's first seed is the one whose runs drew heatmaps (run_one).
        first = config.seeds[0] if config and config.seeds[0] in seeds else min(seeds)
        runs = sorted((r for r in runs if int(r["seed"]) == first), key=lambda r: ARMS.index(r["arm"]))
        lines = []
        logs = {r["arm"]: out / r["log"] for r in runs if (out / r["log"]).is_file()}
        alpha = train_args_for(config, entries[task], "cat").get("cat_alpha") if task in entries else None
        curve = out / "plots" / f"{task}__{model}__ratio.png"
        # Redrawn only when a log is newer: the summary is rewritten after every run.
        stale = not curve.is_file() or any(p.stat().st_mtime > curve.stat().st_mtime for p in logs.values())
        if logs and stale:
            try:
                plot_ratio_curve(logs, curve, alpha=alpha,
                                 title=f"{task}, {model}: causal/other attention, seed {first}")
            except ValueError as e:  # no annotated rows in this task's logs, or a broken log
                print(f"{task}, {model}: no attention-ratio plot: {e}", file=sys.stderr)
        if logs and curve.is_file():
            lines.append(f"![attention ratio during training]({curve.relative_to(out).as_posix()})")
        for r in runs:
            if r.get("attention_plot") and (out / r["attention_plot"]).is_file():
                lines.append(f"![{r['arm']}: attention of the answer rows]({r['attention_plot']})")
        if lines:
            parts.append("\n\n".join([f"### {task}, {model}, seed {first}", *lines]))
    if not parts:
        return ""
    return ("\n## Plots\n\nThe causal/other attention ratio over training (every arm logs it; the target "
            "alpha dashed), and where each arm's model looks when it produces the answer to the first "
            "record of the last test set (causal spans in red).\n\n" + "\n\n".join(parts) + "\n")


def write_summary(out: Path, results: list[dict], config: ExperimentConfig | None = None) -> list[dict]:
    rows = summarize(results, config)
    title = f"Experiment {config.name}" if config else "Experiment"
    markdown = summary_markdown(rows, title, config.arms if config else None)
    atomic_write_text(out / "summary.md", markdown + summary_plots(out, results, config))
    atomic_write_text(out / "summary.csv", summary_csv(rows))
    return rows


# --------------------------------------------------------------------------- running


@dataclass
class TaskData:
    train: list[Record]
    tests: dict[str, list[Record]]
    tokenizer_texts: list[str]


def load_task_data(entry: TaskEntry, need_tokenizer_texts: bool = True) -> TaskData:
    train = entry.task.load(entry.train_split, limit=entry.train_limit)
    if not train:
        raise ConfigError(f"task {entry.label}: the training split {entry.train_split!r} is empty")
    tests = {name: entry.task.load(split, limit=entry.test_limit) for name, split in entry.tests.items()}
    texts = entry.task.tokenizer_texts() if need_tokenizer_texts else []
    return TaskData(train=train, tests=tests, tokenizer_texts=texts or [r.text for r in train])


def _build_model(model: ModelEntry, data: TaskData, seed: int):
    if model.is_tiny:
        from .tiny import build

        return build(data.tokenizer_texts, seed=seed, **model.tiny)
    from .models import load_model

    m, tok = load_model(model.path, trust_remote_code=model.trust_remote_code)
    if model.lora is not None:
        from .trainer import lora_model

        m = lora_model(m, **model.lora)
    return m, tok


def run_one(config: ExperimentConfig, entry: TaskEntry, model_entry: ModelEntry, spec: RunSpec, data: TaskData,
            out: Path, progress: bool = False) -> dict:
    """Train one arm on one seed and evaluate it on every test set: the result line."""
    from .evaluate import evaluate
    from .trainer import CATConfig, CATTrainer

    started = time.time()
    model, tok = _build_model(model_entry, data, spec.seed)
    train = data.train
    placebo_counts: dict[str, int] = {}
    if spec.arm == "placebo":
        train = placebo_records(train, entry.task, seed=spec.seed, tokenizer=tok, counts=placebo_counts)
    args = train_args_for(config, entry, spec.arm)
    tmp = tempfile.mkdtemp(prefix=f".{spec.run_id}.", dir=out)
    try:
        kw = {"disable_tqdm": not progress, **args,
              "output_dir": tmp, "seed": spec.seed, "save_strategy": "no", "report_to": []}
        targs = CATConfig(**kw)
        trainer = CATTrainer(model=model, args=targs, train_dataset=train, processing_class=tok,
                             base_model=model_entry.path)
        # Without progress bars the Trainer prints every log line; they go to logs/RUN.json instead.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.train()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    train_seconds = time.time() - started
    history = trainer.state.log_history
    if config.save_models:
        model_dir = out / "models" / spec.run_id
        trainer.save_model(str(model_dir))
        tok.save_pretrained(str(model_dir))
    tests, predictions = {}, {}
    for name, records in data.tests.items():
        res = evaluate(model, tok, records, checker=entry.task.checker_fn, batch_size=config.eval["batch_size"],
                       max_new_tokens=config.eval["max_new_tokens"], progress=progress,
                       desc=f"{spec.run_id} {name}", span_columns=trainer.args.cat_span_columns,
                       layers=trainer.args.cat_layers, chat_template=trainer.args.chat_template)
        tests[name] = {"accuracy": res.accuracy, "n": res.n, "correct": res.correct,
                       "attention_ratio": res.attention_ratio}
        predictions[name] = res.predictions
    attention_plot = None
    if spec.seed == config.seeds[0]:  # one heatmap per task, model and arm
        from .explain import plot_record

        name, records = list(data.tests.items())[-1]
        if records:
            path = plot_record(model, tok, records[0], out / "plots" / f"{spec.run_id}.png",
                               title=f"{spec.run_id}, {name} record 0", span_columns=trainer.args.cat_span_columns,
                               record_index=0, layers=trainer.args.cat_layers,
                               chat_template=trainer.args.chat_template)
            attention_plot = str(path.relative_to(out))
    log_path = out / "logs" / f"{spec.run_id}.json"
    atomic_write_text(log_path, json.dumps({"run": dataclasses.asdict(spec), "encode": trainer.encode_stats,
                                            "log_history": history}, indent=1) + "\n")
    if config.save_predictions:
        atomic_write_text(out / "predictions" / f"{spec.run_id}.jsonl", "".join(
            json.dumps({"test": name, **p}, ensure_ascii=False) + "\n"
            for name, preds in predictions.items() for p in preds))
    ratios = [h["attn_ratio"] for h in history if "attn_ratio" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "task": spec.task, "model": spec.model, "arm": spec.arm, "seed": spec.seed,
        "tests": tests,
        "train_split": entry.train_split, "n_train": len(train),
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "final_train_attn_ratio": ratios[-1] if ratios else None,
        "cat_gamma": args["cat_gamma"],
        "placebo": placebo_counts or None,
        "encode": trainer.encode_stats.get("train"),
        "settings": settings_hash(config, entry, model_entry, spec.arm),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - started, 1),
        "log": str(log_path.relative_to(out)),
        "attention_plot": attention_plot,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


@dataclass
class ExperimentReport:
    out: Path
    planned: list[RunSpec]
    ran: list[RunSpec] = field(default_factory=list)
    skipped: list[RunSpec] = field(default_factory=list)
    dropped_lines: int = 0
    changed: list[RunSpec] = field(default_factory=list)  # finished under other settings
    rows: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.ran) + len(self.skipped) == len(self.planned)


def _init_worker(threads: int, parent: int) -> None:
    """Start of a worker process for ``jobs > 1``."""
    import threading

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    # A parent killed with SIGKILL cannot stop its workers: each leaves on its own once it
    # is orphaned, instead of training on and writing into the output afterwards.
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def run_experiment(config: ExperimentConfig, out: str | os.PathLike | None = None, max_runs: int | None = None,
                   dry_run: bool = False, log: Callable[[str], None] | None = None,
                   progress: bool = False, jobs: int = 1,
                   only: Callable[[RunSpec], bool] | None = None) -> ExperimentReport:
    """Run every planned run not yet in ``OUT/results.jsonl``; see the module docstring.

    ``jobs > 1`` trains that many runs at once, each in its own (spawned) process with
    ``config.threads`` torch threads, 1 if unset; results are appended as runs finish, in
    any order. If a run fails, no new run starts, the running ones finish and are kept,
    then the error is raised. A script that calls this with ``jobs > 1`` needs the usual
    ``if __name__ == "__main__":`` guard of multiprocessing's spawn. ``only``: run only the
    planned runs it accepts (:func:`select`); the summary still covers every finished run.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if max_runs is not None and max_runs < 0:
        raise ValueError(f"max_runs must be 0 or more, got {max_runs}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out) if out is not None else config.output
    results_path = out / RESULTS
    runs = [spec for spec in plan(config) if only is None or only(spec)]
    report = ExperimentReport(out=out, planned=runs)
    done, bad = read_results(results_path, repair=not dry_run)
    report.dropped_lines = bad
    if bad:
        log(f"{results_path}: dropped {bad} unusable line(s) (a run cut off mid-write); those runs run again")
    finished = {(r["task"], r["model"], r["arm"], int(r["seed"])): r for r in done}
    entries = {t.label: t for t in config.tasks}
    models = {m.label: m for m in config.models}
    todo = []
    for spec in runs:
        if spec.key in finished:
            report.skipped.append(spec)
            expected = settings_hash(config, entries[spec.task], models[spec.model], spec.arm)
            if finished[spec.key].get("settings") not in (None, expected):
                report.changed.append(spec)
        else:
            todo.append(spec)
    if report.changed:
        log(f"warning: {len(report.changed)} finished run(s) used other settings than the config now has "
            f"(e.g. {report.changed[0].run_id}); they are kept. Delete their lines from {results_path} or use "
            "another output directory to run them again.")
    log(f"experiment {config.name}: {len(runs)} runs, {len(report.skipped)} already finished, {len(todo)} to run "
        f"-> {out}")
    if dry_run:
        for spec in runs:
            log(f"  {'done' if spec.key in finished else 'todo'}  {spec.run_id}")
        return report
    out.mkdir(parents=True, exist_ok=True)
    for spec in todo:  # training directories of runs killed last time
        for stale in out.glob(f".{glob.escape(spec.run_id)}.*"):
            shutil.rmtree(stale, ignore_errors=True)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if max_runs is not None:
        todo = todo[:max_runs]
    cache: dict[str, TaskData] = {}
    results = list(done)
    started = time.time()

    def task_data(spec: RunSpec) -> TaskData:
        if spec.task not in cache:
            cache.clear()  # one task's data loaded at a time (runs are ordered by task)
            cache[spec.task] = load_task_data(entries[spec.task],
                                              need_tokenizer_texts=any(m.is_tiny for m in config.models))
        return cache[spec.task]

    def finished_run(spec: RunSpec, result: dict) -> None:
        append_result(results_path, result)
        results.append(result)
        report.ran.append(spec)
        accs = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result["tests"].items())
        log(f"[{time.time() - started:6.0f}s] done {len(report.ran)}/{len(todo)}: {spec.run_id}: {accs} "
            f"({result['seconds']:.0f}s)")
        report.rows = write_summary(out, results, config)

    if jobs == 1:
        for i, spec in enumerate(todo, 1):
            log(f"[{time.time() - started:6.0f}s] run {i}/{len(todo)}: {spec.run_id}")
            result = run_one(config, entries[spec.task], models[spec.model], spec, task_data(spec), out,
                             progress=progress)
            finished_run(spec, result)
    elif todo:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        if progress:
            log("note: --progress shows no bars with more than one job")
        # spawn, not fork: the workers must not inherit torch's or the tokenizers' thread pools
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(config.threads or 1, os.getpid()))
        queue, running, error = list(todo), {}, None
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    spec = queue.pop(0)
                    log(f"[{time.time() - started:6.0f}s] start {spec.run_id}")
                    running[pool.submit(run_one, config, entries[spec.task], models[spec.model], spec,
                                        task_data(spec), out, False)] = spec
                done_now, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done_now:
                    spec = running.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as e:  # let the other running runs finish and keep them
                        if error is None:
                            error = e
                            log(f"{spec.run_id} failed ({type(e).__name__}: {e}); starting no more runs, "
                                f"waiting for the {len(running)} still running")
                        queue.clear()
                        continue
                    finished_run(spec, result)
        except BaseException:  # Ctrl-C: the workers get the signal too; do not wait for them
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if error is not None:
            raise error
    if not report.ran:  # nothing new: still (re)write the summary of what is there
        report.rows = write_summary(out, results, config) if results else []
    return report


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run a grid of tasks x models x arms {baseline, cat, placebo} x seeds from a YAML config, "
        "resumably: results.jsonl gets one line per finished run, summary.md/summary.csv the table "
        "(mean ± std over seeds, CAT - baseline and CAT - placebo with 95% intervals). "
        "Shipped config: builtin:stg (the STG table on the embedded model). Format: docs/experiments.md.",
    )
    p.add_argument("config", help="experiment YAML/JSON file, or builtin:NAME for a shipped one")
    p.add_argument("--out", help="output directory (default: the config's 'output', relative to the current directory)")
    p.add_argument("--seeds", type=int, metavar="N", help="override the config's seeds with 0..N-1")
    p.add_argument("--only-seeds", type=_int_list, metavar="S,S", help="run only these seeds, e.g. 0 or 0,3 "
                   "(to reproduce one cell of a grid); the summary covers every finished run")
    p.add_argument("--only-arms", type=_name_list, metavar="ARM,ARM", help=f"run only these arms ({', '.join(ARMS)})")
    p.add_argument("--only-tasks", type=_name_list, metavar="LABEL,LABEL", help="run only these task labels")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the config's 'threads', else torch's)")
    p.add_argument("--max-runs", type=int, metavar="N", help="stop after N new runs (run again to continue)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once, each in its own process with --threads torch threads (1 if unset); "
                   "with the same --threads the results are those of one run at a time (default: 1)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are finished; train nothing")
    p.add_argument("--summary-only", action="store_true", help="rewrite summary.md/summary.csv from results.jsonl")
    p.add_argument("--progress", action="store_true", help="show training and evaluation progress bars")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,3; got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def select(config: ExperimentConfig, seeds: list[int] | None = None, arms: list[str] | None = None,
           tasks: list[str] | None = None) -> Callable[[RunSpec], bool] | None:
    """A filter on the planned runs: some seeds, arms and task labels (each must be in the
    config). The config itself is unchanged, so summaries still cover every finished run."""
    for what, chosen, have in (("seed", seeds, config.seeds), ("arm", arms, config.arms),
                               ("task", tasks, [t.label for t in config.tasks])):
        missing = [x for x in chosen or [] if x not in have]
        if missing:
            raise ConfigError(f"{config.path or config.name}: no {what} {missing} in the config (it has {have})")
    if not (seeds or arms or tasks):
        return None
    return lambda spec: ((not seeds or spec.seed in seeds) and (not arms or spec.arm in arms)
                         and (not tasks or spec.task in tasks))


def run(args) -> int:
    config = load_config(args.config)
    if args.seeds is not None:
        config.seeds = _seeds(args.seeds, "--seeds")
    only = select(config, args.only_seeds, args.only_arms, args.only_tasks)
    if args.threads:
        config.threads = args.threads
    out = Path(args.out) if args.out else config.output
    if args.summary_only:
        results, bad = read_results(out / RESULTS)
        if not results:
            print(f"no finished runs in {out / RESULTS}", file=sys.stderr)
            return 1
        rows = write_summary(out, results, config)
        print(summary_markdown(rows, f"Experiment {config.name}", config.arms))
        return 0
    if not args.dry_run:
        from .files import check_writable_dir

        check_writable_dir(out, "--out" if args.out else "output")
    report = run_experiment(config, out=out, max_runs=args.max_runs, dry_run=args.dry_run, progress=args.progress,
                            jobs=args.jobs, only=only)
    if args.dry_run:
        return 0
    if report.rows:
        print(summary_markdown(report.rows, f"Experiment {config.name}", config.arms))
    remaining = len(report.planned) - len(report.ran) - len(report.skipped)
    where = (f"; results in {out / RESULTS}, table in {out / 'summary.md'} and {out / 'summary.csv'}"
             if report.rows else "; no finished run yet, so no table")
    print(f"{len(report.ran)} run(s) done now, {len(report.skipped)} earlier, {remaining} left{where}",
          file=sys.stderr)
    return 0
