"""linear_ce: values and gradients equal a naive full-logits CE, on the fast path (gradients computed in the
forward) and on the recompute path (incoming gradients that do not fit the ratios)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from salm_mtp.linear_ce import linear_ce


def _inputs(K=3, V=97, H=16, N=(23, 17, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(n, H, generator=g).requires_grad_(True) for n in N[:K]]
    W = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(True)
    ts = [torch.randint(0, V, (n,), generator=g) for n in N[:K]]
    return hs, W, ts


def _naive(hs, weights, ts):
    ce = torch.stack([F.cross_entropy(F.linear(h, w).float(), t, reduction="sum") for h, w, t in zip(hs, weights, ts)])
    hits = torch.stack([(F.linear(h, w).argmax(-1) == t).sum().float() for h, w, t in zip(hs, weights, ts)])
    return ce, hits


def _grads(loss, hs, W):
    return torch.autograd.grad(loss, [*hs, W], allow_unused=True, materialize_grads=True)


def _close(a, b):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("coef", [[1.0, 0.05, 0.05], [2.0, 0.0, 1.0], [1.0, 0.3, 0.7]])
def test_fast_path_equals_naive_values_and_gradients(chunk, coef):
    hs, W, ts = _inputs()
    ce, hits, rows = linear_ce(hs, [W] * 3, ts, chunk_size=chunk, ratios=coef)
    ref_ce, ref_hits = _naive(hs, [W] * 3, ts)
    _close([ce], [ref_ce])
    assert torch.equal(hits, ref_hits)
    assert torch.allclose(rows[:23].sum(), ref_ce[0], rtol=1e-5)
    scale = 0.37  # the loss is s * sum_k coef_k * ce_k: the gradients computed in the forward serve it exactly
    w = torch.tensor(coef)
    _close(_grads(scale * (w * ce).sum(), hs, W), _grads(scale * (w * ref_ce).sum(), hs, W))


def test_gradients_that_do_not_fit_the_ratios_are_recomputed_exactly():
    hs, W, ts = _inputs()
    ce, _, _ = linear_ce(hs, [W] * 3, ts, chunk_size=7, ratios=[1.0, 0.05, 0.05])
    ref_ce, _ = _naive(hs, [W] * 3, ts)
    w = torch.tensor([1.0, -2.0, 0.5])  # not proportional to the ratios
    _close(_grads((w * ce).sum(), hs, W), _grads((w * ref_ce).sum(), hs, W))


def test_without_ratios_recomputes_and_matches():
    hs, W, ts = _inputs()
    ce, _, _ = linear_ce(hs, [W] * 3, ts, chunk_size=4)
    ref_ce, _ = _naive(hs, [W] * 3, ts)
    _close(_grads(ce.sum(), hs, W), _grads(ref_ce.sum(), hs, W))


def test_detached_weight_for_the_depths_trains_the_weight_from_the_main_head_only():
    hs, W, ts = _inputs()
    weights = [W, W.detach(), W.detach()]
    ce, _, _ = linear_ce(hs, weights, ts, chunk_size=8, ratios=[1.0, 0.1, 0.1])
    ref_ce, _ = _naive(hs, weights, ts)
    w = torch.tensor([1.0, 0.1, 0.1])
    _close(_grads((w * ce).sum(), hs, W), _grads((w * ref_ce).sum(), hs, W))


def test_frozen_inputs_get_no_gradient_and_the_rest_still_match():
    hs, W, ts = _inputs()
    h0 = hs[0].detach()
    W0 = W.detach()
    ce, _, _ = linear_ce([h0, hs[1]], [W0, W0], ts[:2], chunk_size=3, ratios=[1.0, 0.5])
    ref_ce, _ = _naive([h0, hs[1]], [W0, W0], ts[:2])
    (g,) = torch.autograd.grad((ce * torch.tensor([1.0, 0.5])).sum(), [hs[1]])
    (r,) = torch.autograd.grad((ref_ce * torch.tensor([1.0, 0.5])).sum(), [hs[1]])
    assert torch.allclose(g, r, rtol=1e-5, atol=1e-6)


def test_bf16_weight_and_hidden_match_autograd_of_the_same_maths():
    hs, W, ts = _inputs(K=2, N=(31, 9))
    hb = [h.detach().bfloat16().requires_grad_(True) for h in hs]
    Wb = W.detach().bfloat16().requires_grad_(True)
    ce, _, _ = linear_ce(hb, [Wb, Wb], ts, chunk_size=8, ratios=[1.0, 0.5])
    ref_ce, _ = _naive(hb, [Wb, Wb], ts)
    assert torch.allclose(ce, ref_ce, rtol=1e-3)
    w = torch.tensor([1.0, 0.5])
    got, ref = _grads((w * ce).sum(), hb, Wb), _grads((w * ref_ce).sum(), hb, Wb)
    for x, y in zip(got, ref):
        assert x.dtype == torch.bfloat16
        assert (x.float() - y.float()).norm() <= 2e-2 * y.float().norm()


@pytest.mark.parametrize("ratios", [[1.0, 0.5, 0.25], None])
def test_interleaved_weights_keep_each_heads_rows_in_order(ratios):
    # heads 0 and 2 share W (their rows are stacked into one chunked pass), head 1 has its own weight
    hs, W, ts = _inputs(N=(11, 9, 13))
    W2 = (torch.randn_like(W) * 0.3).requires_grad_(True)
    ce, hits, rows = linear_ce(hs, [W, W2, W], ts, chunk_size=5, ratios=ratios)
    ref_ce, ref_hits = _naive(hs, [W, W2, W], ts)
    _close([ce], [ref_ce])
    assert torch.equal(hits, ref_hits)
    ref_rows = torch.cat([F.cross_entropy(F.linear(h, w), t, reduction="none") for h, w, t in zip(hs, [W, W2, W], ts)])
    _close([rows], [ref_rows])  # per-row CE in head order, not in stacking order
    coef = torch.tensor(ratios or [1.0, 1.0, 1.0])
    got = torch.autograd.grad((coef * ce).sum(), [*hs, W, W2])
    ref = torch.autograd.grad((coef * ref_ce).sum(), [*hs, W, W2])
    _close(got, ref)


def test_chunk_size_below_one_is_refused():
    h, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1, got 0 \(model.lm_head_chunk_size\)"):
        linear_ce([h], [w], [t], chunk_size=0)
