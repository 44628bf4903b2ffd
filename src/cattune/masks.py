"""Token-level causal structure from word-level annotations, by character offsets.

For every occurrence of a KEY at tokens [k, k+n) and every occurrence of a VALUE at
tokens [v, v+m) with v + m <= k, the rows k-1 .. k+n-2 (the positions that *predict*
the key's tokens) get the value's tokens as causal columns (docs/method.md section 2).
Text is located by character offsets from the tokenizer, so any fast tokenizer works
without per-model special cases.

``span_columns`` decides which of a value's tokens become columns:

- ``"all"``: every token of the span (the paper).
- ``"last"``: the span's last token only. In a left-to-right model only the position
  at the end of a span has seen all of it; earlier positions (the "Smoking:" of
  "Smoking: 8") cannot carry the value, yet attending to them satisfies the loss.
  Measured on STG_E, "all" leaves CAT no better than plain fine-tuning out of
  distribution while "last" is what makes it work (docs/method.md, "Spans to columns").
- ``"last_word"``: the tokens of the span's last whitespace-separated word ("8" of
  "Smoking: 8", all of "41.9%"). Same as "last" when the value is one token; for a
  value of several tokens ("41", ".", "9", "%") it keeps them all, where "last" would
  keep only the "%", which a shallow model cannot use to read the number.
- ``"numbers"``: the tokens of the span's words that hold a digit (the "89" of "89
  apples", the "0.375" of "0.375 of an inch"); a span without a digit keeps its last
  word. Same as "last_word" where a value ends in its number (STG); on math word
  problems, whose annotations name phrases, "last_word" would keep "apples".
"""

from __future__ import annotations

import bisect
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .records import Record

SPAN_COLUMNS = ("all", "last", "last_word", "numbers")
# What every caller uses unless told otherwise, encode_record included (docs/defaults.md).
DEFAULT_SPAN_COLUMNS = "last_word"
DEFAULT_MAX_LENGTH = 256  # tokens per record in training (CATConfig.max_length) and in its checks


@dataclass
class EncodedRecord:
    input_ids: list[int]
    labels: list[int]
    # COO pairs (row, col) of the causal structure, rows already shifted by one.
    pairs: list[tuple[int, int]]
    unaligned: list[tuple[str, str, str]] = field(default_factory=list)
    truncated: bool = False
    n_pairs: int = 0  # (key, value) pairs the annotation asked for

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def rows(self) -> list[int]:
        """Supervised rows, sorted."""
        return sorted({r for r, _ in self.pairs})

    def columns(self, row: int) -> list[int]:
        return sorted(c for r, c in self.pairs if r == row)

    def causal_mask(self) -> torch.Tensor:
        """Dense [L, L] bool adjacency matrix M (lower-triangular)."""
        n = len(self.input_ids)
        mask = torch.zeros(n, n, dtype=torch.bool)
        if self.pairs:
            idx = torch.tensor(self.pairs, dtype=torch.long)
            mask[idx[:, 0], idx[:, 1]] = True
        return mask


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def find_occurrences(text: str, needle: str) -> list[tuple[int, int]]:
    """Character spans of ``needle`` in ``text`` that are not inside a longer word or number.

    "and" does not match inside "band", "3.4" not inside "33.4"; a needle that starts or
    ends with punctuation or space only needs the text to match there.
    """
    if not needle:
        return []
    out = []
    start = text.find(needle)
    while start != -1:
        end = start + len(needle)
        left_ok = start == 0 or not (_is_word_char(needle[0]) and _is_word_char(text[start - 1]))
        right_ok = end == len(text) or not (_is_word_char(needle[-1]) and _is_word_char(text[end]))
        # "4" must not match the "4" in "4.5", "3.4", "-4" or "3-4": a number is a number
        # with its dot and sign. Only a hyphen after a letter ("COVID-19") leaves it alone.
        if left_ok and needle[0].isdigit() and start >= 1:
            before, before2 = text[start - 1], text[start - 2] if start >= 2 else ""
            if (before == "." and before2.isdigit()) or (before == "-" and not before2.isalpha()):
                left_ok = False
        if right_ok and needle[-1].isdigit() and end + 1 < len(text) and text[end] == "." and text[end + 1].isdigit():
            right_ok = False
        if left_ok and right_ok:
            out.append((start, end))
        start = text.find(needle, start + 1)
    return out


