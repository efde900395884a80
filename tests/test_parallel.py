"""Tests of salm_mtp/parallel.py: the FSDP2 plan and the dp_size loss scaling (docs/design.md §3-4).

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
from salm_mtp.io.checkpoints import build_module, load_sharded_checkpoint
from salm_mtp.model import SALMModule
from salm_mtp.salm import config_from_dict
from salm_mtp.parallel import apply_parallelism, backbone_blocks, check_layerdrop, data_parallel

PATTERN, DEPTHS = "M*E", 2
MODELS = {  # tiny_kwargs overrides; encoder dropout 0 and layerdrop 0 are tiny's defaults
    "base": dict(pattern=PATTERN, mtp_layers=DEPTHS, init_seed=0),
    "ctc": dict(pattern=PATTERN, mtp_layers=DEPTHS, ctc_weight=0.3, init_seed=0),  # + encoder CTC loss (root group)
}
BIAS = [1.000, 1.001, 1.002, 1.003]  # router e_score_correction_bias on disk: all 1.0 once rounded to bf16
FROZEN_LLM = {"freeze": {"patterns": [r"^llm\."], "unfreeze": [r"^llm\.mtp\."]}}
HF_MODELS = {  # models read from local HF directories written by the fixture (parts: config dataclasses as dicts)
    "hf_shipped": dict(kwargs=dict(init_seed=3), parts={"llm": {"path": "{root}/hf_mtp"}, "mtp": {"num_layers": None},
                                                        "tokenizer_path": None}),
    "hf_new_head": dict(kwargs=dict(init_seed=3, mtp_layers=1), parts={"llm": {"path": "{root}/hf_base"},
                                                                       "tokenizer_path": None}),
    "hf_frozen": dict(kwargs=dict(init_seed=3), parts={"llm": {"path": "{root}/hf_mtp"}, "mtp": {"num_layers": None},
                                                       "tokenizer_path": None, **FROZEN_LLM}),
}
REAL_TARGET_PRECISION = dict(param_dtype="bfloat16", reduce_dtype="float32", frozen_dtype="bfloat16")
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
    dict(name="fsdp2_ac", strategy="fsdp2",
         parallel=dict(activation_checkpointing=True, encoder_activation_checkpointing=True)),
    dict(name="fsdp2_unscaled", strategy="fsdp2", parallel=dict(scale_loss_by_dp_size=False)),
    dict(name="fsdp2_bf16", strategy="fsdp2", parallel=dict(param_dtype="bfloat16", reduce_dtype="float32")),
    dict(name="fsdp2_layerdrop", strategy="fsdp2", layerdrop=0.1),
    dict(name="fsdp2_ctc", strategy="fsdp2", model="ctc"),
    dict(name="ddp", strategy="ddp"),
    dict(name="hf_shipped", strategy="fsdp2", model="hf_shipped"),
    dict(name="hf_new_head", strategy="fsdp2", model="hf_new_head"),
    dict(name="hf_bf16", strategy="fsdp2", model="hf_frozen", parallel=REAL_TARGET_PRECISION),
    dict(name="hf_bf16_true", strategy="fsdp2", model="hf_frozen", precision="bf16-true"),
]
CASES_4 = [  # 4 processes, one row each: HSDP 2 replicas x 2 shards, and flat FSDP2 over 4 for comparison
    dict(name="hsdp_2x2", strategy="hsdp", replicate=2),
    dict(name="fsdp2_4", strategy="fsdp2"),
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
    write_hf_dirs(root, tok_dir)
    for key, spec in HF_MODELS.items():
        parts = json.loads(json.dumps(spec["parts"]).replace("{root}", str(root)))
        models[key] = {"kwargs": spec["kwargs"], "parts": parts}
        kw = tiny.tiny_kwargs(tok_dir, **spec["kwargs"])
        kw.update(config_from_dict(parts))
        refs[key] = {"weights": dict(build_module(**kw).named_parameters())}
    for key, kwargs in MODELS.items():
        module = build_module(**tiny.tiny_kwargs(tok_dir, **kwargs))
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
            "weights": {n: v for n, v in torch.load(root / f"{key}.weights.pt").items()
                        if n in dict(module.named_parameters())},
            "grads": {n: p.grad.detach().clone() for n, p in module.named_parameters()},
            "loss": module.summarise(summed)["loss"],
        }

    results = launch(root, tok_dir, models, CASES, nproc=2)
    results.update(launch(root, tok_dir, {"base": models["base"]}, CASES_4, nproc=4, spec_name="spec4.json"))
    return refs, results, batch, root


def launch(root, tok_dir, models: dict, cases: list, nproc: int, spec_name: str = "spec.json") -> dict:
    """Run the worker over ``cases`` on ``nproc`` gloo processes; {case: rank-0 result}."""
    spec = dict(tok_dir=tok_dir, models=models, batch=str(root / "batch.pt"), out=str(root), cases=cases,
                hang_dump_s=200)
    (root / spec_name).write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), WORKER,
           str(root / spec_name)]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(WORKER)), capture_output=True, text=True,
                          timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return {c["name"]: torch.load(root / f"{c['name']}.pt", weights_only=False) for c in cases}


def write_hf_dirs(root, tok_dir) -> None:
    """Two tiny Nemotron-H HF directories as released checkpoints are: weights in bf16, the routers'
    e_score_correction_bias in fp32 (BIAS). ``hf_mtp`` ships an MTP head ("*E"), ``hf_base`` has none."""
    from safetensors.torch import load_file, save_file

    for name, depths in (("hf_mtp", 1), ("hf_base", 0)):
        src = tiny.build(tok_dir, pattern=PATTERN, mtp_layers=depths, init_seed=11)
        for n, b in src.llm.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.tensor(BIAS))
        out = root / name
        src.llm.save_pretrained(out)
        src.tokenizer.save_pretrained(out)
        f = out / "model.safetensors"
        state = {k: (v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)) for k, v in load_file(f).items()}
        save_file(state, f, metadata={"format": "pt"})


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
    # no wrapped module (the adapter's Linear over 3-D input was one) returns a view whose in-place use would drop
    # FSDP2's pre-backward hook; the gradients above, adapter's included, equal one process's
    assert r["view_warnings"] == [] and "adapter" in r["fsdp_modules"]
    # validation ran first (sanity check, root gathered without backward), then the exact step above
    assert r["val_losses"][0] == pytest.approx(ref["loss"], rel=1e-6), r["val_losses"]


@pytest.mark.parametrize("case", ["hsdp_2x2", "fsdp2_4"])
def test_hsdp_gradients_equal_single_process(runs, case):
    """HSDP (2 replicas x 2 shards, salm_mtp.strategy.SALMParallelStrategy) on 4 processes, one row each: the
    gradients equal the single-process gradients of the same global batch; the plan shards over the 2-D mesh."""
    refs, results, _, _ = runs
    check_equivalent(refs["base"], results[case], case)
    if case == "hsdp_2x2":
        assert any("replicate x shard = 2 x 2" in line for line in results[case]["plan"]), results[case]["plan"]
        assert results[case]["dp_size"] == 4


def test_fsdp2_plan_groups(runs, tok_dir):
    _, results, _, _ = runs
    r = ok(results["fsdp2"])
    module = SALMModule(**tiny.tiny_kwargs(tok_dir, pattern=PATTERN, mtp_layers=DEPTHS))
    blocks = [n for n, _ in backbone_blocks(module.llm)]
    assert len(blocks) == len(PATTERN)
    enc_layers = [f"audio.encoder.layers.{i}" for i in range(len(module.audio.encoder.layers))]
    assert len(enc_layers) >= 2
    expected = {"<root>", "adapter", "audio.encoder", "llm.mtp", *blocks, *enc_layers}
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
    assert any("activation checkpointing on 2 encoder layers" in line for line in r["plan"]), r["plan"]


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
    assert module.num_mtp_depths == DEPTHS
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


# ------------------------------------------------------------------- real scale: meta build, shard, load
def test_fsdp2_starts_from_the_single_process_weights(runs):
    """Built on meta, sharded, materialised and initialised per shard: bit-equal to 1 process (init_seed)."""
    refs, results, _, _ = runs
    for case in ("fsdp2", "fsdp2_ctc", "ddp"):
        ref = refs["ctc" if case == "fsdp2_ctc" else "base"]["weights"]
        got = ok(results[case])["init_params"]
        assert set(got) == set(ref)
        bad = [n for n in ref if not torch.equal(got[n], ref[n])]
        assert not bad, f"{case}: {len(bad)} parameters differ from the single-process build, e.g. {bad[:3]}"


@pytest.mark.parametrize("case", ["hf_shipped", "hf_new_head"])
def test_fsdp2_loads_hf_dir_bit_equal_to_single_process(runs, case):
    """Each rank reads its slices of the bf16 safetensors (shipped head included); a new head is initialised
    per shard; the gathered weights equal the single-process build of the same directory bit for bit."""
    refs, results, _, root = runs
    r = ok(results[case])
    ref = refs[case]["weights"]
    assert set(r["init_params"]) == set(ref)
    bad = [n for n in ref if not torch.equal(r["init_params"][n], ref[n].detach())]
    assert not bad, f"{len(bad)} parameters differ, e.g. {bad[:3]}"
    head = {n for n in ref if n.startswith("llm.mtp.")}
    assert head and any(n.endswith("experts.up_proj") for n in head)
    if case == "hf_shipped":  # the shipped head came from the file: exactly the bf16 values on disk, as fp32
        from safetensors.torch import load_file

        disk = load_file(os.path.join(root, "hf_mtp", "model.safetensors"))
        for k in ("mtp.layers.0.eh_proj.weight", "mtp.layers.1.mixer.gate.weight"):
            assert torch.equal(r["init_params"]["llm." + k], disk[k].float()), k


def test_no_rank_reads_or_holds_the_whole_llm(runs):
    """Per rank, the LLM bytes read from disk and held in parameters are ~1/2 of the model (2 ranks)."""
    refs, results, _, root = runs
    r = ok(results["hf_shipped"])
    disk = os.path.getsize(root / "hf_mtp" / "model.safetensors")
    full_fp32 = sum(p.numel() * 4 for n, p in refs["hf_shipped"]["weights"].items() if n.startswith("llm."))
    print(f"\nLLM on disk {disk} B (bf16); per-rank bytes read {r['bytes_read']}; per-rank fp32 LLM parameter "
          f"bytes {r['llm_local_bytes']} of {full_fp32}")
    for read, held in zip(r["bytes_read"], r["llm_local_bytes"]):
        assert read < 0.6 * disk, (read, disk)  # 1/2 plus the small unsharded buffers and rounding of dim 0
        assert held < 0.6 * full_fp32, (held, full_fp32)
    assert sum(r["bytes_read"]) < 1.1 * disk  # together the ranks read the model about once


def test_real_target_precision_keeps_fp32_where_it_must(runs):
    """param_dtype bf16 / reduce fp32 / frozen bf16 (the real-target configs): router biases fp32 and equal
    to the checkpoint's values, trainable master weights fp32, frozen weights bf16, feature buffers as built."""
    _, results, _, _ = runs
    r = ok(results["hf_bf16"])
    biases = {n: b for n, b in r["buffers"].items() if n.endswith("e_score_correction_bias")}
    assert len(biases) == 2  # the backbone's E block and the shipped head's
    for n, b in biases.items():
        assert b.dtype == torch.float32 and torch.equal(b, torch.tensor(BIAS)), (n, b)
    for n, dtype in r["dtypes"].items():
        want = "torch.float32" if r["requires_grad"][n] else "torch.bfloat16"
        assert dtype == want, (n, dtype, r["requires_grad"][n])
    assert any(r["requires_grad"][n] for n in r["dtypes"] if n.startswith("llm.mtp."))
    assert not any(r["requires_grad"][n] for n in r["dtypes"] if n.startswith("llm.model."))
    for n, fresh in r["fresh_feature_buffers"].items():
        assert r["buffers"][n].dtype == torch.float32 and torch.equal(r["buffers"][n], fresh), n
    assert r["loss"] == r["loss"]  # a real step ran (not NaN)


def test_bf16_true_precision_is_refused_naming_the_key(runs):
    _, results, _, _ = runs
    err = results["hf_bf16_true"].get("error", "")
    assert "trainer.precision=bf16-true" in err and "--model.parallel.frozen_dtype=bfloat16" in err, err
