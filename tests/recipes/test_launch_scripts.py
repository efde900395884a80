"""scripts/slurm_fit.sbatch and scripts/torchrun_fit.sh: what they run, checked with stand-ins for srun, scontrol
and torchrun on PATH (no cluster): the world size, the resume checkpoint, the requeue on a pre-emption exit."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _fake(bin_dir: Path, name: str, exit_code: int) -> Path:
    log = bin_dir / f"{name}.args"
    log.unlink(missing_ok=True)
    script = bin_dir / name
    script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{log}"\nexit {exit_code}\n')
    script.chmod(0o755)
    return log


def _sbatch(tmp_path: Path, srun_exit: int, env_extra: dict | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun_log, scontrol_log = _fake(bin_dir, "srun", srun_exit), _fake(bin_dir, "scontrol", 0)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "4",
           "SLURM_NTASKS_PER_NODE": "8(x4)", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "demo",
           "RUN_DIR": str(tmp_path / "run"), **(env_extra or {})}
    proc = subprocess.run(["bash", str(REPO / "scripts/slurm_fit.sbatch"), "--config", "conf/x.yaml"], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    args = srun_log.read_text().splitlines() if srun_log.exists() else []
    requeued = scontrol_log.read_text().splitlines() if scontrol_log.exists() else None
    return proc, args, requeued


def test_slurm_first_start_sets_the_world_and_does_not_resume(tmp_path):
    proc, args, requeued = _sbatch(tmp_path, 0)
    assert proc.returncode == 0, proc.stderr
    assert args[:4] == ["--kill-on-bad-exit=1", ".venv/bin/salm-mtp", "fit", "--config"]
    assert "--trainer.num_nodes=4" in args and "--trainer.devices=8" in args
    assert "--trainer.strategy.init_args.data_parallel_size=32" in args
    assert not any(a.startswith("--ckpt_path") for a in args) and requeued is None


def test_slurm_preempted_run_is_requeued_and_resumes_from_the_newest_checkpoint(tmp_path):
    ckpts = tmp_path / "run" / "salm" / "version_0" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").mkdir()  # a sharded checkpoint directory
    time.sleep(0.02)
    (ckpts / "preempted-step700.ckpt").mkdir()
    proc, args, requeued = _sbatch(tmp_path, 138)
    assert proc.returncode == 0, proc.stderr
    assert f"--ckpt_path={ckpts / 'preempted-step700.ckpt'}" in args
    assert requeued == ["requeue", "4242"] and "pre-empted (exit 138)" in proc.stdout
    proc, _, requeued = _sbatch(tmp_path, 1)  # a real failure: no requeue, its exit code
    assert proc.returncode == 1 and requeued is None


def test_torchrun_multi_node_form(tmp_path):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = _fake(bin_dir, "torchrun", 0)
    env = {**os.environ, "SALM_VENV": str(tmp_path / "venv"), "NNODES": "2", "NPROC": "4", "HEAD": "node001"}
    proc = subprocess.run(["bash", str(REPO / "scripts/torchrun_fit.sh"), "--config", "conf/x.yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().splitlines()
    assert args[:4] == ["--nnodes", "2", "--nproc_per_node", "4"] and "node001:29500" in args
    assert args[args.index("-m") + 1:args.index("-m") + 3] == ["salm_mtp.cli", "fit"]
    assert "--trainer.strategy.init_args.data_parallel_size=8" in args
