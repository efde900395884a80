#!/usr/bin/env python
"""The Python half of bench/gpu_check.sh: what the shell cannot do in one line, and the one JSON at the end.

    python bench/gpu_check.py env --out WORK/env.json            # GPU, torch, nvidia-smi, package versions
    python bench/gpu_check.py kernels --out WORK/kernels.json [--install] [--timeout 90] [--wheels DIR]
    python bench/gpu_check.py assemble --out OUTDIR --work WORK --mode gpu|dry_run [--budget-s 450]

``env`` records the machine (torch and CUDA versions, the device, ``nvidia-smi``'s line, the versions of the
packages the project needs against requirements.txt's pins and which of them do not import).

``kernels`` reports whether the Mamba kernels (mamba_ssm, causal_conv1d) import; with ``--install`` it first runs
``pip install mamba-ssm causal-conv1d`` under ``--timeout`` seconds, with a constraints file pinning the torch that
is installed (pip never replaces torch; no build isolation, so a source build compiles against that torch), from
``--wheels DIR`` only when given. Exit status 1 when the kernels do not import (the fit then runs transformers'
pure-torch scan), or when torch's version changed.

``assemble`` reads what bench/gpu_check.sh left in WORK (per step NAME: steps/NAME.rc, .seconds, .log, or
steps/NAME.skipped with the reason) and the steps' own outputs (env.json, kernels.json, the fit's metrics.csv and
step_times.json, the benchmarks' JSON in OUTDIR) and writes OUTDIR/gpu_check.json: per step its status (ok, failed,
timeout, skipped), seconds, the error line of a failed step and its figures; a summary of the headline figures;
and OUTDIR/gpu_check.log, every step's log one after another.

``StepTimer`` (``--trainer.callbacks+=gpu_check.StepTimer``, with bench/ on PYTHONPATH) writes the fit's
step_times.json into its log directory: train-step intervals between consecutive batch ends (the device drained
at each), validation excluded, the first step (warm-up) not counted.
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "deps", "mamba_kernels", "data", "fit", "loss_memory", "mtp_overhead", "decode")
"""Every step of bench/gpu_check.sh, in order (each one a key of gpu_check.json's "steps")."""
BENCHES = {"loss_memory": "loss_memory.json", "mtp_overhead": "mtp_overhead.json", "decode": "decode.json"}
"""Benchmark steps and the result file each writes into the output directory."""
KERNELS = ("mamba_ssm", "causal_conv1d")
KERNEL_PACKAGES = ("mamba-ssm", "causal-conv1d")
NEEDED = {"torch": "torch", "transformers": "transformers", "lightning": "lightning", "lhotse": "lhotse",
          "jsonargparse": "jsonargparse", "omegaconf": "omegaconf", "soundfile": "soundfile",
          "tokenizers": "tokenizers", "safetensors": "safetensors", "peft": "peft", "yaml": "pyyaml",
          "jiwer": "jiwer", "sacrebleu": "sacrebleu", "cut_cross_entropy": "cut-cross-entropy",
          "mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d", "triton": "triton"}
"""Import name -> distribution name of what ``env`` reports (the fit's imports, the optional kernels)."""
NO_TIME = "no time left"
"""How gpu_check.sh's skip reason starts when the budget ran out before a step (status not_run)."""
ERROR_RE = re.compile(r"^(\w+\.)*\w*(Error|Exception|error)\b|^error:|Killed|Traceback|CUDA out of memory")


# ------------------------------------------------------------------------------------------------ env
def package_versions() -> dict[str, str | None]:
    """Installed version of each NEEDED distribution (None: not installed)."""
    out = {}
    for dist in NEEDED.values():
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def pinned_versions(path: str = os.path.join(ROOT, "requirements.txt")) -> dict[str, str]:
    """``name -> version`` of requirements.txt's ``name==version`` lines (extras dropped)."""
    pins = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s#]+)", line.strip())
            if m:
                pins[m.group(1).lower()] = m.group(3)
    return pins


def nvidia_smi() -> str | None:
    """``nvidia-smi``'s one line per GPU (name, memory, driver), or None where it is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    cmd = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {e}"


def torch_info() -> dict:
    """torch's version, its CUDA build, and the device it sees (name, capability, memory, bf16)."""
    import torch

    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpu_threads": torch.get_num_threads()}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device_count=torch.cuda.device_count(), device_name=props.name,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return info


def env_info() -> dict:
    """Everything ``env`` records (module docstring)."""
    versions = package_versions()
    pins = pinned_versions()
    mismatched = {d: {"pinned": pins[d], "found": v} for d, v in versions.items()
                  if d in pins and (v or "").split("+")[0] != pins[d]}
    return {"python": sys.version.split()[0], "executable": sys.executable, **torch_info(),
            "nvidia_smi": nvidia_smi(), "packages": versions,
            "not_importable": [m for m in NEEDED if importlib.util.find_spec(m) is None],
            "differs_from_requirements": mismatched}


# ------------------------------------------------------------------------------------------------ kernels
def kernels_import(python: str = sys.executable) -> dict:
    """Whether each Mamba kernel package imports, checked in a fresh interpreter: {name: version or error line}."""
    code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n"
            "    try:\n        out[m] = getattr(importlib.import_module(m), '__version__', 'importable')\n"
            "    except Exception as e:\n        out[m] = 'error: ' + type(e).__name__ + ': ' + str(e).splitlines()[0]"
            "\nprint(json.dumps(out))")
    proc = subprocess.run([python, "-c", code, *KERNELS], capture_output=True, text=True, timeout=120)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {m: f"error: the import check failed: {last_line(proc.stderr)}" for m in KERNELS}


