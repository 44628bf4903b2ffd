"""What a built-in model costs the first time, and each time after: join its pieces (if it
ships in pieces), convert the GGUF to safetensors, load it; then a load from the cache.

    python benchmarks/builtin_prepare.py --model gemma3-270m
    python benchmarks/builtin_prepare.py --model smollm2-135m-instruct --out results/builtin_smollm2.json

Runs in an empty temporary CATTUNE_CACHE (the user's cache is neither read nor written).
The figures are wall seconds of one run on this machine: the conversion is CPU bound
(dequantising to float32), the join disk bound.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from _common import RESULTS, command_line, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m", help="a name of cattune.models.BUILTIN_MODELS")
    p.add_argument("--loads", type=int, default=2, help="loads from the cache after the first (default: 2)")
    p.add_argument("--out", default=None, help="JSON file (default: results/builtin_prepare_MODEL.json)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cattune-bench-cache-") as cache:
        os.environ["CATTUNE_CACHE"] = cache
        from cattune.models import builtin_gguf, load_model, resolve_model

        t = time.perf_counter()
        gguf = builtin_gguf(args.model)
        joined = time.perf_counter() - t
        size = gguf.stat().st_size
        t = time.perf_counter()
        resolve_model(f"builtin:{args.model}")
        converted = time.perf_counter() - t
        loads = []
        for _ in range(1 + args.loads):
            t = time.perf_counter()
            load_model(f"builtin:{args.model}")
            loads.append(round(time.perf_counter() - t, 2))
    result = {"command": command_line(), "machine": machine(), "model": args.model,
              "gguf_bytes": size,
              "join_seconds": round(joined, 2), "convert_seconds": round(converted, 2), "load_seconds": loads}
    out = args.out or RESULTS / f"builtin_prepare_{args.model}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    print(f"{args.model}: join {joined:.1f} s, convert {converted:.1f} s, loads {loads} s -> {out}")


if __name__ == "__main__":
    main()
