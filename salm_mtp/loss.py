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

from salm_mtp.errors import config_error
from salm_mtp.linear_ce import linear_ce
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
    group_sum: torch.Tensor | None = None
    """(G,) the optimised term (CE, or the divergence under kl / lk) summed per group (row source), no grad; None
    without groups."""
    group_count: torch.Tensor | None = None
    """(G,) valid targets per group (float); None without groups."""


def _group_sums(values: torch.Tensor, groups: torch.Tensor | None, num_groups: int) -> torch.Tensor | None:
    """(G,) sums of ``values`` (n,) per group id (n,); ids outside [0, G) are dropped. None without groups."""
    if groups is None:
        return None
    keep = (groups >= 0) & (groups < num_groups)
    out = torch.zeros(num_groups, device=values.device, dtype=torch.float32)
    return out.index_add_(0, groups[keep], values.detach().float()[keep])


def _group_ids(groups: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
    """Per-row group ids (B,) -> ids of the valid positions (N,) in ``hidden[valid]`` order."""
    if groups is None:
        return None
    return groups.to(valid.device)[:, None].expand_as(valid)[valid]


def token_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256,
             groups: torch.Tensor | None = None, num_groups: int = 0) -> CEStats:
    """Summed CE and top-1 hits of ``hidden @ weight.T`` against ``targets`` on valid positions.

    Args:
        hidden: (B, T, H) hidden states (post final norm).
        weight: (V, H) lm_head weight.
        targets: (B, T) target ids, IGNORE_INDEX where nothing is predicted.
        chunk_size: rows of logits computed at once.
        groups: (B,) group id of each row (its data source; -1: none), or None; with ``num_groups`` G the
            stats also hold the CE and target count per group.
    """
    return heads_ce([hidden], [weight], [targets], chunk_size, [1.0], groups, num_groups)[0]


def heads_ce(hiddens: list[torch.Tensor], weights: list[torch.Tensor], targets: list[torch.Tensor],
             chunk_size: int = 256, ratios: list[float] | None = None, groups: torch.Tensor | None = None,
             num_groups: int = 0) -> list[CEStats]:
    """``token_ce`` of several heads in one salm_mtp.linear_ce call: heads that share a weight accumulate its
    gradient in one buffer. ``ratios``: each head's coefficient in the optimised loss up to a common factor
    (then no logits are recomputed in backward; see linear_ce)."""
    valid = [t != IGNORE_INDEX for t in targets]  # (B, T) each
    hs = [h[v] for h, v in zip(hiddens, valid)]  # (N_k, H): prompt, audio and padding never reach the lm_head
    ts = [t[v] for t, v in zip(targets, valid)]
    ce, correct, rows = linear_ce(hs, weights, ts, chunk_size, ratios)
    out, start = [], 0
    for k, v in enumerate(valid):
        n = ts[k].numel()
        g = _group_ids(groups, v)  # (N_k,) or None
        out.append(CEStats(ce_sum=ce[k], correct=correct[k], count=v.sum().float(),
                           group_sum=_group_sums(rows[start : start + n], g, num_groups),
                           group_count=None if g is None else _group_sums(torch.ones(n, device=g.device), g, num_groups)))
        start += n
    return out


MTP_LOSSES = ("ce", "kl", "lk")


def _chunk_distill(hq: torch.Tensor, hp: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   kind: str, lk_lambda: float, groups: torch.Tensor | None = None, num_groups: int = 0):
    logq = F.linear(hq, weight).float().log_softmax(-1)  # (n, V) fp32, one chunk at a time
    with torch.no_grad():
        logp = F.linear(hp, weight.detach()).float().log_softmax(-1)  # (n, V) the backbone's own, detached
        p = logp.exp()
    ce = -logq.gather(1, targets[:, None]).sum()
    correct = (logq.argmax(-1) == targets).sum().float()
    if groups is None:
        div = (p * (logp - logq)).sum()
        if kind == "lk":
            div = lk_lambda * div + (1.0 - lk_lambda) * 0.5 * (p - logq.exp()).abs().sum()
        return ce, correct, div, None
    each = (p * (logp - logq)).sum(-1)  # (n,)
    if kind == "lk":
        each = lk_lambda * each + (1.0 - lk_lambda) * 0.5 * (p - logq.exp()).abs().sum(-1)
    return ce, correct, each.sum(), _group_sums(each, groups, num_groups)


