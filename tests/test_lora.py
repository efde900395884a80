"""Tests of salm_mtp/modules/lora.py and its wiring (model.lora): which layers get adapters, names, init,
freezing, training, resume, export (merged and peft adapter), head switch, planner, and 2-process FSDP2.

The distributed cases share one launch of tests/dist/worker.py (2 gloo processes on CPU, as
tests/test_parallel.py does) and compare with a single-process reference on the whole batch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import tiny
from test_parallel import grad_error
from salm_mtp.config import FreezeConfig, LLMConfig, LoRAConfig, MTPConfig
from salm_mtp.io.checkpoints import build_module, load_export, load_sharded_checkpoint
from salm_mtp.io.export import export_hf
from salm_mtp.materialize import seed_for
from salm_mtp.model import SALMModule
from salm_mtp.salm import config_from_dict
from salm_mtp.modules.lora import ADAPTER_DIR, base_name, base_view, is_adapter_param, lora_layers

R = 4
ANSWERS = ["a dog", "the cat sat", "one two three four five six seven eight nine zero", "1 2 3 4 5 6 7 8 9 0 1 2"]
SAMPLES = [8000, 12000, 6000, 16000]
WORKER = os.path.join(os.path.dirname(__file__), "dist", "worker.py")


def lora_model(tok_dir, r: int = R, **overrides) -> SALMModule:
    return tiny.build(tok_dir, init_seed=5, lora=LoRAConfig(r=r, **overrides.pop("lora_kw", {})), **overrides)


@torch.no_grad()
def randomise_adapters(module, std: float = 0.2) -> None:
    """B = 0 at init makes every adapter a no-op: give B values so merges and loads are really tested."""
    g = torch.Generator().manual_seed(0)
    for n, p in module.named_parameters():
        if ".lora_B." in n:
            p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def llm_logits(module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged input embeddings, LLM logits (B, T', V)) of ``module`` in eval mode."""
    module.eval()
    merged, _, _ = module.prepare_inputs(batch)
    return merged.inputs_embeds, module.llm(inputs_embeds=merged.inputs_embeds, use_cache=False).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def batch(tok_dir):
    return tiny.make_batch(SALMModule(**tiny.tiny_kwargs(tok_dir)).tokenizer, ANSWERS, SAMPLES)


@pytest.fixture(scope="module")
def hf_dir(tok_dir, tmp_path_factory):
    """A plain export (llm/ with a shipped 1-depth head, encoder/, adapter) to start LoRA runs from."""
    out = tmp_path_factory.mktemp("hf")
    export_hf(tiny.build(tok_dir, init_seed=11), str(out))
    return str(out)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, key", [(dict(r=-1), "model.lora.r"), (dict(alpha=0), "model.lora.alpha"),
                                     (dict(dropout=1.0), "model.lora.dropout"),
                                     (dict(target_modules=["q_proj", "out_proj"]), "model.lora.target_modules"),
                                     (dict(target_modules=[]), "model.lora.target_modules")])
def test_config_errors_name_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"{key}.*set --{key}"):
        LoRAConfig(**kw)


def test_unknown_target_module_names_the_key_and_the_layers(tok_dir):
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules: \['qkv'\] matches no Linear.*q_proj"):
        SALMModule(**tiny.tiny_kwargs(tok_dir, lora=LoRAConfig(r=R, target_modules=["qkv"])))


