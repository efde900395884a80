#!/usr/bin/env python
"""Peak host memory per rank of a frozen-LLM `salm-mtp fit`: 1 process vs 2 FSDP2 processes (docs/design.md §5).

    python bench/scale_memory.py [--work-dir DIR] [--keep] [--variants bf16,fp32] [--hidden 1024 --repeats 5]

What it does:
  1. writes a mid-size Nemotron-H HF directory (default: 35 blocks "MEMEM*E" x 5, hidden 1024, 16 experts:
     ~680M parameters, ~2.5 GiB in fp32), stored as released checkpoints are (bf16 on disk except the MoE
     routers' fp32 ``e_score_correction_bias``, several safetensors shards + index), a tiny Nemotron-H
     directory of the same layout, a tiny sine-wave corpus and the tiny test tokenizer;
  2. for each precision variant and each LLM (mid-size, tiny) runs `python -m torch.distributed.run
     --standalone --nproc_per_node N -m salm_mtp.cli fit` for N = 1 and N = 2, both under Lightning's
     ModelParallelStrategy (data_parallel_size = N: the same code path; FSDP2 over a 1-rank mesh for N = 1),
     3 steps, the SALM recipe: the whole LLM frozen (``--model.freeze.patterns=['^llm\\.']``), MTP off
     (``model.mtp.num_layers=0``: only the LLM's own weights are measured), tiny trainable encoder + adapter,
     one 0.1-0.33 s clip per rank and step (``--max-cuts``: activations, which data parallelism does not
     shard, stay small), ``model.parallel.activation_checkpointing=true`` as in the real-target configs
     (each block's activations recomputed in backward; ``--no-activation-checkpointing`` keeps them: the
     pure-torch Mamba scan saves ~6 MiB per block even for a 0.3 s clip), OMP_NUM_THREADS=1 per rank;
       bf16: --model.parallel.param_dtype=bfloat16 --model.parallel.reduce_dtype=float32
             --model.parallel.frozen_dtype=bfloat16   (the real-target settings: frozen LLM stored in bf16)
       fp32: no param / frozen dtype (frozen LLM stored in fp32)
  3. measures each rank's peak RSS: a callback inside every rank (``MemoryProbe``, below) reads
     ``/proc/self/status`` at stages and splits the kernel's high-water mark (VmHWM) into phases by
     resetting it (``echo 5 > /proc/self/clear_refs``): startup (imports, data) / load (configure_model:
     meta build, FSDP2 plan, materialise, read the safetensors slices, init, + optimizer) / train (the steps).
     The parent also samples every rank's RssAnon / RssFile every 20 ms: file-backed pages (the
     mmap'ed safetensors that ``safe_open`` reads from) count in RSS while the files are open.
  4. reports per variant: raw peak per rank (1 proc, 2 procs) and their ratio (goal <= 0.65), the fixed
     overhead (peak of the tiny-LLM run of the same config), the LLM's share
     (peak2 - overhead2) / (peak1 - overhead1), and the ideal share 0.5 + U / P (P: the LLM's bytes in its
     storage dtype, U: its largest FSDP2 unit, all-gathered in the compute dtype).
Prints a table and writes bench/results/scale_memory.json. The work directory (a temp dir unless
--work-dir) is deleted at the end unless --keep (a --work-dir keeps corpus, run logs and probes, not the HF
dirs). ~6-7 minutes on 2 CPU cores; peak host memory ~7 GiB (two 3.7 GiB ranks).

Diagnosis switches: --trace (RSS after every backbone block's forward / before its backward, in the rank
JSON), --mallopt-mmap-threshold BYTES (each rank fixes glibc's mmap threshold before configure_model),
--env KEY=VALUE (e.g. MALLOC_MMAP_THRESHOLD_=1048576), --only big_1,big_2, --max-cuts N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import STATUS_KEYS, read_status, reset_hwm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


# ------------------------------------------------------------------------------- in the ranks
class MemoryProbe(Callback):
    """Writes ``out_dir/rank{R}.json``: /proc/self/status at each stage and VmHWM per phase (MiB).

    Phases (VmHWM reset at each boundary): ``startup`` (process start .. ``setup``, i.e. imports, CLI,
    data), ``load`` (``setup`` .. ``on_fit_start``: configure_model = meta build, FSDP2 plan, materialise,
    read, init; then the optimizer), ``train`` (``on_fit_start`` .. ``on_train_end``: the steps).
    """

    def __init__(self, out_dir: str, trace: bool = False, mmap_threshold: int | None = None) -> None:
        self.out_dir = out_dir
        self.mmap_threshold = mmap_threshold
        """If set, ``mallopt(M_MMAP_THRESHOLD, n)`` before configure_model: the in-process form of the
        glibc fix (fixed threshold: freed blocks >= n bytes go back to the OS; the suggested change for salm_mtp.cli)."""
        self.trace = trace
        """Also record RSS after each backbone block's forward and before its backward (diagnosis)."""
        self.block_trace: list[list] = []
        self._hooked = False
        self.stages: list[dict] = []
        self.phase_peak: dict[str, float] = {}
        self.hwm_reset = True
        self.t0 = time.perf_counter()

    def _stage(self, name: str, phase_end: str | None = None) -> None:
        s = read_status()
        self.stages.append({"stage": name, "t": round(time.perf_counter() - self.t0, 2), **s})
        if phase_end is not None:
            self.phase_peak[phase_end] = max(self.phase_peak.get(phase_end, 0.0), s.get("VmHWM", 0.0))
            self.hwm_reset = reset_hwm() and self.hwm_reset

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage("setup (before configure_model)", phase_end="startup")
        if self.mmap_threshold:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, int(self.mmap_threshold))  # M_MMAP_THRESHOLD

    def on_fit_start(self, trainer, pl_module) -> None:
        self._stage("on_fit_start (after configure_model + optimizer)", phase_end="load")
        if self.trace and not self._hooked:
            self._hooked = True
            for i, block in enumerate(pl_module.llm.model.layers):
                block.register_forward_hook(self._block_hook(trainer, i))

    def _block_hook(self, trainer, i: int):
        def record(kind: str) -> None:
            s = read_status()
            self.block_trace.append([trainer.global_step, kind, i, round(s.get("RssAnon", 0.0)),
                                     round(s.get("VmHWM", 0.0))])

        def hook(module, args, output):
            record("fwd")
            out = output[0] if isinstance(output, tuple) else output
            if getattr(out, "requires_grad", False):
                out.register_hook(lambda g: record("bwd"))

        return hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stage(f"after step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._stage("on_train_end", phase_end="train")
        import torch

        params = {"bytes": 0, "numel": 0}
        for p in pl_module.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            params["bytes"] += local.numel() * local.element_size()
            params["numel"] += local.numel()
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"rank": trainer.global_rank, "pid": os.getpid(), "world_size": trainer.world_size,
                       "hwm_reset": self.hwm_reset, "phase_peak_mib": self.phase_peak,
                       "peak_mib": max(self.phase_peak.values()), "stages": self.stages,
                       "local_param_mib": params["bytes"] / MiB, "local_param_numel": params["numel"],
                       "torch_threads": torch.get_num_threads(),
                       "block_trace": {"columns": ["step", "kind", "block", "RssAnon", "VmHWM"],
                                       "rows": self.block_trace}}, f, indent=1)


