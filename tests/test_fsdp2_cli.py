"""A 2-process FSDP2 `salm-mtp fit` (torchrun, gloo, CPU): sharded checkpoints, exact resume, export.

One launch trains 4 steps and writes sharded checkpoints at steps 2 and 4; a second launch resumes
from step 2 and must log the same losses at steps 2 and 3; `salm-mtp export` consolidates the step-4
checkpoint into an HF directory whose mtp.* tensors equal the sharded checkpoint's.
"""

import glob
import os
import subprocess
import sys
import time

import pytest
import torch

from salm_mtp.weights import fuse_experts

from tiny import logged_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600


def _launch(run_dir, manifest, tok_dir, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "salm_mtp.cli", "fit", "--config", os.path.join(ROOT, "conf/demo_fsdp2.yaml"),
           "--config", os.path.join(ROOT, "tests/conf/tiny_model.yaml"),
           f"--trainer.default_root_dir={run_dir}", f"--model.tokenizer_path={tok_dir}",
           f"--data.train_manifest={manifest}", f"--data.val_manifest={manifest}", "--data.test_manifest=null",
           *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def full_run(corpus, tok_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("fsdp2"))
    out, seconds = _launch(run, corpus, tok_dir)
    print(f"2-process FSDP2 fit (4 steps): {seconds:.1f} s wall")
    return run, out


def test_fsdp2_fit_writes_sharded_checkpoints_and_logs(full_run):
    run, out = full_run
    ckpts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run, "salm/version_*/checkpoints/*")))
    assert ckpts == ["last.ckpt", "step2.ckpt", "step4.ckpt"]
    step4 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step4.ckpt"))[0]
    assert os.path.isdir(step4) and os.path.isfile(os.path.join(step4, "meta.pt"))  # sharded, one dir
    assert sorted(logged_losses(run)) == [0, 1, 2, 3]
    log = out.stdout + out.stderr
    assert "[salm_mtp.parallel]" in log and "llm.mtp" in log  # the plan reports what it wrapped


def test_fsdp2_resume_continues_exactly(full_run, corpus, tok_dir, tmp_path):
    run, _ = full_run
    step2 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step2.ckpt"))[0]
    _launch(str(tmp_path), corpus, tok_dir, f"--ckpt_path={step2}")
    full, resumed = logged_losses(run), logged_losses(str(tmp_path))
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step


def test_export_consolidates_sharded_checkpoint(full_run, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run, _ = full_run
    step4 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step4.ckpt"))[0]
    out = subprocess.run([sys.executable, "-m", "salm_mtp.cli", "export", "--ckpt", step4, "--out", str(tmp_path / "exp")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-4000:]
    dcp_to_torch_save(step4, str(tmp_path / "plain.pt"))  # independent reader of the shards
    sharded = torch.load(tmp_path / "plain.pt", weights_only=False)["state_dict"]
    ref = {k[len("llm."):]: v for k, v in sharded.items() if k.startswith("llm.mtp.")}
    exported = fuse_experts({k: v for k, v in load_file(tmp_path / "exp/llm/model.safetensors").items()
                             if k.startswith("mtp.")})
    assert len(ref) > 10 and set(ref) == set(exported)
    for k in ref:
        assert torch.equal(ref[k], exported[k]), k


def test_sharded_checkpoint_keys_are_checked_both_ways(full_run):
    """salm_mtp.strategy.check_sharded_keys (run by SALMParallelStrategy.load_checkpoint before Lightning's load):
    the checkpoint's own keys pass; a model without depth 2 names the unexpected tensors, one with a depth 3 the
    missing ones."""
    from torch.distributed.checkpoint import FileSystemReader

    from salm_mtp.errors import SalmError
    from salm_mtp.strategy import check_sharded_keys

    run, _ = full_run
    step4 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step4.ckpt"))[0]
    keys = [k[len("state_dict."):] for k in FileSystemReader(step4).read_metadata().state_dict_metadata
            if k.startswith("state_dict.")]
    check_sharded_keys(step4, keys)
    depth2 = [k for k in keys if k.startswith("llm.mtp.layers.1.")]
    assert depth2
    with pytest.raises(SalmError, match=rf"{len(depth2)} tensors in it are not in the model \(llm\.mtp\.layers\.1\."):
        check_sharded_keys(step4, [k for k in keys if k not in depth2])
    with pytest.raises(SalmError, match=r"1 tensors the model has are not in it \(llm\.mtp\.layers\.2\.x\)"):
        check_sharded_keys(step4, keys + ["llm.mtp.layers.2.x"])
