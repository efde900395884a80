"""Tests of salm_mtp/parallel.py: the FSDP2 plan and the dp_size loss scaling (DESIGN.md §3-4).

The distributed cases share one launch (module fixture ``runs``): 2 gloo processes on CPU, started
with ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/worker.py SPEC``,
each running one real Lightning ``Trainer.fit(max_steps=1)`` per case on its half of a fixed batch.
Their gradients (full tensors gathered from the DTensor shards) are compared with a single-process
reference on the whole batch, from the same initial weights.

The batch's answers have uneven lengths, so the two ranks hold different target-token counts:
per-rank token means would give the wrong gradient, the global count times dp_size gives the exact
one. BatchNorm (Parakeet's conv modules) is pinned to its running statistics in both runs: batch
statistics differ per rank by design (no SyncBatchNorm), which is not what is tested here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tiny
from salm_mtp.config import EncoderConfig, ParallelConfig
from salm_mtp.model import SALMModule
from salm_mtp.parallel import (
    apply_parallelism,
    backbone_blocks,
    check_layerdrop,
    data_parallel,
    load_sharded_checkpoint,
)

PATTERN, DEPTHS = "M*E", 2
MODELS = {  # tiny_kwargs overrides; encoder dropout 0 and layerdrop 0 are tiny's defaults
    "base": dict(pattern=PATTERN, mtp_layers=DEPTHS),
    "ctc": dict(pattern=PATTERN, mtp_layers=DEPTHS, ctc_weight=0.3),  # + encoder CTC loss (its head in the root)
}
ANSWERS = [  # rank 0: rows 0-1 (short answers), rank 1: rows 2-3 (long ones)
    "a dog",
    "the cat sat",
    "one two three four five six seven eight nine zero",
    "1 2 3 4 5 6 7 8 9 0 1 2",
]
SAMPLES = [8000, 12000, 6000, 16000]  # uneven clips too: each rank pads to its own longest
WORKER = os.path.join(os.path.dirname(__file__), "dist", "worker.py")
CASES = [
    dict(name="fsdp2", strategy="fsdp2", checkpoint=True, validate=True),
    dict(name="guard_head", strategy="fsdp2", prewrap="head"),
    dict(name="guard_head_norm_f", strategy="fsdp2", prewrap="head+norm_f"),
    dict(name="fsdp2_ac", strategy="fsdp2", parallel=dict(activation_checkpointing=True)),
    dict(name="fsdp2_unscaled", strategy="fsdp2", parallel=dict(scale_loss_by_dp_size=False)),
    dict(name="fsdp2_bf16", strategy="fsdp2", parallel=dict(param_dtype="bfloat16", reduce_dtype="float32")),
    dict(name="fsdp2_layerdrop", strategy="fsdp2", layerdrop=0.1),
    dict(name="fsdp2_ctc", strategy="fsdp2", model="ctc"),
    dict(name="ddp", strategy="ddp"),
]
TOL = 1e-5


def pin_batchnorm(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def grad_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], scale: float = 1.0) -> dict:
    """Largest per-parameter ``|got - scale*ref| / |scale*ref|`` (norms), and the whole-model one.

    The denominator has a floor of 1e-10 of the model's gradient norm: a few gradients are exactly
    zero in theory (an attention key bias: softmax ignores a shift shared by all keys) and hold
    only rounding noise, which no relative measure can bound.
    """
    assert set(got) == set(ref), f"missing {set(ref) - set(got)}, unexpected {set(got) - set(ref)}"
    total = torch.stack([g.double().norm() for g in ref.values()]).norm() * scale
    worst, worst_name, diff2 = 0.0, None, 0.0
    for name, g in ref.items():
        target = g.double() * scale
        d = (got[name].double() - target).norm()
        diff2 += float(d) ** 2
        rel = float(d / torch.clamp(target.norm(), min=1e-10 * float(total)))
        if rel > worst:
            worst, worst_name = rel, name
    return {"max_rel": worst, "param": worst_name, "global_rel": diff2**0.5 / float(total)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok_dir):
    """(references by model, {case: rank-0 result}, batch, output dir) of one 2-process launch over every case."""
    root = tmp_path_factory.mktemp("parallel")
    batch, refs, models = None, {}, {}
    for key, kwargs in MODELS.items():
        torch.manual_seed(0)
        module = SALMModule(**tiny.tiny_kwargs(tok_dir, **kwargs))
        if batch is None:
            batch = tiny.make_batch(module.tokenizer, ANSWERS, SAMPLES)
            torch.save(batch, root / "batch.pt")
        torch.save(module.state_dict(), root / f"{key}.weights.pt")
        models[key] = {"kwargs": kwargs, "weights": str(root / f"{key}.weights.pt")}

        module.train()
        pin_batchnorm(module)
        loss, summed, _ = module.compute_losses(batch)  # no trainer: dp_size 1, whole batch
        loss.backward()
        assert all(p.grad is not None for p in module.parameters())
        refs[key] = {
            "grads": {n: p.grad.detach().clone() for n, p in module.named_parameters()},
            "loss": module.summarise(summed)["loss"],
        }

    spec = dict(tok_dir=tok_dir, models=models, batch=str(root / "batch.pt"), out=str(root), cases=CASES,
                hang_dump_s=200)
    (root / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           str(root / "spec.json")]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(WORKER)), capture_output=True, text=True,
                          timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    results = {c["name"]: torch.load(root / f"{c['name']}.pt", weights_only=False) for c in CASES}
    return refs, results, batch, root


def ok(result: dict) -> dict:
    assert "error" not in result, result.get("traceback", result.get("error"))
    return result


def check_equivalent(ref: dict, result: dict, label: str) -> dict:
    err = grad_error(ok(result)["grads"], ref["grads"])
    print(f"\n{label}: max per-parameter relative gradient difference {err['max_rel']:.2e} ({err['param']}), "
          f"whole model {err['global_rel']:.2e}; loss {result['loss']:.9f} vs {ref['loss']:.9f}")
    assert err["max_rel"] < TOL, err
    assert result["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # logged global loss (float32 in the logs)
    return err


# ------------------------------------------------------------------------------ the batch itself
def test_ranks_hold_uneven_target_counts(runs):
    _, _, batch, _ = runs
    counts = [int(batch["loss_mask"][rows].sum()) for rows in (slice(0, 2), slice(2, 4))]
    assert 2 * counts[0] < counts[1], counts  # per-rank means would weight rank 0's tokens 2x+ too much


# ------------------------------------------------------------------------------ FSDP2 (Lightning)
def test_fsdp2_gradients_equal_single_process(runs):
    refs, results, _, _ = runs
    ref = refs["base"]
    r = results["fsdp2"]
    check_equivalent(ref, r, "FSDP2")
    assert set(r["param_types"].values()) == {"DTensor"}  # every parameter sharded exactly once
    # validation ran first (sanity check, root gathered without backward), then the exact step above
    assert r["val_losses"][0] == pytest.approx(ref["loss"], rel=1e-6), r["val_losses"]


def test_fsdp2_plan_groups(runs, tok_dir):
    _, results, _, _ = runs
    r = ok(results["fsdp2"])
    module = SALMModule(**tiny.tiny_kwargs(tok_dir, pattern=PATTERN, mtp_layers=DEPTHS))
    blocks = [n for n, _ in backbone_blocks(module.llm)]
    assert len(blocks) == len(PATTERN)
    expected = {"<root>", "adapter", "audio.encoder", "llm.mtp", *blocks}
    assert set(r["fsdp_modules"]) == expected  # llm itself is no group: its forward never runs
    wrapped = [line for line in r["plan"] if "fully_shard " in line]
    assert len(wrapped) == len(expected) and not any("skip" in line for line in r["plan"])


@pytest.mark.parametrize("case", ["guard_head", "guard_head_norm_f"])
def test_fsdp2_already_sharded_head_is_skipped(runs, case):
    """The head reaches the plan already an FSDPModule (alone, or grouped with the LLM's norm_f)."""
    refs, results, _, _ = runs
    ref = refs["base"]
    r = results[case]
    check_equivalent(ref, r, f"FSDP2, head pre-sharded ({case})")
    assert any("skip llm.mtp" in line for line in r["plan"]), r["plan"]
    assert not any("fully_shard llm.mtp" in line for line in r["plan"])
    assert set(r["param_types"].values()) == {"DTensor"}


def test_fsdp2_activation_checkpointing(runs):
    refs, results, _, _ = runs
    ref = refs["base"]
    r = results["fsdp2_ac"]
    check_equivalent(ref, r, "FSDP2 + activation checkpointing")
    assert any("activation checkpointing on 3 backbone blocks" in line for line in r["plan"])


def test_fsdp2_without_dp_scaling_gradients_are_half(runs):
    """Counter-test: without the dp_size factor FSDP2's average halves the gradient."""
    refs, results, _, _ = runs
    ref = refs["base"]
    r = ok(results["fsdp2_unscaled"])
    num = sum(float((r["grads"][n].double() * g.double()).sum()) for n, g in ref["grads"].items())
    den = sum(float(g.double().pow(2).sum()) for g in ref["grads"].values())
    err = grad_error(r["grads"], ref["grads"], scale=0.5)
    print(f"\nFSDP2 unscaled: gradient ratio {num / den:.7f}, max per-parameter difference from half "
          f"{err['max_rel']:.2e} ({err['param']})")
    assert num / den == pytest.approx(0.5, rel=TOL)
    assert err["max_rel"] < TOL, err
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # the logged loss never carries the factor


def test_fsdp2_bf16_mixed_precision_close(runs):
    refs, results, _, _ = runs
    ref = refs["base"]
    r = ok(results["fsdp2_bf16"])
    err = grad_error(r["grads"], ref["grads"])
    print(f"\nFSDP2 bf16 params / fp32 reduce: whole-model relative gradient difference {err['global_rel']:.2e}")
    assert err["global_rel"] < 0.05
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-3)
    assert any("(fp32)" in line for line in r["plan"])  # BatchNorm kept in fp32


