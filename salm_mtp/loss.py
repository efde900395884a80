"""Token-normalised losses of the main head and the MTP depths (pure functions, DESIGN.md §3).

    N      = all_reduce_sum(#valid main targets on this rank)            global count
    L_main = sum_t CE(main) / N
    L_mtp  = lambda / D * sum_k sum_t CE(depth k) / N
    loss   = (L_main + L_mtp) * dp_size      DDP / FSDP2 average gradients over ranks: the factor
                                              cancels that average, so gradients equal those of
                                              the global-batch token mean.

Self-distillation of the MTP depths (``model.mtp.loss: kl | lk``, DESIGN.md §12): depth k at
position t is trained against the backbone's own detached next-token distribution at t + k (the main
head predicts token t+k+1 there, as depth k does at t), on exactly the positions the CE uses:

    p = softmax(lm_head(h0[t + k])).detach()      q = softmax(lm_head(h_k[t]))
    kl: KL(p || q) = sum_v p (log p - log q)      lk: lk_lambda * KL + (1 - lk_lambda) * TV,  TV = 0.5 sum_v |p - q|
    L_mtp = lambda / D * sum_k sum_t div_k(t) / N

The lm_head runs only on target positions and in row chunks, each recomputed in backward, so no
(B, T, V) logits tensor exists for any depth (V is 131k on real Nemotron models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from salm_mtp.modules.merge import IGNORE_INDEX, shift_left


@dataclass
class CEStats:
    """Sums over one rank's valid targets of one head (main or one MTP depth)."""

    ce_sum: torch.Tensor
    """() summed cross-entropy, differentiable."""
    correct: torch.Tensor
    """() number of targets whose argmax is right (float, no grad)."""
    count: torch.Tensor
    """() number of valid targets (float, no grad)."""
    div_sum: torch.Tensor | None = None
    """() summed divergence from the backbone's distribution (kl / lk self-distillation), differentiable; None for CE."""


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(h, weight).float()  # (n, V) fp32: the largest tensor of the step, one chunk at a time
    ce = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum().float()
    return ce, correct


def token_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 2048) -> CEStats:
    """Summed CE and top-1 hits of ``hidden @ weight.T`` against ``targets`` on valid positions.

    Args:
        hidden: (B, T, H) hidden states (post final norm).
        weight: (V, H) lm_head weight.
        targets: (B, T) target ids, IGNORE_INDEX where nothing is predicted.
        chunk_size: rows of logits computed at once.
    """
    valid = targets != IGNORE_INDEX  # (B, T)
    h = hidden[valid]  # (N, H): prompt, audio and padding positions never reach the lm_head
    t = targets[valid]  # (N,)
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), device=hidden.device)
    for s in range(0, h.shape[0], chunk_size):
        args = (h[s : s + chunk_size], weight, t[s : s + chunk_size])
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            ce, ok = checkpoint(_chunk_ce, *args, use_reentrant=False)  # recompute logits in backward
        else:
            ce, ok = _chunk_ce(*args)
        ce_sum = ce_sum + ce
        correct = correct + ok.detach()
    if h.shape[0] == 0:  # keep the graph connected so every rank runs the same backward
        ce_sum = ce_sum + 0.0 * hidden.sum() + 0.0 * weight.sum()
    return CEStats(ce_sum=ce_sum, correct=correct, count=valid.sum().float())


MTP_LOSSES = ("ce", "kl", "lk")


