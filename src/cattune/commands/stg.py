"""cattune stg: write the Spurious Token Game splits as JSONL."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import stg
from ..records import save_records
from ..files import check_writable_dir, output_lock
from .common import HelpFormatter, number_option


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate the Spurious Token Game. E (cancer risk): train_L/train_M/train_S/iid_test/ood_test; "
        "H (air quality index): train/iid_test/ood_test. Seed 42 reproduces the paper's released STG_E files.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--variant", choices=["E", "H", "e", "h"], default="E", help="easy (labels) or hard (integer AQI)")
    p.add_argument("--seed", type=number_option(int, 0), default=42, help="random seed, 0 or more")
    p.add_argument("--out", required=True, help="output directory; one SPLIT.jsonl per split")
    return p


def run(args) -> int:
    check_writable_dir(args.out, "--out")
    splits = stg.generate(args.variant, seed=args.seed)
    out = Path(args.out)
    with output_lock(out, "cattune stg"):  # two seeds into one --out would mix their splits
        for name, records in splits.items():
            save_records(out / f"{name}.jsonl", records)
            print(f"{out / f'{name}.jsonl'}: {len(records)} records")
    return 0
