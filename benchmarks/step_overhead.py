#!/usr/bin/env python
"""Time and peak memory of one training step: plain fine-tuning vs CAT vs the release's path.

Three variants of the same step (forward + backward + AdamW step, cross-entropy on the
answer tokens) on one Llama-style model: random-init from the --hidden/--layers/... flags,
or with the architecture of a real model (``--model``, e.g. builtin:smollm2-135m-instruct),
random-init from its config.json (``--weights random``, the default) or with its weights
(``--weights pretrained``); the step does the same arithmetic either way.

- ``plain``: SDPA attention, CE only (what CAT must cost almost nothing over).
- ``cat``: the row probe (``cat_sdpa`` + ``AttentionProbe``): SDPA's output untouched,
  softmax(q_rows K^T) for the supervised rows only, CE + gamma * Re-Attention loss
  (``re_attention_loss_rows``), exactly what ``CATTrainer.compute_loss`` does.
- ``release``: the paper release's way: eager attention with ``output_attentions=True``
  (every layer's [B, H, L, L] map), averaged over layers and heads into [B, L, L], and
  the dense loss (``re_attention_loss``, vectorised, on the dense M) added to the CE.

Timing: all variants live in one process on one model; for every step the variants run
one after the other, in an order rotated every step (interleaved), and each variant's
time is the median over its steps. Ratios are taken against ``plain`` of the same run:
ratio of the medians, and the median of the per-step ratios ("paired"). On CPU the
process's CPU time is recorded as well (one torch thread by default): on a machine that
others share, wall time also measures how much of a core the run was given, CPU time
mostly what the step costs.

Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated`` over the step (reset before it), total and
  above what was allocated when the step began.
- CPU: the step is run once under ``torch.profiler`` with ``profile_memory=True``; every
  allocation and free of a CPU tensor during the step is an event with its size, and the
  running sum of those events, in time order, peaks at what the step added on top of what
  was already resident (weights and AdamW state, counted from their tensors). This is
  the CPU analogue of ``max_memory_allocated``: bytes of live tensors, independent of
  glibc's caching. ``--rss`` cross-checks it with the operating system's view: each
  variant runs one step in a fresh subprocess (glibc told to return big blocks at once)
  and reports the resident high-water mark (VmHWM) minus the resident size just before
  the step.

Usage:
    python benchmarks/step_overhead.py                       # CPU defaults, ~10 min on 2 cores
    python benchmarks/step_overhead.py --lengths 256,512 --steps 3
    HF_HUB_OFFLINE=1 python benchmarks/step_overhead.py --model builtin:smollm2-135m-instruct \\
        --batch 256:8,512:4,1024:2,2048:1 --steps 5 --out benchmarks/results/step_overhead_smollm2.json
    python benchmarks/step_overhead.py --device cuda --dtype bf16 --hidden 2048 --layers 16 \\
        --heads 16 --kv-heads 4 --batch 8 --lengths 1024,2048,4096 --steps 10
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import _common
import torch

VARIANTS = ("plain", "cat", "release")
ATTN_IMPL = {"plain": "sdpa", "cat": "cat_sdpa", "release": "eager"}
# Timed steps per length when --steps is not given: fewer at long lengths to keep a CPU
# run near 10 minutes. At 2048 the release path costs ~4x a plain step and ~12 GB, and
# its time is no target, so by default it is timed once there (--release-steps).
DEFAULT_STEPS = {256: 5, 512: 5, 1024: 4, 2048: 3}
DEFAULT_RELEASE_STEPS = {2048: 1}
MiB = 2**20
# (flag, default, help) of the random-init Llama's shape; --model replaces them all.
SHAPE_FLAGS = (
    ("--hidden", 512, "hidden size"),
    ("--intermediate", None, "MLP width (default: ~8/3 hidden, multiple of 32)"),
    ("--layers", 8, "decoder layers"),
    ("--heads", 8, "query heads"),
    ("--kv-heads", 2, "key/value heads"),
    ("--vocab", 8192, "vocabulary size"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="256,512,1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per variant and length (default: {DEFAULT_STEPS}, 3 beyond)")
    p.add_argument("--release-steps", type=int, default=None,
                   help=f"timed steps of the release variant (default: as --steps, but {DEFAULT_RELEASE_STEPS})")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and length (CUDA); "
                   "on CPU the profiled memory step is the warm-up")
    p.add_argument("--batch", default="4",
                   help="sequences per step: one number, or per length as L:B,... (e.g. 256:8,2048:1)")
    p.add_argument("--rows", type=int, default=4, help="supervised rows per sequence")
    p.add_argument("--cols", type=int, default=4, help="causal columns per supervised row")
    p.add_argument("--model", default=None,
                   help="take the architecture from this model reference (cattune.models.resolve_model: a "
                   "directory, hub id, .gguf or builtin:NAME) instead of the shape flags below")
    p.add_argument("--weights", default="random", choices=["random", "pretrained"],
                   help="with --model: random-init from its config (default) or load its weights")
    shape = p.add_argument_group("shape of the random-init Llama (without --model)")
    for flag, default, help_ in SHAPE_FLAGS:
        shape.add_argument(flag, type=int, default=None, help=help_ if default is None else f"{help_} (default {default})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--rss", action="store_true",
                   help="CPU: also measure ru_maxrss, one fresh subprocess per variant and length")
    p.add_argument("--out", default=str(_common.RESULTS / "step_overhead.json"))
    p.add_argument("--_rss-worker", dest="rss_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if "plain" not in args.variants:
        p.error("the 'plain' variant is the reference of every ratio")
    try:
        args.batch_by_length = parse_batch(args.batch, args.lengths)
    except ValueError as e:
        p.error(str(e))
    given = [flag for flag, _, _ in SHAPE_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.model:
        if given:
            p.error(f"--model sets the architecture; drop {', '.join(given)}")
        model_shape(args)
    else:
        if args.weights != "random":
            p.error("--weights pretrained needs --model")
        for flag, default, _ in SHAPE_FLAGS:
            name = flag[2:].replace("-", "_")
            if getattr(args, name) is None and default is not None:
                setattr(args, name, default)
        if args.intermediate is None:
            args.intermediate = int(round(args.hidden * 8 / 3 / 32)) * 32
    return args


def parse_batch(text: str, lengths: list[int]) -> dict[int, int]:
    """``"4"`` -> 4 at every length; ``"256:8,2048:1"`` -> per length (every length named)."""
    if ":" not in text:
        return {L: int(text) for L in lengths}
    table = {}
    for part in text.split(","):
        L, _, B = part.partition(":")
        table[int(L)] = int(B)
    missing = [L for L in lengths if L not in table]
    if missing:
        raise ValueError(f"--batch {text}: no batch size for length(s) {missing}")
    return {L: table[L] for L in lengths}


def model_shape(args) -> None:
    """Fill the shape fields from ``--model``'s config, so that tables and JSON name it."""
    from transformers import AutoConfig

    from cattune.models import resolve_model

    args.model_dir = resolve_model(args.model)
    config = AutoConfig.from_pretrained(args.model_dir, local_files_only=os.path.isdir(args.model_dir))
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    args.model_type = config.model_type
    args.hidden = config.hidden_size
    args.intermediate = config.intermediate_size
    args.layers = config.num_hidden_layers
    args.heads = config.num_attention_heads
    args.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    args.vocab = config.vocab_size


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    import cattune.attention  # noqa: F401  registers "cat_sdpa"

    if args.model:
        return build_from_reference(args)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.lengths),
        attention_dropout=0.0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=DTYPES[args.dtype])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return model, optimizer


