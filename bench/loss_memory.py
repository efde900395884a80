#!/usr/bin/env python
"""Peak memory and time of main + D MTP losses: ours (chunked lm_head, gradients computed in the forward) vs a naive
full-logits loss, and cut-cross-entropy (its CPU path, torch.compile; on CUDA its Triton kernel) when it is installed.

    python bench/loss_memory.py                        # V=131072, H=1024, 1024 tokens, D=2 (about 3 min, 2 cores)
    python bench/loss_memory.py --hidden 2048 --tokens 2048 --out bench/results/loss_memory_full.json   # real size
    python bench/loss_memory.py --device cuda --hidden 2048 --tokens 2048   # on a GPU (bench/gpu_check.sh)

Every case runs in a fresh subprocess (`--case NAME`), so no case inherits another's allocator pages:
the inputs (lm_head weight W (V, H), D+1 hidden states (1, T, H), targets) are built from a fixed seed,
then the peak resident set is reset (`/proc/self/clear_refs` = 5), the loss
``(L_main + lambda / D * sum_k L_k)`` (salm_mtp.loss.combine_losses, lambda = 0.1) runs forward and
backward once, and the case reports ``peak = VmHWM - VmRSS before`` (what the loss adds on top of its
inputs: logits, saved activations, the gradients dW and dh) and the wall time. Loss and gradients of every
case are checked against the naive one (relative L2 error <= 1e-5).

``--device cuda`` (default cpu): the inputs live on the GPU, the timer reads after torch.cuda.synchronize(), and
``peak = max_memory_allocated - memory_allocated before`` (after reset_peak_memory_stats: the caching allocator's
view, not the process's); every case and the config name the device and the memory measure (``memory``:
``rss_hwm`` on cpu, ``cuda_max_allocated`` on cuda). Cases:

- ``ours@C``: salm_mtp.loss.head_stats with ``chunk_size=C`` (``model.lm_head_chunk_size``, default 256):
  logits of C target rows at a time, turned into the gradients at once (salm_mtp/linear_ce.py: dh per head, one
  fp32 dW buffer for the shared lm_head); no (T, V) tensor is kept and nothing is recomputed.
- ``naive``: ``logits = h @ W.T`` (T, V) for every depth, ``F.cross_entropy``; top-1 hits as ours reports.
- ``cce``: ``cut_cross_entropy.linear_cross_entropy(impl="torch_compile")``, the only implementation of that
  package that runs without a GPU; on cuda its own ``impl="cce"`` (a Triton kernel). Its compile time is excluded.

Each case first runs once on a small input (V=256, 16 tokens) so one-off costs (lazy imports, compilation)
stay out of its figures.

The default size keeps V = 131072 (Nemotron-3's vocabulary) and T = H like the real case (T = H = 2048)
at half of each, 8x fewer FLOPs, so the three scripts of bench/ fit in 10 minutes on 2 cores; memory of
every term scales by the same 1/4 (W, dW: V*H; logits: T*V), so the ratios carry over. Prints a table and
writes bench/results/loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

from common import (MEMORY_MEASURES, add_device_arg, parse_device_args, peak_since, peak_start, sync,  # noqa: E402
                    write_result)
from salm_mtp.loss import combine_losses, head_stats, mtp_targets  # noqa: E402

OUT = "bench/results/loss_memory.json"
LAMBDA = 0.1  # model.mtp.loss_scaling_factor's default
RTOL = 1e-5


def make_inputs(vocab: int, hidden: int, tokens: int, depths: int, seed: int = 0, device: str = "cpu"):
    """(W (V, H), [h_0 .. h_D] each (1, T, H), targets (1, T)), all leaves of fp32 on ``device``, fixed by ``seed``
    (drawn on the CPU, so every device gets the same values)."""
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(1, tokens, hidden, generator=g).to(device).requires_grad_(True) for _ in range(depths + 1)]
    W = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    return W, hs, targets


def loss_ours(W, hs, targets, chunk_size: int) -> torch.Tensor:
    D = len(hs) - 1
    stats = head_stats(hs[0], hs[1:], W, targets, chunk_size=chunk_size, mtp_coef=LAMBDA / max(D, 1))
    loss, _, _ = combine_losses(stats, stats[0].count, LAMBDA, 1)
    return loss


def loss_naive(W, hs, targets) -> torch.Tensor:
    n = (targets != -100).sum().float()
    sums = []
    for k, h in enumerate(hs):
        tk = mtp_targets(targets, k).flatten()
        logits = (h.flatten(0, 1) @ W.T).float()  # (T, V) fp32 for every depth: its log-softmax is kept for backward
        sums.append(F.cross_entropy(logits, tk, ignore_index=-100, reduction="sum"))
        valid = tk != -100
        _hits = (logits.argmax(-1)[valid] == tk[valid]).sum()  # the top-1 statistic ours also reports
        del logits
    D = len(hs) - 1
    return sums[0] / n + (LAMBDA / D * sum(sums[1:]) / n if D else 0.0)


def cce_impl(device: str) -> str:
    """cut-cross-entropy's implementation for ``device``: its Triton kernel on cuda, torch.compile on cpu."""
    return "cce" if device == "cuda" else "torch_compile"


