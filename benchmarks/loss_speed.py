#!/usr/bin/env python
"""Speed of the Re-Attention loss: vectorised vs the release's per-row Python loop.

Three implementations of the same number (docs/method.md section 3, kind "div"):

- ``loop``: the paper release's form, written here: Python loops over the batch and the
  rows of the dense [B, L, L] averaged map, one small tensor expression per row.
- ``dense``: ``cattune.loss.re_attention_loss`` on the same [B, L, L] map and mask M.
- ``rows``: ``cattune.loss.re_attention_loss_rows`` on the supervised rows only
  ([B, R, L], what training gets from the row probe).

The map is a random causal softmax, a fraction ``--density`` of the rows supervised with
``--cols`` causal columns each. Every call is forward + backward (the gradient with
respect to the map), timed interleaved (the order alternates every repeat), median of
``--repeats``, in wall-clock and in this process's CPU time (steadier when other jobs
share the cores). The values and the gradients of all three are checked to agree first.

The loop is slow mostly in backward: each row's ``attn[b, i, :i + 1]`` is a slice whose
gradient autograd materialises at the full [B, L, L] size and adds into the map's
gradient, so backward costs (supervised rows) x B x L^2. At L = 1024 a call takes about a
minute; a call slower than ``--loop-budget`` seconds is timed only once (the checking
call), and the table says how many calls each figure is the median of.

Usage:
    python benchmarks/loss_speed.py                     # B=16, L=256 and 1024
    python benchmarks/loss_speed.py --lengths 256 --repeats 11
"""

from __future__ import annotations

import argparse
import time

import _common
import torch

from cattune.loss import re_attention_loss, re_attention_loss_rows


