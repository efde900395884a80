"""Cross-entropy of several linear heads (``h_k @ W_k.T``) in row chunks, gradients computed while the
logits of a chunk exist (docs/design.md §3): no (N, V) tensor is ever kept, and no logits are recomputed.

    ce, correct, row_ce = linear_ce([h0, h1], [W, W], [t0, t1], chunk_size=256, ratios=[1.0, 0.05])

The optimised loss is linear in the heads' summed CEs, ``loss = s * sum_k ratio_k * ce_k`` for some factor s
(s = dp_size / N in salm_mtp.loss). Knowing the ratios in the forward, each chunk's softmax gradient
``G = softmax(logits) - onehot(target)`` (c, V) is turned at once into what backward needs:

    dh_k  = G_k @ W_k                      (N_k, H) per head, kept (hidden-sized: small)
    dW    = sum_k ratio_k * G_k.T @ h_k    (V, H) per distinct trainable weight, one fp32 buffer

and backward only scales them by the incoming gradients (dh_k by g_k, dW by s = g_k / ratio_k). Peak memory is
one chunk's logits plus those buffers, and the time is that of a plain forward + backward (no recompute; the
naive loss spends the same three matmuls per head). Heads that share a weight have their rows stacked
before chunking, so the lm_head GEMMs see full chunks, not a few dozen rows per head. When the incoming
gradients are not proportional to ``ratios`` (a caller that weights the heads differently), backward
recomputes each chunk instead: always exact, only slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(h, w).float()  # (c, V) fp32, the only vocabulary-sized tensor alive at a time


def _softmax_grad_(logits: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row CE (c,), hits (c,), G = softmax - onehot (c, V)) with G written over ``logits``: every step is
    in place or row-sized, so no second (c, V) tensor exists (logsumexp would allocate one)."""
    rows = torch.arange(t.numel(), device=t.device)
    hits = logits.argmax(-1) == t
    picked = logits[rows, t]  # (c,)
    m = logits.amax(-1)  # (c,)
    total = logits.sub_(m[:, None]).exp_().sum(-1)  # (c,): sum exp(x - m)
    ce = m + total.log() - picked
    g = logits.div_(total[:, None])
    g[rows, t] -= 1.0
    return ce, hits, g


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta: dict, *tensors: torch.Tensor):
        K, widx, chunk, ratios = meta["K"], meta["widx"], meta["chunk"], meta["ratios"]
        hs, targets, weights = tensors[:K], tensors[K : 2 * K], tensors[2 * K :]
        need_h = [ctx.needs_input_grad[1 + k] for k in range(K)]
        need_w = [ctx.needs_input_grad[1 + 2 * K + j] for j in range(len(weights))]
        fast = meta["grad"] and ratios is not None and (any(need_h) or any(need_w))
        dW = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) if fast and need_w[j] else None
              for j, w in enumerate(weights)]
        want_dh = [fast and need_h[k] for k in range(K)]
        dh: list[torch.Tensor | None] = [None] * K  # (N_k, H) views of each group's buffer, filled below
        ce_sum = torch.zeros(K, dtype=torch.float32, device=hs[0].device)
        correct = torch.zeros(K, dtype=torch.float32, device=hs[0].device)
        row_ce: list[torch.Tensor | None] = [None] * K
        for j, ks, rows, t, owner in _row_groups(hs, targets, widx):
            w = weights[j]
            n = t.numel()
            each = torch.empty(n, dtype=torch.float32, device=t.device)
            hit = torch.empty(n, dtype=torch.float32, device=t.device)
            h0 = hs[ks[0]]
            dh_all = h0.new_empty(n, h0.shape[1]) if any(want_dh[k] for k in ks) else None
            rr = None  # (n,) each row's head ratio, applied to the small hidden rows instead of the (c, V) G
            if dW[j] is not None and any(ratios[k] != 1.0 for k in ks):
                rr = torch.tensor([ratios[k] for k in ks], dtype=torch.float32, device=t.device)[owner]
            for s in range(0, n, chunk):
                hc, tc = rows(s, s + chunk), t[s : s + chunk]
                ce, hits, g = _softmax_grad_(_chunk_logits(hc, w), tc)
                each[s : s + chunk] = ce
                hit[s : s + chunk] = hits
                if dh_all is not None:
                    dh_all[s : s + chunk] = g.to(w.dtype) @ w
                if dW[j] is not None:
                    x = hc.float() if rr is None else hc.float() * rr[s : s + chunk, None]
                    dW[j].addmm_(g.t(), x)
                del g
            for k, rows_k in _head_rows(ks, targets):
                row_ce[k] = each[rows_k]
                ce_sum[k] = row_ce[k].sum()
                correct[k] = hit[rows_k].sum()
                if want_dh[k]:
                    dh[k] = dh_all[rows_k]
        ctx.meta, ctx.fast = meta, fast
        ctx.dh, ctx.dW = dh, dW
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(correct)
        return ce_sum, correct, torch.cat(row_ce)

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, _grad_correct, _grad_rows):
        K, widx = ctx.meta["K"], ctx.meta["widx"]
        tensors = ctx.saved_tensors
        hs, targets, weights = tensors[:K], tensors[K : 2 * K], tensors[2 * K :]
        if ctx.fast:  # dh_k = g_k * (G_k @ W_k) exactly; dW_j = s_j * buffer_j when the g_k fit the ratios
            # a head whose CE gets no gradient (e.g. only one depth's loss is backpropagated) sends nothing back
            gh = [None if d is None or not bool(grad_ce[k] != 0) else d * grad_ce[k].to(d.dtype)
                  for k, d in enumerate(ctx.dh)]
            gw = []
            for j, d in enumerate(ctx.dW):
                s = None if d is None else _common_scale(grad_ce, ctx.meta["ratios"], widx, j)
                if d is not None and s is not None and not bool(s != 0):
                    d = None  # no head on this weight gets a gradient
                elif d is not None and s is not None:
                    d = d.mul_(s).to(weights[j].dtype)  # in place: no second (V, H) buffer
                elif d is not None:
                    d = _recompute_grads(ctx, grad_ce, hs, targets, weights, only_weight=j)[1][j]
                gw.append(d)
        else:
            gh, gw = _recompute_grads(ctx, grad_ce, hs, targets, weights)
        ctx.dh = ctx.dW = None
        return (None, *gh, *([None] * K), *gw)


