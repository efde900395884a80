#!/usr/bin/env python
"""What the MTP head costs per training step, measured against what its FLOPs predict.

    python bench/mtp_overhead.py                  # demo model + a larger CPU model (about 3 min on 2 cores)
    python bench/mtp_overhead.py --sizes demo --repeats 20
    python bench/mtp_overhead.py --device cuda --precision bf16-mixed     # on a GPU (bench/gpu_check.sh)

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
head costs what its maths costs). ``peak_step_mib``: what the last warm-up step of a setting adds to memory at
its peak (the untimed step; ``memory`` names the measure: ``rss_hwm``, the resident set's high-water mark, on cpu).

``--device cuda`` (default cpu): models, optimizer state and the batch on the GPU, each timed step between
torch.cuda.synchronize() calls, ``peak_step_mib`` from torch.cuda.max_memory_allocated (``cuda_max_allocated``);
the result names the device, the memory measure and the Mamba kernels a CUDA run lacks (transformers' slow
pure-torch scan then). ``--precision bf16-mixed``: the forward under torch.autocast(bfloat16), as Lightning's
bf16-mixed runs it (default 32: fp32 throughout). ``--tokenizer``: another tokenizer for the demo model and batch
(default conf/demo.yaml's). Sizes:

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

import contextlib

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
from common import (MEMORY_MEASURES, add_device_arg, parse_device_args, peak_since, peak_start, sync,  # noqa: E402
                    write_result)

OUT = "bench/results/mtp_overhead.json"
DEMO_CONF = "conf/demo.yaml"
DEMO_TRAIN = "data/demo/train_cuts.jsonl.gz"
PRECISIONS = ("32", "bf16-mixed")

CPU_LARGE_LLM = dict(pattern="M*EM-M*E", hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                     intermediate_size=1024, mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64,
                     n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
                     moe_shared_expert_intermediate_size=512)


def demo_model_kwargs(conf: str = DEMO_CONF, tokenizer: str | None = None) -> dict:
    """conf/demo.yaml's model section (plain data), the encoder built from config (no pretrained path);
    ``tokenizer``: another tokenizer directory (default: the config's)."""
    import yaml

    with open(conf) as f:
        cfg = yaml.safe_load(f)["model"]
    cfg["encoder"]["path"] = None
    if tokenizer:
        cfg["tokenizer_path"] = tokenizer
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


def size_kwargs(size: str, tmp: str, tokenizer: str | None = None) -> dict:
    """SALMModule kwargs (plain data, MTP left to the caller) of a named size (``tokenizer``: demo_model_kwargs)."""
    kw = demo_model_kwargs(tokenizer=tokenizer)
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


def to_device(batch: dict, device: str) -> dict:
    """``batch`` with every tensor moved to ``device`` (the batch itself on cpu)."""
    if device == "cpu":
        return batch
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def autocast(device: str, precision: str):
    """The forward's precision context: torch.autocast(bfloat16) for ``bf16-mixed``, nothing for ``32``."""
    if precision == "32":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def build(kwargs: dict, depths: int, device: str = "cpu"):
    """A materialised SALMModule (seed 0) with ``depths`` MTP depths on ``device``, in train mode, and its AdamW."""
    from salm_mtp.io.checkpoints import build_module
    from salm_mtp.optim import build_optimizer

    kw = copy.deepcopy(kwargs)
    kw["mtp"] = {**kw.get("mtp", {}), "num_layers": depths}
    kw["optim"] = {**kw.get("optim", {}), "decay_steps": 1000}  # no trainer: the schedule length is given
    torch.manual_seed(0)
    module = build_module(**kw).to(device)
    module.train()
    opt = build_optimizer(module, module.cfg_optim)["optimizer"]
    return module, opt


def train_step(module, opt, batch: dict, precision: str = "32") -> float:
    """One step as Lightning's fit runs it (loss under ``precision``'s autocast, backward, clip 1.0, AdamW, MoE
    bias update); returns the loss."""
    with autocast(module.device.type, precision):
        loss, _, _ = module.compute_losses(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if module.balancer.loads:
        module.balancer.step()
    return float(loss)


def step_flops(module, batch: dict, precision: str = "32") -> int:
    """FLOPs of one forward + backward (operator-shape count; no optimizer step is taken)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(module.device.type, precision):
            loss, _, _ = module.compute_losses(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    module.balancer.loads = {}
    return int(counter.get_total_flops())


def warm_up(module, opt, batch: dict, steps: int, device: str, precision: str) -> float | None:
    """``steps`` untimed train steps; MiB the last one adds at its peak (None when ``steps`` is 0)."""
    peak = None
    for i in range(steps):
        if i == steps - 1:
            before, _ = peak_start(device)
        train_step(module, opt, batch, precision)
        if i == steps - 1:
            peak = round(peak_since(device, before), 1)
    return peak


def timed_step(module, opt, batch: dict, device: str, precision: str) -> float:
    """Seconds of one train step (the device's queue drained before and after)."""
    sync(device)
    t0 = time.perf_counter()
    train_step(module, opt, batch, precision)
    sync(device)
    return time.perf_counter() - t0


def measure(kwargs: dict, batch: dict, depths=(0, 1, 2), repeats: int = 10, warmup: int = 2, device: str = "cpu",
            precision: str = "32") -> dict:
    """Median step seconds, FLOPs and the warm-up step's peak memory of each head setting on ``batch`` (moved to
    ``device``); overheads relative to MTP off."""
    from salm_mtp.modules.llm import missing_mamba_kernels

    batch = to_device(batch, device)
    models = {d: build(kwargs, d, device) for d in depths}
    flops = {d: step_flops(models[d][0], batch, precision) for d in depths}
    peaks = {d: warm_up(*models[d], batch, warmup, device, precision) for d in depths}
    times: dict[int, list[float]] = {d: [] for d in depths}
    order = list(depths)
    for r in range(repeats):
        rot = order[r % len(order):] + order[: r % len(order)]
        for d in rot:
            times[d].append(timed_step(*models[d], batch, device, precision))
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
            "peak_step_mib": peaks[d],
        }
    m = models[depths[-1]][0]
    return {
        "device": device,
        "precision": precision,
        "memory": MEMORY_MEASURES[device],
        "mamba_kernels_missing": missing_mamba_kernels(m.llm, device),
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="demo,cpu_large")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-duration", type=float, default=20.0, help="seconds of audio in the batch")
    p.add_argument("--manifest", default=DEMO_TRAIN)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory of the model and the batch "
                                                      f"(default: {DEMO_CONF}'s model.tokenizer_path)")
    p.add_argument("--precision", default="32", choices=PRECISIONS,
                   help="32: fp32 throughout (default); bf16-mixed: the forward under torch.autocast(bfloat16)")
    p.add_argument("--out", default=OUT)
    add_device_arg(p)
    a = parse_device_args(p, argv)
    if not os.path.isfile(a.manifest):
        sys.exit(f"--manifest {a.manifest} is missing: run `salm-mtp make-demo-data --out data/demo` first")
    tokenizer = a.tokenizer or demo_model_kwargs()["tokenizer_path"]
    batch = demo_batch(a.manifest, tokenizer_path=tokenizer, max_duration=a.max_duration)
    res = {"device": a.device, "precision": a.precision, "memory": MEMORY_MEASURES[a.device], "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            t0 = time.perf_counter()
            res["sizes"][size] = measure(size_kwargs(size, tmp, a.tokenizer), batch, repeats=a.repeats,
                                         warmup=a.warmup, device=a.device, precision=a.precision)
            res["sizes"][size]["wall_s"] = round(time.perf_counter() - t0, 1)
    res["goal"] = {"overhead_vs_flops_ratio_max": 1.25}
    print_table(res)
    write_result(res, a.out)


if __name__ == "__main__":
    main()