def build_from_reference(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    local = os.path.isdir(args.model_dir)
    common = {"attn_implementation": "sdpa", "dtype": DTYPES[args.dtype]}
    torch.manual_seed(args.seed)
    if args.weights == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=local, **common)
    else:
        config = AutoConfig.from_pretrained(args.model_dir, local_files_only=local)
        model = AutoModelForCausalLM.from_config(config, **common)
    # Dropout would make the three variants do different work; the released models have none.
    for key in ("attention_dropout", "hidden_dropout", "dropout"):
        if getattr(model.config, key, 0):
            raise SystemExit(f"{args.model}: config.{key} = {getattr(model.config, key)}; this benchmark "
                             "assumes a model without dropout")
    model.config.use_cache = False
    model.to(device=args.device, dtype=DTYPES[args.dtype])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return model, optimizer


def make_batch(args, L: int):
    """Random tokens; the last quarter is the answer (CE), R supervised rows in it, each
    with ``cols`` causal columns in the prompt. Dense M as well, for the release path."""
    g = torch.Generator().manual_seed(args.seed + L)
    B, R = batch_size(args, L), args.rows
    ids = torch.randint(0, args.vocab, (B, L), generator=g)
    answer = L - max(L // 4, R + 1)
    labels = ids.clone()
    labels[:, :answer] = -100
    rows = torch.stack([answer + torch.randperm(L - 1 - answer, generator=g)[:R] for _ in range(B)]).sort(-1).values
    causal = torch.zeros(B, R, L, dtype=torch.bool)
    for b in range(B):
        for r in range(R):
            causal[b, r, torch.randperm(answer, generator=g)[: args.cols]] = True
    dense = torch.zeros(B, L, L, dtype=torch.bool)
    dense[torch.arange(B).view(B, 1), rows] = causal
    dev = args.device
    return {
        "input_ids": ids.to(dev),
        "attention_mask": torch.ones(B, L, dtype=torch.long, device=dev),
        "labels": labels.to(dev),
        "rows": rows.to(dev),
        "causal": causal.to(dev),
        "dense": dense.to(dev),
    }


def batch_size(args, L: int) -> int:
    # Lengths outside --lengths (the short step that creates the AdamW state) take the
    # smallest batch given: it only has to run.
    return args.batch_by_length.get(L, min(args.batch_by_length.values()))


def set_variant(model, variant: str) -> None:
    model.set_attn_implementation(ATTN_IMPL[variant])


def forward_loss(model, batch, variant: str, args) -> torch.Tensor:
    """The step's loss. Only the scalar leaves this function: the model's outputs (logits,
    attention maps) are released before backward, as in ``Trainer.training_step``."""
    from cattune.attention import AttentionProbe
    from cattune.loss import re_attention_loss, re_attention_loss_rows

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if variant == "plain":
        loss = model(**inputs, use_cache=False).loss
    elif variant == "cat":
        probe = AttentionProbe(batch["rows"])
        out = model(**inputs, use_cache=False, cat_probe=probe)
        probe.close()
        l_attn = re_attention_loss_rows(probe.result(), batch["rows"], batch["causal"], alpha=args.alpha,
                                        kind="div", attention_mask=batch["attention_mask"])
        loss = out.loss + args.gamma * l_attn
    else:  # release
        out = model(**inputs, use_cache=False, output_attentions=True)
        if not out.attentions or out.attentions[0] is None:
            raise RuntimeError("the model returned no attention maps: eager attention is needed")
        # Averaged over heads and layers, one layer at a time (never all layers stacked).
        attn = None
        for a in out.attentions:
            m = a.float().mean(dim=1)
            attn = m if attn is None else attn + m
        attn = attn / len(out.attentions)
        l_attn = re_attention_loss(attn, batch["dense"], alpha=args.alpha, kind="div",
                                   attention_mask=batch["attention_mask"])
        loss = out.loss + args.gamma * l_attn
    return loss


def train_step(model, optimizer, batch, variant: str, args) -> float:
    loss = forward_loss(model, batch, variant, args)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()  # also synchronises CUDA
    if not torch.isfinite(torch.tensor(value)):
        raise RuntimeError(f"non-finite loss in variant {variant}")
    return value


def resident_bytes(model, optimizer) -> int:
    """Bytes of the tensors that live across steps: weights, gradients, optimizer state."""
    seen, total = set(), 0
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def cpu_step_peak(fn) -> int:
    """Peak bytes of CPU tensors allocated by ``fn`` and alive at once (above the start)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if f.device.type == torch.device("cpu").type:
                events.append((node.start_time_ns, f.alloc_size))
        stack.extend(node.children)
    events.sort()
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def measure_memory(model, optimizer, batch, variant, args) -> dict:
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        train_step(model, optimizer, batch, variant, args)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak, "step_bytes": peak - start, "method": "torch.cuda.max_memory_allocated"}
    start = resident_bytes(model, optimizer)
    step = cpu_step_peak(lambda: train_step(model, optimizer, batch, variant, args))
    return {"peak_bytes": start + step, "step_bytes": step, "method": "torch.profiler allocation events"}


def proc_status_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (resident high-water mark) of this process, in KiB.

    Not ``getrusage().ru_maxrss``: Linux carries that over an exec from the process that
    forked, so a fresh subprocess would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_worker(args) -> None:
    """One variant, one length, in this fresh process: print the RSS high-water mark around one step."""
    torch.set_num_threads(args.threads)
    model, optimizer = build_model(args)
    # A short step first: creates the AdamW state, so the measured step is a steady one.
    small = make_batch(args, 64)
    set_variant(model, "plain")
    train_step(model, optimizer, small, "plain", args)
    (L,) = args.lengths
    batch = make_batch(args, L)
    set_variant(model, args.rss_worker)
    gc.collect()
    before = proc_status_kib("VmRSS")
    if proc_status_kib("VmHWM") > before + 1024:  # the warm-up peaked above: reset the mark
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    train_step(model, optimizer, batch, args.rss_worker, args)
    peak = proc_status_kib("VmHWM")
    print("RSS " + json.dumps({"before_kib": before, "maxrss_kib": peak}))


def run_rss(args, L: int, variant: str) -> dict:
    env = dict(os.environ)
    # glibc: every block >= 64 KiB is its own mmap, returned to the system when freed, so
    # the resident size follows the live tensors instead of malloc's free lists.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="2")
    cmd = [sys.executable, __file__, "--_rss-worker", variant, "--lengths", str(L),
           "--batch", str(batch_size(args, L)), "--rows", str(args.rows), "--cols", str(args.cols),
           "--dtype", args.dtype, "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.model:
        cmd += ["--model", args.model, "--weights", args.weights]
    else:
        cmd += ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
                "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RSS ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"RSS worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(line[-1][4:])
    return {"rss_peak_bytes": r["maxrss_kib"] * 1024, "rss_step_bytes": (r["maxrss_kib"] - r["before_kib"]) * 1024}


def run(args) -> dict:
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    model, optimizer = build_model(args)
    # One short step so the AdamW state exists before anything is measured.
    set_variant(model, "plain")
    train_step(model, optimizer, make_batch(args, 64), "plain", args)
    n_params = sum(p.numel() for p in model.parameters())
    results = []
    t_start = time.perf_counter()
    for L in args.lengths:
        batch = make_batch(args, L)
        steps = args.steps or DEFAULT_STEPS.get(L, 3)
        n_steps = {v: steps for v in args.variants}
        if "release" in n_steps:
            n_steps["release"] = min(steps, args.release_steps or DEFAULT_RELEASE_STEPS.get(L, steps))
        memory = {}
        for v in args.variants:
            set_variant(model, v)
            if args.device.startswith("cuda"):
                for _ in range(args.warmup):
                    train_step(model, optimizer, batch, v, args)
            if not args.no_memory:  # on CPU this profiled step doubles as the warm-up
                memory[v] = measure_memory(model, optimizer, batch, v, args)
            elif args.device == "cpu":
                for _ in range(args.warmup):
                    train_step(model, optimizer, batch, v, args)
        times = {v: [] for v in args.variants}
        cpu_times = {v: [] for v in args.variants}
        for s in range(steps):
            k = s % len(args.variants)
            for v in args.variants[k:] + args.variants[:k]:  # rotate the order every step
                if s >= n_steps[v]:
                    continue
                set_variant(model, v)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                train_step(model, optimizer, batch, v, args)
                times[v].append(time.perf_counter() - t0)
                cpu_times[v].append(time.process_time() - c0)
        if args.rss and args.device == "cpu":
            for v in args.variants:
                memory.setdefault(v, {}).update(run_rss(args, L, v))
        base_t = _common.median(times["plain"])
        # Other jobs' load while this length ran: wall time above CPU time is the waiting.
        load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        for v in args.variants:
            row = {"length": L, "variant": v, "steps": n_steps[v], "times_s": times[v], "load_average_after": load,
                   "median_s": _common.median(times[v]), "time_ratio": _common.median(times[v]) / base_t}
            # Ratio of medians, and the median of the per-step ratios (paired, same step index).
            row["time_ratio_paired"] = _common.median([t / b for t, b in zip(times[v], times["plain"])])
            # CPU seconds of this process: what the step costs, steadier than wall time
            # when other jobs share the cores (CPU runs only; on CUDA it is host time).
            row["cpu_times_s"] = cpu_times[v]
            row["cpu_median_s"] = _common.median(cpu_times[v])
            row["cpu_time_ratio"] = row["cpu_median_s"] / _common.median(cpu_times["plain"])
            if v in memory:
                row.update(memory[v])
                for key in ("peak_bytes", "step_bytes", "rss_peak_bytes", "rss_step_bytes"):
                    if key in memory[v] and key in memory.get("plain", {}):
                        row[key.replace("_bytes", "_ratio")] = memory[v][key] / memory["plain"][key]
            results.append(row)
        print(f"L={L}: " + ", ".join(f"{v} {_common.median(times[v]):.2f}s" for v in args.variants)
              + f"  [{time.perf_counter() - t_start:.0f}s so far]", flush=True)
    return {"n_params": n_params, "results": results}


def render(payload: dict) -> str:
    a = payload["args"]
    cpu = a["device"] == "cpu"
    rows = []
    by_len = {}
    for r in payload["results"]:
        by_len.setdefault(r["length"], {})[r["variant"]] = r
    for L, vs in by_len.items():
        for v, r in vs.items():
            cells = [L, v, r["steps"], f"{r['median_s'] * 1000:.0f}", f"{r['time_ratio']:.3f}x",
                     f"{r['time_ratio_paired']:.3f}x"]
            if cpu:
                cells += [f"{r['cpu_median_s'] * 1000:.0f}", f"{r['cpu_time_ratio']:.3f}x"]
            if "peak_bytes" in r:
                cells += [f"{r['peak_bytes'] / MiB:.0f}", f"{r.get('peak_ratio', float('nan')):.2f}x",
                          f"{r['step_bytes'] / MiB:.0f}", f"{r.get('step_ratio', float('nan')):.2f}x"]
            if "rss_peak_bytes" in r:
                cells += [f"{r['rss_step_bytes'] / MiB:.0f}", f"{r.get('rss_step_ratio', float('nan')):.2f}x"]
            rows.append(cells)
    headers = ["L", "variant", "steps", "wall ms", "wall vs plain", "paired"]
    if cpu:
        headers += ["CPU ms", "CPU vs plain"]
    if any("peak_bytes" in r for r in payload["results"]):
        headers += ["peak MiB", "peak vs plain", "step MiB", "step vs plain"]
    if any("rss_peak_bytes" in r for r in payload["results"]):
        headers += ["RSS step MiB", "RSS vs plain"]
    batches = sorted(set(a["batch_by_length"].values()))
    batch = (f"B={batches[0]}" if len(batches) == 1 else
             "B=" + ", ".join(f"{b} at L={L}" for L, b in a["batch_by_length"].items()))
    arch = "Llama" if not a.get("model") else f"{a['model']} ({a['model_type']}, {a['weights']} weights):"
    title = (f"{arch} hidden {a['hidden']}, MLP {a['intermediate']}, {a['layers']} layers, {a['heads']} heads / "
             f"{a['kv_heads']} KV heads, vocab {a['vocab']} ({payload['n_params'] / 1e6:.1f}M params), "
             f"{batch}, {a['rows']} supervised rows x {a['cols']} causal columns per sequence, "
             f"{a['dtype']}, {a['device']}, AdamW")
    lines = []
    summary = []
    for L, vs in by_len.items():
        if "cat" in vs:
            s = f"L={L}: CAT {vs['cat']['time_ratio']:.3f}x wall time"
            if cpu:
                s += f" ({vs['cat']['cpu_time_ratio']:.3f}x CPU time)"
            if "peak_ratio" in vs["cat"]:
                s += f", {vs['cat']['peak_ratio']:.3f}x peak memory of plain"
            if "release" in vs and "peak_bytes" in vs["release"] and "peak_bytes" in vs["cat"]:
                s += (f"; release path {vs['release']['time_ratio']:.2f}x wall time, "
                      f"{vs['release']['peak_ratio']:.2f}x "
                      f"memory; CAT uses {vs['release']['peak_bytes'] / vs['cat']['peak_bytes']:.2f}x less "
                      "peak memory than the release path")
            summary.append(s)
    lines.append(_common.table(headers, rows, title))
    lines.append("")
    lines += summary
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.rss_worker:
        rss_worker(args)
        return
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    info = _common.machine(args.device)
    t0 = time.perf_counter()
    out = run(args)
    payload = {"benchmark": "step_overhead", "machine": info, "args": vars(args), **out,
               "wall_s": round(time.perf_counter() - t0, 1)}
    payload["args"].pop("rss_worker", None)
    _common.report(args.out, payload, render)


if __name__ == "__main__":
    main()