def test_fsdp2_refuses_layerdrop(runs):
    _, results, _, _ = runs
    err = results["fsdp2_layerdrop"].get("error", "")
    assert "model.encoder.layerdrop" in err and "ValueError" in err, err


def test_sharded_checkpoint_loads_unsharded(runs):
    """The FSDP2 run's distributed checkpoint (after its optimizer step) reloads 1:1 in one process."""
    _, results, _, root = runs
    final = ok(results["fsdp2"])["final_params"]
    module = load_sharded_checkpoint(str(root / "fsdp2_ckpt"))
    loaded = dict(module.named_parameters())
    assert set(loaded) == set(final)
    for name, p in loaded.items():
        assert torch.equal(p.detach(), final[name]), name
    assert module.num_mtp_depths == DEPTHS and module._pretrained_loaded
    with pytest.raises(FileNotFoundError, match="no meta.pt"):
        load_sharded_checkpoint(str(root))


def test_fsdp2_with_ctc_loss_gradients_equal_single_process(runs):
    refs, results, _, _ = runs
    check_equivalent(refs["ctc"], results["fsdp2_ctc"], "FSDP2 + CTC loss")


# ------------------------------------------------------------------------------ DDP (Lightning)
def test_ddp_gradients_equal_single_process(runs):
    refs, results, _, _ = runs
    ref = refs["base"]
    check_equivalent(ref, results["ddp"], "DDP")


