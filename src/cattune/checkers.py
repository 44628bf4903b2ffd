"""Answer checkers and the number parsing they share.

A checker takes the model's answer and the target and says whether they agree:
``exact`` (the strings after stripping), ``numeric`` (the same number, "84.0" = "84"),
``gsm8k`` (numeric on the text after "####") and ``mc`` (the same choice letter). A task
names its checker; :func:`register_checker` adds one. Nothing here imports a model.
"""

from __future__ import annotations

import math
import re
from typing import Callable

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """The first number in ``text`` ("1,234.0" -> 1234.0), or None."""
    m = NUMBER.search(text)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def final_answer(text: str) -> str:
    """GSM8K style: the text after the last "####"; without one, the last number."""
    if "####" in text:
        return text.rsplit("####", 1)[-1].strip()
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def numeric_error(targets: list[str], predictions: list[str]) -> tuple[float | None, int]:
    """Mean |prediction - target| over the predictions holding a number, and the count of
    those that hold none; (None, 0) unless every target is a number ("42", "-3.5")."""
    truth = [parse_number(t) if NUMBER.fullmatch(t.strip()) else None for t in targets]
    if not truth or any(t is None for t in truth):
        return None, 0
    errors = [abs(p - t) for t, p in zip(truth, map(parse_number, predictions)) if p is not None]
    unparsed = len(truth) - len(errors)
    return (sum(errors) / len(errors) if errors else None), unparsed


def check_exact(prediction: str, target: str) -> bool:
    return prediction.strip() == target.strip()


def check_numeric(prediction: str, target: str, abs_tol: float = 1e-6, rel_tol: float = 0.0) -> bool:
    """The same number: "84.0" matches "84". An integer answer must match exactly (10001
    is not 10000, whatever the scale); a fractional one within ``abs_tol``. A task that
    states a relative tolerance (``rel_tol``) gets it for every answer."""
    p, t = parse_number(prediction), parse_number(target)
    if p is None or t is None:
        return check_exact(prediction, target)
    if rel_tol == 0 and t.is_integer():
        return p == t
    return math.isclose(p, t, rel_tol=rel_tol, abs_tol=abs_tol)


def check_gsm8k(prediction: str, target: str) -> bool:
    return check_numeric(final_answer(prediction), final_answer(target))


def mc_letter(text: str) -> str | None:
    """The answer label in "B", "(B)", "B) ...", "Answer: B", "I think (C)"; choices
    labelled with digits (some ARC questions use 1-4) are read the same way.

    A bare leading label counts only when followed by ".", ")", ":" or the end, so
    "A cat is..." is not read as "A" and "12 apples" not as "1".
    """
    text = text.strip()
    m = re.match(r"^\(?([A-E]|[1-9])(?:[.):]|\)|$)", text)
    if m:
        return m.group(1)
    m = re.search(r"(?i:answer)(?:\s+is)?[:\s]*\(?([A-E]|[1-9])\)?(?![A-Za-z0-9])", text)
    if m:
        return m.group(1)
    m = re.search(r"\(([A-E]|[1-9])\)", text)
    return m.group(1) if m else None


def check_mc(prediction: str, target: str) -> bool:
    p, t = mc_letter(prediction), mc_letter(target)
    return p is not None and p == t


CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "exact": check_exact,
    "numeric": check_numeric,
    "gsm8k": check_gsm8k,
    "mc": check_mc,
}


def register_checker(name: str, fn: Callable[..., bool], overwrite: bool = False) -> Callable[..., bool]:
    """Add an answer checker ``fn(prediction, target, **options) -> bool`` under ``name``,
    for tasks (``checker: NAME``), ``cattune eval --checker`` and ``eval_checker``."""
    if not callable(fn):
        raise TypeError(f"a checker must be callable, got {type(fn).__name__}")
    if name in CHECKERS and not overwrite:
        raise ValueError(f"a checker named {name!r} is already registered (pass overwrite=True to replace it)")
    CHECKERS[name] = fn
    return fn


def get_checker(checker: str | Callable[[str, str], bool]) -> Callable[[str, str], bool]:
    if callable(checker):
        return checker
    if checker not in CHECKERS:
        raise ValueError(f"unknown checker {checker!r}; choose from {sorted(CHECKERS)}")
    return CHECKERS[checker]
