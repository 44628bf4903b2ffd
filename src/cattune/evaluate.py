"""Evaluation: greedy decoding of the answer, checking it (``cattune.checkers``), and
where the model looks.

Accuracy is exact match by default (docs/method.md section 4); a task's checker covers
numbers with a tolerance, GSM8K's "#### answer" and multiple-choice letters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from .attention import AttentionProbe, resolve_layers, use_row_probe
from .checkers import get_checker, numeric_error
from .loss import attention_ratio, row_terms, visible_columns
from .masks import collate, left_cut, render_prompt
from .models import prepare_tokenizer, takes_logits_to_keep
from .reading import Reading
from .records import Record

EVAL_BATCH_SIZE = 32  # records per generation / attention batch, wherever one is evaluated
ANSWER_MARGIN = 4  # new tokens beyond the longest target's: an answer a little longer is still read

@dataclass
class EvalResult:
    accuracy: float
    n: int
    correct: int
    predictions: list[dict] = field(default_factory=list)
    attention_ratio: float | None = None  # mean causal / non-causal attention, annotated records
    truncated: int = 0  # prompts longer than max_length, cut from the left as in training
    # Numeric tasks (every target a number): how far the answers are, which exact match
    # does not show: mean |prediction - target| over the answers that hold a number, and
    # how many do not. None / 0 when a target is not a number.
    abs_error: float | None = None
    unparsed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def default_max_new_tokens(tokenizer, records: list[Record]) -> int:
    """Room for the answer when none is given: the longest target's tokens + a margin."""
    return max(len(tokenizer(r.target, add_special_tokens=False)["input_ids"]) for r in records) + ANSWER_MARGIN


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], batch_size: int = EVAL_BATCH_SIZE,
                     max_new_tokens: int = 16, progress: bool = True, desc: str = "generate",
                     reading: Reading | None = None, stats: dict | None = None) -> list[str]:
    """Greedy decoding of each prompt's continuation, batched with left padding.

    ``reading`` (default: a plain prompt, no length limit): with its ``chat_template``
    each prompt is the user turn of the tokenizer's chat template and the answer the
    assistant's turn, rendered as in training (``render_prompt``). Its ``max_length``
    bounds prompt + answer as training does (``masks.left_cut``): a longer prompt loses
    tokens from the left, after the special tokens the tokenizer adds in front (BOS);
    ``stats["truncated"]`` counts those prompts.
    """
    reading = reading or Reading()
    chat_template, max_length = reading.chat_template, reading.max_length
    if max_length is not None and max_length <= max_new_tokens:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt before {max_new_tokens} new tokens")
    keep = None if max_length is None else max_length - max_new_tokens
    prompts = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    device = _device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    truncated = 0
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            fast = keep is not None and getattr(tokenizer, "is_fast", False)
            enc = tokenizer(prompts[i : i + batch_size], add_special_tokens=not chat_template,
                            return_offsets_mapping=fast)
            ids = enc["input_ids"]
            if keep is not None:  # as encode_record cuts a training record
                truncated += sum(len(x) > keep for x in ids)
                # A slow tokenizer has no offsets (and cannot train): its added BOS is a special id.
                offsets = ([[tuple(o) for o in off] for off in enc["offset_mapping"]] if fast else
                           [[(0, 0) if t in tokenizer.all_special_ids else (0, 1) for t in x] for x in ids])
                cuts = [left_cut(off, len(x), len(x), keep) for x, off in zip(ids, offsets)]
                ids = [x[:start] + x[start + n:] for x, (start, n) in zip(ids, cuts)]
            batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
            gen = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, batch["input_ids"].shape[1] :]
            outs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    if stats is not None:
        stats["truncated"] = truncated
    return outs


@torch.no_grad()
def causal_attention_ratio(model, tokenizer, records: list[Record], batch_size: int = EVAL_BATCH_SIZE,
                           reading: Reading | None = None) -> float | None:
    """Mean over supervised rows of a1/a0 (attention on causal columns vs the rest),
    the records read as ``reading`` says (default: ``Reading()``); its ``layers``: average
    only these layers' attention, as ``CATConfig.cat_layers`` does."""
    reading = reading or Reading()
    encoded = [reading.encode(tokenizer, r) for r in records if r.important]
    encoded = [e for e in encoded if e.pairs]
    if not encoded:
        return None
    use_row_probe(model)
    chosen = resolve_layers(model, reading.layer_list)
    device = _device(model)
    # Only attention is read: the LM head (a fifth of a small model's forward) runs on one position.
    skip_head = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        b = collate(encoded[i : i + batch_size], tokenizer.pad_token_id, padding_side="right")
        rows = b.rows.to(device)
        probe = AttentionProbe(rows, layers=chosen)
        model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), cat_probe=probe,
              use_cache=False, **skip_head)
        attn = probe.result()
        a1, a0, counted = row_terms(attn, b.causal.to(device), visible_columns(rows, attn.shape[-1],
                                                                               b.attention_mask.to(device)))
        n = int((counted & (a0 > 0)).sum())  # the rows attention_ratio averages, as the training log counts them
        total += float(attention_ratio(a1, a0, counted)) * n
        count += n
    return total / count if count else None


def evaluate(model, tokenizer, records: list[Record], checker: str | Callable = "exact",
             batch_size: int = EVAL_BATCH_SIZE, max_new_tokens: int | None = None, progress: bool = True,
             desc: str = "eval", reading: Reading | None = None, attention: bool = True) -> EvalResult:
    """Accuracy of greedy answers on ``records`` plus per-record predictions.

    ``max_new_tokens`` defaults to the longest target's token count + 4. ``reading``: how
    the records are read (``cattune.reading.Reading``): pass the training's
    (``Reading.of(config)``, or ``saved_reading(model_dir)``) to read them as training
    did and compare the attention ratio with the trainer's logged one. Its
    ``max_length`` (default: the model's ``max_position_embeddings``) cuts prompts from
    the left as in training; ``EvalResult.truncated`` counts the cuts. The ratio is
    measured on annotated records. ``attention=False`` skips it (accuracy only).
    """
    if not records:
        raise ValueError("nothing to evaluate: the record list is empty")
    check = get_checker(checker)
    reading = reading or Reading()
    if attention:
        resolve_layers(model, reading.layer_list)  # a layer out of range fails now, not after the answers
    prepare_tokenizer(tokenizer)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, records)
    if reading.max_length is None:
        reading = replace(reading, max_length=getattr(getattr(model, "config", None), "max_position_embeddings", None))
    was_training = model.training
    model.eval()
    stats: dict = {}
    try:
        answers = generate_answers(model, tokenizer, [r.prompt for r in records], batch_size, max_new_tokens,
                                   progress=progress, desc=desc, reading=reading, stats=stats)
        ratio = causal_attention_ratio(model, tokenizer, records, batch_size, reading) if attention else None
    finally:
        model.train(was_training)
    predictions = []
    correct = 0
    for r, a in zip(records, answers):
        ok = bool(check(a, r.target))
        correct += ok
        predictions.append({"prompt": r.prompt, "target": r.target, "prediction": a, "correct": ok})
    abs_error, unparsed = numeric_error([r.target for r in records], answers)
    return EvalResult(accuracy=correct / len(records), n=len(records), correct=correct,
                      predictions=predictions, attention_ratio=ratio, truncated=stats["truncated"],
                      abs_error=abs_error, unparsed=unparsed)