def _chunk_distill(hq: torch.Tensor, hp: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   kind: str, lk_lambda: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logq = F.linear(hq, weight).float().log_softmax(-1)  # (n, V) fp32, one chunk at a time
    with torch.no_grad():
        logp = F.linear(hp, weight.detach()).float().log_softmax(-1)  # (n, V) the backbone's own, detached
        p = logp.exp()
    ce = -logq.gather(1, targets[:, None]).sum()
    correct = (logq.argmax(-1) == targets).sum().float()
    div = (p * (logp - logq)).sum()
    if kind == "lk":
        div = lk_lambda * div + (1.0 - lk_lambda) * 0.5 * (p - logq.exp()).abs().sum()
    return ce, correct, div


def token_distill(hidden: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  kind: str = "kl", lk_lambda: float = 0.5, chunk_size: int = 2048) -> CEStats:
    """CE stats plus the summed divergence of ``hidden @ weight.T`` from ``softmax(teacher @ weight.T)``.

    Args:
        hidden: (B, T, H) depth-k hidden states (post final norm).
        teacher: (B, T, H) backbone h0 rolled left by k (row t holds h0[t + k]); detached here.
        weight: (V, H) lm_head weight (the teacher side uses it detached).
        targets: (B, T) depth-k targets, IGNORE_INDEX where nothing is predicted (those rows are skipped).
        kind: "kl" or "lk".
        lk_lambda: weight of the KL term in the LK loss.
    """
    if kind not in ("kl", "lk"):
        raise ValueError(f"model.mtp.loss must be one of {MTP_LOSSES}, got {kind!r}; set --model.mtp.loss")
    valid = targets != IGNORE_INDEX  # (B, T)
    h, hp, t = hidden[valid], teacher.detach()[valid], targets[valid]  # (N, H), (N, H), (N,)
    zero = hidden.new_zeros((), dtype=torch.float32)
    ce_sum, div_sum, correct = zero, zero, torch.zeros((), device=hidden.device)
    for s in range(0, h.shape[0], chunk_size):
        args = (h[s : s + chunk_size], hp[s : s + chunk_size], weight, t[s : s + chunk_size], kind, lk_lambda)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            ce, ok, div = checkpoint(_chunk_distill, *args, use_reentrant=False)  # recompute in backward
        else:
            ce, ok, div = _chunk_distill(*args)
        ce_sum, div_sum, correct = ce_sum + ce, div_sum + div, correct + ok.detach()
    if h.shape[0] == 0:  # keep the graph connected so every rank runs the same backward
        div_sum = div_sum + 0.0 * hidden.sum() + 0.0 * weight.sum()
    return CEStats(ce_sum=ce_sum, correct=correct, count=valid.sum().float(), div_sum=div_sum)


def mtp_targets(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Depth-k targets: main targets rolled left by k, the last k positions ignored. (B, T) -> (B, T)."""
    return shift_left(targets, k, IGNORE_INDEX)


def head_stats(
    h0: torch.Tensor,
    mtp_hiddens: list[torch.Tensor],
    weight: torch.Tensor,
    targets: torch.Tensor,
    mtp_weight: torch.Tensor | None = None,
    chunk_size: int = 2048,
    mtp_loss: str = "ce",
    lk_lambda: float = 0.5,
) -> list[CEStats]:
    """CE stats of the main head (index 0) and of each MTP depth k (index k).

    ``mtp_weight`` lets the MTP depths use a detached lm_head weight (loss stopped at the backbone).
    ``mtp_loss`` "kl" / "lk" adds each depth's divergence from the backbone's distribution (module docstring).
    """
    stats = [token_ce(h0, weight, targets, chunk_size)]
    w = weight if mtp_weight is None else mtp_weight
    for k, hk in enumerate(mtp_hiddens, start=1):
        tk = mtp_targets(targets, k)
        if mtp_loss == "ce":
            stats.append(token_ce(hk, w, tk, chunk_size))
        else:
            teacher = shift_left(h0.detach(), k, 0.0)  # row t holds h0[t + k]: the main head's view of token t+k+1
            stats.append(token_distill(hk, teacher, w, tk, mtp_loss, lk_lambda, chunk_size))
    return stats


def combine_losses(
    stats: list[CEStats], num_global_tokens: torch.Tensor, loss_scaling_factor: float, dp_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(optimised loss, L_main, L_mtp) of one rank.

    L_main and L_mtp are this rank's share of the global-batch values (summing them over ranks
    gives the global values); the optimised loss is (L_main + L_mtp) * dp_size.
    """
    n = num_global_tokens.clamp(min=1.0)
    main = stats[0].ce_sum / n
    D = len(stats) - 1
    if D:
        mtp = loss_scaling_factor / D * sum(s.ce_sum if s.div_sum is None else s.div_sum for s in stats[1:]) / n
    else:
        mtp = torch.zeros_like(main)
    return (main + mtp) * dp_size, main, mtp


def ctc_sum(
    logits: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, target_lens: torch.Tensor, blank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CTC loss and the number of target tokens (normalise by the global count, like the CE).

    Args:
        logits: (B, F, C) CTC head output; C - 1 classes plus the blank.
        lengths: (B,) valid frames.
        targets: (B, U) token ids, padded with IGNORE_INDEX beyond ``target_lens``.
        target_lens: (B,) tokens per row.
        blank: blank class index.
    """
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (F, B, C)
    loss = F.ctc_loss(log_probs, targets.clamp(min=0), lengths, target_lens, blank=blank,
                      reduction="sum", zero_infinity=True)
    return loss, target_lens.sum().float()
