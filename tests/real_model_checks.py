"""Checks shared by the real-model tests (test_smollm2.py, test_gemma3.py): the same
claims, made of each model family."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import torch

from cattune.masks import encode_record, find_occurrences
from cattune.config import CATConfig
from cattune.models import lora_model
from cattune.trainer import CATTrainer


def alignment_counts(tok, annotated_corpus, chat_template=False) -> dict[str, tuple[int, int]]:
    """Every annotation of every corpus encoded with ``tok``: a pair is aligned exactly when
    its value occurs before its key in the text. Returns corpus -> (aligned, pairs)."""
    counts = {}
    for corpus, records in annotated_corpus.items():
        pairs = aligned = 0
        for record in records:
            enc = encode_record(tok, record, span_columns="last_word", chat_template=chat_template)
            missing = {(k, v) for k, v, _ in enc.unaligned}
            for key, values in record.important:
                kcs = find_occurrences(record.text, key)
                for value in values:
                    vcs = find_occurrences(record.text, value)
                    alignable = any(ve <= ks for ks, _ in kcs for _, ve in vcs)
                    assert alignable == ((key, value) not in missing), (corpus, key, value, enc.unaligned)
                    pairs += 1
                    aligned += alignable
        counts[corpus] = (aligned, pairs)
    return counts


def check_cat_steps(base, tok, records, output_dir, lora: bool, steps: int = 3, chat_template: bool = False) -> list:
    """CAT-train a copy of ``base`` for ``steps`` steps on the same two records: the attention
    ratio rises at every step, the attention loss falls, every trainable weight changes
    (only the adapters under LoRA). Returns the ratios."""
    model = copy.deepcopy(base)
    model.train()
    if lora:
        model = lora_model(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = CATConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2,
                     learning_rate=5e-4 if lora else 3e-5, cat_alpha=1e6, cat_gamma=1.0, cat_gamma_decay=0.0,
                     cat_layers=[-1], chat_template=chat_template, answer_logits_only=True, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    # the same two records every step: the ratio they reach is the loss's doing
    trainer = CATTrainer(model=model, args=args, train_dataset=records[:2], processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "attn_ratio" in h]
    assert len(logs) == steps and all(torch.isfinite(torch.tensor([h["loss_ce"], h["loss_attn"]])).all() for h in logs)
    ratios = [h["attn_ratio"] for h in logs]
    assert ratios == sorted(ratios) and ratios[-1] > 1.05 * ratios[0], ratios  # rises at every step
    assert logs[-1]["loss_attn"] < logs[0]["loss_attn"]
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    if lora:
        assert all("lora_" in n for n in changed)
    return ratios


def cli(*args, timeout=600):
    """``cattune ARGS`` in a subprocess, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cattune.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
