"""``cattune explain``: where a model looks when it produces an answer (``cattune.explain``).

    cattune explain --model out/model --data ood_test.jsonl --record 3 --out rec3.png
    cattune explain --data STG_E:ood_test --model out/model --record 0 --out r0.png --use-prediction
    cattune explain --log results/logs/E__tiny__cat__seed0.json --log results/logs/E__tiny__placebo__seed0.json \\
        --out ratio.png --alpha 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..explain import explain_record, plot_explanation, plot_ratio_curve
from ..files import atomic_write_text, check_distinct_paths, check_writable_file, model_inputs
from ..models import load_model
from ..reading import saved_reading
from ..tasks import load_data
from ..text import format_ratio
from .common import add_training_settings_options, number_option

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Attention reports. With --model/--data: a heatmap PNG of the answer rows' attention over the "
        "prompt tokens of one record (mean over heads and over the model's cat_layers, or --layers), causal spans marked. With --log: the "
        "causal/non-causal attention ratio over training steps.",
    )
    p.add_argument("--out", required=True, help="PNG file to write")
    heat = p.add_argument_group("heatmap of one record")
    heat.add_argument("--model", help="a model directory with its tokenizer (as `cattune train` saves it), a .gguf file, "
                      "builtin:NAME (e.g. builtin:smollm2-135m-instruct, builtin:gemma3-270m), or a hub id")
    heat.add_argument("--data", help="JSONL records (paper format) or TASK:SPLIT (e.g. STG_E:ood_test)")
    heat.add_argument("--record", type=int, default=0, help="0-based index of the record (default: 0)")
    heat.add_argument("--use-prediction", action="store_true",
                      help="rows producing the model's own greedy answer instead of the target")
    add_training_settings_options(heat, "in the heatmap")
    heat.add_argument("--show-special", action="store_true", help="also show BOS and other special tokens")
    heat.add_argument("--json", metavar="FILE", help="also write the numbers (tokens, weights, columns) as JSON")
    heat.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub repository")
    curve = p.add_argument_group("attention ratio over training")
    curve.add_argument("--log", action="append", metavar="FILE",
                       help="train_report.json or an experiment logs/RUN.json; repeat to overlay curves")
    curve.add_argument("--alpha", type=number_option(float, 0, strict=True), help="draw the target ratio alpha")
    return p


def run(args) -> int:
    check_distinct_paths(inputs={"--data": [args.data], "--log": args.log or [], "--model": model_inputs(args.model)},
                         outputs={"--out": [args.out], "--json": [args.json]})
    for option, path in (("--out", args.out), ("--json", args.json)):
        if path:
            check_writable_file(path, option)  # before a model loads
    if args.log:
        if args.model or args.data:
            raise ValueError("give either --log (ratio curve) or --model/--data (heatmap), not both")
        source = {Path(f).stem: f for f in args.log} if len(args.log) > 1 else args.log[0]
        path = plot_ratio_curve(source, args.out, alpha=args.alpha)
        print(f"wrote {path}")
        return 0
    if not args.model or not args.data:
        raise ValueError("a heatmap needs --model and --data (or give --log for a ratio curve)")
    records, _ = load_data(args.data)
    if not 0 <= args.record < len(records):
        raise ValueError(f"--record {args.record} is out of range: {args.data} has {len(records)} records")
    reading = saved_reading(args.model, chat_template=args.chat_template, span_columns=args.span_columns,
                            layers=args.layers, max_length=args.max_length)
    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    expl = explain_record(model, tok, records[args.record], use_prediction=args.use_prediction,
                          reading=reading, record_index=args.record)
    path = plot_explanation(expl, args.out, show_special=args.show_special)
    if args.json:
        atomic_write_text(args.json, json.dumps(expl.to_json(), ensure_ascii=False) + "\n")
    if expl.truncated:
        print(f"note: training cut {expl.truncated} prompt token(s) of this record from the left (max_length "
              f"{reading.max_length}); they are not shown", file=sys.stderr)
    if expl.unaligned:
        print(f"note: {len(expl.unaligned)} annotated pair(s) could not be placed: {expl.unaligned[:3]}",
              file=sys.stderr)
    ratio = expl.attn_ratio
    print(f"wrote {path}: target {expl.target!r}, prediction {expl.prediction!r}"
          + (f", attn_ratio {format_ratio(ratio)} (as training logs and cattune eval report it)"
             if ratio is not None else ""))
    return 0
