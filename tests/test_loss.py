"""The Re-Attention loss against a per-row loop written from docs/method.md section 3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cattune.loss import LOSS_KINDS, attention_ratio, re_attention_loss, re_attention_loss_rows, row_loss, row_terms


def reference_loss(attn, mask, alpha, kind, attention_mask=None):
    """sum of l_i over counted rows / number of counted rows, one row at a time.

    A row counts when, among its visible columns (j <= i, not padding), at least one is
    causal and at least one is not. Returns (loss, rows counted, rows with r < alpha).
    """
    B, L, _ = attn.shape
    total = attn.sum() * 0  # keeps the graph when no row contributes
    counted = active = 0
    for b in range(B):
        for i in range(L):
            visible = [j for j in range(i + 1) if attention_mask is None or attention_mask[b, j]]
            causal = [j for j in visible if mask[b, i, j]]
            other = [j for j in visible if not mask[b, i, j]]
            if not causal or not other:
                continue
            counted += 1
            a1 = sum(attn[b, i, j] for j in causal) / len(causal)
            a0 = sum(attn[b, i, j] for j in other) / len(other)
            r = (a1 / a0).item() if a0 > 0 else math.inf
            if not r < alpha:
                continue
            active += 1
            if kind == "div":
                total = total - torch.log(1 + a1) / torch.log(1 + a0)
            elif kind == "div2":
                total = total - torch.log(1 + a1 / (1 + a0))
            elif kind == "nll":
                total = total - a1 / (a1 + a0)
            else:
                total = total + torch.clamp(alpha - a1 / a0, min=0)
    return (total / counted if counted else total), counted, active


def random_case(seed, B, L, density, zero_share=0.2, normalise=True):
    rng = np.random.default_rng(seed)
    attn = rng.random((B, L, L))
    attn[rng.random((B, L, L)) < zero_share] = 0.0  # exact zeros: a0 = 0 and a1 = 0 rows
    attn = np.tril(attn)
    if normalise:  # as softmax rows are; the loss itself does not need it
        attn = attn / np.maximum(attn.sum(-1, keepdims=True), 1e-12)
    mask = rng.random((B, L, L)) < density  # entries above the diagonal must be ignored
    return torch.tensor(attn, dtype=torch.float64, requires_grad=True), torch.tensor(mask)


def assert_matches_reference(attn, mask, alpha, kind, attention_mask=None):
    ours = re_attention_loss(attn, mask, alpha, kind, attention_mask=attention_mask)
    ref, counted, active = reference_loss(attn, mask, alpha, kind, attention_mask)
    assert abs(ours.item() - ref.item()) <= 1e-6
    (g_ours,) = torch.autograd.grad(ours, attn)
    (g_ref,) = torch.autograd.grad(ref, attn)
    assert torch.isfinite(g_ours).all()
    assert (g_ours - g_ref).abs().max().item() <= 1e-6
    return counted, active


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("seed", range(6))
def test_matches_the_per_row_loop(kind, seed):
    # alpha 3 on normalised random rows: some rows already satisfy it, most do not.
    attn, mask = random_case(seed, B=3, L=9, density=0.3)
    counted, active = assert_matches_reference(attn, mask, 3.0, kind)
    assert counted > active > 0


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_rows_that_satisfy_alpha_add_zero_but_count(kind):
    attn, mask = random_case(11, B=2, L=10, density=0.3)
    _, active_low = assert_matches_reference(attn, mask, 0.05, kind)
    counted, active_high = assert_matches_reference(attn, mask, 1e6, kind)
    assert active_low < active_high == counted  # with a huge alpha every a0 > 0 row is active
    # With alpha ~ 0 only rows with no causal attention at all (a1 = 0) stay active, and
    # they add at most alpha (hinge) or exactly 0 (the log and ratio kinds).
    assert 0 <= abs(re_attention_loss(attn, mask, 1e-9, kind).item()) <= 1e-9


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    B=st.integers(1, 3),
    L=st.integers(1, 8),
    density=st.sampled_from([0.0, 0.1, 0.4, 0.9, 1.0]),
    zero_share=st.sampled_from([0.0, 0.3, 0.9]),
    normalise=st.booleans(),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
    kind=st.sampled_from(LOSS_KINDS),
    padded=st.booleans(),
)
def test_matches_the_per_row_loop_property(seed, B, L, density, zero_share, normalise, alpha, kind, padded):
    attn, mask = random_case(seed, B, L, density, zero_share, normalise)
    attention_mask = None
    if padded:  # left padding: the first columns of some sequences are not visible
        pads = np.random.default_rng(seed + 1).integers(0, L, size=B)
        attention_mask = torch.tensor([[int(j >= p) for j in range(L)] for p in pads], dtype=torch.long)
    assert_matches_reference(attn, mask, alpha, kind, attention_mask)


def test_hand_example():
    # Row 2 attends 0.1 to its causal column 0 and 0.3, 0.6 to the others:
    # a1 = 0.1, a0 = 0.45, r = 0.22 < 2. Row 1 is all causal among j <= 1: not counted.
    attn = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0], [0.1, 0.3, 0.6]]], dtype=torch.float64)
    mask = torch.tensor([[[False] * 3, [True, True, False], [True, False, False]]])
    expected = {
        "div": -math.log(1.1) / math.log(1.45),
        "div2": -math.log(1 + 0.1 / 1.45),
        "nll": -0.1 / 0.55,
        "hinge": 2 - 0.1 / 0.45,
    }
    for kind, value in expected.items():
        assert re_attention_loss(attn, mask, 2.0, kind).item() == pytest.approx(value, abs=1e-12)


# --- edge cases: always finite, gradients too ---------------------------------------------


def finite_loss_and_grad(attn, mask, kind, alpha=2.0):
    attn = attn.clone().requires_grad_(True)
    loss = re_attention_loss(attn, mask, alpha, kind)
    (grad,) = torch.autograd.grad(loss, attn)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    return loss.item(), grad


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_cases_are_finite(kind, dtype):
    L = 4
    base = torch.tril(torch.full((1, L, L), 0.25, dtype=dtype))
    empty = torch.zeros(1, L, L, dtype=torch.bool)
    # No supervision at all: 0, and no gradient.
    loss, grad = finite_loss_and_grad(base, empty, kind)
    assert loss == 0.0 and not grad.any()
    # Every visible column causal: the row does not count.
    all_causal = empty.clone()
    all_causal[0, 2, :3] = True
    loss, grad = finite_loss_and_grad(base, all_causal, kind)
    assert loss == 0.0 and not grad.any()
    # a0 = 0 (all attention on the causal column): ratio infinite, loss 0, but it counts.
    zero_a0 = base.clone()
    zero_a0[0, 3] = torch.tensor([1.0, 0, 0, 0])
    one = empty.clone()
    one[0, 3, 0] = True
    loss, _ = finite_loss_and_grad(zero_a0, one, kind)
    assert loss == 0.0
    # ... so next to an active row it halves that row's loss.
    two = one.clone()
    two[0, 2, 0] = True
    loss_two, _ = finite_loss_and_grad(zero_a0, two, kind)
    only_row_2 = empty.clone()
    only_row_2[0, 2, 0] = True
    loss_row_2, _ = finite_loss_and_grad(zero_a0, only_row_2, kind)
    assert loss_row_2 != 0 and loss_two == pytest.approx(loss_row_2 / 2)
    # A row with no attention at all (a1 = a0 = 0), e.g. a fully masked one.
    dead = base.clone()
    dead[0, 3] = 0
    finite_loss_and_grad(dead, one, kind)
    # A tiny but positive a0 on a satisfied row: the discarded branch of the formula has
    # an infinite derivative there, which must not leak as 0 * inf = NaN.
    tiny = base.clone()
    tiny[0, 3] = torch.tensor([0.9, torch.finfo(dtype).tiny / 4, torch.finfo(dtype).tiny / 4, 0], dtype=dtype)
    assert tiny[0, 3, 1] > 0
    loss, grad = finite_loss_and_grad(tiny, one, kind)
    assert loss == 0.0 and not grad.any()


def test_row_loss_rejects_unknown_kind_and_shapes():
    with pytest.raises(ValueError, match="unknown Re-Attention loss kind"):
        re_attention_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), kind="kl")
    with pytest.raises(ValueError, match=r"\[B, L, L\]"):
        re_attention_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.bool))


# --- the row form ------------------------------------------------------------------------


def gather_rows(attn, mask):
    """The [B, R, L] inputs the trainer gets: supervised rows, padded with L-1."""
    B, L, _ = attn.shape
    visible_causal = mask & torch.ones(L, L, dtype=torch.bool).tril()
    row_lists = [[i for i in range(L) if visible_causal[b, i].any()] for b in range(B)]
    R = max(len(r) for r in row_lists)
    rows = torch.full((B, R), L - 1)
    causal = torch.zeros(B, R, L, dtype=torch.bool)
    for b, row_list in enumerate(row_lists):
        for slot, i in enumerate(row_list):
            rows[b, slot] = i
            causal[b, slot] = mask[b, i]
    return attn.gather(1, rows.unsqueeze(-1).expand(B, R, L)), rows, causal


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_row_form_equals_dense_form(kind, seed):
    attn, mask = random_case(100 + seed, B=4, L=12, density=0.15)
    attention_mask = torch.ones(4, 12, dtype=torch.long)
    attention_mask[1, :3] = 0
    for am in (None, attention_mask):
        dense = re_attention_loss(attn, mask, 2.0, kind, attention_mask=am)
        attn_rows, rows, causal = gather_rows(attn, mask)
        assert rows.shape[1] < 12  # rows without supervision are really left out
        rowwise = re_attention_loss_rows(attn_rows, rows, causal, 2.0, kind, attention_mask=am)
        assert abs(dense.item() - rowwise.item()) <= 1e-12
        g_dense, g_rows = torch.autograd.grad(dense, attn)[0], torch.autograd.grad(rowwise, attn)[0]
        assert torch.allclose(g_dense, g_rows, atol=1e-12, rtol=0)


def test_row_terms_means():
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    causal = torch.tensor([[True, False, True, True]])
    visible = torch.tensor([[True, True, True, False]])  # column 3 is padding or future
    a1, a0, counted = row_terms(attn, causal, visible)
    assert a1.item() == pytest.approx(0.2) and a0.item() == pytest.approx(0.2) and counted.item()
    assert row_loss(a1, a0, counted, alpha=1.0, kind="hinge").item() == 0.0  # r = 1 is not < 1


def test_attention_ratio_of_a_satisfied_row_does_not_overflow():
    # A row driven far past alpha: a0 a float32 subnormal, a1/a0 beyond float32's range.
    a1 = torch.tensor([0.5, 0.25])
    a0 = torch.tensor([1e-44, 0.25])
    ratio = attention_ratio(a1, a0, torch.tensor([True, True]))
    assert math.isfinite(ratio.item())
    assert ratio.item() == pytest.approx((0.5 / float(a0[0]) + 1.0) / 2, rel=1e-6)


def test_vectorised_at_training_size():
    # B=16, L=256 dense maps: one batched call, as a Python loop over rows would never be.
    torch.manual_seed(0)
    B, L = 16, 256
    scores = torch.randn(B, L, L, dtype=torch.float32)
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.softmax(scores, -1).requires_grad_(True)
    mask = (torch.rand(B, L, L) < 0.05).tril()
    losses = {}
    for kind in LOSS_KINDS:
        loss = re_attention_loss(attn, mask, 2.0, kind)
        (grad,) = torch.autograd.grad(loss, attn)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
        losses[kind] = loss.item()
    # Random attention puts about the same mass on causal and other columns (r ~ 1 < 2):
    # most rows are active, div ~ -1, nll ~ -1/2, hinge ~ 1.
    assert -1.2 < losses["div"] < -0.6 and -0.6 < losses["nll"] < -0.3 and 0.6 < losses["hinge"] < 1.2
