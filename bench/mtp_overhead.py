#!/usr/bin/env python
"""What the MTP head costs per training step, measured against what its FLOPs predict.

    python bench/mtp_overhead.py                  # demo model + a larger CPU model (about 3 min on 2 cores)
    python bench/mtp_overhead.py --sizes demo --repeats 20

For each size, one SALMModule per head setting (MTP off, D=1, D=2; the same seed, so backbone, encoder and
adapter start from identical weights) trains on one fixed batch of the demo corpus (the first batch of the
train loader, ``--max-duration`` seconds of audio). A train step is what Lightning runs in ``fit``:
``compute_losses`` (features, encoder, adapter, backbone, head, chunked losses, CTC), backward, gradient
clipping at 1.0, AdamW step, the MoE bias update. After ``--warmup`` steps per setting the settings are
timed one step at a time, interleaved (the order rotates every repetition), so machine noise hits all of
them alike; times are medians over ``--repeats`` repetitions.

FLOPs are counted from the operators' shapes (``torch.utils.flop_counter.FlopCounterMode`` over one
forward + backward: matmuls, attention, convolutions; the lm_head recompute of the chunked loss included)
on the same batch, so ``flops_head_over_rest`` = (FLOPs_D - FLOPs_off) / FLOPs_off is the overhead the
maths predicts, and ``overhead_vs_flops_ratio`` = measured overhead / that prediction (goal <= 1.25: the
head costs what its maths costs). Sizes:

- ``demo``: conf/demo.yaml's model (hidden 128, 6 blocks "M*EM-*", demo tokenizer).
- ``cpu_large``: the demo encoder and adapter with a Nemotron-H of hidden 512, 8 blocks "M*EM-M*E", 8 experts,
  vocabulary 32768 (the demo tokenizer padded with unused tokens).

Prints a table and writes bench/results/mtp_overhead.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
from common import write_result  # noqa: E402

OUT = "bench/results/mtp_overhead.json"
DEMO_CONF = "conf/demo.yaml"
DEMO_TRAIN = "data/demo/train_cuts.jsonl.gz"

CPU_LARGE_LLM = dict(pattern="M*EM-M*E", hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                     intermediate_size=1024, mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64,
                     n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
                     moe_shared_expert_intermediate_size=512)


def demo_model_kwargs(conf: str = DEMO_CONF) -> dict:
    """conf/demo.yaml's model section (plain data), the encoder built from config (no pretrained path)."""
    import yaml

    with open(conf) as f:
        cfg = yaml.safe_load(f)["model"]
    cfg["encoder"]["path"] = None
    return cfg


def padded_tokenizer(src: str, vocab: int, out_dir: str) -> str:
    """A copy of the tokenizer at ``src`` with unused tokens appended up to ``vocab`` entries (a larger lm_head
    and embedding; the text of the batch tokenizes exactly as before). Returns its directory."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    n = vocab - len(tok)
    if n > 0:
        tok.add_tokens([f"<unused_{i}>" for i in range(n)])
    tok.save_pretrained(out_dir)
    return out_dir


def size_kwargs(size: str, tmp: str) -> dict:
    """SALMModule kwargs (plain data, MTP left to the caller) of a named size."""
    kw = demo_model_kwargs()
    if size == "demo":
        return kw
    if size == "cpu_large":
        kw["llm"] = {**kw["llm"], **CPU_LARGE_LLM}
        kw["tokenizer_path"] = padded_tokenizer(kw["tokenizer_path"], 32768, os.path.join(tmp, "tok32k"))
        kw["ctc_weight"] = 0.0  # the encoder's CTC head would need the padded tokenizer's 32k classes
        return kw
    raise ValueError(f"unknown size {size!r}: demo or cpu_large")


def demo_batch(manifest: str = DEMO_TRAIN, tokenizer_path: str = "data/demo/tokenizer", max_duration: float = 20.0,
               seed: int = 0) -> dict:
    """The first batch of the project's train loader (SALMDataModule) over ``manifest``."""
    from salm_mtp.data.datamodule import SALMDataModule

    dm = SALMDataModule(train_manifest=manifest, tokenizer_path=tokenizer_path, max_duration=max_duration,
                        seed=seed, num_workers=0)
    return next(iter(dm.train_dataloader()))


def build(kwargs: dict, depths: int):
    """A materialised SALMModule (seed 0) with ``depths`` MTP depths, in train mode, and its AdamW."""
    from salm_mtp.io import build_module
    from salm_mtp.optim import build_optimizer

    kw = copy.deepcopy(kwargs)
    kw["mtp"] = {**kw.get("mtp", {}), "num_layers": depths}
    kw["optim"] = {**kw.get("optim", {}), "decay_steps": 1000}  # no trainer: the schedule length is given
    torch.manual_seed(0)
    module = build_module(**kw)
    module.train()
    opt = build_optimizer(module, module.cfg_optim)["optimizer"]
    return module, opt


