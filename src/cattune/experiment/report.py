"""The summary of an experiment: pure functions from ``results.jsonl`` lines to tables.

Per task, model and test set: each arm's mean and standard deviation over seeds, and
the paired differences CAT - baseline and CAT - placebo with a 95% t-interval over
seeds (and, where every answer is a number, the mean absolute error of the answers); as
Markdown (with every run's figures and the plots) and CSV (``summary.csv``;
``runs.csv`` has one line per run and test set, to check a re-run against).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from ..text import format_ratio
from .arms import ARMS
from .config import ExperimentConfig, train_args_for

# Two-sided 95% quantiles of Student's t, df 1..30, as printed in t-tables: scipy (which
# has them exactly) is not among cattune's dependencies for this one number.
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
            by_seed = list(arms.get(arm, {}).values())
            row[f"{arm}_n"] = len(by_seed)
            row[f"{arm}_mean"], row[f"{arm}_std"] = _mean_std([v["accuracy"] for v in by_seed])
            row[f"{arm}_attn_ratio"] = _mean_std([v.get("attention_ratio") for v in by_seed])[0]
            row[f"{arm}_abs_error"], row[f"{arm}_abs_error_std"] = _mean_std([v.get("abs_error") for v in by_seed])
        for other in ("baseline", "placebo"):
            a, b = arms.get("cat", {}), arms.get(other, {})
            (row[f"cat_minus_{other}"], row[f"cat_minus_{other}_lo"], row[f"cat_minus_{other}_hi"],
             row[f"cat_minus_{other}_pairs"]) = _paired(a, b, "accuracy")
            (row[f"cat_minus_{other}_abs_error"], row[f"cat_minus_{other}_abs_error_lo"],
             row[f"cat_minus_{other}_abs_error_hi"], _) = _paired(a, b, "abs_error")
        rows.append(row)
    return rows


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and standard deviation of the values that are set (NaN where too few are)."""
    values = [v for v in values if v is not None]
    return (statistics.fmean(values) if values else math.nan,
            statistics.stdev(values) if len(values) > 1 else math.nan)


def _paired(a: dict[int, dict], b: dict[int, dict], metric: str) -> tuple[float, float, float, int]:
    """CAT - other on one metric, paired by the seeds both arms have it for: mean, 95% lo, hi, pairs."""
    seeds = [s for s in sorted(set(a) & set(b)) if a[s].get(metric) is not None and b[s].get(metric) is not None]
    return (*paired_interval([a[s][metric] - b[s][metric] for s in seeds]), len(seeds))


CSV_COLUMNS = (["task", "model", "test"]
               + [f"{a}_{s}" for a in ARMS for s in ("n", "mean", "std", "attn_ratio")]
               + [f"cat_minus_{o}{s}" for o in ("baseline", "placebo") for s in ("", "_lo", "_hi", "_pairs")]
               # numeric tasks only (empty otherwise): mean absolute error of the answers
               + [f"{a}_abs_error{s}" for a in ARMS for s in ("", "_std")]
               + [f"cat_minus_{o}_abs_error{s}" for o in ("baseline", "placebo") for s in ("", "_lo", "_hi")])


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:+.1f}"


def _spread(mean: float, std: float, fmt) -> str:
    """A 'mean ± std' cell, '-' without a mean and no '± ...' without a spread."""
    return "-" if math.isnan(mean) else fmt(mean) + ("" if math.isnan(std) else f" ± {fmt(std)}")


