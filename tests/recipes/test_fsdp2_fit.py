"""2-process FSDP2 `salm-mtp fit` runs (torchrun, gloo, CPU): sharded checkpoints, exact resume, resume at another
world size, asynchronous saves, export.

The runs share launches (fixture ``runs``): one 2-rank torchrun session runs five fits one after another on one
process group (tests/dist/cli_session.py): ``full`` trains 4 steps and writes sharded checkpoints at steps 2 and 4;
``resume`` resumes its step 2 and must log the same losses at steps 2 and 3; ``hold`` holds the step-2 save's
write; ``freeze`` resumes with the MTP head frozen; ``from_one`` resumes a one-process checkpoint on 2 ranks. One
4-rank session resumes ``full``'s step 2 on 4 ranks. The one-process runs (a fresh fit, the 2 -> 1 resume, export)
run in the test process. Only the run killed mid-save has a launch of its own.
"""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cli_run import run_cli
from tiny import fuse_experts, logged_losses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 600
SESSION = os.path.join(ROOT, "tests", "dist", "cli_session.py")
DUMP = "--trainer.callbacks+=resume_helpers.DumpRestoredState"
HOLD = "--trainer.callbacks+=resume_helpers.HoldSave"
LIVE = ("--trainer.callbacks+=salm_mtp.live_spec.LiveAcceptance", "--trainer.callbacks.init_args.utterances=3")
ENV = {"WANDB_MODE": "offline", "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}", "OMP_NUM_THREADS": "1"}


def _fit_args(run_dir, manifest, tok_dir, *extra, nproc=2) -> list[str]:
    """``salm-mtp fit`` of the tiny model on ``nproc`` FSDP2 ranks, or (``nproc=1``) one plain process (Lightning's
    one-device strategy, one-file checkpoints)."""
    if nproc == 1:
        extra = ("--trainer.devices=1", "--trainer.strategy=auto", *extra)
    elif nproc != 2:
        extra = (f"--trainer.devices={nproc}", f"--trainer.strategy.init_args.data_parallel_size={nproc}", *extra)
    return ["fit", "--config", os.path.join(ROOT, "conf/demo_fsdp2.yaml"),
            "--config", os.path.join(ROOT, "tests/conf/tiny_model.yaml"),
            f"--trainer.default_root_dir={run_dir}", f"--model.tokenizer_path={tok_dir}",
            f"--data.train_manifest={manifest}", f"--data.val_manifest={manifest}", "--data.test_manifest=null", *extra]


def _ckpt(run_dir, name) -> str:
    """A checkpoint path of the run in ``run_dir`` (its first version: every run here has its own directory)."""
    return os.path.join(run_dir, "salm", "version_0", "checkpoints", name)


def _session(out_dir, runs: list[dict], nproc: int) -> dict:
    """``runs`` ({name, args, env}) one after another in one ``nproc``-rank torchrun launch; {name: rank 0's
    {returncode, stdout, stderr}}."""
    os.makedirs(out_dir, exist_ok=True)
    spec = os.path.join(out_dir, "session.json")
    with open(spec, "w") as f:
        json.dump({"out": str(out_dir), "runs": runs}, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), SESSION, spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, cwd=ROOT, timeout=TIMEOUT)
    results = {}
    for run in runs:
        for rank in range(nproc):
            path = os.path.join(out_dir, f"{run['name']}.rank{rank}.json")
            got = json.load(open(path)) if os.path.isfile(path) else None
            assert got is not None and got["returncode"] == 0, (
                f"run {run['name']!r} rank {rank}: {got and (got['stdout'][-2000:] + got['stderr'][-5000:])}\n"
                f"launcher ({proc.returncode}): {proc.stderr[-3000:]}")
            if rank == 0:
                results[run["name"]] = got
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results


