"""Text forms of values, one definition each: answers written as text, attention ratios in tables."""

from __future__ import annotations

from typing import Any


def scalar_text(value: Any) -> str:
    """A JSON scalar (an answer, an annotated span) as text: strings as they are, integers
    in decimal, floats as Python writes them (``repr``: "0.1", the shortest that reads back).

    ``TypeError`` saying what the value is for booleans, whose text is ambiguous (true,
    True, 1), and for anything that is not a scalar. Whether a non-finite number is
    acceptable is the caller's to say."""
    if isinstance(value, bool):
        raise TypeError("a boolean")
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    raise TypeError(f"a {type(value).__name__}")


def format_ratio(x: float) -> str:
    """An attention ratio for a table: a layer that looks only at the causes drives a0
    towards 0 and the ratio past 1e10."""
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}"
