"""cattune eval: accuracy of a trained model on one or more JSONL test sets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkers import CHECKERS
from ..evaluate import EVAL_BATCH_SIZE, evaluate
from ..files import check_distinct_paths, check_writable_file, model_inputs
from ..models import load_model
from ..reading import saved_reading
from ..tasks import load_data
from ..text import format_ratio
from .common import HelpFormatter, add_training_settings_options, format_table, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Greedy-decode the answer of every record and check it against the target. "
        "Prints a table (accuracy, causal/non-causal attention ratio and, where every target is a number, the "
        "mean absolute error of the answers) and writes JSON with per-record predictions.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="trained model directory, hub id, .gguf file or builtin:NAME (e.g. builtin:smollm2-135m-instruct)")
    p.add_argument("--data", action="append", required=True,
                   help="JSONL test set, or TASK:SPLIT from the task registry (e.g. MAWPS:test, STG_E:ood_test); "
                   "repeat for several")
    p.add_argument("--checker", choices=sorted(CHECKERS), default=None,
                   help="answer checker (default: the task's own for TASK:SPLIT, else exact)")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help="generation batch size")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest target + 4 tokens")
    add_training_settings_options(p, "in the attention ratio")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out broken records (reported with file and line) instead of stopping")
    p.add_argument("--out", default=None,
                   help="JSON output, replaced. Default: MODEL/eval_results.json for a model directory (results are "
                   "kept per data file: evaluating another file adds to it), else ./eval_results.json")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub repository")
    return p


def run(args) -> int:
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    in_model_dir = args.out is None and Path(args.model).is_dir()
    out = Path(args.out) if args.out else (Path(args.model) / "eval_results.json" if in_model_dir
                                           else Path("eval_results.json"))
    check_distinct_paths(inputs={"--data": args.data, "--model": model_inputs(args.model)}, outputs={"--out": [out]})
    check_writable_file(out, "--out")  # before the model loads and the evaluation runs
    on_error = "skip" if args.skip_invalid else "raise"
    datasets = {path: load_data(path, on_error=on_error) for path in args.data}  # bad input fails first
    reading = saved_reading(args.model, chat_template=args.chat_template, span_columns=args.span_columns,
                            layers=args.layers, max_length=args.max_length)
    settings = reading.to_json()
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    results, rows = {}, []
    for path, (records, task) in datasets.items():
        if not records:
            raise ValueError(f"{path}: no records to evaluate")
        checker = args.checker or (task.checker if task is not None else "exact")
        check = task.checker_fn if task is not None and checker == task.checker else checker
        res = evaluate(model, tokenizer, records, checker=check, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, desc=Path(path).name, reading=reading)
        if res.truncated:
            print(f"{path}: {res.truncated} of {res.n} prompts longer than max_length were cut from the left",
                  file=sys.stderr)
        results[path] = {**res.to_json(), "checker": checker, "settings": settings}
        ratio = "-" if res.attention_ratio is None else format_ratio(res.attention_ratio)
        rows.append([path, res.n, res.accuracy, ratio, "-" if res.abs_error is None else f"{res.abs_error:.2f}"])
    head = ["data", "n", "accuracy", "attn ratio", "mean abs error"]
    if all(r[-1] == "-" for r in rows):  # no numeric task: no error column
        head, rows = head[:-1], [r[:-1] for r in rows]
    print(format_table(head, rows))
    kept, weights = [], _weights_fingerprint(args.model)
    if in_model_dir:  # one file per model, one entry per data file: another evaluation adds, never erases
        earlier = _read_results(out, weights)
        kept = [p for p in earlier if p not in results]
        results = {**{p: earlier[p] for p in kept}, **results}
    write_json(out, {"model": args.model, "weights": weights, "settings": settings,
                     "results": results})
    print(f"wrote {out}" + (f" (in the model directory; kept earlier results for {len(kept)} other data file(s))"
                             if in_model_dir else ""))
    return 0


def _weights_fingerprint(model: str) -> str | None:
    """Names, sizes and times of a model directory's weight files: results of a model
    trained again into the same directory are not kept beside the new ones."""
    if not Path(model).is_dir():
        return None
    files = sorted(p for p in Path(model).iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _read_results(path: Path, weights: str | None) -> dict:
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict) or not isinstance(earlier.get("results"), dict):
        return {}
    if earlier.get("weights") != weights:
        print(f"{path}: earlier results are of other weights (the model was trained again): replaced",
              file=sys.stderr)
        return {}
    return earlier["results"]