def token_distill(hidden: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  kind: str = "kl", lk_lambda: float = 0.5, chunk_size: int = 2048,
                  groups: torch.Tensor | None = None, num_groups: int = 0) -> CEStats:
    """CE stats plus the summed divergence of ``hidden @ weight.T`` from ``softmax(teacher @ weight.T)``.

    Args:
        hidden: (B, T, H) depth-k hidden states (post final norm).
        teacher: (B, T, H) backbone h0 rolled left by k (row t holds h0[t + k]); detached here.
        weight: (V, H) lm_head weight (the teacher side uses it detached).
        targets: (B, T) depth-k targets, IGNORE_INDEX where nothing is predicted (those rows are skipped).
        kind: "kl" or "lk".
        lk_lambda: weight of the KL term in the LK loss.
        groups, num_groups: per-row group ids as in ``token_ce`` (per-group sums are of the divergence).
    """
    if kind not in ("kl", "lk"):
        raise config_error("model.mtp.loss", f"must be one of {MTP_LOSSES}, got {kind!r}")
    valid = targets != IGNORE_INDEX  # (B, T)
    h, hp, t = hidden[valid], teacher.detach()[valid], targets[valid]  # (N, H), (N, H), (N,)
    g = _group_ids(groups, valid)
    zero = hidden.new_zeros((), dtype=torch.float32)
    ce_sum, div_sum, correct = zero, zero, torch.zeros((), device=hidden.device)
    group_sum = torch.zeros(num_groups, device=hidden.device) if g is not None else None
    for s in range(0, h.shape[0], chunk_size):
        args = (h[s : s + chunk_size], hp[s : s + chunk_size], weight, t[s : s + chunk_size], kind, lk_lambda,
                None if g is None else g[s : s + chunk_size], num_groups)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            ce, ok, div, per = checkpoint(_chunk_distill, *args, use_reentrant=False)  # recompute in backward
        else:
            ce, ok, div, per = _chunk_distill(*args)
        ce_sum, div_sum, correct = ce_sum + ce, div_sum + div, correct + ok.detach()
        if per is not None:
            group_sum = group_sum + per
    if h.shape[0] == 0:  # keep the graph connected so every rank runs the same backward
        div_sum = div_sum + 0.0 * hidden.sum() + 0.0 * weight.sum()
    count = None if g is None else _group_sums(torch.ones_like(t, dtype=torch.float32), g, num_groups)
    return CEStats(ce_sum=ce_sum, correct=correct, count=valid.sum().float(), div_sum=div_sum, group_sum=group_sum,
                   group_count=count)