def pip_install_kernels(timeout: float, wheels: str | None) -> dict:
    """``pip install mamba-ssm causal-conv1d`` pinned to the installed torch; {rc, seconds, tail} (rc 124: timeout)."""
    import torch

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={torch.__version__}\n")
        constraints = f.name
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-build-isolation",
           "--retries", "0", "--timeout", "10", "-c", constraints, *KERNEL_PACKAGES]
    if wheels:
        cmd += ["--no-index", "--find-links", wheels]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"pip timed out after {timeout:.0f} s\n{(e.stderr or b'')[-2000:]!r}"
    finally:
        os.unlink(constraints)
    return {"cmd": " ".join(cmd[1:]), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "tail": text.strip().splitlines()[-5:]}


def kernels_main(a) -> int:
    """``kernels``: optional install, then the import check; 1 when a kernel does not import or torch changed."""
    before = torch_version()
    res: dict = {"pip": pip_install_kernels(a.timeout, a.wheels) if a.install else None}
    res["imports"] = kernels_import()
    res["importable"] = all(not str(v).startswith("error") for v in res["imports"].values())
    res["torch_before"], res["torch_after"] = before, torch_version()
    res["fit_uses"] = "mamba_ssm kernels" if res["importable"] else "transformers' pure-torch reference scan"
    write_json(res, a.out)
    if res["torch_before"] != res["torch_after"]:
        print(f"error: pip changed torch {res['torch_before']} -> {res['torch_after']}", file=sys.stderr)
        return 1
    if not res["importable"]:
        bad = [m for m, v in res["imports"].items() if str(v).startswith("error")]
        print(f"error: {', '.join(bad)} not importable: the fit uses transformers' pure-torch reference scan",
              file=sys.stderr)
        return 1
    return 0