class _Offsets:
    """Maps character spans to token spans for one tokenized text.

    ``kept`` is the character range that survived truncation: a span reaching outside it
    lost some of its tokens and is not placed at all (half a "Smoking: 8" is no value).
    """

    def __init__(self, offsets: list[tuple[int, int]], kept: tuple[int, int] = (0, 1 << 62)):
        # Machine integers, not lists of tuples: a long record has a million tokens.
        self.index = array("q", (i for i, (s, e) in enumerate(offsets) if e > s))  # skip specials
        self.starts = array("q", (offsets[i][0] for i in self.index))
        self.ends = array("q", (offsets[i][1] for i in self.index))
        self.kept = kept

    def is_cut(self, start: int, end: int) -> bool:
        return start < self.kept[0] or end > self.kept[1]

    def span(self, start: int, end: int) -> tuple[int, int] | None:
        """Token span [a, b) of the tokens overlapping characters [start, end)."""
        if self.is_cut(start, end):
            return None
        lo = bisect.bisect_right(self.ends, start)  # first token ending after `start`
        hi = bisect.bisect_left(self.starts, end)  # tokens starting before `end`
        if lo >= hi:
            return None
        return self.index[lo], self.index[hi - 1] + 1


def _columns(full: _Offsets, text: str, chars: tuple[int, int], tokens: tuple[int, int],
             span_columns: str) -> Sequence[int]:
    """The value's tokens that become causal columns (module docstring)."""
    v, v_end = tokens
    if span_columns == "last":
        return range(v_end - 1, v_end)
    if span_columns == "numbers":
        start = chars[0]
        cols: set[int] = set()
        for word in re.finditer(r"\S+", text[start:chars[1]]):
            if any(c.isdigit() for c in word[0]):
                token_span = full.span(start + word.start(), start + word.end())
                cols.update(range(*token_span) if token_span else ())
        if cols:
            return sorted(cols)
        # no number in the span: its last word, as "last_word"
    if span_columns in ("last_word", "numbers"):
        start, end = chars
        body = text[start:end].rstrip()
        words = body.split()
        last = words[-1] if words else ""
        word = full.span(start + len(body) - len(last), start + len(body)) if last else None
        # a word no token covers on its own: fall back to the span's last token
        return range(word[0], word[1]) if word is not None else range(v_end - 1, v_end)
    return range(v, v_end)


def _tokenize(tokenizer, text: str, add_special_tokens: bool):
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow tokenizer: causal masks need character offsets, "
            "load the fast one (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]  # no new tuple per token of a long record
    if offsets and not isinstance(offsets[0], tuple):
        offsets = [tuple(o) for o in offsets]
    return ids, offsets


class ChatTemplateError(ValueError):
    """The tokenizer's chat template is missing or cannot carry a record."""


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"chat_template is on, but the tokenizer ({type(tokenizer).__name__}, "
                                f"{getattr(tokenizer, 'name_or_path', '?')!r}) has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer, prompt: str, chat_template: bool = False) -> str:
    """The text a model is given to answer ``prompt``: the prompt itself, or with
    ``chat_template`` the user turn and the assistant's header (``add_generation_prompt``).
    Tokenize it with ``add_special_tokens=not chat_template``, as ``encode_record`` does."""
    if not chat_template:
        return prompt
    return _chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False))
    return ids


def _find_verbatim(haystack: str, text: str) -> tuple[int, int] | None:
    """Where ``text`` stands in ``haystack`` (a template may trim it); None if rewritten."""
    for needle in (text, text.strip()):
        at = haystack.find(needle) if needle else -1
        if at != -1:
            return at, at + len(needle)
    return None


