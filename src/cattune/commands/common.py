"""Loading models and printing tables, shared by the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..records import atomic_write_text


def load_model(name_or_path: str, trust_remote_code: bool = False, torch_dtype: str = "auto"):
    """``(model, tokenizer)`` from a local directory or a hub id, with the row-probe attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..attention import use_row_probe
    from ..trainer import prepare_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, dtype=torch_dtype
        )
    except (OSError, ValueError) as e:
        hint = "" if Path(name_or_path).exists() else " (not a local directory; hub ids need network access)"
        raise ValueError(f"cannot load model {name_or_path!r}{hint}: {e}") from None
    use_row_probe(model)
    return model, prepare_tokenizer(tokenizer)


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


def parse_layers(text: str) -> list[int] | None:
    """'all' -> None (every layer); '-1' or '0,1' -> a list of layer indices."""
    if text.strip().lower() == "all":
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated layer indices such as -1 or 0,1; got {text!r}")
