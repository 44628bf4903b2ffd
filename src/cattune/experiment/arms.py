"""The experiment's arms, and the placebo arm's annotation.

``baseline``: plain fine-tuning (cat_gamma 0); ``cat``: the Re-Attention loss on the
causal annotation; ``placebo``: the same loss with the columns moved to spans that carry
no causal information (:func:`placebo_records`), so that a gain of CAT over the placebo
comes from where the attention is pointed, not from the extra loss as such.
"""

from __future__ import annotations

import copy
import random
import re
from typing import Iterable

from ..masks import find_occurrences
from ..records import Record
from ..tasks import Task, get_task

ARMS = ("baseline", "cat", "placebo")

_WORD = re.compile(r"\w+")


class _Lengths:
    """Token counts of character spans of one text: the tokenizer's when given, else
    words and punctuation marks."""

    def __init__(self, text: str, tokenizer=None):
        if tokenizer is not None:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            self.spans = [(s, e) for s, e in enc["offset_mapping"] if e > s]
        else:
            self.spans = [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]

    def count(self, start: int, end: int) -> int:
        return sum(1 for s, e in self.spans if s < end and e > start)


def _overlaps(span: tuple[int, int], spans: Iterable[tuple[int, int]]) -> bool:
    return any(span[0] < e and span[1] > s for s, e in spans)


def _candidates(text: str, limit: int, blocked: list[tuple[int, int]], max_words: int = 8) -> list[tuple[int, int]]:
    """Word-aligned spans of ``text[:limit]`` with no digit that touch no blocked span."""
    words = [m.span() for m in _WORD.finditer(text, 0, limit)]
    out = []
    for i in range(len(words)):
        for j in range(i, min(i + max_words, len(words))):
            span = (words[i][0], words[j][1])
            if span[1] > limit or _overlaps(span, blocked):
                break
            if any(c.isdigit() for c in text[span[0]: span[1]]):
                break
            out.append(span)
    return out


def _word_suffixes(text: str, span: tuple[int, int]) -> list[tuple[int, int]]:
    """``span`` and its shorter versions that start after a space: trimming from the
    left keeps the span's last token (the column "last" uses)."""
    starts = {m.start() for m in re.finditer(r"(?<!\S)\S", text[: span[1]]) if m.start() > span[0]}
    return [(s, span[1]) for s in sorted(starts | {span[0]})]


def placebo_annotation(record: Record, task: Task | None, rng: random.Random, tokenizer=None,
                       counts: dict | None = None):
    """The record's annotation with every value moved to a non-causal span of the same
    token count that precedes the same key (see :func:`placebo_records`)."""
    text = record.text
    recipe = (task.placebo if task is not None else {}) or {}
    lengths = _Lengths(text, tokenizer)
    excluded = [m.span() for p in recipe.get("exclude", []) for m in re.finditer(p, record.prompt)]
    annotated = [span for key, values in record.important for s in [key, *values]
                 for span in find_occurrences(text, s)]
    preferred = sorted({sub for p in recipe.get("prefer", []) for m in re.finditer(p, record.prompt)
                        if m.group(0) for sub in _word_suffixes(text, m.span())})
    counts = counts if counts is not None else {}

    def bump(name):
        counts[name] = counts.get(name, 0) + 1

    def unique(span):  # the text is found exactly there and nowhere else
        return find_occurrences(text, text[span[0]: span[1]]) == [span]

    out = []
    for key, values in record.important:
        key_occ = find_occurrences(text, key)
        # this key's own causal text: never a placebo for it, even in the relaxed pass
        own = key_occ + [span for v in values for span in find_occurrences(text, v)]
        used: list[tuple[int, int]] = []
        new_values = []
        for value in values:
            bump("values")
            pair = [(v, k) for v in find_occurrences(text, value) for k in key_occ if v[1] <= k[0]]
            if not pair:  # the original pair does not align either: no placebo for it
                bump("dropped")
                continue
            (vs, ve), (ks, _) = pair[0]
            want = lengths.count(vs, ve)
            levels = (
                ("preferred", lambda: [s for s in preferred if s[1] <= ks and not _overlaps(s, used + excluded)]),
                # text no annotation mentions
                ("random", lambda: _candidates(text, ks, annotated + excluded + used)),
                # dense annotations (SVAMP's cover most words): text that is not this key's
                ("relaxed", lambda: _candidates(text, ks, own + excluded + used)),
            )
            for how, make in levels:
                pool = [s for s in make() if unique(s)]
                if pool:
                    break
            else:
                bump("dropped")
                continue
            best = min(abs(lengths.count(*s) - want) for s in pool)
            span = rng.choice([s for s in pool if abs(lengths.count(*s) - want) == best])
            if best:
                bump("length_mismatch")
            bump(how)
            used.append(span)
            new_values.append(text[span[0]: span[1]])
        if new_values:
            out.append((key, new_values))
    return out


def placebo_records(records: list[Record], task: Task | str | None = None, seed: int = 0, tokenizer=None,
                    counts: dict | None = None) -> list[Record]:
    """Copies of ``records`` whose causal values are moved to spans with no causal information.

    Keys stay; each value becomes a span that (1) comes before the same key occurrence,
    (2) has the same token count (``tokenizer``'s tokens when given, else words and
    punctuation), (3) touches no annotated key or value, no ``exclude`` pattern of the
    task's placebo recipe and no digit, and (4) occurs once in the text, so it maps to
    exactly one set of columns. The task's ``prefer`` patterns are used first (STG_E:
    the unrelated items "Certain gene: v", "Room size: v"); random word spans fill the
    rest. Deterministic for a seed (each record draws from its own seeded generator).
    A value with no possible placebo is dropped and counted in ``counts["dropped"]``.
    """
    task = get_task(task) if isinstance(task, str) else task
    out = []
    for i, r in enumerate(records):
        rng = random.Random(f"placebo:{seed}:{i}")
        new = copy.deepcopy(r)
        new.important = placebo_annotation(r, task, rng, tokenizer, counts)
        out.append(new)
    return out
