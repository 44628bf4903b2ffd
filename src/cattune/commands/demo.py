"""cattune demo: plain fine-tuning vs CAT on the Spurious Token Game, IID vs OOD.

Runs the demo recipe (``builtin:demo``: src/cattune/resources/experiments/demo.yaml)
through the experiment runner: STG_E (seed 42: the paper's released files), the embedded
tiny Llama trained on train_M twice per seed (gamma 0 = baseline, then CAT), both
evaluated on iid_test and ood_test; then prints the table and writes results.json and
the charts. ``--variants E,H`` adds STG_H (exact integer answers, its 3000 records).
Every option's default is the recipe's; the recipe says where its settings come from.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import statistics
import time
from pathlib import Path

from ..experiment import RESULTS, ConfigError, RunSpec, parse_config, read_results, resolve_config_path, run_experiment
from ..files import check_writable_dir, load_config_file, output_lock
from ..masks import SPAN_COLUMNS
from .common import HelpFormatter, format_table, parse_layers, write_json

RECIPE = "builtin:demo"
ARMS = ("baseline", "cat")
VARIANTS = ("E", "H")
# The demo's ratio chart wants the same number of points whatever the run length.
LOG_POINTS = 0.02


def _recipe() -> tuple[Path, dict]:
    path = resolve_config_path(RECIPE)
    return path, load_config_file(path)


def _entry(recipe: dict, variant: str) -> dict:
    return next(t for t in recipe["tasks"] if t["label"] == f"STG_{variant}")


def _layers_text(layers: list[int] | None) -> str:
    return "all" if layers is None else ",".join(str(i) for i in layers)


def build_parser() -> argparse.ArgumentParser:
    _, recipe = _recipe()
    train, e, h = recipe["train"], _entry(recipe, "E"), _entry(recipe, "H")
    e_args, h_args = {**train, **e.get("train_args", {})}, {**train, **h.get("train_args", {})}
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Everything runs on CPU with the embedded model, no download.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="demo_out",
                   help="output directory: results.json, demo.png (accuracy), ratio_STG_*.png (attention ratio "
                   "during training), attention_STG_*.png (heatmaps of an OOD record), the models, and the "
                   "experiment runner's results.jsonl, summary.md and logs/")
    p.add_argument("--seeds", type=int, default=recipe["seeds"],
                   help="training seeds per arm (the table shows mean and range)")
    p.add_argument("--variants", default="E", help="STG variants, comma-separated: E, H or E,H")
    p.add_argument("--split", default=e["train"], choices=["train_S", "train_M", "train_L"],
                   help="STG_E training split (STG_H trains on its 3000 records)")
    p.add_argument("--epochs", type=float, default=e_args["num_train_epochs"], help="STG_E training epochs")
    p.add_argument("--h-epochs", type=float, default=h_args["num_train_epochs"], help="STG_H training epochs")
    p.add_argument("--lr", type=float, default=e_args["learning_rate"],
                   help="STG_E learning rate (cosine schedule, 10%% warm-up)")
    p.add_argument("--h-lr", type=float, default=h_args["learning_rate"], help="STG_H learning rate")
    p.add_argument("--batch-size", type=int, default=train["per_device_train_batch_size"], help="per-step batch size")
    p.add_argument("--gamma", type=float, default=train["cat_gamma"], help="CAT arm: Re-Attention loss weight")
    p.add_argument("--alpha", type=float, default=e_args["cat_alpha"],
                   help="CAT arm on STG_E: target causal/other attention ratio (of the --layers' average)")
    p.add_argument("--gamma-decay", type=float, default=e_args["cat_gamma_decay"],
                   help="CAT arm on STG_E: gamma decay per epoch")
    p.add_argument("--layers", type=parse_layers, default=_layers_text(e_args["cat_layers"]),
                   help="CAT arm on STG_E: decoder layers whose attention the loss averages, comma-separated "
                   "(0 = first, -1 = last), or 'all' (the paper); write a list as --layers=-2,-1")
    p.add_argument("--h-alpha", type=float, default=h_args["cat_alpha"], help="CAT arm on STG_H: alpha")
    p.add_argument("--h-gamma-decay", type=float, default=h_args["cat_gamma_decay"],
                   help="CAT arm on STG_H: gamma decay per epoch")
    p.add_argument("--h-layers", type=parse_layers, default=_layers_text(h_args["cat_layers"]),
                   help="CAT arm on STG_H: layers, as --layers")
    p.add_argument("--span-columns", choices=SPAN_COLUMNS, default=train["cat_span_columns"],
                   help="value tokens that become causal columns ('all' = the paper's whole span)")
    p.add_argument("--threads", type=int, default=recipe["threads"],
                   help=f"torch CPU threads (default: {recipe['threads']}, the recipe's; 0: torch's own choice); "
                   "the tiny model's ops are too small to gain from more")
    p.add_argument("--jobs", type=int, default=1,
                   help="train N runs at once, each in its own process with --threads threads; the results are "
                   "those of one run at a time")
    p.add_argument("--limit", type=int, default=0, help="use only the first N records of each split (quick checks)")
    return p


def demo_config(args, variants: list[str]):
    """The recipe with the command line's settings: an ``ExperimentConfig``."""
    path, recipe = _recipe()
    data = copy.deepcopy(recipe)
    data["seeds"] = args.seeds
    data["threads"] = args.threads or None
    data["save_models"] = True  # `cattune explain --model OUT/STG_E_cat_seed0`
    data["train"].update(per_device_train_batch_size=args.batch_size, cat_gamma=args.gamma,
                         cat_span_columns=args.span_columns, logging_steps=LOG_POINTS, use_cpu=True)
    per_variant = {
        "E": {"train": args.split, "num_train_epochs": args.epochs, "learning_rate": args.lr,
              "cat_alpha": args.alpha, "cat_gamma_decay": args.gamma_decay, "cat_layers": args.layers},
        "H": {"num_train_epochs": args.h_epochs, "learning_rate": args.h_lr, "cat_alpha": args.h_alpha,
              "cat_gamma_decay": args.h_gamma_decay,
              "cat_layers": args.h_layers},
    }
    tasks = []
    for variant in variants:
        entry = copy.deepcopy(_entry(recipe, variant))
        settings = dict(per_variant[variant])
        entry["train"] = settings.pop("train", entry["train"])
        entry["train_args"] = {**entry.get("train_args", {}), **settings}
        if args.limit:
            entry["train_limit"] = entry["test_limit"] = args.limit
        tasks.append(entry)
    data["tasks"] = tasks
    return parse_config(data, path)