def _cce_fn(device: str = "cpu"):
    from cut_cross_entropy import linear_cross_entropy

    impl = cce_impl(device)

    def loss_cce(W, hs, targets) -> torch.Tensor:
        n = (targets != -100).sum().float()
        sums = [linear_cross_entropy(h, W, mtp_targets(targets, k), impl=impl, reduction="sum")
                for k, h in enumerate(hs)]
        D = len(hs) - 1
        return sums[0] / n + (LAMBDA / D * sum(sums[1:]) / n if D else 0.0)

    return loss_cce


def loss_fn(case: str, device: str = "cpu"):
    """The loss function of a case name: ``naive``, ``cce`` or ``ours@CHUNK`` (``device``: cce's implementation)."""
    if case == "naive":
        return loss_naive
    if case == "cce":
        return _cce_fn(device)
    if case.startswith("ours@"):
        chunk = int(case.split("@", 1)[1])
        return lambda W, hs, t: loss_ours(W, hs, t, chunk)
    raise ValueError(f"unknown case {case!r}: naive, cce or ours@CHUNK")


def run_case(case: str, vocab: int, hidden: int, tokens: int, depths: int, grads_file: str | None = None,
             device: str = "cpu") -> dict:
    """One forward + backward of ``case`` in this process on ``device``: peak MiB above the inputs, seconds, loss,
    and which device and memory measure those are.

    Writes the loss and gradients (dW, dh_0..dh_D) to ``grads_file`` when given (for check_against).
    """
    fn = loss_fn(case, device)
    # warm-up on a small input: first-call costs (lazy imports, cce's compile: dynamic shapes, so the same
    # graph serves the real size; CUDA context and kernel loading) stay out of the figures
    w, h, t = make_inputs(256, hidden, 16, depths, seed=1, device=device)
    fn(w, h, t).backward()
    del w, h, t
    W, hs, targets = make_inputs(vocab, hidden, tokens, depths, device=device)
    before, exact = peak_start(device)
    t0 = time.perf_counter()
    loss = fn(W, hs, targets)
    loss.backward()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_since(device, before)
    if grads_file is not None:
        torch.save({"loss": loss.detach(), "grads": [W.grad] + [h.grad for h in hs]}, grads_file)
    return {"case": case, "peak_mib": round(peak, 1), "seconds": round(seconds, 3), "loss": float(loss),
            "peak_reset": exact, "device": device, "memory": MEMORY_MEASURES[device]}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (L2 over all elements)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def check_against(file: str, ref_file: str) -> dict:
    """Relative errors of a case's loss and gradients against the reference case's."""
    got, ref = torch.load(file, map_location="cpu"), torch.load(ref_file, map_location="cpu")
    errs = [rel_err(g, r) for g, r in zip(got["grads"], ref["grads"])]
    loss_err = rel_err(got["loss"].reshape(1), ref["loss"].reshape(1))
    return {"loss_rel_err": loss_err, "grad_rel_err": max(errs), "matches": loss_err <= RTOL and max(errs) <= RTOL}


