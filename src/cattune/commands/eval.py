"""cattune eval: accuracy of a trained model on one or more JSONL test sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..masks import DEFAULT_SPAN_COLUMNS, SPAN_COLUMNS
from ..evaluate import CHECKERS, evaluate
from ..records import load_records
from .common import format_ratio, format_table, load_model, parse_layers, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Greedy-decode the answer of every record and check it against the target. "
        "Prints a table (accuracy, causal/non-causal attention ratio) and writes JSON with per-record predictions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="trained model directory (or hub id)")
    p.add_argument("--data", action="append", required=True, help="JSONL test set; repeat for several")
    p.add_argument("--checker", choices=sorted(CHECKERS), default="exact", help="answer checker")
    p.add_argument("--batch-size", type=int, default=32, help="generation batch size")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest target + 4 tokens")
    p.add_argument("--span-columns", choices=SPAN_COLUMNS, default=DEFAULT_SPAN_COLUMNS,
                   help="value tokens counted as causal for the attention ratio (as in training)")
    p.add_argument("--layers", type=parse_layers, default="all",
                   help="layers whose attention the ratio averages, as cat_layers in training: 'all' or indices "
                   "such as -1 (write a list as --layers=-2,-1)")
    p.add_argument("--out", default=None, help="JSON output (default: MODEL/eval_results.json)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub repository")
    return p


def run(args) -> int:
    datasets = {path: load_records(path) for path in args.data}  # fail on bad input before loading a model
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    results, rows = {}, []
    for path, records in datasets.items():
        res = evaluate(model, tokenizer, records, checker=args.checker, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, desc=Path(path).name, span_columns=args.span_columns,
                       layers=args.layers)
        results[path] = res.to_json()
        ratio = "-" if res.attention_ratio is None else format_ratio(res.attention_ratio)
        rows.append([path, res.n, res.accuracy, ratio])
    print(format_table(["data", "n", "accuracy", "attn ratio"], rows))
    out = Path(args.out) if args.out else Path(args.model) / "eval_results.json"
    write_json(out, {"model": args.model, "checker": args.checker, "results": results})
    print(f"wrote {out}")
    return 0
