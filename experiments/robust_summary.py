"""Worst case over seeds and executions: the robustness table of experiments/README.md.

    python experiments/robust_summary.py experiments/demo_robust/t1 experiments/demo_robust/t2 [--baseline-of a200=now]

Each argument is an experiment output folder (its results.jsonl), run under one
execution (e.g. --threads 1, --threads 2). Per task label: CAT - baseline on each
(seed, execution), paired, with its minimum, and CAT's mean and minimum accuracy. A task
whose runs differ from another's only in CAT's settings can borrow that task's baseline
(`--baseline-of a200=now`). Accuracy in %.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(folder: Path) -> dict:
    runs = {}
    for line in (folder / "results.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        runs[(r["task"], r["arm"], r["seed"])] = {k: 100 * v["accuracy"] for k, v in r["tests"].items()}
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--baseline-of", action="append", default=[], metavar="TASK=TASK")
    p.add_argument("--iid", default="iid_val")
    p.add_argument("--ood", default="ood_val")
    args = p.parse_args()
    borrow = dict(x.split("=", 1) for x in args.baseline_of)
    executions = {f.name: load(f) for f in args.folders}
    tasks = list(dict.fromkeys(t for runs in executions.values() for (t, arm, _) in runs if arm == "cat"))
    print(f"| task | runs | baseline OOD | CAT IID | CAT OOD (min) | CAT - baseline OOD: mean (min) "
          f"| CAT - baseline IID: mean (min) | per run OOD gain |")
    print("|---|---|---|---|---|---|---|---|")
    for task in tasks:
        gains, iid_gains, cat_ood, cat_iid, base_ood, cells = [], [], [], [], [], []
        for name, runs in executions.items():
            for (t, arm, seed), cat in sorted(runs.items(), key=lambda kv: kv[0][2]):
                if t != task or arm != "cat":
                    continue
                base = runs.get((borrow.get(task, task), "baseline", seed))
                if base is None:
                    continue
                gains.append(cat[args.ood] - base[args.ood])
                iid_gains.append(cat[args.iid] - base[args.iid])
                cat_ood.append(cat[args.ood])
                cat_iid.append(cat[args.iid])
                base_ood.append(base[args.ood])
                cells.append(f"{name}/s{seed} {gains[-1]:+.1f}")
        if not gains:
            continue
        print(f"| {task} | {len(gains)} | {statistics.mean(base_ood):.1f} | {statistics.mean(cat_iid):.1f} "
              f"| {statistics.mean(cat_ood):.1f} ({min(cat_ood):.1f}) | {statistics.mean(gains):+.1f} ({min(gains):+.1f}) "
              f"| {statistics.mean(iid_gains):+.1f} ({min(iid_gains):+.1f}) | {', '.join(cells)} |")


if __name__ == "__main__":
    main()
