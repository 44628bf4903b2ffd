"""cattune demo: plain fine-tuning vs CAT on the Spurious Token Game, IID vs OOD.

Generates STG_E (seed 42: the paper's released files), trains the embedded tiny Llama
on train_M twice per seed (gamma 0 = baseline, then CAT), evaluates both on iid_test
and ood_test, prints the table and writes results.json and a bar chart. ``--variants E,H``
adds STG_H (exact integer answers, trained on its 3000 records).
The STG_E defaults were chosen on validation sets generated with seed 7 (experiments/).
STG_H's epochs were set for time; its CAT setting is the paper's (alpha 2, gamma
decaying per epoch), the least bad of those tried on its seed-7 validation sets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from ..masks import DEFAULT_SPAN_COLUMNS, SPAN_COLUMNS
from .common import check_writable_dir, format_table, parse_layers, write_json

ARMS = ("baseline", "cat")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Everything runs on CPU with the embedded model, no download.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="demo_out",
                   help="output directory: results.json, demo.png (accuracy), ratio_STG_*.png (attention ratio "
                   "during training), attention_STG_*.png (heatmaps of an OOD record), the models")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per arm (the table shows mean and range)")
    p.add_argument("--variants", default="E", help="STG variants, comma-separated: E, H or E,H")
    p.add_argument("--split", default="train_M", choices=["train_S", "train_M", "train_L"],
                   help="STG_E training split (STG_H trains on its 3000 records)")
    p.add_argument("--epochs", type=float, default=30, help="STG_E training epochs")
    p.add_argument("--h-epochs", type=float, default=10, help="STG_H training epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (cosine schedule, 10%% warm-up)")
    p.add_argument("--batch-size", type=int, default=16, help="per-step batch size")
    p.add_argument("--gamma", type=float, default=1.0, help="CAT arm: Re-Attention loss weight")
    p.add_argument("--alpha", type=float, default=2000.0,
                   help="CAT arm on STG_E: target causal/other attention ratio (of the --layers' average)")
    p.add_argument("--gamma-decay", type=float, default=0.0, help="CAT arm on STG_E: gamma decay per epoch")
    p.add_argument("--layers", type=parse_layers, default="-1",
                   help="CAT arm on STG_E: decoder layers whose attention the loss averages, comma-separated "
                   "(0 = first, -1 = last), or 'all' (the paper); write a list as --layers=-2,-1")
    p.add_argument("--h-alpha", type=float, default=2.0, help="CAT arm on STG_H: alpha")
    p.add_argument("--h-gamma-decay", type=float, default=1.0, help="CAT arm on STG_H: gamma decay per epoch")
    p.add_argument("--h-layers", type=parse_layers, default="all", help="CAT arm on STG_H: layers, as --layers")
    p.add_argument("--span-columns", choices=SPAN_COLUMNS, default=DEFAULT_SPAN_COLUMNS,
                   help="value tokens that become causal columns ('all' = the paper's whole span)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the tiny model's ops are too small to gain from more (0: torch's default)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N records of each split (quick checks)")
    return p


# variant -> (split whose text trains the tokenizer, answer checker)
VARIANTS = {"E": ("train_L", "exact"), "H": ("train", "numeric")}


def variant_settings(variant: str, args) -> dict:
    """The command-line settings of one STG variant: split, epochs, alpha, gamma decay, layers."""
    if variant == "E":
        return {"split": args.split, "epochs": args.epochs, "alpha": args.alpha, "decay": args.gamma_decay,
                "layers": args.layers}
    return {"split": "train", "epochs": args.h_epochs, "alpha": args.h_alpha, "decay": args.h_gamma_decay,
            "layers": args.h_layers}


def train_arm(variant: str, arm: str, seed: int, data: dict, args, out: Path) -> dict:
    from ..evaluate import evaluate
    from ..tiny import build
    from ..trainer import CATConfig, CATTrainer

    corpus, checker = VARIANTS[variant]
    settings = variant_settings(variant, args)
    model, tokenizer = build([r.text for r in data[corpus]], seed=seed)
    config = CATConfig(
        output_dir=str(out / f"STG_{variant}_{arm}_seed{seed}"),
        cat_gamma=args.gamma if arm == "cat" else 0.0,
        cat_alpha=settings["alpha"],
        cat_gamma_decay=settings["decay"],
        cat_layers=settings["layers"],
        cat_span_columns=args.span_columns,
        num_train_epochs=settings["epochs"],
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=0.1,
        lr_scheduler_type="cosine",
        save_strategy="no",
        logging_steps=0.02,  # 50 points on any run length
        report_to=[],
        use_cpu=True,
        seed=seed,
    )
    t = time.time()
    trainer = CATTrainer(model=model, args=config, train_dataset=data[settings["split"]], processing_class=tokenizer)
    trainer.train()
    trainer.save_model(config.output_dir)
    result = {"variant": variant, "arm": arm, "seed": seed, "train_split": settings["split"],
              "train_seconds": round(time.time() - t, 1), "log_history": trainer.state.log_history}
    for split in ("iid_test", "ood_test"):
        res = evaluate(model, tokenizer, data[split], checker=checker, span_columns=args.span_columns,
                       layers=settings["layers"],
                       desc=f"STG_{variant} {arm} seed {seed} {split}")
        result[split] = res.accuracy
        result[f"{split}_attention_ratio"] = res.attention_ratio
    if seed == 0:  # where the model looks on an OOD record
        from ..explain import plot_record

        path = plot_record(model, tokenizer, data["ood_test"][0], out / f"attention_STG_{variant}_{arm}.png",
                           title=f"STG_{variant} {arm}, OOD record 0", span_columns=args.span_columns, record_index=0,
                           layers=settings["layers"])
        result["attention_plot"] = path.name
    return result


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
    import torch

    from .. import stg

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    variants = [v.strip().upper() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--variants takes E, H or E,H; got {args.variants!r}")
    out = Path(args.out)
    check_writable_dir(out, "--out")
    runs: list[dict] = []
    started = time.time()
    for variant in variants:
        data = stg.generate(variant, seed=42)
        if args.limit:
            data = {name: records[: args.limit] for name, records in data.items()}
        for seed in range(args.seeds):
            for arm in ARMS:
                print(f"[{time.time() - started:6.0f}s] training {arm}, seed {seed} on STG_{variant}", file=sys.stderr)
                runs.append(train_arm(variant, arm, seed, data, args, out))
    table = format_table(["benchmark", "arm", "test set", "seeds", "accuracy", "range"], summarize(runs))
    print(table)
    settings = {k: v for k, v in vars(args).items()}
    write_json(out / "results.json", {"settings": settings, "runs": runs, "table": summarize(runs),
                                      "seconds": round(time.time() - started, 1)})
    plot(runs, out / "demo.png")
    from ..explain import plot_ratio_curve

    written = ["results.json", "demo.png"]
    for variant in variants:
        first = {r["arm"]: r["log_history"] for r in runs if r["variant"] == variant and r["seed"] == 0}
        curve = plot_ratio_curve(first, out / f"ratio_STG_{variant}.png",
                                 alpha=variant_settings(variant, args)["alpha"],
                                 title=f"STG_{variant}: causal/other attention during training, seed 0")
        written += [curve.name] + [r["attention_plot"] for r in runs if r["variant"] == variant and r["seed"] == 0]
    print(f"wrote {', '.join(str(out / w) for w in written)} ({time.time() - started:.0f}s)")
    return 0