def torch_version() -> str | None:
    """torch's installed version as pip's metadata on disk says now (None: none)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------ fit
def _step_timer_class():
    """The StepTimer callback class (built on first use: Lightning is imported only by the fit)."""
    import lightning.pytorch as pl
    import torch

    class StepTimer(pl.Callback):
        """Train-step intervals of a fit, validation excluded -> ``<log_dir>/step_times.json`` (rank 0)."""

        def __init__(self) -> None:
            self.intervals: list[float] = []
            self._last: float | None = None

        def _now(self, pl_module) -> float:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = self._now(pl_module)
            if self._last is not None:
                self.intervals.append(now - self._last)
            self._last = now

        def on_validation_start(self, trainer, pl_module) -> None:
            self._last = None  # the next interval would hold the validation

        def on_train_end(self, trainer, pl_module) -> None:
            if trainer.global_rank != 0 or not trainer.log_dir:
                return
            write_json(step_time_summary(self.intervals), os.path.join(trainer.log_dir, "step_times.json"))

    return StepTimer


def step_time_summary(intervals: list[float]) -> dict:
    """Counted intervals, their median and mean seconds, and steps per second from the mean."""
    if not intervals:
        return {"intervals": 0}
    mean = sum(intervals) / len(intervals)
    return {"intervals": len(intervals), "median_step_s": round(statistics.median(intervals), 5),
            "mean_step_s": round(mean, 5), "steps_per_s": round(1.0 / mean, 3)}


def __getattr__(name: str):
    """``gpu_check.StepTimer`` (what the fit's ``--trainer.callbacks+=`` names) resolves on first use."""
    if name == "StepTimer":
        cls = _step_timer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def read_metrics(path: str) -> list[dict]:
    """Rows of a CSVLogger metrics.csv with their non-empty fields as floats."""
    with open(path) as f:
        return [{k: float(v) for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(f)]


def fit_summary(run_dir: str, log_text: str) -> dict:
    """Figures of the fit under ``run_dir``: first and last train loss / mtp_loss / main_loss, the last val_loss,
    steps logged, all finite?, steps per second (StepTimer), the checkpoint, the Mamba implementation used."""
    versions = sorted(glob.glob(os.path.join(run_dir, "salm", "version_*")), key=os.path.getmtime)
    if not versions:
        return {"error": f"no CSVLogger run under {run_dir}/salm"}
    log_dir = versions[-1]
    rows = read_metrics(os.path.join(log_dir, "metrics.csv"))
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    out: dict = {"log_dir": log_dir, "logged_train_rows": len(train),
                 "last_step": int(train[-1]["step"]) if train else None}
    for key in ("loss", "mtp_loss", "main_loss", "ctc_loss"):
        vals = [r[key] for r in train if key in r]
        if vals:
            out[f"first_{key}"], out[f"last_{key}"] = vals[0], vals[-1]
    if val:
        out["last_val_loss"] = val[-1]["val_loss"]
        out["last_val_mtp_loss"] = val[-1].get("val_mtp_loss")
    losses = [r[k] for r in train + val for k in ("loss", "mtp_loss", "val_loss") if k in r]
    out["losses_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    out["nonfinite_steps"] = train[-1].get("nonfinite_steps") if train else None
    times = os.path.join(log_dir, "step_times.json")
    if os.path.isfile(times):
        with open(times) as f:
            out.update(json.load(f))
    ckpt = os.path.join(log_dir, "checkpoints", "last.ckpt")
    out["checkpoint"] = ckpt if os.path.exists(ckpt) else None
    out["mamba_impl"] = "torch_reference" if re.search(r"falling back to its reference|pure-torch reference scan",
                                                       log_text) else "kernels"
    return out


# ------------------------------------------------------------------------------------------------ assemble
def last_line(text: str) -> str:
    """The last non-empty line of ``text`` ('' when none)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def error_line(log_text: str, rc: int, timeout: str | None = None) -> str:
    """The line that says why a step failed: a timeout, else the last error-looking line, else the last line."""
    if rc in (124, 137):
        return f"timed out after {timeout or '?'} s (exit {rc})"
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ERROR_RE.search(ln) and not ln.startswith("Traceback"):
            return ln[:500]
    return (lines[-1][:500] if lines else f"exit {rc} with no output")


def read_text(path: str) -> str:
    """A file's text ('' when it is missing)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def read_json(path: str) -> dict | None:
    """A JSON file's content (None when missing or unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(obj, path: str) -> None:
    """Write ``obj`` as indented JSON at ``path`` (its directory created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def bench_figures(name: str, res: dict | None) -> dict:
    """The headline figures of a benchmark's result file, with its device and memory measure."""
    if res is None:
        return {}
    if name == "loss_memory":
        c = res["config"]
        cases = {k: {f: v.get(f) for f in ("peak_mib", "seconds", "peak_vs_naive", "time_vs_naive", "matches",
                                           "error") if f in v} for k, v in res["cases"].items()}
        return {"device": c.get("device", "cpu"), "memory": c.get("memory", "rss_hwm"), "cce_impl": c.get("cce_impl"),
                "size": {k: c[k] for k in ("vocab", "hidden", "tokens", "depths")},
                "ours_peak_vs_naive": res["ours_peak_vs_naive"], "ours_time_vs_naive": res["ours_time_vs_naive"],
                "matches": res["matches"], "cases": cases}
    if name == "mtp_overhead":
        sizes = {s: {"step_ms": {k: round(r["step_s"] * 1e3, 2) for k, r in v["rows"].items()},
                     "overhead_vs_flops_ratio": {k: r["overhead_vs_flops_ratio"] for k, r in v["rows"].items()
                                                 if r["depths"]},
                     "peak_step_mib": {k: r.get("peak_step_mib") for k, r in v["rows"].items()},
                     "mamba_kernels_missing": v.get("mamba_kernels_missing")} for s, v in res["sizes"].items()}
        return {"device": res.get("device", "cpu"), "memory": res.get("memory", "rss_hwm"),
                "precision": res.get("precision", "32"), "sizes": sizes}
    if name == "decode":
        keys = ("device", "memory", "peak_mib", "model", "tokens_per_forward", "speedup", "identical",
                "chained_acceptance", "mean_accepted_length")
        rows = [{k: r.get(k) for k in ("batch_size", "decoder", "num_drafts", "wall_seconds", "tokens_per_forward",
                                        "speedup", "identical")} for r in res["runs"]]
        return {**{k: res.get(k) for k in keys}, "rows": rows}
    return res


def step_figures(name: str, out_dir: str, work: str, log_text: str) -> dict:
    """What a step produced, read from its output files (module docstring)."""
    if name == "env":
        return read_json(os.path.join(work, "env.json")) or {}
    if name == "mamba_kernels":
        return read_json(os.path.join(work, "kernels.json")) or {}
    if name in ("deps", "data"):
        return read_json(os.path.join(work, f"{name}.json")) or {}
    if name == "fit":
        return fit_summary(os.path.join(work, "fit"), log_text) if os.path.isdir(os.path.join(work, "fit")) else {}
    return bench_figures(name, read_json(os.path.join(out_dir, BENCHES[name])))


def step_record(name: str, out_dir: str, work: str) -> dict:
    """One step's entry of gpu_check.json: status, seconds, error line, figures."""
    base = os.path.join(work, "steps", name)
    log_text = read_text(base + ".log")
    if os.path.isfile(base + ".skipped"):
        reason = last_line(read_text(base + ".skipped"))
        rec = {"status": "skipped", "reason": reason, "seconds": 0.0, "error": None}
        if reason.startswith(NO_TIME):  # the budget ran out before it: a measurement missing, not a choice
            rec.update(status="not_run", error=reason)
    elif not os.path.isfile(base + ".rc"):
        rec = {"status": "not_run", "seconds": 0.0, "error": "the step did not run (gpu_check.sh stopped before it)"}
    else:
        rc = int(read_text(base + ".rc").strip() or 1)
        rec = {"status": "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed"), "rc": rc,
               "seconds": float(read_text(base + ".seconds").strip() or 0.0),
               "error": None if rc == 0 else error_line(log_text, rc, read_text(base + ".timeout").strip())}
    try:
        rec["figures"] = step_figures(name, out_dir, work, log_text)
    except (KeyError, ValueError, TypeError, OSError) as e:  # a half-written output: the step's record survives
        rec["figures"] = {"error": f"reading the step's output failed: {type(e).__name__}: {e}"}
    check_figures(name, rec)
    return rec


def check_figures(name: str, rec: dict) -> None:
    """Turn an ok step whose figures are wrong (a fit with non-finite losses, no result file) into a failure."""
    if rec["status"] != "ok":
        return
    fig = rec["figures"]
    why = None
    if name == "fit" and not fig.get("losses_finite"):
        why = fig.get("error") or "the fit logged no loss, or a non-finite one"
    elif name in BENCHES and not fig:
        why = f"{BENCHES[name]} was not written"
    if why:
        rec.update(status="failed", error=why)


def summary(steps: dict) -> dict:
    """Headline figures across steps (None where a step gave none)."""
    env, fit = steps["env"]["figures"], steps["fit"]["figures"]
    lm, mo, dec = (steps[n]["figures"] for n in ("loss_memory", "mtp_overhead", "decode"))
    return {
        "device_name": env.get("device_name"), "torch": env.get("torch"),
        "mamba_kernels": steps["mamba_kernels"]["figures"].get("importable"),
        "fit_last_loss": fit.get("last_loss"), "fit_last_mtp_loss": fit.get("last_mtp_loss"),
        "fit_steps_per_s": fit.get("steps_per_s"), "fit_mamba_impl": fit.get("mamba_impl"),
        "loss_memory_ours_peak_vs_naive": lm.get("ours_peak_vs_naive"),
        "mtp_overhead_vs_flops": {s: v["overhead_vs_flops_ratio"] for s, v in mo.get("sizes", {}).items()},
        "decode_speedup": dec.get("speedup"), "decode_tokens_per_forward": dec.get("tokens_per_forward"),
        "failed_steps": [n for n, r in steps.items() if r["status"] in ("failed", "timeout", "not_run")],
    }


def concat_logs(out_dir: str, work: str) -> str:
    """OUTDIR/gpu_check.log: every step's log under a header line; returns its path."""
    path = os.path.join(out_dir, "gpu_check.log")
    with open(path, "w") as f:
        for name in STEPS:
            text = read_text(os.path.join(work, "steps", name + ".log"))
            f.write(f"===== {name}\n{text}{'' if text.endswith(chr(10)) or not text else chr(10)}")
    return path


def assemble_main(a) -> int:
    """``assemble``: write OUTDIR/gpu_check.json and gpu_check.log; print one line per step."""
    steps = {name: step_record(name, a.out, a.work) for name in STEPS}
    res = {"mode": a.mode, "out_dir": os.path.abspath(a.out), "work_dir": os.path.abspath(a.work),
           "budget_s": a.budget_s, "total_seconds": round(sum(s["seconds"] for s in steps.values()), 1),
           "summary": summary(steps), "steps": steps}
    write_json(res, os.path.join(a.out, "gpu_check.json"))
    concat_logs(a.out, a.work)
    for name, rec in steps.items():
        extra = rec.get("error") or rec.get("reason") or ""
        print(f"{name:13s} {rec['status']:8s} {rec['seconds']:7.1f} s  {extra}")
    print(f"wrote {os.path.join(a.out, 'gpu_check.json')}")
    return 0 if not res["summary"]["failed_steps"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="record the machine")
    e.add_argument("--out", required=True)
    k = sub.add_parser("kernels", help="Mamba kernels: optional pip install, then the import check")
    k.add_argument("--out", required=True)
    k.add_argument("--install", action="store_true", help="pip install mamba-ssm causal-conv1d first")
    k.add_argument("--timeout", type=float, default=90.0, help="seconds pip may take (default 90)")
    k.add_argument("--wheels", default=None, help="install from this wheel directory only (--no-index)")
    s = sub.add_parser("assemble", help="write gpu_check.json from the steps' outputs")
    s.add_argument("--out", required=True, help="output directory (the benchmarks' JSON, gpu_check.json)")
    s.add_argument("--work", required=True, help="work directory (steps/, env.json, fit/, ...)")
    s.add_argument("--mode", required=True, choices=("gpu", "dry_run"))
    s.add_argument("--budget-s", type=int, default=None)
    a = p.parse_args(argv)
    if a.cmd == "env":
        write_json(env_info(), a.out)
        print(json.dumps({k: v for k, v in read_json(a.out).items() if k != "packages"}, indent=1))
        return 0
    if a.cmd == "kernels":
        if a.timeout <= 0:
            p.error(f"--timeout must be > 0, got {a.timeout}")
        if a.wheels and not os.path.isdir(a.wheels):
            p.error(f"--wheels {a.wheels}: not a directory")
        return kernels_main(a)
    return assemble_main(a)


if __name__ == "__main__":
    sys.exit(main())
