"""Experiments: a grid of tasks x models x arms {baseline, cat, placebo} x seeds.

In pipeline order: ``config`` reads and checks a YAML config (the training arguments'
types with ``cattune.fields``), ``arms`` says what each arm trains on (the placebo's spans),
``runner`` runs what is not yet in ``results.jsonl``, ``report`` turns the results into
the summary. The command is ``cattune experiment`` (``cattune.commands.experiment``).
"""

from .arms import ARMS, placebo_annotation, placebo_records
from .config import (
    DEFAULT_EVAL, RESERVED_TRAIN, ConfigError, ExperimentConfig, ModelEntry, RunSpec, TaskEntry, load_config,
    parse_config, plan, resolve_config_path, select, settings_hash, train_args_for,
)
from .report import (
    CSV_COLUMNS, compare_results, paired_interval, summarize, summary_csv, summary_markdown, summary_plots, t_quantile_975,
    write_summary,
)
from .runner import RESULTS, ExperimentReport, TaskData, append_result, load_task_data, read_results, run_experiment, run_one

__all__ = [
    "ARMS", "placebo_annotation", "placebo_records",
    "DEFAULT_EVAL", "RESERVED_TRAIN", "ConfigError", "ExperimentConfig", "ModelEntry", "RunSpec",
    "TaskEntry", "load_config", "parse_config", "plan", "resolve_config_path", "select", "settings_hash",
    "train_args_for",
    "CSV_COLUMNS", "compare_results", "paired_interval", "summarize", "summary_csv", "summary_markdown", "summary_plots",
    "t_quantile_975", "write_summary",
    "RESULTS", "ExperimentReport", "TaskData", "append_result", "load_task_data", "read_results", "run_experiment",
    "run_one",
]
