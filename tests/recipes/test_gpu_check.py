"""bench/gpu_check.sh, the prepared GPU check: its syntax, its CPU dry run end to end (one JSON with every step, a
fit with finite losses, benchmarks on device cpu), gpu_check.py's record of steps that failed or never ran, and the
benchmarks' ``--device`` option (cpu output unchanged apart from the device and memory fields)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
BENCH_STEPS = ("loss_memory", "mtp_overhead", "decode")


def _load(name: str):
    """A bench/ script as a module (each puts the repository and bench/ on sys.path itself)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_syntax():
    out = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_unknown_option_is_named():
    out = subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "'--bogus'" in out.stderr


def test_dry_run_writes_one_json_with_every_step(corpus, tok_dir, tmp_path):
    out_dir = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_MANIFEST": corpus, "GPU_CHECK_TOKENIZER": tok_dir,
           "GPU_CHECK_PY": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out_dir)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    res = json.loads((out_dir / "gpu_check.json").read_text())
    gpu_check = _load("gpu_check")
    assert res["mode"] == "dry_run" and list(res["steps"]) == list(gpu_check.STEPS)
    steps = res["steps"]
    assert steps["mamba_kernels"]["status"] == "skipped" and steps["mamba_kernels"]["figures"]["importable"] is False
    fit = steps["fit"]
    assert fit["status"] == "ok", fit
    for key in ("first_loss", "last_loss", "last_mtp_loss", "last_val_loss"):
        assert math.isfinite(fit["figures"][key]), key
    assert fit["figures"]["last_step"] == 3 and fit["figures"]["steps_per_s"] > 0
    assert fit["figures"]["checkpoint"].endswith("last.ckpt")
    for name in BENCH_STEPS:
        assert steps[name]["status"] == "ok", steps[name]
        assert steps[name]["figures"]["device"] == "cpu" and steps[name]["figures"]["memory"] == "rss_hwm", name
        assert (out_dir / gpu_check.BENCHES[name]).is_file()
    assert steps["decode"]["figures"]["model"] == fit["figures"]["checkpoint"]  # decoded the fit's checkpoint
    assert steps["loss_memory"]["figures"]["matches"] is True
    assert res["summary"]["failed_steps"] == []
    assert "===== fit" in (out_dir / "gpu_check.log").read_text()


def test_assemble_records_steps_that_failed_or_never_ran(tmp_path):
    gpu_check = _load("gpu_check")
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "steps").mkdir(parents=True)
    out.mkdir()
    (work / "steps" / "env.rc").write_text("0\n")
    (work / "steps" / "env.seconds").write_text("1.5\n")
    (work / "steps" / "fit.rc").write_text("1\n")
    (work / "steps" / "fit.seconds").write_text("3.0\n")
    (work / "steps" / "fit.log").write_text("Traceback (most recent call last):\n  ...\nValueError: bad config\nbye\n")
    (work / "steps" / "decode.rc").write_text("124\n")
    (work / "steps" / "decode.timeout").write_text("120\n")
    (work / "steps" / "loss_memory.skipped").write_text("no time left in the 450 s budget\n")
    (work / "steps" / "deps.skipped").write_text("GPU_CHECK_WHEELS not set\n")
    rc = gpu_check.main(["assemble", "--out", str(out), "--work", str(work), "--mode", "gpu"])
    res = json.loads((out / "gpu_check.json").read_text())
    steps = res["steps"]
    assert rc == 1
    assert steps["env"]["status"] == "ok" and steps["deps"]["status"] == "skipped"
    assert steps["fit"]["status"] == "failed" and steps["fit"]["error"] == "ValueError: bad config"
    assert steps["decode"]["status"] == "timeout" and "120 s" in steps["decode"]["error"]
    assert steps["loss_memory"]["status"] == "not_run" and steps["mtp_overhead"]["status"] == "not_run"
    assert set(res["summary"]["failed_steps"]) == {"fit", "decode", "loss_memory", "mtp_overhead", "data",
                                                   "mamba_kernels"}


def test_loss_memory_cpu_case_keys():
    lm = _load("loss_memory")
    res = lm.run_case("ours@16", vocab=256, hidden=16, tokens=32, depths=1, device="cpu")
    assert set(res) == {"case", "peak_mib", "seconds", "loss", "peak_reset", "device", "memory"}
    assert res["device"] == "cpu" and res["memory"] == "rss_hwm" and math.isfinite(res["loss"])
    assert lm.cce_impl("cpu") == "torch_compile" and lm.cce_impl("cuda") == "cce"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script", ["loss_memory.py", "mtp_overhead.py", "decode.py"])
def test_device_cuda_without_gpu_names_the_option(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--device", "cuda"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "--device cuda" in proc.stderr