def _interval(mean: float, lo: float, hi: float, fmt) -> str:
    """A 'diff [lo, hi]' cell, '-' without a difference and no interval without one."""
    return "-" if math.isnan(mean) else fmt(mean) + ("" if math.isnan(lo) else f" [{fmt(lo)}, {fmt(hi)}]")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def summary_markdown(rows: list[dict], title: str = "Experiment", arms: list[str] | None = None) -> str:
    arms = arms or list(ARMS)
    head = ["task", "model", "test", "seeds"] + [a for a in arms]
    diffs = [o for o in ("baseline", "placebo") if "cat" in arms and o in arms]
    head += [f"CAT - {o} [95% CI]" for o in diffs]
    lines = [f"# {title}", "",
             "Accuracy in %: mean ± standard deviation over seeds. Differences are paired by seed, "
             "with a 95% t-interval over the seeds (needs at least 2 pairs).", ""]
    table = []
    for r in rows:
        cells = [r["task"], r["model"], r["test"], str(max(r[f"{a}_n"] for a in arms))]
        cells += [_spread(r[f"{a}_mean"], r[f"{a}_std"], _pct) for a in arms]
        cells += [_interval(*(r[f"cat_minus_{o}{s}"] for s in ("", "_lo", "_hi")), _signed) for o in diffs]
        table.append(cells)
    lines += _table(head, table)
    ratio_arms = [a for a in arms if any(not math.isnan(r[f"{a}_attn_ratio"]) for r in rows)]
    if ratio_arms:
        lines += ["", "Mean causal/non-causal attention ratio on each test set's annotation (docs/method.md "
                  "section 3: a1/a0 over the rows that produce annotated keys):", ""]
        lines += _table(["task", "model", "test", *ratio_arms],
                        [[r["task"], r["model"], r["test"],
                          *("-" if math.isnan(r[f"{a}_attn_ratio"]) else format_ratio(r[f"{a}_attn_ratio"])
                            for a in ratio_arms)] for r in rows])
    error_rows = [r for r in rows if any(not math.isnan(r[f"{a}_abs_error"]) for a in arms)]
    if error_rows:
        lines += ["", "Numeric answers: mean absolute error |answer - target| (lower is better), over the "
                  "answers that hold a number (runs.csv counts those that do not), mean ± standard deviation "
                  "over seeds; differences paired by seed with a 95% t-interval. A mean: a few far-off "
                  "answers can outweigh all the others (the predictions, where saved, hold every answer):", ""]
        table = []
        for r in error_rows:
            table.append([r["task"], r["model"], r["test"],
                          *(_spread(r[f"{a}_abs_error"], r[f"{a}_abs_error_std"], "{:.2f}".format) for a in arms),
                          *(_interval(*(r[f"cat_minus_{o}_abs_error{s}"] for s in ("", "_lo", "_hi")),
                                      "{:+.2f}".format) for o in diffs)])
        lines += _table(["task", "model", "test", *arms, *(f"CAT - {o} [95% CI]" for o in diffs)], table)
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


RUN_COLUMNS = ["task", "model", "arm", "seed", "test", "accuracy", "correct", "n", "attention_ratio",
               "train_seconds", "seconds", "cpu_capability", "threads", "torch", "abs_error", "unparsed"]


def _run_order(results: list[dict], config: ExperimentConfig | None) -> list[dict]:
    tasks = [t.label for t in config.tasks] if config else []
    return sorted(results, key=lambda r: (tasks.index(r["task"]) if r["task"] in tasks else len(tasks), r["task"],
                                          r["model"], int(r["seed"]), ARMS.index(r["arm"])))


def runs_csv(results: list[dict], config: ExperimentConfig | None = None) -> str:
    """One line per run and test set: what a re-run of one cell is checked against."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RUN_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in _run_order(results, config):
        ran = r.get("execution") or {}
        for test, res in r["tests"].items():
            ratio = res.get("attention_ratio")
            w.writerow({"task": r["task"], "model": r["model"], "arm": r["arm"], "seed": r["seed"], "test": test,
                        "accuracy": res["accuracy"], "correct": res["correct"], "n": res["n"],
                        "attention_ratio": "" if ratio is None else ratio,
                        "train_seconds": r.get("train_seconds", ""), "seconds": r.get("seconds", ""),
                        "cpu_capability": ran.get("cpu_capability", ""), "threads": ran.get("threads", ""),
                        "torch": ran.get("torch", ""), "abs_error": res.get("abs_error", ""),
                        "unparsed": res.get("unparsed", "")})
    return buf.getvalue()


def runs_markdown(results: list[dict], config: ExperimentConfig | None = None) -> str:
    """Every run's accuracies (%) and wall time, in the order the grid runs them."""
    if not results:
        return ""
    tests = list(dict.fromkeys(t for r in results for t in r["tests"]))
    head = ["task", "model", "seed", "arm", *tests, "train s", "total s", "CPU kernels"]
    table = []
    for r in _run_order(results, config):
        accs = [_pct(r["tests"][t]["accuracy"]) if t in r["tests"] else "-" for t in tests]
        secs = [f"{r[k]:.0f}" if isinstance(r.get(k), (int, float)) else "-" for k in ("train_seconds", "seconds")]
        cells = [r["task"], r["model"], str(r["seed"]), r["arm"], *accs, *secs,
                 (r.get("execution") or {}).get("cpu_capability", "-")]
        table.append(cells)
    return "\n".join(["", "## Every run", "", *_table(head, table)]) + "\n"