def _child(case: str, args, grads_file: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--vocab", str(args.vocab), "--hidden",
           str(args.hidden), "--tokens", str(args.tokens), "--depths", str(args.depths), "--grads-file", grads_file,
           "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(cases: list[str], vocab: int, hidden: int, tokens: int, depths: int, fresh_process: bool = True,
            repeats: int = 1, device: str = "cpu") -> dict:
    """Run every case on ``device`` (each in a fresh subprocess unless ``fresh_process`` is False) ``repeats``
    times, interleaved; peak = the first run's, seconds = the median; each case checked against ``naive``."""
    args = argparse.Namespace(vocab=vocab, hidden=hidden, tokens=tokens, depths=depths, device=device)
    if "naive" not in cases:
        cases = ["naive"] + cases
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {c: os.path.join(tmp, c.replace("@", "_") + ".pt") for c in cases}
        for r in range(repeats):
            for case in cases:
                gf = files[case] if r == 0 else None
                if fresh_process:
                    res = _child(case, args, gf or os.devnull)
                else:
                    res = run_case(case, vocab, hidden, tokens, depths, gf, device)
                prev = results.setdefault(case, {**res, "runs_s": []})
                if "seconds" in res:
                    prev["runs_s"].append(res["seconds"])
        for case, res in results.items():
            if "error" in res:
                continue
            res["seconds"] = round(sorted(res["runs_s"])[len(res["runs_s"]) // 2], 3)
            res.update(check_against(files[case], files["naive"]))
    naive = results["naive"]
    for res in results.values():
        if "error" not in res and "error" not in naive:
            res["peak_vs_naive"] = round(res["peak_mib"] / naive["peak_mib"], 4)
            res["time_vs_naive"] = round(res["seconds"] / naive["seconds"], 4)
    ours = [c for c in cases if c.startswith("ours@")]
    head = results[ours[0]] if ours else {}
    return {
        "config": {"vocab": vocab, "hidden": hidden, "tokens": tokens, "depths": depths, "lambda": LAMBDA,
                   "fresh_process": fresh_process, "repeats": repeats, "rtol": RTOL, "device": device,
                   "memory": MEMORY_MEASURES[device], "cce_impl": cce_impl(device)},
        "ours_peak_vs_naive": head.get("peak_vs_naive"),
        "ours_time_vs_naive": head.get("time_vs_naive"),
        "matches": all(r.get("matches", False) for r in results.values() if "error" not in r),
        "goal": {"peak_vs_naive_max": 0.25, "time_vs_naive_max": 1.3},
        "cases": results,
    }


def print_table(res: dict) -> None:
    c = res["config"]
    print(f"main + {c['depths']} MTP losses: vocab={c['vocab']} hidden={c['hidden']} tokens={c['tokens']} "
          f"on {c['device']} (peak: {c['memory']})")
    print(f"{'case':12s} {'peak MiB':>10s} {'vs naive':>9s} {'fwd+bwd s':>10s} {'vs naive':>9s} "
          f"{'loss rel':>9s} {'grad rel':>9s}")
    for name, r in res["cases"].items():
        if "error" in r:
            print(f"{name:12s} failed: {r['error']}")
            continue
        print(f"{name:12s} {r['peak_mib']:10.1f} {r['peak_vs_naive']:9.3f} {r['seconds']:10.2f} "
              f"{r['time_vs_naive']:9.3f} {r['loss_rel_err']:9.1e} {r['grad_rel_err']:9.1e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=1024, help="target tokens of the main head")
    p.add_argument("--depths", type=int, default=2, help="MTP depths D")
    p.add_argument("--chunk-sizes", default="256,192,128", help="ours@C cases (the first, the model default, is the headline)")
    p.add_argument("--no-cce", action="store_true", help="skip cut-cross-entropy")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=OUT)
    add_device_arg(p)
    p.add_argument("--case", help=argparse.SUPPRESS)  # child mode: one case, one JSON line on stdout
    p.add_argument("--grads-file", help=argparse.SUPPRESS)
    a = parse_device_args(p, argv)
    if a.case:
        gf = None if a.grads_file in (None, os.devnull) else a.grads_file
        print(json.dumps(run_case(a.case, a.vocab, a.hidden, a.tokens, a.depths, gf, a.device)))
        return
    cases = ["naive"] + [f"ours@{int(c)}" for c in a.chunk_sizes.split(",")] + ([] if a.no_cce else ["cce"])
    res = measure(cases, a.vocab, a.hidden, a.tokens, a.depths, repeats=a.repeats, device=a.device)
    print_table(res)
    write_result(res, a.out)


if __name__ == "__main__":
    main()
