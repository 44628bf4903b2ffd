"""What several commands share: tables and JSON files as they print and write them, the
options that say how records are encoded for a model (--layers parsed here), and how
--help shows defaults."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..fields import check_number
from ..files import atomic_write_text
from ..masks import DEFAULT_SPAN_COLUMNS, SPAN_COLUMNS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where there is a default that the help does not already
    state: not to required options, nor to ones whose default is None. A description keeps
    its blank lines between paragraphs and its indented lines (example commands) as written;
    the rest is wrapped to the terminal."""

    def _fill_text(self, text, width, indent):
        blocks, prose = [], []
        for line in text.splitlines() + [""]:
            if line.strip() and not line.startswith(" "):
                prose.append(line)
                continue
            if prose:
                blocks.append(super()._fill_text(" ".join(prose), width, indent))
                prose = []
            blocks.append(indent + line if line.strip() else "")
        return "\n".join(blocks[:-1])

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.required or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def add_training_settings_options(group, measured: str) -> None:
    """--span-columns, --layers, --chat-template and --max-length: the reading settings
    (cattune.reading), each defaulting to how the model was trained (its cattune.json), so
    that a saved model is read as it was trained."""
    group.add_argument("--span-columns", choices=SPAN_COLUMNS, default=None,
                       help=f"value tokens counted as causal {measured}; default: as the model was trained "
                       f"(its cattune.json), else {DEFAULT_SPAN_COLUMNS}")
    group.add_argument("--layers", type=layers_option, default=None,
                       help=f"layers whose attention {measured} averages: 'all' or indices (0 = first, -1 = last; "
                       "write a list as --layers=-2,-1); default: the model's cat_layers (cattune.json), else all")
    group.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                       help="prompts through the tokenizer's chat template; default: as the model was trained "
                       "(cattune.json), else off")
    group.add_argument("--max-length", type=number_option(int, low=1), default=None,
                       help="tokens per record, prompt cut from the left as in training; default: as the model was "
                       "trained (cattune.json), else the model's max_position_embeddings")


def parse_layers(text: str) -> list[int] | None:
    """'all' -> None (every layer); '-1' or '0,1' -> a list of layer indices."""
    if text.strip().lower() == "all":
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated layer indices such as -1 or 0,1; got {text!r}")


def layers_option(text: str) -> list[int] | str:
    """``--layers`` of commands that default to the trained layers: 'all' stays 'all'."""
    return "all" if text.strip().lower() == "all" else parse_layers(text)


def number_option(kind: type = float, low: float = 0, high: float | None = None, *, strict: bool = False,
                  unit: str = "", none: bool = False):
    """An argparse ``type``: a finite ``kind`` from ``low`` (excluded if ``strict``) to
    ``high`` (``fields.check_number``); with ``none``, also the word 'none' (None).
    nan compares False with everything, so an unchecked one silently passes every test."""
    def parse(text: str):
        if none and text.lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            value = text
        try:
            return check_number("", value, low, high, integer=kind is int, above=strict, unit=unit, shown=repr(text))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}; 'none' sends none" if none else str(e)) from None

    return parse


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