# ---------------------------------------------------------------------------- in the parent
class Sampler(threading.Thread):
    """Polls /proc/<pid>/status of every descendant of ``root_pid`` every ``period`` s; keeps per-pid maxima."""

    def __init__(self, root_pid: int, period: float = 0.02, refresh: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.period, self.refresh = root_pid, period, refresh
        self.peaks: dict[int, dict[str, float]] = {}
        self.timeline: dict[int, list[list[float]]] = {}  # pid -> [[t, VmRSS, RssAnon, RssFile], ...] every 0.5 s
        self.cmd: dict[int, str] = {}
        self.stop = threading.Event()

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
        out, todo = [], [self.root_pid]
        while todo:
            for c in children.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    def run(self) -> None:
        pids: list[int] = []
        t_list = t_line = 0.0
        t0 = time.monotonic()
        while not self.stop.is_set():
            line = time.monotonic() - t_line >= 0.5
            if line:
                t_line = time.monotonic()
            if time.monotonic() - t_list > self.refresh:  # listing /proc costs more than reading a few statuses
                pids, t_list = self._descendants(), time.monotonic()
            for pid in pids:
                s = read_status(pid)
                if not s:
                    continue
                peak = self.peaks.setdefault(pid, {})
                for k in ("VmRSS", "RssAnon", "RssFile"):
                    peak[k] = max(peak.get(k, 0.0), s.get(k, 0.0))
                if line:
                    self.timeline.setdefault(pid, []).append(
                        [round(time.monotonic() - t0, 2)] + [round(s.get(k, 0.0)) for k in ("VmRSS", "RssAnon", "RssFile")])
                if pid not in self.cmd:
                    try:
                        with open(f"/proc/{pid}/cmdline") as f:
                            self.cmd[pid] = f.read().replace("\0", " ")[:200]
                    except OSError:
                        pass
            self.stop.wait(self.period)


def _import_test_helpers():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import conftest  # noqa: F401  (write_sine_corpus)
    import tiny

    return conftest, tiny


def nemotron_config(a: argparse.Namespace | dict, vocab: int):
    from transformers import NemotronHConfig

    from salm_mtp.config import BLOCK_SYMBOLS

    a = a if isinstance(a, dict) else vars(a)
    return NemotronHConfig(
        vocab_size=vocab, hidden_size=a["hidden"], layers_block_type=[BLOCK_SYMBOLS[s] for s in a["pattern"]],
        num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"], head_dim=a["head_dim"],
        intermediate_size=4 * a["hidden"], mamba_num_heads=a["mamba_heads"], mamba_head_dim=a["mamba_head_dim"],
        ssm_state_size=a["ssm_state"], n_groups=1, chunk_size=64, n_routed_experts=a["experts"],
        num_experts_per_tok=2, moe_intermediate_size=a["moe_intermediate"],
        moe_shared_expert_intermediate_size=2 * a["moe_intermediate"], max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, num_nextn_predict_layers=0,
    )


TINY_ARCH = dict(hidden=32, pattern="MEMEM*E", heads=2, kv_heads=1, head_dim=16, mamba_heads=4, mamba_head_dim=16,
                 ssm_state=8, experts=4, moe_intermediate=16)


def write_hf_dir(out_dir: str, arch: dict, vocab: int, tok_dir: str, shard: str) -> dict:
    """A randomly initialised Nemotron-H (transformers' own init) saved as released: bf16 except the fp32
    ``e_score_correction_bias``; returns parameter facts of the model (numel, bytes per unit)."""
    import torch
    from transformers import AutoTokenizer, NemotronHForCausalLM

    config = nemotron_config(arch, vocab)
    torch.manual_seed(0)
    llm = NemotronHForCausalLM(config)
    keep = set(getattr(llm, "_keep_in_fp32_modules_strict", None) or ())
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if not any(k in name for k in keep):
                p.data = p.data.to(torch.bfloat16)
    facts = llm_facts(llm)
    llm.save_pretrained(out_dir, max_shard_size=shard)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out_dir)
    del llm
    return facts