# ------------------------------------------------------------------------------------ what is wrapped
def test_default_targets_and_stable_checkpoint_names(tok_dir):
    module = SALMModule(**tiny.tiny_kwargs(tok_dir, pattern="M*E-", lora=LoRAConfig(r=R)))
    plain = SALMModule(**tiny.tiny_kwargs(tok_dir, pattern="M*E-"))
    wrapped = {n for n, _ in lora_layers(module)}
    assert wrapped == {
        "llm.model.layers.0.mixer.in_proj",
        *(f"llm.model.layers.1.mixer.{p}_proj" for p in "qkvo"),
        "llm.model.layers.2.mixer.shared_experts.up_proj", "llm.model.layers.2.mixer.shared_experts.down_proj",
        "llm.model.layers.3.mixer.up_proj", "llm.model.layers.3.mixer.down_proj",
    }  # no Mamba out_proj, no fused routed experts (3-D parameters), no MTP head, no encoder layer
    adapters = [n for n, _ in module.named_parameters() if is_adapter_param(n)]
    assert len(adapters) == 2 * len(wrapped)
    shapes = dict(module.named_parameters())
    assert shapes["llm.model.layers.1.mixer.q_proj.lora_A.default.weight"].shape == (R, 32)
    assert shapes["llm.model.layers.1.mixer.k_proj.lora_B.default.weight"].shape == (16, R)
    # everything else: the plain model's names once the base layers stand in (checkpoint key map)
    with base_view(module):
        assert list(module.state_dict()) == list(plain.state_dict())
    assert {base_name(n) for n in module.state_dict() if not is_adapter_param(n)} == set(plain.state_dict())
    assert all(p.is_meta for p in module.parameters())  # built on meta like everything else


def test_lora_model_starts_as_the_plain_model(tok_dir, batch):
    plain, lora = tiny.build(tok_dir, init_seed=5), lora_model(tok_dir)
    ps, ls = plain.state_dict(), lora.state_dict()
    for n, t in ls.items():
        if not is_adapter_param(n):
            assert torch.equal(t, ps[base_name(n)]), n  # same values per name and seed, Mamba rescale included
    for name, layer in lora_layers(lora):
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0, name
        a = layer.lora_A["default"].weight
        with torch.random.fork_rng(devices=[]):  # A: kaiming-uniform under the module's own seed
            torch.manual_seed(seed_for(5, f"{name}.lora_A.default"))
            want = torch.nn.init.kaiming_uniform_(torch.empty(a.shape), a=5 ** 0.5)
        assert torch.equal(a, want), name
    _, lp = llm_logits(lora, batch)
    _, pp = llm_logits(plain, batch)
    assert torch.equal(lp, pp)


def test_base_frozen_adapters_and_configured_parts_trainable(tok_dir):
    module = lora_model(tok_dir, freeze=FreezeConfig(patterns=[r"^audio\."], unfreeze=[r"^llm\.lm_head\."]))
    grads = {n: p.requires_grad for n, p in module.named_parameters()}
    for n, g in grads.items():
        if is_adapter_param(n):
            assert g, n
        elif n.startswith("llm.mtp."):  # a new head trains in full
            assert g, n
        elif n.startswith("llm.lm_head."):  # model.freeze.unfreeze re-enables a base weight
            assert g, n
        elif n.startswith(("llm.", "audio.")):
            assert not g, n
        else:
            assert g, n  # the modality adapter keeps its own setting
    assert any(n.startswith("adapter.") for n in grads)


# ----------------------------------------------------------------------------------- training, resume
class Batches(torch.utils.data.Dataset):
    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


def fit(module, batch, tmp_path, steps: int, ckpt_path=None, every: int | None = None):
    callbacks = []
    if every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=every,
                                                             save_top_k=-1, filename="step{step}",
                                                             auto_insert_metric_name=False))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(every), callbacks=callbacks,
                        default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(Batches(batch, steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=False)  # our own file
    return trainer


def test_steps_change_only_adapters_and_configured_parameters(tok_dir, batch, tmp_path):
    module = SALMModule(**tiny.tiny_kwargs(tok_dir, init_seed=5, lora=LoRAConfig(r=R),
                                           freeze=FreezeConfig(patterns=[r"^audio\."])))
    trainer = fit(module, batch, tmp_path, steps=3)
    after = {n: p.detach().clone() for n, p in module.named_parameters()}
    before = dict(tiny.build(tok_dir, init_seed=5, lora=LoRAConfig(r=R),
                             freeze=FreezeConfig(patterns=[r"^audio\."])).named_parameters())
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in module.named_parameters() if n in trained}  # AdamW holds these only
    changed = {n for n in after if not torch.equal(after[n], before[n].detach())}
    assert changed <= trained
    assert {n for n in trained if ".lora_B." in n} <= changed  # every adapter moved off zero
    assert any(n.startswith("adapter.") for n in changed) and any(n.startswith("llm.mtp.") for n in changed)
    assert not any(n.startswith(("audio.", "llm.model.", "llm.lm_head.")) and not is_adapter_param(n)
                   for n in changed)


