"""An experiment config: tasks x models x arms x seeds, checked before any run trains.

The format is documented in docs/experiments.md. ``builtin:NAME`` names a recipe shipped
in cattune/resources/experiments (``builtin:stg``: the STG grid; ``builtin:demo``: the
tiny STG_E demo; ``builtin:smollm2_stg``: STG on SmolLM2-135M-Instruct; ``builtin:smollm2_downstream``:
MAWPS <-> SVAMP on it; ``builtin:gemma3_stg``: STG_E on Gemma 3 270M). A config's
``train:`` block starts from CATConfig's own defaults, or from another config's block
named by ``train_from`` (``builtin:demo`` for the tiny model's tuned settings).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..evaluate import EVAL_BATCH_SIZE
from ..files import load_config_file
from ..shipped import is_builtin, shipped_file, shipped_names
from ..tasks import Task, TaskError, get_task, load_task_file
from .arms import ARMS
from ..fields import _typed, typed_fields


# Set by the runner itself: a config that sets them is refused.
RESERVED_TRAIN = ("output_dir", "seed", "save_strategy", "report_to")
DEFAULT_EVAL = {"batch_size": EVAL_BATCH_SIZE, "max_new_tokens": None}

_CONFIG_KEYS = {"name", "output", "seeds", "arms", "models", "tasks", "task_files", "train", "train_from", "arm_args",
                "eval", "save_models", "save_predictions", "threads", "checkpoint_minutes", "description", "reference"}
_TASK_ENTRY_KEYS = {"task", "label", "train", "test", "files", "train_limit", "test_limit", "train_args", "seeds"}
_MODEL_KEYS = {"name", "path", "tiny", "lora", "trust_remote_code"}


class ConfigError(ValueError):
    """The experiment config is wrong; the message names the config file and the field."""


@dataclass
class TaskEntry:
    label: str
    task: Task
    train_split: str
    tests: dict[str, str]  # test-set name -> split of the task
    train_limit: int | None = None
    test_limit: int | None = None
    train_args: dict = field(default_factory=dict)
    seeds: list[int] | None = None  # this task's own seeds (a costly task runs fewer); else the config's
    raw: Any = None


@dataclass
class ModelEntry:
    label: str
    path: str | None = None  # None: the embedded tiny model
    tiny: dict = field(default_factory=dict)  # cattune.tiny.build overrides (hidden_size, vocab_size, ...)
    lora: dict | None = None  # cattune.models.lora_model kwargs; {} = the release's LoRA setting
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
    save_models: bool | list[int] = False  # True, or the seeds whose models are kept
    save_predictions: bool = False
    threads: int | None = None
    checkpoint_minutes: float = 10.0  # a run training longer saves a checkpoint to resume from; 0: never
    path: Path | None = None

    def seeds_of(self, task: str) -> list[int]:
        """The seeds a task runs: its own ``seeds`` if it has them, else the config's."""
        entry = next((t for t in self.tasks if t.label == task), None)
        return entry.seeds if entry is not None and entry.seeds else self.seeds

    def set_seeds(self, seeds: list[int]) -> None:
        """Every task runs these seeds (``cattune experiment --seeds``)."""
        self.seeds = seeds
        for t in self.tasks:
            t.seeds = None

    def keeps_model(self, seed: int) -> bool:
        return self.save_models is True or (isinstance(self.save_models, list) and seed in self.save_models)


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
    if is_builtin(spec):
        return shipped_file(spec, "experiments", "{name}.yaml", "experiment")
    path = Path(spec)
    if not path.is_file():
        shipped = ", ".join(f"builtin:{n}" for n in shipped_names("experiments", "{name}.yaml"))
        raise FileNotFoundError(f"{path}: no such experiment config (shipped ones: {shipped})")
    return path



def _coerce_train_args(args: dict, where: str) -> dict:
    """Check names and value types against CATConfig, before any run trains."""
    import typing

    from ..config import CATConfig

    return typed_fields(args, typing.get_type_hints(CATConfig), where, ConfigError,
                        "CATConfig/TrainingArguments field",
                        {k: "is set by the experiment runner (per run)" for k in RESERVED_TRAIN})


def _check_train_args(config: "ExperimentConfig", where: str) -> None:
    """Build every run's CATConfig once, so that a value TrainingArguments rejects fails now,
    not after the first runs trained."""
    from ..config import CATConfig

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


