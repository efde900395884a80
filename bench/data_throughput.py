#!/usr/bin/env python
"""Does the data pipeline keep up? Audio-seconds per wall-second of manifest -> sampler -> dataset -> batches.

    python bench/data_throughput.py                 # demo corpus, 0 and 2 workers (about 1 min on 2 cores)
    python bench/data_throughput.py --workers 0,1,2 --batches 60

The loader is the project's own: ``SALMDataModule(...).train_dataloader()`` with conf/demo.yaml's data
settings (DynamicBucketingSampler, ``max_duration`` seconds per batch, SALMDataset reading the audio,
tokenising prompts and collating). For each worker count it draws ``--batches`` batches and reports
audio seconds per wall second (``x_realtime``) from the first batch on (``steady``: the first batch, which
pays for starting workers and opening the manifest, excluded; ``cold``: included).

``fraction_of_step``: the loader's wall time per batch over the time of one demo train step on a batch of
the same size (conf/demo.yaml's model, D=1, as bench/mtp_overhead.py times it): the share of a step the
data would cost if the training process had to wait for it (with workers, loading overlaps the step, so
this is an upper bound). Prints a table and writes bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
from common import write_result  # noqa: E402

OUT = "bench/results/data_throughput.json"
DEMO_CONF = "conf/demo.yaml"
SAMPLE_RATE = 16000


def demo_data_kwargs(conf: str = DEMO_CONF) -> dict:
    """conf/demo.yaml's data section, with its ``${...}`` interpolation resolved."""
    import yaml

    with open(conf) as f:
        raw = yaml.safe_load(f)
    data = dict(raw["data"])
    data["tokenizer_path"] = raw["model"]["tokenizer_path"]
    return {k: data[k] for k in ("train_manifest", "tokenizer_path", "max_duration", "num_buckets")}


def loader_throughput(num_workers: int, num_batches: int, **data_kwargs) -> dict:
    """Draw ``num_batches`` batches from a fresh train loader; audio seconds and wall times."""
    from salm_mtp.data.datamodule import SALMDataModule

    t0 = time.perf_counter()
    dm = SALMDataModule(num_workers=num_workers, seed=0, **data_kwargs)
    it = iter(dm.train_dataloader())
    stamps, audio_s, utts = [], [], 0
    for _ in range(num_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        stamps.append(time.perf_counter())
        audio_s.append(float(batch["audio_lens"].sum()) / SAMPLE_RATE)
        utts += int(batch["audio_lens"].numel())
    del it  # shuts the workers down
    if len(stamps) < 2:
        raise ValueError(f"{data_kwargs.get('train_manifest')!r} gave {len(stamps)} batch(es): need at least 2")
    cold_s, steady_s = stamps[-1] - t0, stamps[-1] - stamps[0]
    return {
        "num_workers": num_workers,
        "batches": len(stamps),
        "utterances": utts,
        "audio_s": round(sum(audio_s), 2),
        "cold_wall_s": round(cold_s, 3),
        "steady_wall_s": round(steady_s, 3),
        "x_realtime_cold": round(sum(audio_s) / cold_s, 1),
        "x_realtime": round(sum(audio_s[1:]) / steady_s, 1),
        "s_per_batch": round(steady_s / (len(stamps) - 1), 5),
        "audio_s_per_batch": round(statistics.mean(audio_s), 2),
    }


def demo_step_seconds(max_duration: float, repeats: int = 3, manifest: str | None = None) -> dict:
    """Median seconds of one demo train step (conf/demo.yaml's model, D=1) on a batch of ``max_duration``."""
    from bench.mtp_overhead import DEMO_TRAIN, build, demo_batch, demo_model_kwargs, train_step

    batch = demo_batch(manifest or DEMO_TRAIN, max_duration=max_duration)
    module, opt = build(demo_model_kwargs(), 1)
    train_step(module, opt, batch)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_step(module, opt, batch)
        times.append(time.perf_counter() - t0)
    return {"step_s": round(statistics.median(times), 4), "audio_s": round(float(batch["audio_lens"].sum()) / 16000, 2)}


def measure(workers=(0, 2), num_batches: int = 40, step_repeats: int = 3, **data_kwargs) -> dict:
    kw = {**demo_data_kwargs(), **data_kwargs}
    rows = {f"workers={w}": loader_throughput(w, num_batches, **kw) for w in workers}
    step = demo_step_seconds(kw["max_duration"], step_repeats, kw["train_manifest"])
    for r in rows.values():
        # per-batch loader time scaled to the timed step's audio (batches vary around max_duration)
        per_step = r["s_per_batch"] * step["audio_s"] / max(r["audio_s_per_batch"], 1e-9)
        r["fraction_of_step"] = round(per_step / step["step_s"], 4)
    return {"data": kw, "demo_step": step, "rows": rows, "goal": {"x_realtime_min_2_workers": 100}}


def print_table(res: dict) -> None:
    d = res["data"]
    print(f"{d['train_manifest']}: batches of <= {d['max_duration']} s audio; demo train step "
          f"{res['demo_step']['step_s'] * 1e3:.0f} ms on {res['demo_step']['audio_s']} s of audio")
    print(f"{'workers':>7s} {'batches':>7s} {'audio s':>8s} {'x realtime':>10s} {'(cold)':>8s} {'ms/batch':>9s} "
          f"{'of a step':>9s}")
    for r in res["rows"].values():
        print(f"{r['num_workers']:7d} {r['batches']:7d} {r['audio_s']:8.1f} {r['x_realtime']:10.1f} "
              f"{r['x_realtime_cold']:8.1f} {r['s_per_batch'] * 1e3:9.1f} {r['fraction_of_step']:9.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--step-repeats", type=int, default=3)
    p.add_argument("--manifest", default=None, help="default: conf/demo.yaml's data.train_manifest")
    p.add_argument("--out", default=OUT)
    a = p.parse_args()
    kw = {} if a.manifest is None else {"train_manifest": a.manifest}
    manifest = kw.get("train_manifest", demo_data_kwargs()["train_manifest"])
    if not os.path.isfile(manifest):
        sys.exit(f"{manifest} is missing: run `salm-mtp make-demo-data --out data/demo` first")
    torch.manual_seed(0)
    res = measure(tuple(int(w) for w in a.workers.split(",")), a.batches, a.step_repeats, **kw)
    print_table(res)
    write_result(res, a.out)


if __name__ == "__main__":
    main()
