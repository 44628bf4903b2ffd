"""Tables, JSON output and output-path checks shared by the commands (model loading lives in
cattune.models)."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import check_distinct_paths, check_writable_dir, check_writable_file  # noqa: F401  (re-exported)
from ..models import load_model, parse_layers  # noqa: F401  (the commands import them from here)
from ..records import atomic_write_text


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def format_ratio(x: float) -> str:
    """An attention ratio for a table: a layer that looks only at the causes drives a0
    towards 0 and the ratio past 1e10."""
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}"
