import math

import pytest
import torch

from salm_mtp.loss import combine_losses, head_stats, mtp_targets

X = -100


def _naive(h0, mtp_h, W, targets, lam, dp_size):
    """Explicit loops over depths, rows and positions (the maths of DESIGN.md §3)."""
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