def llm_facts(llm) -> dict:
    """numel of the LLM and of its FSDP2 units (backbone blocks; the rest goes to the root group)."""
    blocks = [sum(p.numel() for p in b.parameters()) for b in llm.model.layers]
    total = sum(p.numel() for p in llm.parameters())
    return {"numel": total, "blocks": len(blocks), "largest_block_numel": max(blocks),
            "root_numel": total - sum(blocks)}


def fit_config(run_dir: str, probe_dir: str, hf_dir: str, corpus: str, nproc: int, variant: str, steps: int,
               trace: bool = False, max_cuts: int = 1, mmap_threshold: int | None = None,
               activation_checkpointing: bool = True) -> dict:
    parallel = ({"param_dtype": "bfloat16", "reduce_dtype": "float32", "frozen_dtype": "bfloat16"}
                if variant == "bf16" else {"param_dtype": None, "reduce_dtype": None, "frozen_dtype": None})
    parallel["activation_checkpointing"] = activation_checkpointing
    return {
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "cpu", "devices": nproc, "num_nodes": 1, "precision": "32-true",
            "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                         "init_args": {"data_parallel_size": nproc, "tensor_parallel_size": 1}},
            "max_steps": steps, "limit_val_batches": 0, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "use_distributed_sampler": False, "default_root_dir": run_dir,
            "callbacks": [{"class_path": "scale_memory.MemoryProbe", "init_args": {"out_dir": probe_dir, "trace": trace,
                                                                              "mmap_threshold": mmap_threshold}}],
        },
        "model": {
            "tokenizer_path": None, "ctc_weight": 0.3,
            "encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                        "subsampling_conv_channels": 8, "subsampling_factor": 4, "dropout": 0.0, "layerdrop": 0.0},
            "adapter": {"stack_frames": 2, "hidden_size": 32},
            "llm": {"path": hf_dir},
            "mtp": {"num_layers": 0},
            "freeze": {"patterns": [r"^llm\."], "unfreeze": []},
            "parallel": parallel,
            "spec_augment": {"enabled": False},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
        },
        "data": {"train_manifest": corpus, "val_manifest": None, "test_manifest": None, "tokenizer_path": None,
                 "max_duration": 0.6, "max_cuts": max_cuts, "num_buckets": 2, "num_workers": 0},
    }


