"""A 2-process FSDP2 `salm-mtp fit` (torchrun, gloo, CPU): sharded checkpoints, exact resume, export.

One launch trains 4 steps and writes sharded checkpoints at steps 2 and 4; a second launch resumes
from step 2 and must log the same losses at steps 2 and 3; `salm-mtp export` consolidates the step-4
checkpoint into an HF directory whose mtp.* tensors equal the sharded checkpoint's.
"""

import glob
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from tiny import fuse_experts, logged_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600


def _launch(run_dir, manifest, tok_dir, *extra, nproc=2, env_extra=None, check=True):
    """``salm-mtp fit`` of the tiny model: ``nproc`` FSDP2 ranks under torchrun, or (``nproc=1``) one plain
    process (Lightning's one-device strategy, one-file checkpoints)."""
    if nproc == 1:
        launcher = [sys.executable, "-m", "salm_mtp.cli"]
        extra = ("--trainer.devices=1", "--trainer.strategy=auto", *extra)
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    "-m", "salm_mtp.cli"]
        if nproc != 2:
            extra = (f"--trainer.devices={nproc}", f"--trainer.strategy.init_args.data_parallel_size={nproc}", *extra)
    cmd = [*launcher, "fit", "--config", os.path.join(ROOT, "conf/demo_fsdp2.yaml"),
           "--config", os.path.join(ROOT, "tests/conf/tiny_model.yaml"),
           f"--trainer.default_root_dir={run_dir}", f"--model.tokenizer_path={tok_dir}",
           f"--data.train_manifest={manifest}", f"--data.val_manifest={manifest}", "--data.test_manifest=null",
           *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}",
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT)
    assert out.returncode == 0 or not check, out.stdout[-3000:] + out.stderr[-6000:]
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


# ---- resume at another world size: 2 ranks -> 1 process, 2 -> 4 ranks, 1 process -> 2 ranks ----------------------

DUMP = "--trainer.callbacks+=resume_helpers.DumpRestoredState"


def _saved_by_name(path):
    """(model tensors, {parameter name: optimizer state}, global step) of a checkpoint of either kind."""
    from salm_mtp.checkpoint_io import read_sharded
    from salm_mtp.optim_state import by_name

    ckpt = read_sharded(path) if os.path.isdir(path) else torch.load(path, map_location="cpu", weights_only=False)
    named, _ = by_name(ckpt["optimizer_states"][0])
    return ckpt["state_dict"], named, ckpt["global_step"]


def _assert_restored(dump_file, ckpt_path, world_size):
    """What the resumed run holds at its first step equals, name by name, what the checkpoint saved."""
    dump = torch.load(dump_file, weights_only=False)
    model, optim, step = _saved_by_name(ckpt_path)
    assert dump["world_size"] == world_size and dump["global_step"] == step
    assert set(dump["model"]) == set(model)
    for k, v in model.items():
        assert torch.equal(dump["model"][k], v), k
    assert len(optim) > 20 and set(dump["optim"]) == set(optim)
    for name, state in optim.items():
        assert set(dump["optim"][name]) == set(state), name
        for key, v in state.items():
            assert torch.equal(torch.as_tensor(dump["optim"][name][key]), torch.as_tensor(v)), (name, key)


def _resumed_losses_finite(run_dir, steps):
    losses = logged_losses(run_dir)
    assert sorted(losses) == steps
    assert all(math.isfinite(v) for v in losses.values()), losses


@pytest.fixture(scope="module")
def one_process_resume(full_run, corpus, tok_dir, tmp_path_factory):
    """The 2-rank step-2 checkpoint resumed by one plain process (writes one-file checkpoints at steps 2 and 4)."""
    run, _ = full_run
    step2 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step2.ckpt"))[0]
    out_dir = tmp_path_factory.mktemp("resume_1")
    out, _ = _launch(str(out_dir), corpus, tok_dir, f"--ckpt_path={step2}", DUMP, nproc=1,
                     env_extra={"SALM_TEST_DUMP": str(out_dir / "restored.pt")})
    return step2, str(out_dir), out


def test_two_rank_checkpoint_resumes_in_one_process(one_process_resume):
    step2, run, out = one_process_resume
    _assert_restored(os.path.join(run, "restored.pt"), step2, world_size=1)
    _resumed_losses_finite(run, [2, 3])
    # the data position: the 2 x 2 batches the two ranks consumed, skipped by the one process
    assert "resuming on 1 data-parallel ranks from a checkpoint of 2: the 4 batches" in out.stdout + out.stderr
    assert os.path.isfile(glob.glob(os.path.join(run, "salm/version_*/checkpoints/step4.ckpt"))[0])


def test_one_process_checkpoint_resumes_on_two_ranks(one_process_resume, corpus, tok_dir, tmp_path):
    _, run, _ = one_process_resume
    step4 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step4.ckpt"))[0]  # a file: one process
    out, _ = _launch(str(tmp_path), corpus, tok_dir, f"--ckpt_path={step4}", DUMP, "--trainer.max_steps=6",
                     env_extra={"SALM_TEST_DUMP": str(tmp_path / "restored.pt")})
    _assert_restored(str(tmp_path / "restored.pt"), step4, world_size=2)
    _resumed_losses_finite(str(tmp_path), [4, 5])
    assert "resuming on 2 data-parallel ranks from a checkpoint of 1" in out.stdout + out.stderr