def test_resume_is_exact(tok_dir, batch, tmp_path):
    kw = tiny.tiny_kwargs(tok_dir, init_seed=5, lora=LoRAConfig(r=R, dropout=0.0))
    full = SALMModule(**kw)
    fit(full, batch, tmp_path / "full", steps=4, every=2)
    resumed = SALMModule(**kw)
    fit(resumed, batch, tmp_path / "resumed", steps=4, ckpt_path=str(tmp_path / "full" / "ckpt" / "step2.ckpt"))
    a, b = dict(full.named_parameters()), dict(resumed.named_parameters())
    assert set(a) == set(b)
    bad = [n for n in a if not torch.equal(a[n], b[n])]
    assert not bad, bad[:3]


def test_head_only_trains_the_head_alone(tok_dir):
    module = SALMModule(**tiny.tiny_kwargs(tok_dir, lora=LoRAConfig(r=R), mtp=MTPConfig(training_mode="head_only")))
    module.apply_freeze()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("llm.mtp.") for n in trainable)


# ---------------------------------------------------------------------------------- the MTP head switch
def test_lora_on_a_shipped_head(tok_dir, hf_dir, batch):
    kw = tiny.tiny_kwargs(tok_dir, init_seed=5, tokenizer_path=None, mtp=MTPConfig(num_layers=None),
                          lora=LoRAConfig(r=R, mtp_head=True))
    kw["llm"] = LLMConfig(path=os.path.join(hf_dir, "llm"))
    module = build_module(**kw)
    head_layers = [n for n, _ in lora_layers(module) if n.startswith("llm.mtp.")]
    assert "llm.mtp.layers.0.mixer.q_proj" in head_layers
    for n, p in module.named_parameters():
        if n.startswith("llm."):
            assert p.requires_grad == is_adapter_param(n), n  # head base frozen like the backbone's
    shipped = load_file(os.path.join(hf_dir, "llm", "model.safetensors"))
    got = module.llm.mtp.layers[0].mixer.q_proj.base_layer.weight
    assert torch.equal(got, shipped["mtp.layers.0.mixer.q_proj.weight"])  # read through the key map
    # merged export carries the head's adapter too: reload equals the LoRA model, head depths included
    randomise_adapters(module)
    emb, ref = llm_logits(module, batch)
    h0 = module(emb)
    ref_head = module.mtp_head(h0, emb)[0]
    out = export_hf(module, os.path.join(hf_dir, "..", "head_lora_export"))
    back = load_export(out["root"])
    back.eval()
    with torch.no_grad():
        assert rel(back.mtp_head(back(emb), emb)[0], ref_head) < 1e-5
    assert not lora_layers(back)


def test_lora_on_a_new_head_is_refused(tok_dir):
    with pytest.raises(ValueError, match=r"model\.lora\.mtp_head=true but no shipped MTP head"):
        SALMModule(**tiny.tiny_kwargs(tok_dir, lora=LoRAConfig(r=R, mtp_head=True)))