def _in_process(args, env=None):
    out = run_cli(args, env={**ENV, **(env or {})}, threads=1)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def runs(corpus, tok_dir, tmp_path_factory):
    """{name: (run dir, rank 0's output)} of every run but the killed one (the module docstring lists them)."""
    root = tmp_path_factory.mktemp("fsdp2")
    d = {name: str(root / name) for name in ("one", "full", "resume", "hold", "freeze", "from_one", "on_one",
                                             "on_four", "session2", "session4")}
    out = {"one": _in_process(_fit_args(d["one"], corpus, tok_dir, nproc=1))}
    step2 = _ckpt(d["full"], "step2.ckpt")
    two = [
        dict(name="full", args=_fit_args(d["full"], corpus, tok_dir)),
        dict(name="resume", args=_fit_args(d["resume"], corpus, tok_dir, f"--ckpt_path={step2}", *LIVE)),
        dict(name="hold", args=_fit_args(d["hold"], corpus, tok_dir, HOLD),
             env={"SALM_TEST_HOLD_AT": "2", "SALM_TEST_HOLD_LOG": os.path.join(d["hold"], "hold.json")}),
        dict(name="freeze", args=_fit_args(d["freeze"], corpus, tok_dir, f"--ckpt_path={step2}", DUMP,
                                           "--model.freeze.patterns=[^llm\\.mtp\\.]"),
             env={"SALM_TEST_DUMP": os.path.join(d["freeze"], "restored.pt")}),
        dict(name="from_one", args=_fit_args(d["from_one"], corpus, tok_dir, f"--ckpt_path={_ckpt(d['one'], 'step4.ckpt')}",
                                             DUMP, "--trainer.max_steps=6"),
             env={"SALM_TEST_DUMP": os.path.join(d["from_one"], "restored.pt")}),
    ]
    for run in two:
        os.makedirs(d[run["name"]], exist_ok=True)
    out.update(_session(d["session2"], two, nproc=2))
    out["on_one"] = _in_process(_fit_args(d["on_one"], corpus, tok_dir, f"--ckpt_path={step2}", DUMP, nproc=1),
                                env={"SALM_TEST_DUMP": os.path.join(d["on_one"], "restored.pt")})
    os.makedirs(d["on_four"], exist_ok=True)
    out.update(_session(d["session4"], [dict(name="on_four", args=_fit_args(d["on_four"], corpus, tok_dir,
                                                                           f"--ckpt_path={step2}", DUMP, nproc=4),
                                             env={"SALM_TEST_DUMP": os.path.join(d["on_four"], "restored.pt")})],
                        nproc=4))
    return {name: (d[name], out[name]) for name in out}


def test_fsdp2_fit_writes_sharded_checkpoints_and_logs(runs):
    run, out = runs["full"]
    ckpts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run, "salm/version_*/checkpoints/*")))
    assert ckpts == ["last.ckpt", "step2.ckpt", "step4.ckpt"]
    step4 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step4.ckpt"))[0]
    assert os.path.isdir(step4) and os.path.isfile(os.path.join(step4, "meta.pt"))  # sharded, one dir
    assert sorted(logged_losses(run)) == [0, 1, 2, 3]
    log = out["stdout"] + out["stderr"]
    assert "[salm_mtp.parallel]" in log and "llm.mtp" in log  # the plan reports what it wrapped


def test_fsdp2_resume_continues_exactly(runs):
    """The resumed run also measures live acceptance (LiveAcceptance: every rank decodes rank 0's rows with the
    sharded model): its losses are those of the run without it, and the speculative answers equal greedy's."""
    import csv

    full, resumed = logged_losses(runs["full"][0]), logged_losses(runs["resume"][0])
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    (path,) = glob.glob(os.path.join(runs["resume"][0], "salm/version_*/metrics.csv"))
    live = [r for r in csv.DictReader(open(path)) if r.get("val_spec/tokens_per_forward")]
    assert len(live) == 1  # the validation at step 4
    assert float(live[0]["val_spec/tokens_per_forward"]) >= 1.0 and float(live[0]["val_spec/identical"]) == 1.0