def _row_groups(hs, targets, widx):
    """Yield (weight index j, head indices ks, rows, targets t (n,), owner (n,)) for the heads on weight j (of one
    dtype), their rows stacked: ``rows(s, e)`` is rows s..e of the heads' hidden states one after another (a
    view, or a chunk-sized copy where it spans two heads), so each chunk's GEMMs see up to ``chunk`` rows from all
    of them. A few dozen rows per head (small batches, short answers) would make slow, narrow lm_head GEMMs."""
    order: dict[tuple[int, torch.dtype], list[int]] = {}
    for k in range(len(hs)):
        order.setdefault((widx[k], hs[k].dtype), []).append(k)
    for (j, _), ks in order.items():
        parts = [hs[k] for k in ks]
        t = targets[ks[0]] if len(ks) == 1 else torch.cat([targets[k] for k in ks])
        sizes = torch.tensor([targets[k].numel() for k in ks], device=t.device)
        owner = torch.repeat_interleave(torch.arange(len(ks), device=t.device), sizes)  # (n,) index into ks
        yield j, ks, (lambda s, e, parts=parts: _stacked_rows(parts, s, e)), t, owner


def _head_rows(ks: list[int], targets) -> list[tuple[int, slice]]:
    """Each head k of a group and the slice of the group's stacked rows that are its own."""
    out, start = [], 0
    for k in ks:
        out.append((k, slice(start, start + targets[k].numel())))
        start += targets[k].numel()
    return out


def _stacked_rows(parts: list[torch.Tensor], s: int, e: int) -> torch.Tensor:
    """Rows s..e of ``torch.cat(parts)`` without building it: (e - s, H)."""
    out, off = [], 0
    for p in parts:
        a, b = max(s, off), min(e, off + p.shape[0])
        if a < b:
            out.append(p[a - off : b - off])
        off += p.shape[0]
    return out[0] if len(out) == 1 else torch.cat(out)


