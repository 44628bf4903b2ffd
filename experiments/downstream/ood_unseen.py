"""The OOD test figures without the records that chose the settings.

The downstream OOD test sets are whole data sets (MAWPS:ood is all 1000 SVAMP records),
so they hold the other data set's validation split (MAWPS:ood_val, svamp_val's 200), on
which the settings were chosen. This script drops those records from every run's answers
(``predictions/RUN.jsonl``, kept by ``save_predictions``) and summarizes what is left as
the experiment report does (mean ± std over seeds, paired 95% t-intervals), as a further
test set ``ood_unseen``:

    python experiments/downstream/ood_unseen.py docs/results/smollm2_downstream

It writes ``ood_unseen.md`` and ``ood_unseen.csv`` beside the results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cattune.experiment.report import summary_csv, summary_markdown, summarize
from cattune.files import atomic_write_text
from cattune.tasks import get_task

TEST, HELD_OUT, NAME = "ood", "ood_val", "ood_unseen"


def unseen_results(out: Path) -> list[dict]:
    """results.jsonl's lines with one test set each: the OOD test without the task's ood_val prompts."""
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    seen: dict[str, set[str]] = {}
    rows = []
    for r in results:
        if TEST not in r["tests"]:
            continue
        if r["task"] not in seen:
            seen[r["task"]] = {rec.prompt for rec in get_task(r["task"]).load(HELD_OUT)}
        path = out / "predictions" / f"{Path(r['log']).stem}.jsonl"  # the run's id, as the runner names its files
        if not path.exists():
            raise SystemExit(f"{path}: no answers for this run (set save_predictions: true and run it again)")
        answers = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ood = [a for a in answers if a["test"] == TEST]
        if len(ood) != r["tests"][TEST]["n"]:
            raise SystemExit(f"{path}: {len(ood)} answers on {TEST!r}, results.jsonl says {r['tests'][TEST]['n']}")
        kept = [a for a in ood if a["prompt"] not in seen[r["task"]]]
        correct = sum(bool(a["correct"]) for a in kept)
        rows.append({**r, "tests": {NAME: {"accuracy": correct / len(kept), "n": len(kept), "correct": correct}}})
    return rows


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    out = Path(argv[0])
    rows = unseen_results(out)
    if not rows:
        raise SystemExit(f"{out}: no finished run has an {TEST!r} test")
    per_run = ["", "| run | records | correct | accuracy |", "|---|---|---|---|"] + [
        f"| {r['task']} {r['arm']} seed {r['seed']} | {r['tests'][NAME]['n']} | {r['tests'][NAME]['correct']} | "
        f"{100 * r['tests'][NAME]['accuracy']:.1f} |" for r in rows]
    summary = summarize(rows)
    title = f"OOD test without the {HELD_OUT} records ({out.name})"
    atomic_write_text(out / f"{NAME}.md", summary_markdown(summary, title=title) + "\n".join(per_run) + "\n")
    atomic_write_text(out / f"{NAME}.csv", summary_csv(summary))
    print(f"wrote {out / (NAME + '.md')} and {out / (NAME + '.csv')} ({len(rows)} runs)")


if __name__ == "__main__":
    main(sys.argv[1:])
