#!/usr/bin/env python
"""Records per second through ``cattune.masks.encode_record``.

For SVAMP (annotated train set) and the STG_E / STG_H train files, with a byte-level BPE
(GPT-2 style) and a Metaspace BPE (sentencepiece style, BOS in front), both trained
locally with ``cattune.tiny.train_tokenizer`` on the records' text. Each pass encodes
every record of the set once; passes of ``encode_record`` alternate with passes of the
tokenizer calls alone (the same two calls with offsets that ``encode_record`` makes), so
the table also shows how much of the time is the tokenizer and how much the alignment.
Records/s is the median over ``--repeats`` passes, per second of this process's CPU time
(what the code costs; steady when other jobs share the cores) and per wall-clock second
(what this run saw; lower when the machine is busy). One thread: the tokenizer calls are
single texts, and torch is told to use one thread.

Usage:
    python benchmarks/mask_speed.py
    python benchmarks/mask_speed.py --profile        # cProfile of one SVAMP pass as well
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import _common
import torch

from cattune.masks import encode_record
from cattune.records import load_records
from cattune.tiny import train_tokenizer

DATASETS = {
    "svamp": "svamp_train_annotated.jsonl",
    "stg_e": "stg_paper/spurious_token_game_train3.jsonl",
    "stg_h": "stg_paper/STG_H_train.jsonl",
}


def encode_pass(tokenizer, records, max_length, span_columns) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one pass."""
    t0, c0 = time.perf_counter(), time.process_time()
    for r in records:
        encode_record(tokenizer, r, max_length=max_length, span_columns=span_columns)
    return time.perf_counter() - t0, time.process_time() - c0


def tokenize_pass(tokenizer, records) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for r in records:
        tokenizer(r.prompt, add_special_tokens=True, return_offsets_mapping=True)
        tokenizer(r.target, add_special_tokens=False, return_offsets_mapping=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(_common.DATA_DIR))
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--tokenizers", default="bytelevel,metaspace")
    p.add_argument("--max-length", type=int, default=256, help="as CATConfig.max_length (0: none)")
    p.add_argument("--span-columns", default="last", choices=["all", "last"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print a cProfile of one SVAMP pass")
    p.add_argument("--out", default=str(_common.RESULTS / "mask_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    info = _common.machine()  # the load average as the run starts
    t_start = time.perf_counter()
    data = {name: load_records(f"{args.data_dir}/{DATASETS[name]}") for name in args.datasets.split(",") if name}
    texts = [r.text for records in data.values() for r in records]
    max_length = args.max_length or None
    results = []
    profile_text = None
    for kind in [k for k in args.tokenizers.split(",") if k]:
        tok = train_tokenizer(texts, kind, vocab_size=1000, individual_digits=True)
        for name, records in data.items():
            encode_pass(tok, records[:50], max_length, args.span_columns)  # warm-up
            enc, only = [], []
            for _ in range(args.repeats):
                enc.append(encode_pass(tok, records, max_length, args.span_columns))
                only.append(tokenize_pass(tok, records))
            n = len(records)
            tokens = sum(len(encode_record(tok, r, max_length=max_length)) for r in records[:200]) / min(n, 200)
            wall = _common.median([w for w, _ in enc])
            cpu = _common.median([c for _, c in enc])
            cpu_only = _common.median([c for _, c in only])
            row = {"dataset": name, "tokenizer": kind, "records": n, "mean_tokens": tokens,
                   "records_per_s": n / wall, "records_per_cpu_s": n / cpu,
                   "tokenizer_only_records_per_cpu_s": n / cpu_only,
                   "tokenizer_share": cpu_only / cpu, "pass_s": enc, "tokenizer_pass_s": only}
            results.append(row)
            print(f"{kind:9s} {name:6s} {row['records_per_cpu_s']:8.0f} records per CPU second, "
                  f"{row['records_per_s']:8.0f} per wall second "
                  f"(tokenizer alone {row['tokenizer_only_records_per_cpu_s']:.0f}/CPU s)", flush=True)
            if args.profile and name == "svamp" and profile_text is None:
                prof = cProfile.Profile()
                prof.enable()
                encode_pass(tok, records, max_length, args.span_columns)
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
                profile_text = s.getvalue()
    text = _common.table(
        ["dataset", "tokenizer", "records", "tokens/record", "records/CPU s", "records/wall s",
         "tokenizer alone, records/CPU s", "tokenizer share"],
        [[r["dataset"], r["tokenizer"], r["records"], f"{r['mean_tokens']:.0f}", f"{r['records_per_cpu_s']:,.0f}",
          f"{r['records_per_s']:,.0f}", f"{r['tokenizer_only_records_per_cpu_s']:,.0f}",
          f"{r['tokenizer_share']:.0%}"] for r in results],
        f"encode_record (max_length {max_length}, span_columns {args.span_columns!r}), one process, "
        f"median of {args.repeats} passes",
    )
    print()
    print(text)
    if profile_text:
        print("\ncProfile, one SVAMP pass (first tokenizer), by own time:\n" + profile_text)
    path = _common.write_json(args.out, {"benchmark": "mask_speed", "machine": info, "args": vars(args),
                                         "results": results, "table": text, "profile": profile_text,
                                         "wall_s": round(time.perf_counter() - t_start, 1)})
    print(f"written {path}")


if __name__ == "__main__":
    main()
