#!/usr/bin/env python
"""Tokens per second of a fine-tuning step of a real model on STG-sized batches.

Four variants of one optimizer step of SmolLM2-135M-Instruct (or ``--model``):

- ``full-ce`` / ``full-cat``: every weight trained; cross-entropy only, or CE + gamma *
  Re-Attention loss through the row probe (``AttentionProbe`` + ``re_attention_loss_rows``,
  as ``benchmarks/step_overhead.py`` and ``CATTrainer.compute_loss`` do it).
- ``lora-ce`` / ``lora-cat``: the same on a PEFT LoRA model with the release's setting
  (``cattune.models.lora_model``: r=64, alpha=32, dropout 0.1 on q, k, v, gate, up, down).

``--logits answer`` runs each variant as ``CATTrainer`` does with ``answer_logits_only``:
the LM head only at the positions that predict a label (``logits_to_keep`` with a boolean
mask, the loss given the matching ``shift_labels``); ``--logits all,answer`` times both,
interleaved, and reports the gain.

A step is what ``Trainer`` does per batch without gradient accumulation: forward,
backward, ``clip_grad_norm_(1.0)``, fused AdamW (``adamw_torch_fused``, the Trainer's
default) and ``zero_grad``. The batches are real: the first records of STG-E ``train_M``
(seed 42), encoded with ``encode_record(span_columns="last_word")`` with and without the
chat template (~67 and ~97 tokens) and collated as ``CATCollator`` does; step i of every
variant sees the same batch i.

Timing: per thread count and template, the variants alternate step by step in an order
rotated every step; the first ``--warmup`` steps of each are not timed; each figure is a
median. Tokens/s counts the batch's real tokens (not padding). The projected minutes of a
run multiply the median seconds per step by its steps (training only: no loading, no
evaluation).

Usage:
    HF_HUB_OFFLINE=1 python benchmarks/finetune_speed.py                 # ~12 min on 2 idle cores
    HF_HUB_OFFLINE=1 python benchmarks/finetune_speed.py --threads 2 --steps 3 --templates plain
    HF_HUB_OFFLINE=1 python benchmarks/finetune_speed.py --model builtin:gemma3-270m --templates plain \
        --variants full-ce,full-cat,lora-cat --logits all,answer --threads 1 \
        --out benchmarks/results/finetune_speed_gemma3.json
"""

from __future__ import annotations

import argparse
import math
import os
import time

import _common
import torch

VARIANTS = ("full-ce", "full-cat", "lora-ce", "lora-cat")
TEMPLATES = ("plain", "chat")
LOGITS = ("all", "answer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before them")
    p.add_argument("--threads", default="2,1", help="torch thread counts to measure, comma-separated")
    p.add_argument("--templates", default=",".join(TEMPLATES),
                   help="plain (prompt + target) and/or chat (the tokenizer's chat template)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--logits", default="all",
                   help="all (the LM head at every position) and/or answer (only where a label is "
                   "predicted: answer_logits_only), comma-separated; each variant runs with each")
    p.add_argument("--cat-layers", default="all",
                   help="layers the probe averages: 'all' (the paper, the default here) or e.g. -1 "
                   "(the experiment runner's default)")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="the Trainer's default; 0 = no clipping")
    p.add_argument("--records", type=int, default=800, help="records of the projected run")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the projected run")
    p.add_argument("--out", default=str(_common.RESULTS / "finetune_speed.json"))
    args = p.parse_args(argv)
    args.threads = [int(x) for x in args.threads.split(",") if x]
    args.templates = [t for t in args.templates.split(",") if t]
    args.variants = [v for v in args.variants.split(",") if v]
    args.logits = [x for x in args.logits.split(",") if x]
    for name, chosen, allowed in (("templates", args.templates, TEMPLATES), ("variants", args.variants, VARIANTS),
                                  ("logits", args.logits, LOGITS)):
        bad = set(chosen) - set(allowed)
        if bad:
            p.error(f"unknown {name} {sorted(bad)}; choose from {allowed}")
    return args