def train_step(module, opt, batch: dict) -> float:
    """One step as Lightning's fit runs it (loss, backward, clip 1.0, AdamW, MoE bias update); returns the loss."""
    loss, _, _ = module.compute_losses(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if module.balancer.loads:
        module.balancer.step()
    return float(loss)


def step_flops(module, batch: dict) -> int:
    """FLOPs of one forward + backward (operator-shape count; no optimizer step is taken)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = module.compute_losses(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    module.balancer.loads = {}
    return int(counter.get_total_flops())


def measure(kwargs: dict, batch: dict, depths=(0, 1, 2), repeats: int = 10, warmup: int = 2) -> dict:
    """Median step seconds and FLOPs of each head setting on ``batch``; overheads relative to MTP off."""
    models = {d: build(kwargs, d) for d in depths}
    flops = {d: step_flops(models[d][0], batch) for d in depths}
    for d in depths:
        for _ in range(warmup):
            train_step(*models[d], batch)
    times: dict[int, list[float]] = {d: [] for d in depths}
    order = list(depths)
    for r in range(repeats):
        rot = order[r % len(order):] + order[: r % len(order)]
        for d in rot:
            t0 = time.perf_counter()
            train_step(*models[d], batch)
            times[d].append(time.perf_counter() - t0)
    base = 0 if 0 in depths else depths[0]
    t_base, f_base = statistics.median(times[base]), flops[base]
    rows = {}
    for d in depths:
        t = statistics.median(times[d])
        measured = t / t_base - 1.0
        predicted = flops[d] / f_base - 1.0
        rows[f"D={d}" if d else "off"] = {
            "depths": d,
            "step_s": round(t, 5),
            "step_s_all": [round(x, 5) for x in times[d]],
            "gflops_per_step": round(flops[d] / 1e9, 4),
            "measured_overhead": round(measured, 4),
            "flops_head_over_rest": round(predicted, 4),
            "overhead_vs_flops_ratio": round(measured / predicted, 3) if d and predicted > 0 else None,
        }
    m = models[depths[-1]][0]
    return {
        "params": sum(p.numel() for p in m.parameters()),
        "llm_hidden": m.llm.config.hidden_size,
        "llm_blocks": m.llm.config.num_hidden_layers,
        "vocab": m.llm.config.vocab_size,
        "batch": {"rows": int(batch["input_ids"].shape[0]),
                  "audio_s": round(float(batch["audio_lens"].sum()) / 16000, 2),
                  "llm_tokens": int(batch["input_ids"].numel())},
        "repeats": repeats,
        "rows": rows,
    }


def print_table(res: dict) -> None:
    print(f"{'size':10s} {'head':5s} {'step ms':>8s} {'GFLOP':>8s} {'measured':>9s} {'FLOPs':>8s} {'ratio':>6s}")
    for size, r in res["sizes"].items():
        for name, row in r["rows"].items():
            ratio = row["overhead_vs_flops_ratio"]
            print(f"{size:10s} {name:5s} {row['step_s'] * 1e3:8.1f} {row['gflops_per_step']:8.2f} "
                  f"{row['measured_overhead']:+9.1%} {row['flops_head_over_rest']:+8.1%} "
                  f"{'' if ratio is None else format(ratio, '6.2f')}")
    print("measured = step-time overhead over MTP off (median); FLOPs = what the head's maths adds; "
          "ratio = measured / FLOPs (goal <= 1.25)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="demo,cpu_large")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-duration", type=float, default=20.0, help="seconds of audio in the batch")
    p.add_argument("--manifest", default=DEMO_TRAIN)
    p.add_argument("--out", default=OUT)
    a = p.parse_args()
    if not os.path.isfile(a.manifest):
        sys.exit(f"{a.manifest} is missing: run `salm-mtp make-demo-data --out data/demo` first")
    batch = demo_batch(a.manifest, max_duration=a.max_duration)
    res = {"sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            t0 = time.perf_counter()
            res["sizes"][size] = measure(size_kwargs(size, tmp), batch, repeats=a.repeats, warmup=a.warmup)
            res["sizes"][size]["wall_s"] = round(time.perf_counter() - t0, 1)
    res["goal"] = {"overhead_vs_flops_ratio_max": 1.25}
    print_table(res)
    write_result(res, a.out)


if __name__ == "__main__":
    main()