def loop_loss(attn: torch.Tensor, mask: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """The release's form: for every sequence, for every row with supervision, a1, a0 and
    the "div" loss from Python-level tensor ops; mean over counted rows."""
    B, L, _ = attn.shape
    total = attn.new_zeros(())
    counted = 0
    for b in range(B):
        for i in range(L):
            m = mask[b, i, : i + 1]
            n1 = int(m.sum())
            if n1 == 0 or n1 == i + 1:  # no causal column, or nothing else visible
                continue
            row = attn[b, i, : i + 1]
            a1 = row[m].mean()
            a0 = row[~m].mean()
            counted += 1
            if a0 > 0 and a1 / a0 < alpha:
                total = total + (-torch.log1p(a1) / torch.log1p(a0))
    return total / max(counted, 1)


def make_inputs(B: int, L: int, density: float, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, L, generator=g)
    future = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    attn = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    R = max(1, int(round(density * L)))
    rows = torch.stack([torch.randperm(L - cols - 1, generator=g)[:R] + cols + 1 for _ in range(B)]).sort(-1).values
    causal = torch.zeros(B, R, L, dtype=torch.bool)
    for b in range(B):
        for r in range(R):
            i = int(rows[b, r])
            causal[b, r, torch.randperm(i, generator=g)[:cols]] = True  # columns before the row
    mask = torch.zeros(B, L, L, dtype=torch.bool)
    mask[torch.arange(B).view(B, 1), rows] = causal
    return attn, mask, rows, causal


def run_impl(name: str, attn: torch.Tensor, mask, rows, causal, alpha: float):
    """(value, gradient w.r.t. attn, forward seconds, forward+backward seconds, forward+backward
    CPU seconds of this process)."""
    x = attn.detach().clone().requires_grad_(True)
    c0 = time.process_time()
    t0 = time.perf_counter()
    if name == "loop":
        loss = loop_loss(x, mask, alpha)
    elif name == "dense":
        loss = re_attention_loss(x, mask, alpha=alpha, kind="div")
    else:
        B, R = rows.shape
        attn_rows = x.gather(1, rows.unsqueeze(-1).expand(B, R, x.shape[-1]))
        loss = re_attention_loss_rows(attn_rows, rows, causal, alpha=alpha, kind="div")
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    c2 = time.process_time()
    return loss.item(), x.grad, t1 - t0, t2 - t0, c2 - c0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lengths", default="256,1024")
    p.add_argument("--density", type=float, default=0.25, help="fraction of rows that are supervised")
    p.add_argument("--cols", type=int, default=4, help="causal columns per supervised row")
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loop-budget", type=float, default=20.0,
                   help="seconds: a loop call slower than this is timed once (its checking call)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(_common.RESULTS / "loss_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = _common.machine()  # the load average as the run starts
    impls = ["loop", "dense", "rows"]
    results = []
    t_start = time.perf_counter()
    for L in [int(x) for x in args.lengths.split(",") if x]:
        attn, mask, rows, causal = make_inputs(args.batch, L, args.density, args.cols, args.seed)
        # Same value and same gradient, before any timing (the first call of each also warms up).
        ref = {name: run_impl(name, attn, mask, rows, causal, args.alpha) for name in impls}
        # The loop's backward grows like rows x B x L^2 (every per-row slice sends a full
        # [B, L, L] gradient back): at L = 1024 one call takes minutes. Past --loop-budget
        # seconds the checking call is its only timing.
        repeats = {n: args.repeats for n in impls}
        if ref["loop"][3] > args.loop_budget:
            repeats["loop"] = 0
        v0, g0 = ref["loop"][0], ref["loop"][1]
        check = {}
        for name in impls:
            v, g = ref[name][0], ref[name][1]
            check[name] = {"value": v, "abs_diff": abs(v - v0),
                           "grad_max_abs_diff": (g - g0).abs().max().item()}
            if abs(v - v0) > 1e-5 * max(1.0, abs(v0)) or not torch.allclose(g, g0, rtol=1e-4, atol=1e-8):
                raise SystemExit(f"L={L}: {name} disagrees with the loop: {check[name]}")
        fwd = {n: [] for n in impls}
        tot = {n: [] for n in impls}
        cpu = {n: [] for n in impls}
        if repeats["loop"] == 0:
            _, _, tf, tt, tc = ref["loop"]
            fwd["loop"].append(tf)
            tot["loop"].append(tt)
            cpu["loop"].append(tc)
        for rep in range(args.repeats):
            order = impls if rep % 2 == 0 else impls[::-1]
            for name in order:
                if rep >= repeats[name]:
                    continue
                _, _, tf, tt, tc = run_impl(name, attn, mask, rows, causal, args.alpha)
                fwd[name].append(tf)
                tot[name].append(tt)
                cpu[name].append(tc)
        med = {n: _common.median(tot[n]) for n in impls}
        assert all(tot[n] for n in impls)
        medf = {n: _common.median(fwd[n]) for n in impls}
        medc = {n: _common.median(cpu[n]) for n in impls}
        for n in impls:
            results.append({
                "batch": args.batch, "length": L, "impl": n, "supervised_rows": int(rows.numel()),
                "timed_calls": len(tot[n]),
                "median_fwd_bwd_s": med[n], "median_fwd_s": medf[n], "median_fwd_bwd_cpu_s": medc[n],
                "times_fwd_bwd_s": tot[n], "cpu_times_fwd_bwd_s": cpu[n],
                "speedup_vs_loop": med["loop"] / med[n], "fwd_speedup_vs_loop": medf["loop"] / medf[n],
                "cpu_speedup_vs_loop": medc["loop"] / medc[n],
                **check[n],
            })
        print(f"L={L}: " + ", ".join(f"{n} {med[n] * 1e3:.2f} ms" for n in impls)
              + f"  [{time.perf_counter() - t_start:.0f}s]", flush=True)
    rows_out = [[r["batch"], r["length"], r["impl"], r["supervised_rows"], r["timed_calls"],
                 f"{r['median_fwd_bwd_s'] * 1e3:.2f}",
                 f"{r['speedup_vs_loop']:.0f}x", f"{r['median_fwd_bwd_cpu_s'] * 1e3:.2f}",
                 f"{r['cpu_speedup_vs_loop']:.0f}x", f"{r['median_fwd_s'] * 1e3:.2f}", f"{r['fwd_speedup_vs_loop']:.0f}x",
                 f"{r['value']:.6f}", f"{r['grad_max_abs_diff']:.1e}"] for r in results]
    text = _common.table(
        ["B", "L", "implementation", "supervised rows", "calls", "fwd+bwd wall ms", "speed-up", "fwd+bwd CPU ms",
         "CPU speed-up", "fwd wall ms", "fwd speed-up", "loss", "max |grad - loop grad|"],
        rows_out,
        f"Re-Attention loss (div, alpha {args.alpha}), {args.density:.0%} of rows supervised, "
        f"{args.cols} causal columns each, fp32, {args.threads} thread(s), median of the timed calls",
    )
    print()
    print(text)
    path = _common.write_json(args.out, {"benchmark": "loss_speed", "machine": info, "args": vars(args),
                                         "results": results, "table": text,
                                         "wall_s": round(time.perf_counter() - t_start, 1)})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