def load(args, lora: bool):
    from cattune.models import load_model, lora_model

    torch.manual_seed(0)  # LoRA's A matrices
    model, tok = load_model(args.model)
    if lora:
        model = lora_model(model)
    model.train()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)
    return {"model": model, "optimizer": optimizer, "params": params, "tokenizer": tok,
            "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters())}


def batches(args, tok, template: str, n: int) -> list[dict]:
    from cattune import stg
    from cattune.masks import collate, encode_record

    records = stg.generate("E", seed=42)["train_M"][: n * args.batch]
    if len(records) < n * args.batch:
        raise SystemExit(f"train_M has {len(records)} records; {n} steps of {args.batch} need more")
    out = []
    for i in range(n):
        enc = [encode_record(tok, r, span_columns="last_word", chat_template=template == "chat")
               for r in records[i * args.batch:(i + 1) * args.batch]]
        b = collate(enc, tok.pad_token_id, padding_side="right")
        out.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels,
                    "rows": b.rows, "causal": b.causal, "tokens": int(b.attention_mask.sum())})
    return out


def train_step(setup, batch, cat: bool, args, layers, answer_logits: bool = False) -> float:
    from cattune.attention import AttentionProbe
    from cattune.loss import re_attention_loss_rows

    model, optimizer = setup["model"], setup["optimizer"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if answer_logits:  # as CATTrainer.compute_loss does with answer_logits_only
        shifted = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
        keep = shifted != -100
        inputs.update(logits_to_keep=keep, shift_labels=shifted[keep])
    if cat:
        probe = AttentionProbe(batch["rows"], layers=layers)
        out = model(**inputs, use_cache=False, cat_probe=probe)
        probe.close()
        l_attn = re_attention_loss_rows(probe.result(), batch["rows"], batch["causal"], alpha=args.alpha,
                                        kind="div", attention_mask=batch["attention_mask"])
        loss = out.loss + args.gamma * l_attn
    else:
        out = model(**inputs, use_cache=False)
        loss = out.loss
    del out  # only the loss lives through backward, as in Trainer.training_step
    loss.backward()
    if args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(setup["params"], args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    if not math.isfinite(value):
        raise RuntimeError(f"non-finite loss {value}")
    return value


def layer_set(args, model):
    from cattune.attention import resolve_layers
    from cattune.commands.common import parse_layers

    return resolve_layers(model, parse_layers(args.cat_layers))


def run(args) -> dict:
    modes = sorted({v.split("-")[0] for v in args.variants})
    setups = {m: load(args, lora=m == "lora") for m in modes}
    tok = next(iter(setups.values()))["tokenizer"]
    layers = layer_set(args, next(iter(setups.values()))["model"])
    n = args.warmup + args.steps
    data = {t: batches(args, tok, t, n) for t in args.templates}
    results = []
    t_start = time.perf_counter()
    combos = [(v, lg) for lg in args.logits for v in args.variants]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for template in args.templates:
            times = {c: [] for c in combos}
            cpu = {c: [] for c in combos}
            for s in range(n):
                k = s % len(combos)
                for c in combos[k:] + combos[:k]:  # rotate the order every step
                    mode, loss = c[0].split("-")
                    t0, c0 = time.perf_counter(), time.process_time()
                    train_step(setups[mode], data[template][s], loss == "cat", args, layers, c[1] == "answer")
                    if s >= args.warmup:
                        times[c].append(time.perf_counter() - t0)
                        cpu[c].append(time.process_time() - c0)
            # Other jobs' load during this block: with 2 threads on 2 shared cores a busy
            # machine slows a step far more than the load suggests (spinning OpenMP threads).
            load_avg = list(os.getloadavg())
            timed = data[template][args.warmup:]
            tokens = _common.median([b["tokens"] for b in timed])
            padded = _common.median([b["input_ids"].numel() for b in timed])
            for v, lg in combos:
                mode = v.split("-")[0]
                med = _common.median(times[v, lg])
                ce = (f"{mode}-ce", lg)
                results.append({
                    "threads": threads, "template": template, "variant": v, "logits": lg, "steps": len(times[v, lg]),
                    "batch": args.batch, "length": _common.median([b["input_ids"].shape[1] for b in timed]),
                    "tokens_per_step": tokens, "padded_tokens_per_step": padded,
                    "times_s": times[v, lg], "median_s": med,
                    # Per-step tokens over per-step seconds, then the median.
                    "tokens_per_s": _common.median([b["tokens"] / t for b, t in zip(timed, times[v, lg])]),
                    "cpu_times_s": cpu[v, lg], "cpu_median_s": _common.median(cpu[v, lg]),
                    "time_ratio_vs_ce": med / _common.median(times[ce]) if ce in times else None,
                    # answer logits only against the LM head everywhere, same variant (paired medians)
                    "time_ratio_vs_all_logits": (_common.median([t / a for t, a in zip(times[v, lg], times[v, "all"])])
                                                 if (v, "all") in times else None),
                    "trainable_params": setups[mode]["trainable"], "load_average_after": load_avg,
                })
            print(f"threads={threads} {template}: "
                  + ", ".join(f"{v}/{lg} {_common.median(times[v, lg]):.2f}s" for v, lg in combos)
                  + f"  [{time.perf_counter() - t_start:.0f}s so far]", flush=True)
    steps_per_epoch = -(-args.records // args.batch)
    for r in results:
        r["projected_run_min"] = r["median_s"] * steps_per_epoch * args.epochs / 60
    return {"params": {m: {"trainable": s["trainable"], "total": s["total"]} for m, s in setups.items()},
            "projected_run": {"records": args.records, "batch": args.batch, "epochs": args.epochs,
                              "steps": steps_per_epoch * args.epochs},
            "results": results}


def render(payload: dict) -> str:
    a, pr = payload["args"], payload["projected_run"]
    headers = ["threads", "template", "L", "tokens/step", "variant", "logits", "steps", "s/step", "tokens/s",
               "vs CE", "vs all logits", "CPU s/step", f"{pr['steps']}-step run, min"]
    rows = []
    for r in payload["results"]:
        ratio = r.get("time_ratio_vs_all_logits")
        rows.append([r["threads"], r["template"], f"{r['length']:.0f}", f"{r['tokens_per_step']:.0f}", r["variant"],
                     r.get("logits", "all"), r["steps"], f"{r['median_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                     "" if r["time_ratio_vs_ce"] is None else f"{r['time_ratio_vs_ce']:.3f}x",
                     "" if ratio is None else f"{ratio:.3f}x",
                     f"{r['cpu_median_s']:.2f}", f"{r['projected_run_min']:.1f}"])
    params = ", ".join(f"{m}: {p['trainable'] / 1e6:.1f}M of {p['total'] / 1e6:.1f}M trained"
                       for m, p in payload["params"].items())
    title = (f"{a['model']}, batch {a['batch']} of STG-E train_M (seed 42), span_columns last_word; {params}; "
             f"CAT probe layers: {a['cat_layers']}; fused AdamW, clip {a['max_grad_norm']}; "
             f"projected run: {pr['epochs']} epochs x {pr['records']} records = {pr['steps']} steps")
    return _common.table(headers, rows, title)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads[0])
    info = _common.machine("cpu")
    info["torch_threads"] = args.threads
    t0 = time.perf_counter()
    out = run(args)
    payload = {"benchmark": "finetune_speed", "machine": info, "args": vars(args), **out,
               "load_average_at_end": os.getloadavg(), "wall_s": round(time.perf_counter() - t0, 1)}
    _common.report(args.out, payload, render)


if __name__ == "__main__":
    main()