def _minutes(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{where} must be a number of minutes, 0 or more, got {value!r}")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    try:
        return _typed(value, bool)
    except TypeError:
        raise ConfigError(f"{where} must be true or false, got {value!r}") from None


def _save_models(value: Any, where: str) -> bool | list[int]:
    # A list keeps the models of those seeds only: a real model's weights are large.
    if isinstance(value, list):
        return parse_seeds(value, where)
    try:
        return _flag(value, where)
    except ConfigError:
        raise ConfigError(f"{where} must be true, false or a list of seeds, got {value!r}") from None


def parse_seeds(value: Any, where: str) -> list[int]:
    """A seed count (3 -> [0, 1, 2]) or a list of distinct integers; ``where`` names the
    setting in the error."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: seeds must be a count or a list of integers")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where}: seeds must be >= 1")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: seeds repeat: {value}")
        if negative := [s for s in value if s < 0]:  # Python's random would take -3 as seed 3
            raise ConfigError(f"{where}: seeds must be 0 or more, got {negative[0]}")
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
    tiny = obj.get("tiny") or {}
    _check_kwargs(tiny, _tiny_options(), f"{where}: tiny")
    for key, value in tiny.items():  # sizes, counts, rope_theta: a bad one would fail hours into the grid
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 < value < math.inf:
            raise ConfigError(f"{where}: tiny: {key} must be a number > 0, got {value!r}")
    if lora is not None:
        import inspect

        from ..config import check_lora
        from ..models import lora_model

        _check_kwargs(lora, set(inspect.signature(lora_model).parameters) - {"model"}, f"{where}: lora")
        try:
            check_lora(**lora)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return ModelEntry(label=str(obj["name"]), path=path, tiny=dict(tiny), lora=lora,
                      trust_remote_code=_flag(obj.get("trust_remote_code", False), f"{where}: trust_remote_code"),
                      raw=obj)


def _tiny_options() -> set[str]:
    import inspect

    from ..tiny import TINY_CONFIG, build

    return set(TINY_CONFIG) | (set(inspect.signature(build).parameters) - {"texts", "seed", "overrides"})


def _check_kwargs(value: Any, allowed: set[str], where: str) -> None:
    # LlamaConfig and friends swallow unknown keywords: a typo would silently change nothing.
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of options, got {value!r}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown options {unknown}; allowed: {sorted(allowed)}")


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
    used, known = {str(train_split), *tests.values()}, task.splits()
    if unknown := sorted(used - known):
        raise ConfigError(f"{where}: unknown split(s) {unknown} of task {task.name}; its splits: {sorted(known)}")
    if obj.get("files"):  # a split named wrong would silently read the task's own data
        if unused := sorted(set(map(str, obj["files"])) - used):
            raise ConfigError(f"{where}: files names split(s) {unused} that this entry does not use: it trains on "
                              f"{str(train_split)!r} and tests on {sorted(set(tests.values()))} (set train:/test: "
                              "to use them)")
        for split, path in task.source["files"].items():
            if not Path(path).is_file():
                raise ConfigError(f"{where}: files: {split}: no such file: {path}")
    label = str(obj.get("label", task.name if train_split == task.train_split else f"{task.name}_{train_split}"))
    for name in ("train_limit", "test_limit"):
        v = obj.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{where}: {name} must be a positive integer")
    train_args = _coerce_train_args(dict(obj.get("train_args") or {}), f"{where} train_args")
    seeds = parse_seeds(obj["seeds"], f"{where}: seeds") if obj.get("seeds") is not None else None
    return TaskEntry(label=label, task=task, train_split=str(train_split), tests=tests,
                     train_limit=obj.get("train_limit"), test_limit=obj.get("test_limit"),
                     train_args=train_args, seeds=seeds, raw=obj)


def _train_from(spec: Any, where: str, base_dir: Path, _seen: tuple = ()) -> dict:
    # No implicit base: settings tuned for one model (the tiny one's 30 epochs at lr 3e-4,
    # alpha 2000 on its last layer) must not reach another one unasked.
    if spec is None:
        return {}
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{where}: train_from must be builtin:NAME or the path of another experiment config")
    try:
        path = resolve_config_path(spec if is_builtin(spec) or Path(spec).is_absolute() else base_dir / spec)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: train_from: {e}") from None
    if path.resolve() in _seen:
        raise ConfigError(f"{where}: train_from: {spec} leads back to itself")
    data = load_config_file(path, error=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping")
    train = _train_from(data.get("train_from"), str(path), path.parent, _seen + (path.resolve(),))
    train.update(_coerce_train_args(dict(data.get("train") or {}), f"{path}: train"))
    return train


def parse_config(data: dict, path: Path | None = None) -> ExperimentConfig:
    try:
        return _parse_config(data, path)
    except (TypeError, AttributeError) as e:  # a value of a shape no check foresaw: still the config's fault
        raise ConfigError(f"{path or 'config'}: a field has a value of the wrong type ({e})") from None


def _parse_config(data: dict, path: Path | None = None) -> ExperimentConfig:
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
    train = _train_from(data.get("train_from"), where, base_dir, (path.resolve(),) if path else ())
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
    _check_reference(data.get("reference"), f"{where}: reference")
    output = Path(data.get("output") or f"{name}_results")
    config = ExperimentConfig(
        name=name, output=output, seeds=parse_seeds(data.get("seeds", 1), f"{where}: seeds"), arms=list(arms),
        models=model_entries, tasks=task_entries, train=train, arm_args=arm_args, eval=ev,
        save_models=_save_models(data.get("save_models", False), f"{where}: save_models"),
        save_predictions=_flag(data.get("save_predictions", False), f"{where}: save_predictions"),
        threads=_positive_int(data.get("threads"), f"{where}: threads"),
        checkpoint_minutes=_minutes(data.get("checkpoint_minutes", ExperimentConfig.checkpoint_minutes),
                                    f"{where}: checkpoint_minutes"),
        path=path,
    )
    _check_train_args(config, where)
    return config


def _check_reference(ref: Any, where: str) -> None:
    # The figures a recipe measured, which `cattune demo` prints a run beside; the runner
    # ignores them. {command, runs, tasks: {LABEL: {ARM: {TEST: [mean, low, high]}}}}
    if ref is None:
        return
    if not isinstance(ref, dict) or not {"command", "runs", "tasks"} <= set(ref) or not isinstance(ref["tasks"], dict):
        raise ConfigError(f"{where}: must be a mapping with 'command', 'runs' and 'tasks'")
    def triple(v: Any) -> bool:
        return isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)

    for task, arms in ref["tasks"].items():
        if not isinstance(arms, dict):
            raise ConfigError(f"{where}: tasks.{task}: give {{ARM: {{TEST: [mean, low, high]}}}}")
        for arm, tests in arms.items():
            if not isinstance(tests, dict) or not all(triple(v) for v in tests.values()):
                raise ConfigError(f"{where}: tasks.{task}.{arm}: give {{TEST: [mean, low, high]}} per arm")


def load_config(spec: str | os.PathLike) -> ExperimentConfig:
    """Read and check an experiment config (YAML or JSON; ``builtin:NAME`` for shipped ones)."""
    path = resolve_config_path(spec)
    return parse_config(load_config_file(path, error=ConfigError), path)


def plan(config: ExperimentConfig) -> list[RunSpec]:
    """Every run, in execution order: task, model, seed, then arm (so that the arms of a
    seed finish together and paired differences grow run by run)."""
    return [RunSpec(t.label, m.label, arm, seed)
            for t in config.tasks for m in config.models for seed in (t.seeds or config.seeds) for arm in config.arms]


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



def select(config: ExperimentConfig, seeds: list[int] | None = None, arms: list[str] | None = None,
           tasks: list[str] | None = None) -> Callable[[RunSpec], bool] | None:
    """A filter on the planned runs: some seeds, arms and task labels (each must be in the
    config). The config itself is unchanged, so summaries still cover every finished run."""
    all_seeds = sorted({s for t in config.tasks for s in config.seeds_of(t.label)})
    for what, chosen, have in (("seed", seeds, all_seeds), ("arm", arms, config.arms),
                               ("task", tasks, [t.label for t in config.tasks])):
        missing = [x for x in chosen or [] if x not in have]
        if missing:
            raise ConfigError(f"{config.path or config.name}: no {what} {missing} in the config (it has {have})")
    if not (seeds or arms or tasks):
        return None
    return lambda spec: ((not seeds or spec.seed in seeds) and (not arms or spec.arm in arms)
                         and (not tasks or spec.task in tasks))

