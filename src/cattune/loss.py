"""The Re-Attention loss (docs/method.md section 3).

For a supervised row, a1 is the mean attention on its causal columns and a0 the mean on
every other visible column; rows whose ratio a1/a0 is below ``alpha`` are pushed up.
One implementation works on rows: the dense [B, L, L] form and the [B, R, L] form that
training gets from the row probe both go through ``row_terms``.
"""

from __future__ import annotations

import torch

LOSS_KINDS = ("div", "div2", "nll", "hinge")
DEFAULT_ALPHA = 2.0  # the paper's target ratio of causal to other attention (CATConfig.cat_alpha)


def row_terms(attn: torch.Tensor, causal: torch.Tensor, visible: torch.Tensor):
    """Mean attention on causal (a1) and other visible (a0) columns of each row.

    ``attn`` [..., L] float, ``causal`` and ``visible`` [..., L] bool. A row counts when
    it has at least one visible causal column and at least one visible other column.
    Returns ``(a1, a0, counted)``, each shaped like ``attn[..., 0]``.
    """
    causal = causal & visible
    other = visible & ~causal
    n1 = causal.sum(-1)
    n0 = other.sum(-1)
    counted = (n1 > 0) & (n0 > 0)  # = counted_rows(causal, visible)
    zero = attn.new_zeros(())
    a1 = torch.where(causal, attn, zero).sum(-1) / n1.clamp(min=1)
    a0 = torch.where(other, attn, zero).sum(-1) / n0.clamp(min=1)
    return a1, a0, counted


def counted_rows(causal: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Rows the loss averages over: a visible causal column and a visible other one.

    Depends on the masks only, so a trainer can count a whole step's rows up front.
    """
    causal = causal & visible
    return causal.any(-1) & (visible & ~causal).any(-1)


def row_loss(a1: torch.Tensor, a0: torch.Tensor, counted: torch.Tensor, alpha: float, kind: str,
             reduction: str = "mean") -> torch.Tensor:
    """Per-row loss over counted rows; rows with a1/a0 >= alpha add 0.

    ``reduction="mean"``: divided by the number of counted rows (the paper's L_attn);
    ``"sum"``: left for the caller to divide by a count over several batches.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown Re-Attention loss kind {kind!r}; choose from {LOSS_KINDS}")
    positive = a0 > 0
    with torch.no_grad():  # a0 = 0: the ratio is infinite, no loss
        active = counted & positive & (a1 / torch.where(positive, a0, torch.ones_like(a0)) < alpha)
    # The formulas only ever see active rows' values. torch.where alone is not enough: an
    # inactive row with a tiny a0 (1e-45 after a sharp softmax) gives an infinite
    # derivative in its discarded branch, and 0 * inf poisons every gradient with NaN.
    a1 = torch.where(active, a1, torch.zeros_like(a1))
    a0 = torch.where(active, a0, torch.ones_like(a0))
    if kind == "div":
        per_row = -torch.log1p(a1) / torch.log1p(a0)
    elif kind == "div2":
        per_row = -torch.log1p(a1 / (1 + a0))
    elif kind == "nll":
        per_row = -a1 / (a1 + a0)
    else:  # hinge
        per_row = alpha - a1 / a0
    per_row = torch.where(active, per_row, torch.zeros_like(per_row))
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / counted.sum().clamp(min=1)


def attention_ratio(a1: torch.Tensor, a0: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Mean a1/a0 over counted rows (a diagnostic: > 1 means causal columns get more).

    Taken in float64: once a row is satisfied, a0 can shrink to a subnormal float32
    (1e-44) and a1/a0 then overflows float32 to inf.
    """
    a1, a0 = a1.double(), a0.double()
    ok = counted & (a0 > 0)
    ratio = torch.where(ok, a1 / torch.where(ok, a0, torch.ones_like(a0)), torch.zeros_like(a1))
    return ratio.sum() / ok.sum().clamp(min=1)


def visible_columns(rows: torch.Tensor, length: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, R, L] bool: columns j <= row that are not padding."""
    cols = torch.arange(length, device=rows.device)
    visible = cols.view(1, 1, -1) <= rows.unsqueeze(-1)
    if attention_mask is not None:
        visible = visible & attention_mask.bool().unsqueeze(1)
    return visible


def re_attention_loss(
    attn: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    kind: str = "div",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-Attention loss on dense maps.

    ``attn`` [B, L, L]: attention probabilities averaged over layers and heads.
    ``mask`` [B, L, L] bool: the causal adjacency matrix M. ``attention_mask`` [B, L]
    (optional) excludes padding columns. Returns a scalar.
    """
    if attn.dim() != 3 or attn.shape != mask.shape or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"attn and mask must both be [B, L, L], got {tuple(attn.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    # Only rows with a causal column can count: gather those (one per "batch" entry)
    # instead of passing all B x L.
    b, i = mask.any(-1).nonzero(as_tuple=True)
    return re_attention_loss_rows(attn[b, i].unsqueeze(1), i.unsqueeze(1), mask[b, i].unsqueeze(1), alpha, kind,
                                  None if attention_mask is None else attention_mask[b])


def re_attention_loss_rows(
    attn_rows: torch.Tensor,
    rows: torch.Tensor,
    causal: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    kind: str = "div",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-Attention loss on the supervised rows only: ``attn_rows`` [B, R, L] are the
    rows ``rows`` [B, R] of the averaged map, ``causal`` [B, R, L] their columns of M."""
    visible = visible_columns(rows, attn_rows.shape[-1], attention_mask)
    return row_loss(*row_terms(attn_rows, causal, visible), alpha=alpha, kind=kind)
