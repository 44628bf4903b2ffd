"""cattune stg: write the Spurious Token Game splits as JSONL."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import stg
from ..files import atomic_write_text, check_writable_dir, output_lock
from ..records import save_records
from .common import HelpFormatter, number_option

MANIFEST = "stg.json"  # which variant and seed the folder's splits are


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate the Spurious Token Game. E (cancer risk): train_L/train_M/train_S/iid_test/ood_test; "
        "H (air quality index): train/iid_test/ood_test. Seed 42 reproduces the paper's released STG_E files.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--variant", choices=["E", "H", "e", "h"], default="E", help="easy (labels) or hard (integer AQI)")
    p.add_argument("--seed", type=number_option(int, 0), default=42, help="random seed, 0 or more")
    p.add_argument("--out", required=True, help="output directory; one SPLIT.jsonl per split, and stg.json naming "
                   "the variant and seed (another variant or seed into the same folder is refused)")
    return p


def run(args) -> int:
    check_writable_dir(args.out, "--out")
    splits = stg.generate(args.variant, seed=args.seed)
    out = Path(args.out)
    with output_lock(out, "cattune stg"):  # two seeds into one --out would mix their splits
        # So would two runs one after the other: the folder says whose splits it holds.
        written = {"variant": args.variant.upper(), "seed": args.seed}
        manifest = out / MANIFEST
        if manifest.is_file():
            try:
                earlier = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                earlier = None
            if earlier != written and isinstance(earlier, dict):
                raise ValueError(f"--out {out} holds STG_{earlier.get('variant')} seed {earlier.get('seed')}'s "
                                 "splits: give another --out (or remove them)")
        for name, records in splits.items():
            save_records(out / f"{name}.jsonl", records)
            print(f"{out / f'{name}.jsonl'}: {len(records)} records")
        atomic_write_text(manifest, json.dumps(written) + "\n")
    return 0