def summary_plots(out: Path, results: list[dict], config: ExperimentConfig | None = None) -> str:
    """Markdown embedding, per task and model, the attention-ratio curves of the first
    seed's arms (drawn here from ``logs/``) and each arm's heatmap (drawn by the run)."""
    from ..explain import plot_ratio_curve

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["model"]), []).append(r)
    entries = {t.label: t for t in config.tasks} if config else {}
    parts = []
    for (task, model), runs in groups.items():
        seeds = {int(r["seed"]) for r in runs}
        # The config's first seed is the one whose runs drew heatmaps (run_one).
        first = config.seeds_of(task)[0] if config and config.seeds_of(task)[0] in seeds else min(seeds)
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


def compare_results(results: list[dict], reference: list[dict], tolerance: float = 3.0,
                    title: str = "Comparison") -> tuple[str, int]:
    """Each run and test set found in both, side by side: accuracy here, in the reference
    (a committed grid) and the difference in points. Returns the Markdown and how many
    differ by more than ``tolerance`` points. Runs whose settings hashes differ trained
    something else: they are listed, not compared."""
    if not 0 <= tolerance < math.inf:  # nan compares False with every difference: all would pass
        raise ValueError(f"tolerance must be a number of points, 0 or more, got {tolerance}")
    ref = {(r["task"], r["model"], r["arm"], int(r["seed"])): r for r in reference}
    head = ["task", "model", "seed", "arm", "test", "here", "reference", "difference", "CPU kernels (here / reference)"]
    rows, other_settings, over, diffs = [], [], [], []
    for r in _run_order(results, None):
        key = (r["task"], r["model"], r["arm"], int(r["seed"]))
        if key not in ref:
            continue
        theirs = ref[key]
        if None not in (r.get("settings"), theirs.get("settings")) and r["settings"] != theirs["settings"]:
            other_settings.append("__".join(map(str, key)))
            continue
        kernels = " / ".join((x.get("execution") or {}).get("cpu_capability", "?") for x in (r, theirs))
        for test, res in r["tests"].items():
            if test not in theirs["tests"]:
                continue
            d = 100 * (res["accuracy"] - theirs["tests"][test]["accuracy"])
            diffs.append(abs(d))
            if abs(d) > tolerance + 1e-9:
                over.append(f"{key[0]} {key[1]} seed {key[3]} {key[2]} {test} ({d:+.1f})")
            rows.append([key[0], key[1], str(key[3]), key[2], test, _pct(res["accuracy"]),
                         _pct(theirs["tests"][test]["accuracy"]), f"{d:+.1f}", kernels])
    lines = [f"# {title}", ""]
    if rows:
        lines += ["Accuracy in %; the difference is here minus the reference, in points.", "", *_table(head, rows)]
        lines += ["", f"{len(rows)} result(s) in both; the largest difference is {max(diffs):.1f} points, "
                      f"the mean absolute one {statistics.mean(diffs):.1f}. "
                  + (f"{len(over)} differ{'s' if len(over) == 1 else ''} by more than {tolerance:g} points: "
                     f"{'; '.join(over)}." if over
                     else f"All within {tolerance:g} points.")]
    else:
        lines.append("No run of this experiment is in the reference with the same settings.")
    if other_settings:
        lines += ["", f"Not compared, trained with other settings than the reference's: {', '.join(other_settings)}."]
    return "\n".join(lines) + "\n", len(over)


def write_summary(out: Path, results: list[dict], config: ExperimentConfig | None = None) -> list[dict]:
    rows = summarize(results, config)
    title = f"Experiment {config.name}" if config else "Experiment"
    markdown = summary_markdown(rows, title, config.arms if config else None)
    atomic_write_text(out / "summary.md", markdown + runs_markdown(results, config) + summary_plots(out, results, config))
    atomic_write_text(out / "summary.csv", summary_csv(rows))
    atomic_write_text(out / "runs.csv", runs_csv(results, config))
    return rows