@dataclass
class _Layout:
    text: str  # the characters the offsets point into
    ids: list[int]
    offsets: list[tuple[int, int]]
    labels: list[int]
    n_prompt: int  # tokens before the answer
    # Annotations are found in the record's own text (prompt + target); these pieces map
    # its characters [lo, hi) to text[lo + delta, hi + delta). One piece without a template.
    pieces: list[tuple[int, int, int]]

    def place(self, span: tuple[int, int], is_key: bool) -> tuple[int, int] | None:
        """A span of the record's text in ``text``; None where the template lost it.

        A span that runs from the prompt into the answer ("Answer: 32") is split by the
        template's turn markers: a key keeps its answer part (what the model produces), a
        value its prompt part (what the model reads).
        """
        s, e = span
        parts = [(max(s, lo) + d, min(e, hi) + d) for lo, hi, d in self.pieces if max(s, lo) < min(e, hi)]
        if not parts:
            return None
        return parts[-1] if is_key else parts[0]


def _plain_layout(tokenizer, record: Record, add_eos: bool) -> _Layout:
    # Prompt and target tokenized apart, so the prompt's tokens are those of generation.
    p_ids, p_off = _tokenize(tokenizer, record.prompt, add_special_tokens=True)
    t_ids, t_off = _tokenize(tokenizer, record.target, add_special_tokens=False)
    shift = len(record.prompt)
    n_prompt = len(p_ids)
    labels = [-100] * n_prompt + t_ids
    ids, offsets = p_ids, p_off  # extended in place: a long prompt's lists are not copied
    ids.extend(t_ids)
    offsets.extend((s + shift, e + shift) if e > s else (0, 0) for s, e in t_off)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        offsets.append((0, 0))
        labels.append(tokenizer.eos_token_id)
    return _Layout(record.text, ids, offsets, labels, n_prompt, [(0, len(record.text), 0)])


