#!/usr/bin/env python
"""Memory and time of the chunked, recomputed lm_head loss vs materialising full logits.

    python bench/bench_lm_head_loss.py [--vocab 131072] [--tokens 4096] [--hidden 1024] [--depths 3]

Both variants compute main + D MTP cross-entropies over the same hidden states. Memory is the
bytes of the distinct storages autograd keeps for backward (saved-tensor hooks: exact and
repeatable on CPU; inputs W and h count for both variants);
time is the best of a few forward+backward runs. Printed as ratios measured side by side.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from salm_mtp.loss import head_stats, mtp_targets


def saved_bytes(fn) -> tuple[int, float]:
    """(bytes saved for backward by fn(), seconds of fn() + backward)."""
    seen: dict[int, int] = {}

    def pack(t):  # count each storage once: W saved by every chunk is one tensor, not a copy
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values()), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=2048, help="answer tokens in the batch")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--depths", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(1, a.tokens, a.hidden, generator=g, requires_grad=True) for _ in range(a.depths + 1)]
    W = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).requires_grad_(True)
    targets = torch.randint(0, a.vocab, (1, a.tokens), generator=g)

    def chunked():
        stats = head_stats(hs[0], hs[1:], W, targets, chunk_size=1024)
        return sum(s.ce_sum for s in stats)

    def full():
        loss = 0
        for k, h in enumerate(hs):
            logits = (h @ W.T).float()  # (1, T, V) for every depth, all kept for backward
            loss = loss + F.cross_entropy(logits.flatten(0, 1), mtp_targets(targets, k).flatten(),
                                          ignore_index=-100, reduction="sum")
        return loss

    res = {}
    for name, fn in (("chunked", chunked), ("full", full)):
        runs = [saved_bytes(fn) for _ in range(a.repeats)]
        res[name] = (runs[0][0], min(r[1] for r in runs))
    print(f"tokens={a.tokens} vocab={a.vocab} hidden={a.hidden} depths={a.depths}")
    for name, (b, s) in res.items():
        print(f"{name:8s} saved-for-backward {b / 2**20:9.1f} MiB   fwd+bwd {s:7.3f} s")
    print(f"memory ratio full/chunked: {res['full'][0] / res['chunked'][0]:.1f}x   "
          f"time ratio chunked/full: {res['chunked'][1] / res['full'][1]:.2f}x")


if __name__ == "__main__":
    main()