def _common_scale(grad_ce: torch.Tensor, ratios: list[float], widx: list[int], j: int) -> torch.Tensor | None:
    """The factor s with grad_ce[k] = s * ratios[k] (relative 1e-5) for every head k on weight j, or None."""
    ks = [k for k in range(len(widx)) if widx[k] == j]
    r = torch.tensor([ratios[k] for k in ks], dtype=grad_ce.dtype, device=grad_ce.device)
    g = grad_ce[ks]
    if not bool((r != 0).any()):
        return g.new_zeros(()) if not bool((g != 0).any()) else None
    i = int(r.abs().argmax())
    s = g[i] / r[i]
    return s if torch.allclose(g, s * r, rtol=1e-5, atol=0.0) else None


def _recompute_grads(ctx, grad_ce, hs, targets, weights, only_weight: int | None = None):
    """Exact gradients for any incoming ``grad_ce``, each chunk's logits recomputed (``only_weight``: that
    weight's gradient alone)."""
    K, widx, chunk = ctx.meta["K"], ctx.meta["widx"], ctx.meta["chunk"]
    need_h = [ctx.needs_input_grad[1 + k] and only_weight is None for k in range(K)]
    need_w = [ctx.needs_input_grad[1 + 2 * K + j] and only_weight in (None, j) for j in range(len(weights))]
    gw = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w[j] else None
          for j, w in enumerate(weights)]
    gh: list[torch.Tensor | None] = [None] * K  # (N_k, H) views of each group's buffer, filled below
    for j, ks, rows, t, owner in _row_groups(hs, targets, widx):
        w = weights[j]
        if gw[j] is None and not any(need_h[k] for k in ks):
            continue
        gk = grad_ce[ks].float()[owner]  # (n,) each row's incoming gradient
        h0 = hs[ks[0]]
        dh_all = h0.new_empty(t.numel(), h0.shape[1]) if any(need_h[k] for k in ks) else None
        for s in range(0, t.numel(), chunk):
            hc = rows(s, s + chunk)
            _, _, g = _softmax_grad_(_chunk_logits(hc, w), t[s : s + chunk])
            g.mul_(gk[s : s + chunk, None])
            if dh_all is not None:
                dh_all[s : s + chunk] = g.to(w.dtype) @ w
            if gw[j] is not None:
                gw[j].addmm_(g.t(), hc.float())
        for k, rows_k in _head_rows(ks, targets):
            if need_h[k]:
                gh[k] = dh_all[rows_k]
    return gh, [None if g is None else g.to(w.dtype) for g, w in zip(gw, weights)]


def linear_ce(
    hs: list[torch.Tensor],
    weights: list[torch.Tensor],
    targets: list[torch.Tensor],
    chunk_size: int = 256,
    ratios: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CE, top-1 hits and per-row CE of K linear heads.

    Args:
        hs: K hidden states (N_k, H), valid rows only.
        weights: K weights (V, H); the same tensor object for heads that share a weight (its gradient is
            accumulated in one buffer), a detached one where a head must not train it.
        targets: K target ids (N_k,).
        chunk_size: rows of logits computed at once.
        ratios: each head's coefficient in the loss up to a common factor (module docstring); None: gradients
            by recomputation in backward.

    Returns:
        ce_sum (K,) differentiable, correct (K,) float without grad, row_ce (sum N_k,) per-row CE (use detached).
    """
    K = len(hs)
    uniq: list[torch.Tensor] = []
    widx = []
    for w in weights:
        j = next((i for i, u in enumerate(uniq) if u is w), None)
        if j is None:
            uniq.append(w)
            j = len(uniq) - 1
        widx.append(j)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size} (model.lm_head_chunk_size)")
    meta = {"K": K, "widx": widx, "chunk": int(chunk_size), "grad": torch.is_grad_enabled(),
            "ratios": None if ratios is None else [float(r) for r in ratios]}
    return _LinearCE.apply(meta, *hs, *targets, *uniq)