# ------------------------------------------------------------------------------------------------ export
def test_merged_export_is_a_plain_nemotron_h_with_equal_logits(tok_dir, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    module = lora_model(tok_dir)
    randomise_adapters(module)
    emb, ref = llm_logits(module, batch)
    out = export_hf(module, str(tmp_path / "export"))
    keys = set(load_file(os.path.join(out["llm"], "model.safetensors")))
    assert not any("lora" in k or "base_layer" in k for k in keys)
    assert "adapter_config.json" not in os.listdir(out["llm"]) and "lora_adapter" not in out
    hf = AutoModelForCausalLM.from_pretrained(out["llm"]).eval()  # transformers alone, no peft
    with torch.no_grad():
        got = hf(inputs_embeds=emb).logits
    print(f"\nmerged export vs LoRA model: relative logit difference {rel(got, ref):.2e}")
    assert rel(got, ref) < 1e-5
    assert rel(got, llm_logits(tiny.build(tok_dir, init_seed=5), batch)[1]) > 1e-3  # the adapters matter
    back = load_export(out["root"])  # salm_config.json says r=0: a plain SALM model
    assert back.cfg_lora.r == 0 and not lora_layers(back)
    assert rel(llm_logits(back, batch)[1], ref) < 1e-5
    assert lora_layers(module)  # the exported module keeps its adapters (merge was on copies)
    assert rel(llm_logits(module, batch)[1], ref) == 0.0


def test_adapter_export_loads_with_peft_onto_the_base(tok_dir, hf_dir, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kw = tiny.tiny_kwargs(tok_dir, init_seed=5, tokenizer_path=None, mtp=MTPConfig(num_layers=None),
                          lora=LoRAConfig(r=R, alpha=8.0))
    base_dir = os.path.join(hf_dir, "llm")
    kw["llm"] = LLMConfig(path=base_dir)
    module = build_module(**kw)  # base weights read from base_dir through the key map
    randomise_adapters(module)
    emb, ref = llm_logits(module, batch)
    out = export_hf(module, str(tmp_path / "export"), lora="adapter")
    adapter_dir = out["lora_adapter"]
    assert adapter_dir == str(tmp_path / "export" / ADAPTER_DIR)
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (R, 8.0, base_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        got = peft_model(inputs_embeds=emb).logits
    print(f"\npeft adapter on the base vs LoRA model: relative logit difference {rel(got, ref):.2e}")
    assert rel(got, ref) < 1e-5


def test_adapter_export_without_lora_is_refused_before_writing(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_hf(tiny.build(tok_dir), str(tmp_path / "x"), lora="adapter")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ planner
def test_planner_counts_adapters_as_the_trainable_llm_part(tok_dir):
    from salm_mtp.plan import build, planner, shards

    module = build.build_model(tiny.tiny_kwargs(tok_dir, lora=LoRAConfig(r=R)))
    records, _ = shards.shard_records(module, 2)
    parts: dict[tuple[str, bool], int] = {}
    for r in records:
        key = (planner.part_of(r.name), r.trainable)
        parts[key] = parts.get(key, 0) + math.prod(r.shape)
    lora_n = sum(p.numel() for n, p in module.named_parameters() if is_adapter_param(n))
    assert parts[("llm.lora", True)] == lora_n > 0
    assert ("llm", True) not in parts  # the LLM's base: frozen only
    per_rank = shards.per_rank(records, 2, None, 0, 0, 1)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert per_rank["optimizer_bytes"] == sum(torch.empty(p.shape, device="meta").chunk(2)[0].numel() * 8
                                              for p in trainable)


# ---------------------------------------------------------------------------- 2 processes (FSDP2, gloo)
PATTERN = "M*E"
FROZEN_BF16 = dict(param_dtype="bfloat16", reduce_dtype="float32", frozen_dtype="bfloat16")
CASES = [
    dict(name="lora_fsdp2", strategy="fsdp2", checkpoint=True, lora_b=0.05),
    dict(name="lora_fsdp2_bf16", strategy="fsdp2", model="hf", parallel=FROZEN_BF16),
]


@pytest.fixture(scope="module")
def runs(tok_dir, hf_dir, batch, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dist")
    torch.save(batch, root / "batch.pt")
    kwargs = dict(pattern=PATTERN, mtp_layers=2, init_seed=0)
    parts = {"lora": {"r": R, "alpha": 8.0}}
    # the reference: one process, whole batch, B set by name as the workers do (B != 0: real gradients of A)
    module = build_module(**{**tiny.tiny_kwargs(tok_dir, **kwargs), **config_from_dict(parts)})
    tiny.set_lora_b(module, 0.05)
    module.train()
    for m in module.modules():  # BatchNorm on running statistics, as the workers pin it
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    loss, summed, _ = module.compute_losses(batch)
    loss.backward()
    ref = {"grads": {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None},
           "loss": module.summarise(summed)["loss"], "weights": dict(module.named_parameters())}
    hf_parts = {**parts, "llm": {"path": os.path.join(hf_dir, "llm")}, "mtp": {"num_layers": None},
                "tokenizer_path": None}
    models = {"base": {"kwargs": kwargs, "parts": parts},
              "hf": {"kwargs": dict(init_seed=3), "parts": hf_parts}}
    spec = dict(tok_dir=tok_dir, models=models, batch=str(root / "batch.pt"), out=str(root), cases=CASES,
                hang_dump_s=200)
    (root / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           str(root / "spec.json")]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(WORKER)), capture_output=True, text=True,
                          timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    results = {c["name"]: torch.load(root / f"{c['name']}.pt", weights_only=False) for c in CASES}
    return ref, results, root


def ok(result: dict) -> dict:
    assert "error" not in result, result.get("traceback", result.get("error"))
    return result


def test_fsdp2_lora_gradients_equal_single_process(runs):
    ref, results, _ = runs
    r = ok(results["lora_fsdp2"])
    assert set(r["grads"]) == set(ref["grads"])
    assert any(is_adapter_param(n) for n in r["grads"])
    assert not any(n.startswith("llm.model.") and not is_adapter_param(n) for n in r["grads"])  # frozen base
    err = grad_error(r["grads"], ref["grads"])  # key biases' zero-in-theory gradients floored, as test_parallel does
    print(f"\nFSDP2 + LoRA: max per-parameter relative gradient difference {err['max_rel']:.2e} ({err['param']})")
    assert err["max_rel"] < 1e-5, err
    adapter_err = max(float((r["grads"][n] - g).norm() / g.norm()) for n, g in ref["grads"].items() if is_adapter_param(n))
    assert adapter_err < 1e-5  # A and B both carry real gradients (B != 0)
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert set(r["param_types"].values()) == {"DTensor"}  # adapters sharded with their blocks
    init = r["init_params"]
    assert all(torch.equal(init[n], ref["weights"][n].detach()) for n in ref["weights"])


def test_fsdp2_lora_sharded_checkpoint_loads_unsharded(runs):
    _, results, root = runs
    final = ok(results["lora_fsdp2"])["final_params"]
    module = load_sharded_checkpoint(str(root / "lora_fsdp2_ckpt"))
    assert module.cfg_lora.r == R and lora_layers(module)
    loaded = dict(module.named_parameters())
    assert set(loaded) == set(final)
    assert all(torch.equal(p.detach(), final[n]) for n, p in loaded.items())


def test_fsdp2_lora_precision_policy(runs):
    """Real-target dtypes: the LLM's base weights stay frozen in bf16, the adapters train as fp32 masters."""
    _, results, _ = runs
    r = ok(results["lora_fsdp2_bf16"])
    adapters = [n for n in r["dtypes"] if is_adapter_param(n)]
    assert adapters
    for n, dtype in r["dtypes"].items():
        if is_adapter_param(n):
            assert r["requires_grad"][n] and dtype == "torch.float32", (n, dtype)
        elif n.startswith("llm.model."):
            assert not r["requires_grad"][n] and dtype == "torch.bfloat16", (n, dtype)
    assert r["loss"] == r["loss"]  # a real step ran (not NaN)
