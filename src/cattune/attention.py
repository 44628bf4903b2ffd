"""Row-probe attention: SDPA's output untouched, probabilities only for supervised rows.

The Re-Attention loss needs the attention maps of a few rows per sequence. Asking the
model for ``output_attentions`` forces eager attention and materialises every layer's
[heads, L, L] map. Instead we register an attention function ("cat_sdpa") that calls
SDPA as usual and, when the forward call carries a ``cat_probe``, also computes
``softmax(q_rows K^T * scaling + mask)`` for the probe's rows, in float32, averaged over
heads and layers. Cost: O(layers * heads * R * L) for R rows instead of L^2.

The probe is passed as a keyword argument of the model's forward, which transformers
hands down to every attention call; nothing is stored globally.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

try:  # the mask function must be registered too, or padding is silently ignored
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # pragma: no cover - transformers < 4.53
    AttentionMaskInterface = None

ATTN_IMPLEMENTATION = "cat_sdpa"


class ProbeError(RuntimeError):
    pass


class AttentionProbe:
    """Collects the attention rows ``rows`` [B, R] of every layer during one forward.

    After the forward, ``result()`` is [B, R, L]: the probabilities averaged over heads
    and layers, differentiable with respect to the model's parameters. ``layers``: the
    indices (``module.layer_idx``) of the layers to average; None = all of them.
    """

    def __init__(self, rows: torch.Tensor, detach: bool = False, layers: frozenset[int] | None = None):
        self.rows = rows
        # detach: observe only (e.g. to log the ratio of a baseline), no gradient path
        self.detach = detach
        self.only_layers = layers
        self.requires_grad = torch.is_grad_enabled() and not detach
        self.total: torch.Tensor | None = None
        self.layers = 0  # layers averaged
        self.seen = 0  # attention calls, chosen layers or not
        self.closed = False

    def close(self) -> None:
        # A recomputation during backward (non-reentrant gradient checkpointing) runs the
        # same ops again; after close() their results are dropped, not added twice.
        self.closed = True

    def result(self) -> torch.Tensor:
        if self.total is None:
            if self.seen:
                raise ProbeError(f"the attention probe saw {self.seen} attention layer(s) but none of the chosen "
                                 f"layers {sorted(self.only_layers)}: do those layers have attention?")
            raise ProbeError(
                "the attention probe saw no attention layer: load the model with "
                f"attn_implementation={ATTN_IMPLEMENTATION!r} (cattune.attention.use_row_probe(model))"
            )
        return self.total / self.layers

    def record(self, module, query, key, attention_mask, scaling) -> None:
        self.seen += 1
        if self.only_layers is not None:
            index = getattr(module, "layer_idx", None)
            if index is None:
                raise ProbeError(f"{type(module).__name__} has no layer_idx: choosing layers (cat_layers) "
                                 "needs attention modules that know their index")
            if index not in self.only_layers:
                return
        # Reentrant checkpointing runs the training forward under no_grad; an eval-mode
        # forward under no_grad is someone measuring, not a loss about to be lost.
        if self.requires_grad and not torch.is_grad_enabled() and getattr(module, "training", True):
            raise ProbeError(
                "the attention probe ran without gradients inside a training forward: reentrant "
                "gradient checkpointing detaches it and the Re-Attention loss would silently do nothing. "
                "Use gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        if self.detach:
            query, key = query.detach(), key.detach()
        probs = row_probabilities(query, key, attention_mask, scaling, self.rows.to(query.device))
        if self.closed:
            return
        per_layer = probs.mean(dim=1)  # over heads: [B, R, L]
        self.total = per_layer if self.total is None else self.total + per_layer
        self.layers += 1


def row_probabilities(query, key, attention_mask, scaling, rows) -> torch.Tensor:
    """softmax(q_rows K^T * scaling + mask) in float32: [B, H, R, Lk].

    GQA without repeating K: the query heads of one KV head are stacked as extra rows.
    ``attention_mask`` is what SDPA got: None (causal), bool (True = attend) or additive.
    """
    B, H, _, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    R = rows.shape[1]
    if scaling is None:
        scaling = D**-0.5
    q = query.gather(2, rows.view(B, 1, R, 1).expand(B, H, R, D)).float()
    q = q.view(B, Hkv, (H // Hkv) * R, D)
    scores = torch.matmul(q, key.float().transpose(-1, -2)).view(B, H, R, Lk) * scaling
    if attention_mask is None:
        allowed = torch.arange(Lk, device=rows.device).view(1, 1, Lk) <= rows.unsqueeze(-1)
        scores = scores.masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
    else:
        m = attention_mask.expand(B, -1, -1, -1)
        m = m.gather(2, rows.view(B, 1, R, 1).expand(B, m.shape[1], R, Lk))
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, torch.finfo(torch.float32).min)
        else:
            scores = scores + m.float()
    return torch.softmax(scores, dim=-1)


def cat_sdpa_attention(module, query, key, value, attention_mask, cat_probe: AttentionProbe | None = None, **kwargs):
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if cat_probe is not None and query.shape[2] > 1:
        if key.shape[2] != query.shape[2]:
            raise ProbeError("the attention probe does not work with a KV cache: run a plain forward (use_cache=False)")
        cat_probe.record(module, query, key, attention_mask, kwargs.get("scaling"))
    return out, None


def resolve_layers(model, layers: Sequence[int] | None) -> frozenset[int] | None:
    """Layer indices (negative ones counted from the end) as the set ``AttentionProbe`` takes."""
    if layers is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise ValueError("choosing layers: the model's config has no num_hidden_layers")
    if not layers:
        raise ValueError("no layers chosen (cat_layers is empty): leave it unset to average every layer")
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n} layers (0..{n - 1}, or -{n}..-1)")
    return frozenset(i % n for i in layers)


def register() -> None:
    """Register "cat_sdpa" with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, cat_sdpa_attention)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_row_probe(model) -> None:
    """Switch a loaded model (or PEFT wrapper) to the row-probe attention."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # transformers 4.x
        base.config._attn_implementation = ATTN_IMPLEMENTATION


register()
