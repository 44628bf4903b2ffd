"""cattune eval: accuracy of a trained model on one or more JSONL test sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..masks import DEFAULT_SPAN_COLUMNS, SPAN_COLUMNS
from ..evaluate import CHECKERS, evaluate
from ..records import load_records
from ..models import layers_option, load_model, training_settings
from .common import format_ratio, format_table, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Greedy-decode the answer of every record and check it against the target. "
        "Prints a table (accuracy, causal/non-causal attention ratio) and writes JSON with per-record predictions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="trained model directory, hub id, .gguf file or builtin:NAME (e.g. builtin:smollm2-135m-instruct)")
    p.add_argument("--data", action="append", required=True, help="JSONL test set; repeat for several")
    p.add_argument("--checker", choices=sorted(CHECKERS), default="exact", help="answer checker")
    p.add_argument("--batch-size", type=int, default=32, help="generation batch size")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest target + 4 tokens")
    p.add_argument("--span-columns", choices=SPAN_COLUMNS, default=None,
                   help="value tokens counted as causal for the attention ratio; default: as the model was trained "
                   f"(its cattune.json), else {DEFAULT_SPAN_COLUMNS}")
    p.add_argument("--layers", type=layers_option, default=None,
                   help="layers whose attention the ratio averages: 'all' or indices such as -1 (write a list as "
                   "--layers=-2,-1); default: the model's cat_layers (cattune.json), else all")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="prompts through the tokenizer's chat template; default: as the model was trained "
                   "(cattune.json), else off")
    p.add_argument("--out", default=None,
                   help="JSON output (default: MODEL/eval_results.json for a model directory, else ./eval_results.json)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub repository")
    return p


def run(args) -> int:
    datasets = {path: load_records(path) for path in args.data}  # fail on bad input before loading a model
    settings = training_settings(args.model, chat_template=args.chat_template, span_columns=args.span_columns,
                                 layers=args.layers)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    results, rows = {}, []
    for path, records in datasets.items():
        res = evaluate(model, tokenizer, records, checker=args.checker, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, desc=Path(path).name,
                       span_columns=settings["span_columns"], layers=settings["layers"],
                       chat_template=settings["chat_template"])
        results[path] = res.to_json()
        ratio = "-" if res.attention_ratio is None else format_ratio(res.attention_ratio)
        rows.append([path, res.n, res.accuracy, ratio])
    print(format_table(["data", "n", "accuracy", "attn ratio"], rows))
    default_out = Path(args.model) / "eval_results.json" if Path(args.model).is_dir() else Path("eval_results.json")
    out = Path(args.out) if args.out else default_out
    write_json(out, {"model": args.model, "checker": args.checker, "settings": settings, "results": results})
    print(f"wrote {out}")
    return 0