def test_two_rank_checkpoint_resumes_on_four_and_exports_in_one_process(full_run, corpus, tok_dir, tmp_path):
    from salm_mtp.checkpoint_io import read_sharded
    from salm_mtp.io import load_sharded_checkpoint

    run, _ = full_run
    step2 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step2.ckpt"))[0]
    _launch(str(tmp_path), corpus, tok_dir, f"--ckpt_path={step2}", DUMP, nproc=4,
            env_extra={"SALM_TEST_DUMP": str(tmp_path / "restored.pt")})
    _assert_restored(str(tmp_path / "restored.pt"), step2, world_size=4)
    _resumed_losses_finite(str(tmp_path), [2, 3])
    # offline consolidation of the 4-rank checkpoint: one CPU process, no process group
    step4 = glob.glob(os.path.join(str(tmp_path), "salm/version_*/checkpoints/step4.ckpt"))[0]
    module = load_sharded_checkpoint(step4)
    saved = read_sharded(step4)["state_dict"]
    state = module.state_dict()
    assert set(state) == set(saved)
    for k, v in saved.items():
        assert torch.equal(state[k], v), k


# ---- asynchronous saves: training goes on while a checkpoint is written; a killed save never becomes `last` -----

HOLD = "--trainer.callbacks+=resume_helpers.HoldSave"


def _ckpt_dir(run):
    return glob.glob(os.path.join(run, "salm/version_*/checkpoints"))[0]


def test_async_save_does_not_block_the_next_step_and_saves_the_state_of_its_step(full_run, corpus, tok_dir, tmp_path):
    """The step-2 save's write is held in its background thread until step 3 starts: step 3 starts (the save did
    not block), the checkpoint is not yet published there, and once written it holds the step-2 state, equal to
    the same run's step-2 checkpoint written without a hold."""
    import json

    from salm_mtp.checkpoint_io import read_sharded

    log = tmp_path / "hold.json"
    _launch(str(tmp_path), corpus, tok_dir, HOLD,
            env_extra={"SALM_TEST_HOLD_AT": "2", "SALM_TEST_HOLD_LOG": str(log)})
    seen = json.loads(log.read_text())
    assert seen == {"step": 3, "published": False, "in_progress": True}
    ckpts = _ckpt_dir(str(tmp_path))
    assert sorted(os.listdir(ckpts)) == ["last.ckpt", "step2.ckpt", "step4.ckpt"]  # nothing left in progress
    assert os.readlink(os.path.join(ckpts, "last.ckpt")) == "step4.ckpt"
    held = read_sharded(os.path.join(ckpts, "step2.ckpt"))["state_dict"]
    plain = read_sharded(glob.glob(os.path.join(full_run[0], "salm/version_*/checkpoints/step2.ckpt"))[0])["state_dict"]
    assert set(held) == set(plain)
    for k in plain:
        assert torch.equal(held[k], plain[k]), k


def test_a_save_killed_mid_write_leaves_last_on_the_previous_checkpoint(full_run, corpus, tok_dir, tmp_path):
    import json

    log = tmp_path / "hold.json"
    out, _ = _launch(str(tmp_path), corpus, tok_dir, HOLD, "--trainer.max_steps=6", check=False,
                     env_extra={"SALM_TEST_HOLD_AT": "4", "SALM_TEST_HOLD_LOG": str(log), "SALM_TEST_HOLD_KILL": "1"})
    assert out.returncode != 0
    assert json.loads(log.read_text()) == {"step": 5, "published": False, "in_progress": True}
    ckpts = _ckpt_dir(str(tmp_path))
    assert sorted(os.listdir(ckpts)) == [".step4.ckpt.inprogress", "last.ckpt", "step2.ckpt"]
    last = os.path.join(ckpts, "last.ckpt")
    assert os.readlink(last) == "step2.ckpt"
    resumed = tmp_path / "resumed"
    _launch(str(resumed), corpus, tok_dir, f"--ckpt_path={last}", "--trainer.max_steps=3")
    assert logged_losses(str(resumed))[2] == pytest.approx(logged_losses(full_run[0])[2], rel=1e-5)


def test_sharded_resume_with_a_changed_freeze_list_matches_optimizer_state_by_name(full_run, corpus, tok_dir,
                                                                                   tmp_path):
    """Freezing the MTP head on resume (a safe setting): every model tensor is restored, the head's optimizer state
    is dropped and said so, every other parameter's state equals the saved one, and training goes on."""
    run, _ = full_run
    step2 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step2.ckpt"))[0]
    out, _ = _launch(str(tmp_path), corpus, tok_dir, f"--ckpt_path={step2}", DUMP,
                     "--model.freeze.patterns=[^llm\\.mtp\\.]",
                     env_extra={"SALM_TEST_DUMP": str(tmp_path / "restored.pt")})
    log = out.stdout + out.stderr
    assert "resuming with changed settings: model.freeze.patterns" in log
    model, optim, _ = _saved_by_name(step2)
    head = sorted(n for n in optim if n.startswith("llm.mtp."))
    assert head and f"optimizer state matched by parameter name: {len(head)} no longer trained" in log
    dump = torch.load(tmp_path / "restored.pt", weights_only=False)
    for k, v in model.items():
        assert torch.equal(dump["model"][k], v), k
    assert set(dump["optim"]) == set(optim) - set(head)
    for name in dump["optim"]:
        for key, v in optim[name].items():
            assert torch.equal(torch.as_tensor(dump["optim"][name][key]), torch.as_tensor(v)), (name, key)
    _resumed_losses_finite(str(tmp_path), [2, 3])
