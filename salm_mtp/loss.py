"""Token-normalised losses of the main head and the MTP depths (pure functions, docs/design.md §3), and the
statistics vector that carries them to the logs (its layout and summary: ``stat_names``, ``summarise_stats``).

    N      = all_reduce_sum(#valid main targets on this rank)            global count
    L_main = sum_t CE(main) / N
    L_mtp  = lambda / D * sum_k sum_t CE(depth k) / N
    L_ctc  = ctc_weight * sum CTC / all_reduce_sum(#CTC targets)         only with model.ctc_weight > 0
    loss   = (L_main + L_mtp + L_ctc + aux) * dp_size
                                              DDP / FSDP2 average gradients over ranks: the factor
                                              cancels that average, so gradients equal those of
                                              the global-batch token mean.

Self-distillation of the MTP depths (``model.mtp.loss: kl | lk``, docs/design.md §3): depth k at
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


# ------------------------------------------------------------------------------ statistics vector
# One step's (or one eval epoch's) statistics travel as one flat fp32 vector so that a single all_reduce_sum
# sums them over the data-parallel group; ``stat_names`` is its layout and ``summarise_stats`` turns the
# summed vector into the logged metrics (docs/design.md §3). Layout, D = number of MTP depths:
#
#   main.{ce,correct,count,div}  depth_1.{...}  ...  depth_D.{...}  ctc.ce  ctc.count  aux.loss
#
# ``*.div`` is 0 for CE-trained depths; ``aux.loss`` is the MoE sequence aux loss of this rank as added to the
# optimised loss (0 when off or outside training).
STAT_FIELDS = ("ce", "correct", "count", "div")


def stat_names(num_depths: int) -> list[str]:
    """Names of the statistics vector's entries, in order (layout above)."""
    heads = ["main"] + [f"depth_{k}" for k in range(1, num_depths + 1)]
    return [f"{h}.{f}" for h in heads for f in STAT_FIELDS] + ["ctc.ce", "ctc.count", "aux.loss"]


def stats_vector(stats: list[CEStats], ctc: tuple[torch.Tensor, torch.Tensor] | None = None,
                 aux: torch.Tensor | float = 0.0) -> torch.Tensor:
    """This rank's statistics vector (``stat_names(len(stats) - 1)`` entries, fp32, detached).

    Args:
        stats: ``head_stats`` output (main head, then each depth).
        ctc: (summed CTC loss, target-token count) of this rank, or None when the CTC loss is off.
        aux: the MoE aux loss this rank added to its optimised loss (before the dp_size factor).
    """
    zero = stats[0].ce_sum.new_zeros((), dtype=torch.float32)
    vec = [t for s in stats for t in (s.ce_sum, s.correct, s.count, zero if s.div_sum is None else s.div_sum)]
    vec += list(ctc) if ctc is not None else [zero, zero]
    vec.append(torch.as_tensor(aux, dtype=torch.float32, device=zero.device))
    return torch.stack([v.detach().float().reshape(()).to(zero.device) for v in vec])


def summarise_stats(summed: torch.Tensor, num_depths: int, loss_scaling_factor: float, mtp_loss: str = "ce",
                    ctc_weight: float = 0.0) -> dict[str, float]:
    """The logged metrics of a statistics vector summed over ranks (and, in evaluation, over batches).

    ``loss`` is the optimised objective, term for term as ``combine_losses`` plus the model adds them:

        loss = L_main + L_mtp + ctc_weight * ctc_loss + aux_loss

    with every count global. In a training step this equals the optimised loss of one process, and with
    ``model.parallel.scale_loss_by_dp_size`` (the default) the mean over ranks of the per-rank optimised
    losses: the value whose gradient DDP / FSDP2's averaged gradients are.
    """
    s = dict(zip(stat_names(num_depths), summed.tolist()))
    n = max(s["main.count"], 1.0)
    out = {"main_loss": s["main.ce"] / n, "main_acc": s["main.correct"] / n, "target_tokens": s["main.count"]}
    distill = mtp_loss != "ce"
    mtp = 0.0
    for k in range(1, num_depths + 1):
        nk = max(s[f"depth_{k}.count"], 1.0)
        out[f"mtp_loss/depth_{k}"] = s[f"depth_{k}.ce"] / nk  # per-depth CE over the depth's own targets
        out[f"mtp_acc/depth_{k}"] = s[f"depth_{k}.correct"] / nk
        if distill:
            out[f"mtp_{mtp_loss}/depth_{k}"] = s[f"depth_{k}.div"] / nk
        mtp += s[f"depth_{k}.div" if distill else f"depth_{k}.ce"] / n  # the optimised term: over main's count
    loss = out["main_loss"]
    if num_depths:
        out["mtp_loss"] = loss_scaling_factor / num_depths * mtp
        loss += out["mtp_loss"]
    if ctc_weight > 0:
        out["ctc_loss"] = s["ctc.ce"] / max(s["ctc.count"], 1.0)
        loss += ctc_weight * out["ctc_loss"]
    if s["aux.loss"] != 0.0:
        out["moe_aux_loss"] = s["aux.loss"]
        loss += s["aux.loss"]
    out["loss"] = loss
    return out
