import math

import pytest
import torch

from salm_mtp.loss import combine_losses, head_stats, mtp_targets

X = -100


def _naive(h0, mtp_h, W, targets, lam, dp_size):
    """Explicit loops over depths, rows and positions (the maths of docs/design.md §3)."""
    B, T, _ = h0.shape
    n = sum(1 for b in range(B) for t in range(T) if targets[b, t] != X)
    main = 0.0
    for b in range(B):
        for t in range(T):
            y = int(targets[b, t])
            if y != X:
                main = main - torch.log_softmax(W @ h0[b, t], -1)[y]
    depth_sums = []
    for k, hk in enumerate(mtp_h, start=1):
        s = 0.0
        for b in range(B):
            for t in range(T):
                if t + k < T and int(targets[b, t + k]) != X:
                    s = s - torch.log_softmax(W @ hk[b, t], -1)[int(targets[b, t + k])]
        depth_sums.append(s)
    D = len(mtp_h)
    mtp = lam / D * sum(depth_sums) / n if D else 0.0
    return (main / n + mtp) * dp_size, main / n, mtp


@pytest.mark.parametrize("D", [1, 3])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_mtp_loss_matches_naive_reference(D, dp_size):
    g = torch.Generator().manual_seed(D)
    B, T, H, V = 2, 7, 8, 11
    h0 = torch.randn(B, T, H, generator=g, requires_grad=True)
    mtp_h = [torch.randn(B, T, H, generator=g, requires_grad=True) for _ in range(D)]
    W = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = X  # prompt / audio positions
    targets[1, 4:] = X  # padding
    targets[0, 5] = X  # an ignored position inside the answer
    stats = head_stats(h0, mtp_h, W, targets, chunk_size=3)
    n = (targets != X).sum().float()
    loss, main, mtp = combine_losses(stats, n, 0.1, dp_size)
    ref_loss, ref_main, ref_mtp = _naive(h0, mtp_h, W, targets, 0.1, dp_size)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert main.item() == pytest.approx(ref_main.item(), rel=1e-6)
    assert mtp.item() == pytest.approx(ref_mtp.item(), rel=1e-6)
    grads = torch.autograd.grad(loss, [h0, W, *mtp_h])
    ref_grads = torch.autograd.grad(ref_loss, [h0, W, *mtp_h])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_counts_and_accuracy():
    W = torch.eye(4)
    h = torch.eye(4)[[0, 1, 2, 3]][None] * 10  # argmax at position t is t
    targets = torch.tensor([[0, 1, 3, X]])
    (main,) = head_stats(h, [], W, targets)
    assert main.count.item() == 3 and main.correct.item() == 2
    assert main.ce_sum.item() == pytest.approx(2 * math.log(1 + 3 * math.exp(-10)) + (10 + math.log(1 + 3 * math.exp(-10))), rel=1e-5)


def test_mtp_targets_roll_without_wraparound():
    t = torch.tensor([[X, 5, 6, 7, X]])
    assert mtp_targets(t, 1).tolist() == [[5, 6, 7, X, X]]
    assert mtp_targets(t, 2).tolist() == [[6, 7, X, X, X]]


def test_no_valid_targets_keeps_graph():
    h = torch.randn(1, 3, 4, requires_grad=True)
    W = torch.randn(5, 4, requires_grad=True)
    (s,) = head_stats(h, [], W, torch.full((1, 3), X))
    s.ce_sum.backward()
    assert s.count.item() == 0 and h.grad is not None and h.grad.abs().sum() == 0


def _naive_distill(h0, mtp_h, W, targets, lam, kind, lk_lambda):
    """Full (B, T, V) logits, explicit positions: depth k at t against softmax(W h0[t+k]) detached."""
    B, T, _ = h0.shape
    n = sum(1 for b in range(B) for t in range(T) if targets[b, t] != X)
    main = sum(-torch.log_softmax(W @ h0[b, t], -1)[int(targets[b, t])]
               for b in range(B) for t in range(T) if targets[b, t] != X)
    sums = []
    for k, hk in enumerate(mtp_h, start=1):
        logq = torch.log_softmax(hk @ W.T, -1)  # (B, T, V)
        logp = torch.log_softmax(h0.detach() @ W.detach().T, -1)
        s = 0.0
        for b in range(B):
            for t in range(T):
                if t + k < T and int(targets[b, t + k]) != X:
                    p, lq = logp[b, t + k].exp(), logq[b, t]
                    kl = (p * (logp[b, t + k] - lq)).sum()
                    tv = 0.5 * (p - lq.exp()).abs().sum()
                    s = s + (kl if kind == "kl" else lk_lambda * kl + (1 - lk_lambda) * tv)
        sums.append(s)
    return main / n + lam / len(mtp_h) * sum(sums) / n


@pytest.mark.parametrize("kind", ["kl", "lk"])
@pytest.mark.parametrize("D", [1, 2])
def test_distillation_losses_match_naive_full_logits(kind, D):
    g = torch.Generator().manual_seed(10 + D)
    B, T, H, V = 2, 7, 8, 11
    h0 = torch.randn(B, T, H, generator=g, requires_grad=True)
    mtp_h = [torch.randn(B, T, H, generator=g, requires_grad=True) for _ in range(D)]
    W = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = X
    targets[1, 5:] = X
    stats = head_stats(h0, mtp_h, W, targets, chunk_size=3, mtp_loss=kind, lk_lambda=0.3)
    n = (targets != X).sum().float()
    loss, _, _ = combine_losses(stats, n, 0.1, 1)
    ref = _naive_distill(h0, mtp_h, W, targets, 0.1, kind, 0.3)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    grads = torch.autograd.grad(loss, [h0, W, *mtp_h])
    ref_grads = torch.autograd.grad(ref, [h0, W, *mtp_h])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(s.div_sum is not None and s.div_sum.item() > 0 for s in stats[1:])
    # the CE of each depth is still reported (logging), from the same chunks
    ce = head_stats(h0, mtp_h, W, targets, chunk_size=3)
    for a, b in zip(stats, ce):
        assert a.ce_sum.item() == pytest.approx(b.ce_sum.item(), rel=1e-6) and a.correct == b.correct


def test_kl_is_zero_when_the_head_equals_the_backbone():
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(1, 6, 4, generator=g)
    W = torch.randn(9, 4, generator=g)
    targets = torch.randint(0, 9, (1, 6), generator=g)
    hk = torch.roll(h0, -1, dims=1)  # depth 1 at t holds exactly h0[t+1]
    (_, s) = head_stats(h0, [hk], W, targets, mtp_loss="kl")
    assert abs(s.div_sum.item()) < 1e-5