# The recipe's training fields, as the options that set them.
_OPTIONS = {"cat_alpha": "--alpha / --h-alpha", "cat_gamma": "--gamma",
            "cat_gamma_decay": "--gamma-decay / --h-gamma-decay", "cat_layers": "--layers / --h-layers",
            "num_train_epochs": "--epochs / --h-epochs", "learning_rate": "--lr / --h-lr",
            "per_device_train_batch_size": "--batch-size"}


def _option_error(message: str) -> str:
    """A config error from the demo's options, said in terms of the options rather than the recipe file."""
    detail = message.split(": ", 1)[1] if message.startswith(str(_recipe()[0])) else message
    named = [opt for field, opt in _OPTIONS.items() if re.search(rf"\b{field}\b", detail)]
    return f"invalid option{'s' if len(named) > 1 else ''} {', '.join(named)}: {detail}" if named else detail


def _runs(out: Path, results: list[dict], config) -> list[dict]:
    """The runner's result lines in the demo's own form (results.json)."""
    runs = []
    for r in results:
        entry = next(t for t in config.tasks if t.label == r["task"])
        history = json.loads((out / r["log"]).read_text(encoding="utf-8"))["log_history"]
        run = {"variant": r["task"].removeprefix("STG_"), "arm": r["arm"], "seed": r["seed"],
               "train_split": entry.train_split, "train_seconds": r["train_seconds"], "log_history": history}
        for split in ("iid_test", "ood_test"):
            run[split] = r["tests"][split]["accuracy"]
            run[f"{split}_attention_ratio"] = r["tests"][split]["attention_ratio"]
        if r.get("attention_plot"):
            run["attention_plot"] = f"attention_{r['task']}_{r['arm']}.png"
            shutil.copyfile(out / r["attention_plot"], out / run["attention_plot"])
        runs.append(run)
    return runs


def _keep_models(out: Path, results: list[dict]) -> None:
    # Where the demo has always put them (README: `cattune explain --model demo_out/STG_E_cat_seed0`).
    for r in results:
        run_id = RunSpec(r["task"], r["model"], r["arm"], int(r["seed"])).run_id
        source, target = out / "models" / run_id, out / f"{r['task']}_{r['arm']}_seed{r['seed']}"
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            source.replace(target)
    if (out / "models").is_dir() and not any((out / "models").iterdir()):
        (out / "models").rmdir()


def summarize(runs: list[dict]) -> list[list]:
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        for arm in ARMS:
            for split in ("iid_test", "ood_test"):
                accs = [r[split] for r in runs if r["arm"] == arm and r["variant"] == variant]
                if accs:
                    spread = f"{min(accs):.3f}-{max(accs):.3f}" if len(accs) > 1 else "-"
                    rows.append([f"STG_{variant}", arm, split, len(accs), statistics.mean(accs), spread])
    return rows


# Options that do not change what one seed's run should measure (the thread count does
# not change the tiny model's results): a run under them is comparable with the recipe's
# reference figures.
_COMPARABLE_OPTIONS = ("out", "seeds", "variants", "threads", "jobs")