def _chat_layout(tokenizer, record: Record) -> _Layout:
    # The rendered conversation is one text; its prompt part is exactly what generation
    # renders (add_generation_prompt), and the answer is the rest up to the end of turn.
    prompt = render_prompt(tokenizer, record.prompt, chat_template=True)
    full = _chat(tokenizer, [{"role": "user", "content": record.prompt},
                             {"role": "assistant", "content": record.target}], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ChatTemplateError("the chat template renders the user turn differently once an assistant turn "
                                "follows, so the training prompt would not be the generation prompt")
    answer = full[len(prompt):]
    target = _find_verbatim(answer, record.target)
    if target is None:
        raise ChatTemplateError(f"the chat template rewrote the answer {record.target!r}: it is not in {answer!r}")
    user = _find_verbatim(prompt, record.prompt)
    p_ids, p_off = _tokenize(tokenizer, prompt, add_special_tokens=False)
    a_ids, a_off = _tokenize(tokenizer, answer, add_special_tokens=False)
    shift = len(prompt)
    target_end = shift + target[1]
    # The loss covers the assistant turn through its end-of-turn token; what the template
    # puts after it (a newline) is neither trained nor kept.
    special = _special_ids(tokenizer)
    end = next((i + 1 for i, (t, (s, _)) in enumerate(zip(a_ids, a_off)) if s + shift >= target_end and t in special),
               len(a_ids))
    ids = p_ids + a_ids[:end]
    offsets = p_off + [(s + shift, e + shift) if e > s else (0, 0) for s, e in a_off[:end]]
    labels = [-100] * len(p_ids) + list(a_ids[:end])
    n = len(record.prompt)
    pieces = [_piece(record.target, target, n, shift)]
    if user is not None:  # else the template rewrote the prompt: none of its annotations can be placed
        pieces.insert(0, _piece(record.prompt, user, 0, 0))
    return _Layout(full, ids, offsets, labels, len(p_ids), pieces)


def _piece(original: str, found: tuple[int, int], start: int, shift: int) -> tuple[int, int, int]:
    """The piece of the record's text (``original`` starts at ``start``) that stands at
    ``found`` in a rendered part starting at ``shift``, maybe without its edge spaces."""
    lead = len(original) - len(original.lstrip()) if found[1] - found[0] < len(original) else 0
    lo = start + lead
    return lo, lo + found[1] - found[0], shift + found[0] - lo


def left_cut(offsets: list[tuple[int, int]], n_prompt: int, length: int, max_length: int | None) -> tuple[int, int]:
    """Where a sequence of ``length`` tokens longer than ``max_length`` loses tokens, in
    training and in evaluation alike: ``(start, count)``, prompt tokens from the left after
    the special tokens the tokenizer adds in front (BOS: offsets (0, 0); a BOS a chat
    template writes as text is text, and may be cut), never the answer's. ``offsets``: at
    least the prompt's, its first ``n_prompt`` tokens."""
    start = 0
    while start < n_prompt and offsets[start] == (0, 0):
        start += 1
    if max_length is None or length <= max_length:
        return start, 0
    return start, min(length - max_length, n_prompt - start)  # even the whole prompt may not be enough


def encode_record(
    tokenizer,
    record: Record,
    max_length: int | None = None,
    span_columns: str = DEFAULT_SPAN_COLUMNS,
    add_eos: bool = True,
    chat_template: bool = False,
) -> EncodedRecord:
    """Tokenize ``prompt + target (+ eos)`` and place the record's causal annotation.

    Prompt and target are tokenized separately and concatenated, so the prompt's tokens
    are exactly those the model sees at generation time. With ``chat_template`` the
    prompt is the user turn and the target the assistant turn of the tokenizer's chat
    template; the labels cover the assistant turn and its end-of-turn token, and
    annotations are found in the record's own text and placed in the rendered user and
    assistant turns (never in a system prompt the template adds). Records longer than
    ``max_length`` lose prompt
    tokens from the left (the answer is kept); annotations cut off that way land in
    ``unaligned``. Nothing here raises on an annotation that cannot be placed: every
    such pair is reported in ``unaligned`` with the reason.
    """
    if span_columns not in SPAN_COLUMNS:
        raise ValueError(f"span_columns must be one of {SPAN_COLUMNS}, got {span_columns!r}")
    if chat_template:
        layout = _chat_layout(tokenizer, record)
    else:
        layout = _plain_layout(tokenizer, record, add_eos)
    ids, offsets, labels = layout.ids, layout.offsets, layout.labels
    n_prompt = layout.n_prompt

    keep_prefix, cut = left_cut(offsets, n_prompt, len(ids), max_length)  # positions >= keep_prefix shift left by `cut`
    truncated = max_length is not None and len(ids) > max_length
    kept_lo, kept_hi = 0, 1 << 62  # characters still covered by kept tokens
    if truncated:
        kept_lo = max((offsets[i][1] for i in range(keep_prefix, keep_prefix + cut)), default=0)
        for tokens in (ids, labels, offsets):  # in place, not copies of a long record's lists
            del tokens[keep_prefix : keep_prefix + cut]
        if len(ids) > max_length:  # the answer alone is too long: cut it from the right
            kept_hi = min((s for s, e in offsets[max_length:] if e > s), default=kept_hi)
            for tokens in (ids, labels, offsets):
                del tokens[max_length:]

    text = layout.text
    full = _Offsets(offsets, kept=(kept_lo, kept_hi))
    columns: dict[int, set[int]] = {}  # row -> its causal columns
    unaligned: list[tuple[str, str, str]] = []
    n_pairs = 0
    spans: dict[tuple[str, bool], list[_Span]] = {}  # each text is located once, however often it is named

    def located(needle: str, is_key: bool) -> list[_Span]:
        if (needle, is_key) not in spans:
            spans[needle, is_key] = [_Span.of(layout, full, occ, is_key, span_columns)
                                     for occ in find_occurrences(record.text, needle)]
        return spans[needle, is_key]

    for key, values in record.important:
        keys = located(key, True)
        for value in values:
            n_pairs += 1
            reason = _place(keys, located(value, False), columns)
            if reason:
                unaligned.append((key, value, reason))
    pairs = sorted((row, col) for row, cols in columns.items() for col in cols)

    return EncodedRecord(
        input_ids=ids,
        labels=labels,
        pairs=sorted(pairs),
        unaligned=unaligned,
        truncated=truncated,
        n_pairs=n_pairs,
    )


@dataclass
class _Span:
    """One occurrence of a key or value: its characters in the record's text and, when it
    lands on tokens (``status`` "ok"), its token span and (for a value) its columns."""

    start: int
    end: int
    status: str  # "ok", "lost" (the template rewrote it), "cut" (by max_length), "uncovered" (no token)
    tokens: tuple[int, int] = (0, 0)
    cols: Sequence[int] = range(0)

    @classmethod
    def of(cls, layout: _Layout, full: _Offsets, chars: tuple[int, int], is_key: bool, span_columns: str) -> "_Span":
        placed = layout.place(chars, is_key=is_key)
        if placed is None:
            return cls(*chars, "lost")
        tokens = full.span(*placed)
        if tokens is None:
            return cls(*chars, "cut" if full.is_cut(*placed) else "uncovered")
        cols = range(0) if is_key else _columns(full, layout.text, placed, tokens, span_columns)
        return cls(*chars, "ok", tokens, cols)


def _place(keys: list[_Span], values: list[_Span], columns: dict[int, set[int]]) -> str | None:
    """Add the causal columns of one (key, value) pair; the reason when none is placed.

    Every occurrence of the value that ends before an occurrence of the key starts is a
    column of that key occurrence's rows. Both lists are in text order, so the values
    before each key are a growing prefix: time and memory go with the occurrences and
    the columns placed, not with their product (a key and a value named 1000 times each
    in a long record took minutes and gigabytes).
    """
    if not keys or not values:
        return f"{'key' if not keys else 'value'} not found in text"
    if values[0].end > keys[-1].start:
        return "value not before key"
    before: set[str] = set()  # statuses of the values before the current key
    usable: list[_Span] = []  # the "ok" values before it, in text (and token) order
    cols: set[int] = set()  # the columns of the usable values that end by the key's first token
    j = n_cols = 0
    placed = lost = cut_off = uncovered = False
    for key in keys:
        while j < len(values) and values[j].end <= key.start:
            before.add(values[j].status)
            if values[j].status == "ok":
                usable.append(values[j])
            j += 1
        if not before:
            continue
        # Why a (key, value) combination failed, as each of them would say.
        lost |= key.status == "lost" or "lost" in before
        if key.status != "lost":
            cut_off |= (key.status == "cut" and bool(before - {"lost"})) or "cut" in before
            uncovered |= (key.status == "uncovered" and bool(before & {"ok", "uncovered"})) or (
                key.status == "ok" and "uncovered" in before)
        if key.status != "ok":
            continue
        k, k_end = key.tokens
        while n_cols < len(usable) and usable[n_cols].tokens[1] <= k:  # else they share a token
            cols.update(usable[n_cols].cols)
            n_cols += 1
        if n_cols:
            for row in range(k - 1, k_end - 1):
                columns.setdefault(row, set()).update(cols)
            placed = True
    if placed:
        return None
    if cut_off:
        return "cut by max_length"
    if lost:
        return "not in the chat template's rendering (the template rewrote the prompt)"
    if uncovered:
        return "no token covers the text"
    return "value and key share a token"


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [B, R] supervised row positions (padded with L-1)
    causal: torch.Tensor  # [B, R, L] bool: causal columns of each supervised row


def collate(encoded: list[EncodedRecord], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad a list of encoded records into tensors, the causal structure as rows x columns.

    Only supervised rows are kept (R = most supervised rows in one record), which is
    all the Re-Attention loss needs: [B, R, L] instead of [B, L, L].
    """
    if not encoded:
        raise ValueError("cannot collate an empty batch")
    B = len(encoded)
    L = max(len(e) for e in encoded)
    row_lists = [e.rows for e in encoded]
    R = max((len(r) for r in row_lists), default=0)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    rows = torch.full((B, R), L - 1, dtype=torch.long)
    causal = torch.zeros(B, R, L, dtype=torch.bool)
    for b, (e, row_list) in enumerate(zip(encoded, row_lists)):
        n = len(e)
        off = L - n if padding_side == "left" else 0
        input_ids[b, off : off + n] = torch.tensor(e.input_ids)
        attention_mask[b, off : off + n] = 1
        labels[b, off : off + n] = torch.tensor(e.labels)
        if row_list:
            slot = {row: i for i, row in enumerate(row_list)}
            rows[b, : len(row_list)] = torch.tensor(row_list) + off
            idx = torch.tensor([(slot[r], c + off) for r, c in e.pairs], dtype=torch.long)
            causal[b, idx[:, 0], idx[:, 1]] = True
    if padding_side == "left":
        rows[:, :] = torch.where(causal.any(-1), rows, torch.full_like(rows, L - 1))
    return Batch(input_ids, attention_mask, labels, rows, causal)