def run_fit(work: str, name: str, hf_dir: str, corpus: str, nproc: int, variant: str, steps: int,
            timeout: int, extra_env: dict[str, str], trace: bool = False, max_cuts: int = 1,
            mmap_threshold: int | None = None, activation_checkpointing: bool = True) -> dict:
    import yaml

    run_dir = os.path.join(work, "runs", name)
    probe_dir = os.path.join(run_dir, "probe")
    os.makedirs(run_dir, exist_ok=True)
    cfg_file = os.path.join(run_dir, "fit.yaml")
    with open(cfg_file, "w") as f:
        yaml.safe_dump(fit_config(run_dir, probe_dir, hf_dir, corpus, nproc, variant, steps, trace, max_cuts,
                                  mmap_threshold, activation_checkpointing), f, sort_keys=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "salm_mtp.cli", "fit", "--config", cfg_file]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "bench")]),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **extra_env}
    t0 = time.perf_counter()
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = Sampler(proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        with open(os.path.join(run_dir, "log.txt")) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{name}: fit exited with {rc} after {wall:.0f} s; log tail:\n{tail}")
    ranks = []
    for r in range(nproc):
        with open(os.path.join(probe_dir, f"rank{r}.json")) as f:
            info = json.load(f)
        info["sampled_peak_mib"] = {k: round(v, 1) for k, v in sampler.peaks.get(info["pid"], {}).items()}
        info["timeline_mib"] = {"columns": ["t_s", "VmRSS", "RssAnon", "RssFile"],
                                "rows": sampler.timeline.get(info["pid"], [])}
        ranks.append(info)
    return {"name": name, "nproc": nproc, "variant": variant, "wall_s": round(wall, 1), "command": " ".join(cmd),
            "peak_mib": max(r["peak_mib"] for r in ranks),
            "peak_anon_mib": max(r["sampled_peak_mib"].get("RssAnon", 0.0) for r in ranks),
            "peak_file_mib": max(r["sampled_peak_mib"].get("RssFile", 0.0) for r in ranks), "ranks": ranks}


def summarise(variant: str, runs: dict, facts: dict) -> dict:
    big1, big2, tiny1, tiny2 = (runs[k] for k in ("big_1", "big_2", "tiny_1", "tiny_2"))
    storage = 2 if variant == "bf16" else 4
    compute = 2 if variant == "bf16" else 4
    p_mib = facts["numel"] * storage / MiB
    unit_mib = max(facts["largest_block_numel"], facts["root_numel"]) * compute / MiB
    share = (big2["peak_mib"] - tiny2["peak_mib"]) / (big1["peak_mib"] - tiny1["peak_mib"])
    anon_share = ((big2["peak_anon_mib"] - tiny2["peak_anon_mib"]) /
                  max(big1["peak_anon_mib"] - tiny1["peak_anon_mib"], 1e-9))

    def phases(run):
        return {ph: max(r["phase_peak_mib"].get(ph, 0.0) for r in run["ranks"]) for ph in ("startup", "load", "train")}

    train = {k: phases(runs[k])["train"] for k in runs}
    train_share = (train["big_2"] - train["tiny_2"]) / max(train["big_1"] - train["tiny_1"], 1e-9)

    return {
        "peak_1proc_mib": round(big1["peak_mib"]), "peak_2proc_per_rank_mib": round(big2["peak_mib"]),
        "ratio": round(big2["peak_mib"] / big1["peak_mib"], 3),
        "goal_ratio": 0.65, "goal_met": big2["peak_mib"] / big1["peak_mib"] <= 0.65,
        "overhead_1proc_mib": round(tiny1["peak_mib"]), "overhead_2proc_mib": round(tiny2["peak_mib"]),
        "llm_share": round(share, 3), "ideal_share": round(0.5 + unit_mib / p_mib, 3),
        "llm_storage_mib": round(p_mib), "largest_unit_mib": round(unit_mib, 1),
        "anon_peak_1proc_mib": round(big1["peak_anon_mib"]), "anon_peak_2proc_mib": round(big2["peak_anon_mib"]),
        "anon_llm_share": round(anon_share, 3),
        "file_peak_1proc_mib": round(big1["peak_file_mib"]), "file_peak_2proc_mib": round(big2["peak_file_mib"]),
        "train_phase_ratio": round(train["big_2"] / train["big_1"], 3), "train_phase_llm_share": round(train_share, 3),
        "phase_peaks_mib": {k: {ph: round(v) for ph, v in phases(runs[k]).items()} for k in runs},
        "wall_s": {k: runs[k]["wall_s"] for k in runs},
    }


def print_table(summaries: dict, facts: dict) -> str:
    lines = [f"Nemotron-H {facts['numel'] / 1e6:.0f}M params ({facts['blocks']} blocks, largest "
             f"{facts['largest_block_numel'] / 1e6:.1f}M), LLM frozen, MTP off, 3 steps, ModelParallelStrategy dp=1 vs 2",
             "", "| variant | LLM in memory | 1 proc peak | 2 procs peak/rank | ratio (goal <= 0.65) | overhead 1p / 2p "
             "| LLM share | ideal share |", "|---|---|---|---|---|---|---|---|"]
    for v, s in summaries.items():
        lines.append(f"| {v} | {s['llm_storage_mib']} MiB | {s['peak_1proc_mib']} MiB | {s['peak_2proc_per_rank_mib']} MiB "
                     f"| {s['ratio']:.2f} {'(met)' if s['goal_met'] else '(missed)'} | {s['overhead_1proc_mib']} / "
                     f"{s['overhead_2proc_mib']} MiB | {s['llm_share']:.2f} | {s['ideal_share']:.2f} |")
    lines.append("")
    lines.append("Phase peaks (VmHWM per phase, max over ranks, MiB) and sampled peak RssAnon:")
    for v, s in summaries.items():
        for k, ph in s["phase_peaks_mib"].items():
            lines.append(f"  {v:5s} {k:7s} startup {ph['startup']:6d}  load {ph['load']:6d}  train {ph['train']:6d}"
                         f"   wall {s['wall_s'][k]:6.1f} s")
        lines.append(f"  {v:5s} train phase only: ratio {s['train_phase_ratio']:.2f}, LLM share {s['train_phase_llm_share']:.2f}")
        lines.append(f"  {v:5s} sampled peaks: RssAnon 1p {s['anon_peak_1proc_mib']} / 2p {s['anon_peak_2proc_mib']} MiB "
                     f"(anon LLM share {s['anon_llm_share']:.2f}), RssFile 1p {s['file_peak_1proc_mib']} / 2p "
                     f"{s['file_peak_2proc_mib']} MiB")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=None, help="where the HF dirs, corpus and runs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (HF dirs, run logs, probes)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench/results/scale_memory.json"))
    p.add_argument("--variants", default="bf16,fp32", help="comma list of bf16, fp32")
    p.add_argument("--only", default="tiny_1,tiny_2,big_1,big_2",
                   help="runs of each variant (the summary needs all four)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of the fit runs (e.g. MALLOC_MMAP_THRESHOLD_=1048576); recorded in the JSON")
    p.add_argument("--malloc-policy", choices=("bounded", "product"), default="bounded",
                   help="bounded (default): every run, 1 process or 2, under the same glibc policy "
                        "(SALM_MTP_MALLOC_THRESHOLD=1048576), so the ratio compares like with like; product: each run "
                        "as salm-mtp sets it (one CPU process keeps freed memory for speed, several are bounded)")
    p.add_argument("--no-speed-run", dest="speed_run", action="store_false",
                   help="skip the extra one-process run under the speed policy (what a one-process CPU fit costs)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-cuts", type=int, default=1,
                   help="clips per batch per rank (activations do not shard under data parallelism: keep them small)")
    p.add_argument("--mallopt-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="diagnosis: each rank calls mallopt(M_MMAP_THRESHOLD, BYTES) before configure_model")
    p.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false",
                   help="keep every block's activations (default: model.parallel.activation_checkpointing=true, "
                        "as the real-target configs set it)")
    p.add_argument("--trace", action="store_true", help="record RSS around every backbone block (diagnosis)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per fit run")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5, help="repeats of --unit in the block pattern")
    p.add_argument("--unit", default="MEMEM*E", help="block pattern repeated --repeats times")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--moe-intermediate", type=int, default=1024)
    p.add_argument("--mamba-heads", type=int, default=32)
    p.add_argument("--mamba-head-dim", type=int, default=64)
    p.add_argument("--ssm-state", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--shard", default="400MB", help="max_shard_size of the written safetensors")
    a = p.parse_args()
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = set(variants) - {"bf16", "fp32"}
    if bad:
        p.error(f"unknown variants {sorted(bad)}")
    only = [k.strip() for k in a.only.split(",") if k.strip()]
    if set(only) - {"tiny_1", "tiny_2", "big_1", "big_2"}:
        p.error(f"--only takes tiny_1, tiny_2, big_1, big_2; got {only}")
    extra_env = dict(kv.split("=", 1) for kv in a.env)
    if a.malloc_policy == "bounded":
        extra_env.setdefault("SALM_MTP_MALLOC_THRESHOLD", "1048576")
    arch = dict(hidden=a.hidden, pattern=a.unit * a.repeats, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                mamba_heads=a.mamba_heads, mamba_head_dim=a.mamba_head_dim, ssm_state=a.ssm_state, experts=a.experts,
                moe_intermediate=a.moe_intermediate)

    work = a.work_dir or tempfile.mkdtemp(prefix="scale_memory_")
    os.makedirs(work, exist_ok=True)
    t_all = time.perf_counter()
    out: dict = {}

    def save() -> None:
        out["total_s"] = round(time.perf_counter() - t_all, 1)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)

    try:
        conftest, tiny = _import_test_helpers()
        from pathlib import Path

        tok_dir = tiny.tokenizer_dir(work)
        corpus = str(conftest.write_sine_corpus(Path(work) / "corpus", n=24))
        t0 = time.perf_counter()
        big_dir, tiny_dir = os.path.join(work, "llm_mid"), os.path.join(work, "llm_tiny")
        facts = write_hf_dir(big_dir, arch, a.vocab, tok_dir, a.shard)
        tiny_facts = write_hf_dir(tiny_dir, TINY_ARCH, 128, tok_dir, a.shard)
        disk = sum(os.path.getsize(os.path.join(big_dir, f)) for f in os.listdir(big_dir))
        t_write = time.perf_counter() - t0
        print(f"wrote {big_dir}: {facts['numel'] / 1e6:.1f}M params ({facts['numel'] * 4 / 2**30:.2f} GiB fp32, "
              f"{disk / 2**30:.2f} GiB on disk) in {t_write:.0f} s", flush=True)
        out.update({
            "what": "peak RSS per rank (VmHWM) of a frozen-LLM salm-mtp fit, 1 vs 2 FSDP2 processes (CPU, gloo)",
            "recipe": "ModelParallelStrategy(data_parallel_size=N), llm frozen (^llm\\.), MTP off, tiny encoder+adapter "
                      "trainable, CTC 0.3, OMP_NUM_THREADS=1, per-rank batches of max_cuts sine clips (0.10-0.33 s)",
            "arch": arch, "vocab": a.vocab, "llm": facts, "tiny_llm": {**TINY_ARCH, **tiny_facts},
            "disk_gib": round(disk / 2**30, 3), "steps": a.steps, "max_cuts": a.max_cuts, "activation_checkpointing": a.activation_checkpointing, "mallopt_mmap_threshold": a.mallopt_mmap_threshold, "write_s": round(t_write, 1), "env": extra_env,
            "malloc_policy": a.malloc_policy,
            "summary": {}, "runs": {}, "errors": {},
        })
        for variant in variants:
            runs = out["runs"].setdefault(variant, {})
            for key in [k for k in ("tiny_1", "tiny_2", "big_1", "big_2") if k in only]:
                llm_name, nproc = key.split("_")
                try:
                    r = run_fit(work, f"{variant}_{key}", big_dir if llm_name == "big" else tiny_dir, corpus,
                                int(nproc), variant, a.steps, a.timeout, extra_env, a.trace, a.max_cuts,
                                a.mallopt_mmap_threshold, a.activation_checkpointing)
                except RuntimeError as e:
                    print(f"[{variant}] {key}: FAILED\n{e}", flush=True)
                    out["errors"][f"{variant}_{key}"] = str(e)[-3000:]
                    save()
                    continue
                runs[key] = r
                print(f"[{variant}] {key}: peak/rank {r['peak_mib']:.0f} MiB (sampled: anon {r['peak_anon_mib']:.0f}, "
                      f"file {r['peak_file_mib']:.0f}), {r['wall_s']:.0f} s", flush=True)
                save()
            if all(k in runs for k in ("tiny_1", "tiny_2", "big_1", "big_2")):
                out["summary"][variant] = summarise(variant, runs, facts)
            if a.speed_run and a.malloc_policy == "bounded" and "big_1" in only:
                speed_env = {k: v for k, v in extra_env.items() if k != "SALM_MTP_MALLOC_THRESHOLD"}
                try:  # the product's one-process CPU policy: freed memory kept for speed (salm_mtp/malloc.py)
                    r = run_fit(work, f"{variant}_big_1_speed", big_dir, corpus, 1, variant, a.steps, a.timeout,
                                speed_env, a.trace, a.max_cuts, a.mallopt_mmap_threshold, a.activation_checkpointing)
                    runs["big_1_speed"] = r
                    print(f"[{variant}] big_1 under the speed policy: peak {r['peak_mib']:.0f} MiB "
                          f"({r['peak_mib'] / runs['big_1']['peak_mib']:.2f}x the bounded run), {r['wall_s']:.0f} s",
                          flush=True)
                except RuntimeError as e:
                    out["errors"][f"{variant}_big_1_speed"] = str(e)[-3000:]
                save()
        if out["summary"]:
            out["table"] = print_table(out["summary"], facts)
        save()
        print(f"\nwrote {a.out}; total {out['total_s']:.0f} s", flush=True)
        if out["errors"]:
            sys.exit(1)
    finally:
        if not a.keep and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        elif not a.keep:
            for sub in ("llm_mid", "llm_tiny"):
                shutil.rmtree(os.path.join(work, sub), ignore_errors=True)


if __name__ == "__main__":
    main()
