"""The embedded default model: a small Llama built from a config, no download.

Its tokenizer is trained locally with ``tokenizers`` on the task's own text: byte-level
BPE with digit runs split from letters, so frequent numbers ("12") become one token and
numbers it never saw still encode, digit by digit. ``individual_digits=True`` gives one
token per digit instead (as Llama/Qwen), ``split_numbers=False`` lets a number keep its
leading space (" 8" one token); on STG_E validation data the defaults, whole numbers split
from their space, trained best (docs/defaults.md). This is what ``cattune train``,
``cattune demo`` and the experiment runner use when no model is given.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# Sized for a 2-core CPU: ~0.4M parameters, a few minutes for an STG run.
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def train_tokenizer(texts: Iterable[str], kind: str = "bytelevel", vocab_size: int = 1000,
                    individual_digits: bool = False, split_numbers: bool = True) -> PreTrainedTokenizerFast:
    """Train a fast tokenizer on ``texts``.

    ``"bytelevel"``: GPT-2-style byte-level BPE. ``"metaspace"``: sentencepiece-style
    BPE with the "▁" word marker (as Llama-2 / T5 tokenizers). ``individual_digits``:
    every digit its own token (as Llama/Qwen); otherwise digit runs are pre-split from
    letters and BPE merges frequent numbers into one token. ``split_numbers=False``: no
    digit pre-splitting at all, so a number can merge with the space before it.
    """
    specials = list(SPECIAL.values())
    digits = (pre_tokenizers.Digits(individual_digits=individual_digits) if split_numbers
              else pre_tokenizers.Sequence([]))
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"], byte_fallback=False))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [digits, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: use 'bytelevel' or 'metaspace'")
    tok.train_from_iterator(list(texts), trainer=trainer)
    if kind == "metaspace":  # sentencepiece-style: BOS in front of every text
        from tokenizers.processors import TemplateProcessing

        bos = SPECIAL["bos_token"]
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.padding_side = "left"
    return fast


def build(texts: Iterable[str], seed: int = 0, vocab_size: int = 1000, individual_digits: bool = False,
          split_numbers: bool = True, **overrides):
    """A fresh tiny Llama and a tokenizer trained on ``texts``: ``(model, tokenizer)``.

    The tokenizer options are :func:`train_tokenizer`'s; ``overrides`` change the
    ``LlamaConfig`` (hidden_size, num_hidden_layers, ...)."""
    import torch

    tokenizer = train_tokenizer(texts, "bytelevel", vocab_size=vocab_size, individual_digits=individual_digits,
                                split_numbers=split_numbers)
    cfg = dict(TINY_CONFIG, **overrides)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model, tokenizer