def test_export_consolidates_sharded_checkpoint(runs, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step4 = _ckpt(runs["full"][0], "step4.ckpt")
    _in_process(["export", "--ckpt", step4, "--out", str(tmp_path / "exp")])
    dcp_to_torch_save(step4, str(tmp_path / "plain.pt"))  # independent reader of the shards
    sharded = torch.load(tmp_path / "plain.pt", weights_only=False)["state_dict"]
    ref = {k[len("llm."):]: v for k, v in sharded.items() if k.startswith("llm.mtp.")}
    exported = fuse_experts({k: v for k, v in load_file(tmp_path / "exp/llm/model.safetensors").items()
                             if k.startswith("mtp.")})
    assert len(ref) > 10 and set(ref) == set(exported)
    for k in ref:
        assert torch.equal(ref[k], exported[k]), k


def test_sharded_checkpoint_keys_are_checked_both_ways(runs):
    """salm_mtp.strategy.check_sharded_keys (run by SALMParallelStrategy.load_checkpoint before Lightning's load):
    the checkpoint's own keys pass; a model without depth 2 names the unexpected tensors, one with a depth 3 the
    missing ones."""
    from torch.distributed.checkpoint import FileSystemReader

    from salm_mtp.errors import SalmError
    from salm_mtp.strategy import check_sharded_keys

    step4 = _ckpt(runs["full"][0], "step4.ckpt")
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


def _saved_by_name(path):
    """(model tensors, {parameter name: optimizer state}, global step) of a checkpoint of either kind."""
    from salm_mtp.io.sharded import read_sharded
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


def test_two_rank_checkpoint_resumes_in_one_process(runs):
    run, out = runs["on_one"]
    _assert_restored(os.path.join(run, "restored.pt"), _ckpt(runs["full"][0], "step2.ckpt"), world_size=1)
    _resumed_losses_finite(run, [2, 3])
    # the data position: the 2 x 2 batches the two ranks consumed, skipped by the one process
    assert "resuming on 1 data-parallel ranks from a checkpoint of 2: the 4 batches" in out.stdout + out.stderr
    assert os.path.isfile(_ckpt(run, "step4.ckpt"))


def test_one_process_checkpoint_resumes_on_two_ranks(runs):
    step4 = _ckpt(runs["one"][0], "step4.ckpt")
    assert os.path.isfile(step4)  # a file: one process
    run, out = runs["from_one"]
    _assert_restored(os.path.join(run, "restored.pt"), step4, world_size=2)
    _resumed_losses_finite(run, [4, 5])
    assert "resuming on 2 data-parallel ranks from a checkpoint of 1" in out["stdout"] + out["stderr"]


def test_two_rank_checkpoint_resumes_on_four_and_exports_in_one_process(runs):
    from salm_mtp.io.sharded import read_sharded
    from salm_mtp.io.checkpoints import load_sharded_checkpoint

    run, _ = runs["on_four"]
    _assert_restored(os.path.join(run, "restored.pt"), _ckpt(runs["full"][0], "step2.ckpt"), world_size=4)
    _resumed_losses_finite(run, [2, 3])
    # offline consolidation of the 4-rank checkpoint: one CPU process, no process group
    step4 = _ckpt(run, "step4.ckpt")
    module = load_sharded_checkpoint(step4)
    saved = read_sharded(step4)["state_dict"]
    state = module.state_dict()
    assert set(state) == set(saved)
    for k, v in saved.items():
        assert torch.equal(state[k], v), k


# ---- asynchronous saves: training goes on while a checkpoint is written; a killed save never becomes `last` -----

def _ckpt_dir(run):
    return glob.glob(os.path.join(run, "salm/version_*/checkpoints"))[0]


def test_async_save_does_not_block_the_next_step_and_saves_the_state_of_its_step(runs):
    """The step-2 save's write is held in its background thread until step 3 starts: step 3 starts (the save did
    not block), the checkpoint is not yet published there, and once written it holds the step-2 state, equal to
    the same run's step-2 checkpoint written without a hold."""
    from salm_mtp.io.sharded import read_sharded

    run, _ = runs["hold"]
    seen = json.load(open(os.path.join(run, "hold.json")))
    assert seen == {"step": 3, "published": False, "in_progress": True}
    ckpts = _ckpt_dir(run)
    assert sorted(os.listdir(ckpts)) == ["last.ckpt", "step2.ckpt", "step4.ckpt"]  # nothing left in progress
    assert os.readlink(os.path.join(ckpts, "last.ckpt")) == "step4.ckpt"
    held = read_sharded(os.path.join(ckpts, "step2.ckpt"))["state_dict"]
    plain = read_sharded(_ckpt(runs["full"][0], "step2.ckpt"))["state_dict"]
    assert set(held) == set(plain)
    for k in plain:
        assert torch.equal(held[k], plain[k]), k


def test_a_save_killed_mid_write_leaves_last_on_the_previous_checkpoint(runs, corpus, tok_dir, tmp_path):
    """A launch of its own (its ranks are killed): SIGKILL while the step-4 save is still being written. ``last``
    stays on step 2, which holds what the uninterrupted run's step-2 checkpoint holds (test_fsdp2_resume_continues
    _exactly resumes that one)."""
    from salm_mtp.io.sharded import read_sharded

    log = tmp_path / "hold.json"
    env = {**os.environ, **ENV, "SALM_TEST_HOLD_AT": "4", "SALM_TEST_HOLD_LOG": str(log), "SALM_TEST_HOLD_KILL": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "salm_mtp.cli", *_fit_args(str(tmp_path), corpus, tok_dir, HOLD, "--trainer.max_steps=6")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT)
    assert out.returncode != 0
    assert json.loads(log.read_text()) == {"step": 5, "published": False, "in_progress": True}
    ckpts = _ckpt_dir(str(tmp_path))
    assert sorted(os.listdir(ckpts)) == [".step4.ckpt.inprogress", "last.ckpt", "step2.ckpt"]
    last = os.path.join(ckpts, "last.ckpt")
    assert os.readlink(last) == "step2.ckpt"
    kept, plain = read_sharded(last), read_sharded(_ckpt(runs["full"][0], "step2.ckpt"))
    assert kept["global_step"] == plain["global_step"] == 2 and set(kept["state_dict"]) == set(plain["state_dict"])
    for k, v in plain["state_dict"].items():
        assert torch.equal(kept["state_dict"][k], v), k


def test_sharded_resume_with_a_changed_freeze_list_matches_optimizer_state_by_name(runs):
    """Freezing the MTP head on resume (a safe setting): every model tensor is restored, the head's optimizer state
    is dropped and said so, every other parameter's state equals the saved one, and training goes on."""
    run, out = runs["freeze"]
    step2 = _ckpt(runs["full"][0], "step2.ckpt")
    log = out["stdout"] + out["stderr"]
    assert "resuming with changed settings: model.freeze.patterns" in log
    model, optim, _ = _saved_by_name(step2)
    head = sorted(n for n in optim if n.startswith("llm.mtp."))
    assert head and f"optimizer state matched by parameter name: {len(head)} no longer trained" in log
    dump = torch.load(os.path.join(run, "restored.pt"), weights_only=False)
    for k, v in model.items():
        assert torch.equal(dump["model"][k], v), k
    assert set(dump["optim"]) == set(optim) - set(head)
    for name in dump["optim"]:
        for key, v in optim[name].items():
            assert torch.equal(torch.as_tensor(dump["optim"][name][key]), torch.as_tensor(v)), (name, key)
    _resumed_losses_finite(run, [2, 3])