def mtp_targets(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Depth-k targets: main targets rolled left by k, the last k positions ignored. (B, T) -> (B, T)."""
    return shift_left(targets, k, IGNORE_INDEX)


def head_stats(
    h0: torch.Tensor,
    mtp_hiddens: list[torch.Tensor],
    weight: torch.Tensor,
    targets: torch.Tensor,
    mtp_weight: torch.Tensor | None = None,
    chunk_size: int = 256,
    mtp_loss: str = "ce",
    lk_lambda: float = 0.5,
    groups: torch.Tensor | None = None,
    num_groups: int = 0,
    mtp_coef: float | None = None,
) -> list[CEStats]:
    """CE stats of the main head (index 0) and of each MTP depth k (index k).

    ``mtp_coef``: each depth's CE coefficient relative to the main head's in the optimised loss
    (loss_scaling_factor / D in combine_losses); with the right value backward recomputes no logits (a wrong
    one costs only time: linear_ce then recomputes).
    ``mtp_weight`` lets the MTP depths use a detached lm_head weight (loss stopped at the backbone).
    ``mtp_loss`` "kl" / "lk" adds each depth's divergence from the backbone's distribution (module docstring).
    ``groups`` (B,) / ``num_groups``: also sum each head's optimised term and targets per row group (data source).
    """
    w = weight if mtp_weight is None else mtp_weight
    D = len(mtp_hiddens)
    if mtp_loss == "ce":  # one call: the main head and every depth share the lm_head weight's gradient buffer
        coef = [1.0] + [(mtp_coef if mtp_coef is not None else 1.0 / max(D, 1))] * D
        return heads_ce([h0, *mtp_hiddens], [weight] + [w] * D, [targets] + [mtp_targets(targets, k) for k in
                        range(1, D + 1)], chunk_size, coef, groups, num_groups)
    stats = [token_ce(h0, weight, targets, chunk_size, groups, num_groups)]
    for k, hk in enumerate(mtp_hiddens, start=1):
        tk = mtp_targets(targets, k)
        teacher = shift_left(h0.detach(), k, 0.0)  # row t holds h0[t + k]: the main head's view of token t+k+1
        stats.append(token_distill(hk, teacher, w, tk, mtp_loss, lk_lambda, chunk_size, groups, num_groups))
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
# optimised loss (0 when off or outside training). With named data sources (training on data.inputs) three entries
# per source follow: ``src/<name>.{main,count,mtp}``: the main head's summed CE, its target count and the summed
# optimised MTP term (CE, or the divergence under kl / lk) over all depths, on that source's rows.
STAT_FIELDS = ("ce", "correct", "count", "div")
SOURCE_FIELDS = ("main", "count", "mtp")


def stat_names(num_depths: int, sources: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Names of the statistics vector's entries, in order (layout above)."""
    heads = ["main"] + [f"depth_{k}" for k in range(1, num_depths + 1)]
    out = [f"{h}.{f}" for h in heads for f in STAT_FIELDS] + ["ctc.ce", "ctc.count", "aux.loss"]
    return out + [f"src/{n}.{f}" for n in sources for f in SOURCE_FIELDS]


def stats_vector(stats: list[CEStats], ctc: tuple[torch.Tensor, torch.Tensor] | None = None,
                 aux: torch.Tensor | float = 0.0) -> torch.Tensor:
    """This rank's statistics vector (``stat_names(len(stats) - 1, sources)`` entries, fp32, detached).

    Args:
        stats: ``head_stats`` output (main head, then each depth); with groups, the per-source entries follow.
        ctc: (summed CTC loss, target-token count) of this rank, or None when the CTC loss is off.
        aux: the MoE aux loss this rank added to its optimised loss (before the dp_size factor).
    """
    zero = stats[0].ce_sum.new_zeros((), dtype=torch.float32)
    vec = [t for s in stats for t in (s.ce_sum, s.correct, s.count, zero if s.div_sum is None else s.div_sum)]
    vec += list(ctc) if ctc is not None else [zero, zero]
    vec.append(torch.as_tensor(aux, dtype=torch.float32, device=zero.device))
    out = torch.stack([v.detach().float().reshape(()).to(zero.device) for v in vec])
    if stats[0].group_sum is None:
        return out
    mtp = sum((s.group_sum for s in stats[1:]), torch.zeros_like(stats[0].group_sum))
    per = torch.stack([stats[0].group_sum, stats[0].group_count, mtp], dim=1)  # (G, 3)
    return torch.cat([out, per.reshape(-1).to(out.device)])


def summarise_stats(summed: torch.Tensor, num_depths: int, loss_scaling_factor: float, mtp_loss: str = "ce",
                    ctc_weight: float = 0.0, sources: tuple[str, ...] | list[str] = ()) -> dict[str, float]:
    """The logged metrics of a statistics vector summed over ranks (and, in evaluation, over batches).

    ``loss`` is the optimised objective, term for term as ``combine_losses`` plus the model adds them:

        loss = L_main + L_mtp + ctc_weight * ctc_loss + aux_loss

    with every count global. In a training step this equals the optimised loss of one process, and with
    ``model.parallel.scale_loss_by_dp_size`` (the default) the mean over ranks of the per-rank optimised
    losses: the value whose gradient DDP / FSDP2's averaged gradients are.

    Per source (``sources``, when the vector holds their entries), under ``source/<name>/`` (``source_metric``: a
    namespace of its own, apart from the per-depth ``mtp_loss/depth_k``): ``main_loss`` = the main head's CE per
    target token of that source's rows, ``mtp_loss`` = the MTP term as ``mtp_loss`` defines it, over those rows, and
    ``target_tokens``; a source with no target in the summed batches gets no entries.
    """
    s = dict(zip(stat_names(num_depths, sources), summed.tolist()))
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
    for name in sources:
        n_src = s[f"src/{name}.count"]
        if n_src <= 0:  # no row of this source in the batch(es): nothing to report
            continue
        out[source_metric(name, "main_loss")] = s[f"src/{name}.main"] / n_src
        if num_depths:
            out[source_metric(name, "mtp_loss")] = loss_scaling_factor / num_depths * s[f"src/{name}.mtp"] / n_src
        out[source_metric(name, "target_tokens")] = s[f"src/{name}.count"]
    return out


SOURCE_METRICS = ("main_loss", "mtp_loss", "target_tokens")
"""What is logged per training source (``source_metric``)."""


def source_metric(source: str, what: str) -> str:
    """The logged name of one per-source metric: ``source/<source>/<what>``, ``what`` one of SOURCE_METRICS."""
    return f"source/{source}/{what}"