# ------------------------------------------------------------------------------ single process
def test_data_parallel_outside_distributed():
    assert data_parallel(None) == (1, None)


@pytest.mark.parametrize("key", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_model_parallel_with_mtp_refused(tok_dir, key):
    module = SALMModule(**tiny.tiny_kwargs(tok_dir, pattern=PATTERN, mtp_layers=1,
                                           parallel=ParallelConfig(**{key: 2})))
    with pytest.raises(ValueError, match=rf"model\.parallel\.{key}=2 with an MTP head"):
        apply_parallelism(module)


def test_model_parallel_without_mtp_not_implemented(tok_dir):
    module = SALMModule(**tiny.tiny_kwargs(tok_dir, pattern=PATTERN, mtp_layers=0,
                                           parallel=ParallelConfig(tensor_parallel_size=2)))
    with pytest.raises(ValueError, match=r"model\.parallel\.tensor_parallel_size=2: tensor parallelism is not"):
        apply_parallelism(module)


def test_layerdrop_check(tok_dir):
    kw = tiny.tiny_kwargs(tok_dir, pattern=PATTERN, mtp_layers=1)
    kw["encoder"] = EncoderConfig(**{**kw["encoder"].__dict__, "layerdrop": 0.2})
    with pytest.raises(ValueError, match=r"model\.encoder\.layerdrop=0\.2"):
        check_layerdrop(SALMModule(**kw))


def test_backbone_blocks_read_from_no_split_modules(tok_dir):
    module = SALMModule(**tiny.tiny_kwargs(tok_dir, pattern=PATTERN, mtp_layers=1))
    names = {type(b).__name__ for _, b in backbone_blocks(module.llm)}
    assert names == set(module.llm._no_split_modules)
    module.llm._no_split_modules = ["SomethingElse"]
    with pytest.raises(ValueError, match="no backbone block to shard"):
        backbone_blocks(module.llm)