def reference_lines(recipe: dict, args, defaults: dict, runs: list[dict]) -> list[str]:
    """This run beside the figures the README quotes (the recipe's ``reference:`` block).

    Figures move between machines (other CPU kernels, other float reduction orders), so
    the reference is a range over seeds and two executions; a run inside it is typical.
    """
    ref = recipe.get("reference")
    if not ref:
        return []
    changed = [k for k, v in vars(args).items() if k not in _COMPARABLE_OPTIONS and v != defaults.get(k)]
    if changed:
        options = ", ".join("--" + k.replace("_", "-") for k in changed)
        return [f"Not compared with the README's figures: {options} differ from the recipe's settings."]
    lines = [f"This run beside the README's figures (`{ref['command']}`, {ref['runs']}; accuracy in %, "
             "mean (lowest to highest)):"]
    for task, arms in ref["tasks"].items():
        variant = task.removeprefix("STG_")
        for arm, splits in arms.items():
            for split, (mean, low, high) in splits.items():
                if arm == "cat_minus_baseline":
                    mine = [100 * (c[split] - b[split]) for c in runs for b in runs
                            if c["variant"] == b["variant"] == variant and c["seed"] == b["seed"]
                            and c["arm"] == "cat" and b["arm"] == "baseline"]
                else:
                    mine = [100 * r[split] for r in runs if r["variant"] == variant and r["arm"] == arm]
                if not mine:
                    continue
                outside = [m for m in mine if not low - 0.05 <= m <= high + 0.05]
                verdict = "within the measured range" if not outside else \
                    f"{len(outside)} of {len(mine)} outside the measured range"
                values = ", ".join(f"{m:+.1f}" if arm == "cat_minus_baseline" else f"{m:.1f}" for m in mine)
                sign = "+" if arm == "cat_minus_baseline" else ""
                lines.append(f"  {task} {arm.replace('_', ' ')} {split}: this run {values}; README "
                             f"{mean:{sign}.1f} ({low:{sign}.1f} to {high:{sign}.1f}): {verdict}")
    return lines


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(v, split) for v in dict.fromkeys(r["variant"] for r in runs) for split in ("iid_test", "ood_test")]
    fig, ax = plt.subplots(figsize=(3 + 1.6 * len(groups), 3.6))
    width = 0.38
    for i, arm in enumerate(ARMS):
        means = [statistics.mean(r[s] for r in runs if r["arm"] == arm and r["variant"] == v) for v, s in groups]
        bars = ax.bar([x + (i - 0.5) * width for x in range(len(groups))], [m * 100 for m in means], width,
                      label="plain fine-tuning" if arm == "baseline" else "CAT")
        ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(groups)), [f"STG_{v} {s.split('_')[0].upper()}" for v, s in groups])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)
    seeds = len({r["seed"] for r in runs})
    ax.set_title(f"Spurious Token Game, tiny Llama, mean of {seeds} seed(s)")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def run(args) -> int:
    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    if args.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    variants = [v.strip().upper() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--variants takes E, H or E,H; got {args.variants!r}")
    out = Path(args.out)
    check_writable_dir(out, "--out")
    try:
        config = demo_config(args, variants)
    except ConfigError as e:  # the recipe file is sound: only an option can have broken it
        raise ValueError(_option_error(str(e))) from None
    started = time.time()
    # The demo trains afresh every time (the runner would keep runs finished under other
    # options), so it clears its own runs, and never an experiment's that shares the folder.
    # Cleared under the runner's lock: a demo still running in the same --out keeps its runs.
    with output_lock(out, "cattune demo"):
        if (out / RESULTS).exists():
            if not (out / "results.json").exists():
                raise ValueError(f"--out {out} holds an experiment's {RESULTS} that the demo did not write; "
                                 "give the demo another --out")
            (out / RESULTS).unlink()
    run_experiment(config, out=out, progress=args.jobs == 1, jobs=args.jobs)
    results, _ = read_results(out / RESULTS)
    runs = _runs(out, results, config)
    _keep_models(out, results)
    table = format_table(["benchmark", "arm", "test set", "seeds", "accuracy", "range"], summarize(runs))
    print(table)
    _, recipe = _recipe()
    reference = reference_lines(recipe, args, vars(build_parser().parse_args([])), runs)
    for line in reference:
        print(line)
    settings = {k: v for k, v in vars(args).items()}
    write_json(out / "results.json", {"settings": settings, "runs": runs, "table": summarize(runs),
                                      "reference": reference, "seconds": round(time.time() - started, 1)})
    plot(runs, out / "demo.png")
    from ..explain import plot_ratio_curve

    written = ["results.json", "demo.png"]
    for variant in variants:
        first = {r["arm"]: r["log_history"] for r in runs if r["variant"] == variant and r["seed"] == 0}
        entry = next(t for t in config.tasks if t.label == f"STG_{variant}")
        alpha = {**config.train, **entry.train_args}["cat_alpha"]
        curve = plot_ratio_curve(first, out / f"ratio_STG_{variant}.png", alpha=alpha,
                                 title=f"STG_{variant}: causal/other attention during training, seed 0")
        written += [curve.name] + [r["attention_plot"] for r in runs if r["variant"] == variant and r["seed"] == 0]
    print(f"wrote {', '.join(str(out / w) for w in written)} ({time.time() - started:.0f}s)")
    return 0
