"""Mean validation accuracy per configuration over seeds, from tune_log.jsonl."""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

KEYS = ("variant", "gamma", "alpha", "span", "span_rows", "layer_reduce", "loss", "decay", "epochs", "lr", "bs", "wd", "dropout",
        "layers", "hidden", "heads", "inter", "warmup", "sched", "whole_numbers", "digits", "spaced",
        "cat_layers", "prompt_loss", "prompt_weight", "label_smoothing", "max_grad_norm", "untie")
# Flags added to tune_stg.py later: older lines ran with these values. "last" and
# "last_word" are the same columns on STG_E with the tiny tokenizer.
DEFAULTS = {"variant": "E", "span_rows": False, "layer_reduce": "mean", "decay": 0.0, "heads": 8, "inter": 2, "warmup": 0.1, "sched": "cosine",
            "spaced": False, "cat_layers": "all", "prompt_loss": False, "prompt_weight": 0.0, "label_smoothing": 0.0,
            "max_grad_norm": 1.0, "untie": False}
SHOWN_IF_SET = ("digits", "dropout", "span_rows", "decay", "spaced", "prompt_loss", "prompt_weight", "label_smoothing", "untie")
runs = defaultdict(list)
for line in Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("tune_log.jsonl")).open():
    d = json.loads(line)
    d.setdefault("loss", "div")  # before the --loss flag every run used "div"
    for k, v in DEFAULTS.items():
        d.setdefault(k, v)
    if float(d["epochs"]).is_integer():  # "--epochs 30" was logged as 30 or 30.0
        d["epochs"] = int(d["epochs"])
    if d["variant"] == "E" and d["span"] == "last_word":
        d["span"] = "last"
    if "digits" in d:  # current flag
        whole = not d["digits"]
    else:  # older lines: a --whole-numbers flag (absent before it existed: digits were split)
        whole = bool(d.get("whole_numbers"))
    d["whole_numbers"], d["digits"] = bool(whole), not whole
    runs[tuple((k, d.get(k)) for k in KEYS)].append(d)
print("| config | seeds | val IID | val OOD | OOD per seed |")
print("|---|---|---|---|---|")
for cfg, rs in sorted(runs.items(), key=lambda kv: -statistics.mean(r["val_ood"] for r in kv[1])):
    label = ", ".join(f"{k}={v}" for k, v in cfg
                      if k != "whole_numbers" and (k not in SHOWN_IF_SET or v) and DEFAULTS.get(k, object()) != v)
    print(f"| {label} | {len(rs)} | {statistics.mean(r['val_iid'] for r in rs):.3f} | "
          f"{statistics.mean(r['val_ood'] for r in rs):.3f} | {' '.join(format(r['val_ood'], '.3f') for r in rs)} |")
