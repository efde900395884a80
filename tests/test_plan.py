"""salm_mtp.plan: its counts equal the module the trainer builds; its per-rank bytes equal an independent shard count.

The trainer's module comes from the real CLI (``SALMCLI(..., run=False)``: parse, instantiate, no fit), built on
meta; shards are counted with ``torch.chunk`` on meta tensors (what FSDP2 does on dim 0).
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist

from cli_run import run_cli
from salm_mtp.plan import build, planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "data", "configs")
SUPER_BACKBONE = 120_668_687_360  # docs/design.md §5: Super's published config built on meta with transformers 5.23
# demo with a frozen, bf16-stored LLM backbone, so trainable != total and two storage dtypes appear
DEMO = ["--config", "conf/demo.yaml", "--model.tokenizer_path=tests/tokenizer",
        "--model.freeze.patterns=[^llm\\.model\\.]", "--model.parallel.param_dtype=bfloat16",
        "--model.parallel.frozen_dtype=bfloat16"]
SUPER = ["--config", "conf/nemotron3_super.yaml", f"--model.llm.path={CONFIGS}/nemotron3_super_120b_a12b",
         f"--model.encoder.path={CONFIGS}/parakeet_ctc_1.1b"]


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' relative paths


def trainer_module(args: list[str], tmp_path, monkeypatch, extra: list[str] = ()):
    """The SALMModule that ``salm-mtp fit`` would build (on meta), through the real CLI without fitting."""
    from salm_mtp.trainer_cli import SALMCLI
    from salm_mtp.data.datamodule import SALMDataModule
    from salm_mtp.model import SALMModule

    monkeypatch.setattr(sys, "argv", ["salm-mtp"])  # LightningCLI warns when args and pytest's argv both exist
    args = [*args, *extra, f"--trainer.default_root_dir={tmp_path}", "--data.train_manifest=null",
            "--data.val_manifest=null", "--data.test_manifest=null"]
    cli = SALMCLI(SALMModule, SALMDataModule, parser_kwargs={"parser_mode": "omegaconf+"}, args=args, run=False,
                  auto_configure_optimizers=False)
    return cli.model


def shard_numel(p: torch.Tensor, n: int) -> int:
    """Rank 0's elements of ``p`` under FSDP2's dim-0 sharding over n ranks."""
    return torch.empty(p.shape, device="meta").chunk(n, dim=0)[0].numel()


@pytest.fixture(scope="module")
def demo_plan():
    return planner.make_plan([*DEMO, "--world_size", "2"])


@pytest.fixture(scope="module")
def super_plan():
    return planner.make_plan([*SUPER, "--world_size", "8"])


def test_demo_counts_equal_the_trainers_module(demo_plan, tmp_path, monkeypatch):
    from salm_mtp.parallel import apply_param_dtypes

    module = trainer_module(DEMO, tmp_path, monkeypatch)
    assert demo_plan["total_params"] == sum(p.numel() for p in module.parameters())
    module.apply_freeze()
    apply_param_dtypes(module)
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    assert 0 < demo_plan["trainable_params"] == sum(p.numel() for p in trainable) < demo_plan["total_params"]
    # per-rank bytes over 2 ranks from torch.chunk on the trainer's module
    r = demo_plan["per_rank"]
    assert r["params_bytes"] == sum(shard_numel(p, 2) * p.element_size() for p in params)
    assert r["grads_bytes"] == sum(shard_numel(p, 2) * 4 for p in trainable)
    assert r["optimizer_bytes"] == sum(shard_numel(p, 2) * 8 for p in trainable)
    frozen_bf16 = sum(shard_numel(p, 2) * 2 for p in params if not p.requires_grad and p.dtype == torch.bfloat16)
    assert r["params_by_kind"]["frozen/bfloat16"] == frozen_bf16 > 0
    parts = r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] + r["gathered_bytes"]
    assert r["total_bytes"] == parts + r["grad_buffer_bytes"] + r["activation_bytes"] + r["overhead_bytes"]


def test_world_size_changes_only_the_sharded_parts(demo_plan):
    one = planner.make_plan([*DEMO, "--world_size", "1"])
    r1, r2 = one["per_rank"], demo_plan["per_rank"]
    assert one["total_params"] == demo_plan["total_params"]
    assert r1["params_bytes"] == sum(r1["params_by_kind"].values())
    assert r2["params_bytes"] < r1["params_bytes"] <= 2 * r2["params_bytes"]  # ceil chunks: at most 2x
    assert r1["activation_bytes"] == r2["activation_bytes"]
    # the search's entry for 2 ranks is the plan for 2 ranks; the minimum is the first that fits
    assert next(s for s in demo_plan["search"] if s["world_size"] == 2)["total_bytes"] == r2["total_bytes"]
    budget = demo_plan["gpu_memory_gib"] * build.GIB
    fits = [s["world_size"] for s in demo_plan["search"] if s["total_bytes"] <= budget]
    assert demo_plan["min_world_size"] == fits[0] == 1


def test_planner_leaves_no_distributed_state():
    hook = sys.excepthook
    planner.make_plan([*DEMO, "--world_size", "3"])  # non-dividing world size: padded last shards
    assert not dist.is_initialized()
    assert sys.excepthook is hook


def test_activation_checkpointing_lowers_the_estimate(demo_plan):
    a = demo_plan["activations"]
    assert a["with_ac_bytes"] < a["without_ac_bytes"]
    assert a["llm_positions"] == a["audio_positions"] + a["text_tokens"]
    assert a["encoder_frames"] == 60 * 100 // 4  # 60 s, 10 ms hop, demo subsampling 4


def test_super_counts_equal_the_trainers_module(super_plan, tmp_path, monkeypatch):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cpu = ["--model.tokenizer_path=data/configs/tokenizer", "--trainer.accelerator=cpu", "--trainer.devices=1",
           "--trainer.strategy=auto"]
    module = trainer_module(SUPER, tmp_path, monkeypatch, cpu)
    assert super_plan["total_params"] == sum(p.numel() for p in module.parameters())
    module.apply_freeze()
    assert super_plan["trainable_params"] == sum(p.numel() for p in module.parameters() if p.requires_grad)
    # the LLM: the published backbone + the shipped MTP head ("*E": an attention and a MoE sublayer, enorm/hnorm,
    # eh_proj and final_layernorm), counted from transformers' own blocks
    config = NemotronHConfig.from_pretrained(os.path.join(CONFIGS, "nemotron3_super_120b_a12b"))
    with torch.device("meta"):
        llm = NemotronHForCausalLM(config)
    assert sum(p.numel() for p in llm.parameters()) == SUPER_BACKBONE
    kinds = list(config.layers_block_type)
    layer = {k: llm.model.layers[kinds.index(k)] for k in ("full_attention", "moe")}
    block = {k: sum(p.numel() for p in m.parameters()) for k, m in layer.items()}
    H = config.hidden_size
    head = block["full_attention"] + block["moe"] + 2 * H + 2 * H * H + H
    assert super_plan["params_by_part"]["llm"] == SUPER_BACKBONE
    assert super_plan["params_by_part"]["llm.mtp"] == head
    assert super_plan["params_by_part"]["llm"] + super_plan["params_by_part"]["llm.mtp"] == SUPER_BACKBONE + head


def test_super_plan_per_rank(super_plan):
    r = super_plan["per_rank"]
    frozen = super_plan["frozen_params"]
    # frozen LLM stored in bf16 over 8 ranks: within one row per tensor of frozen x 2 / 8
    assert frozen * 2 / 8 <= r["params_by_kind"]["frozen/bfloat16"] < frozen * 2 / 8 * 1.001
    assert r["grads_bytes"] * 2 == r["optimizer_bytes"]
    assert r["largest_unit"]["params"] >= 2.8e9  # a Super MoE block or the MTP head: ~3 B parameters in one group
    assert super_plan["min_world_size"] is None or super_plan["min_world_size"] > 8


def test_published_configs_build_to_their_sizes():
    from transformers import NemotronHConfig, NemotronHForCausalLM, ParakeetCTCConfig, ParakeetForCTC

    with torch.device("meta"):
        nano = NemotronHForCausalLM(NemotronHConfig.from_pretrained(os.path.join(CONFIGS, "nemotron3_nano_30b_a3b")))
        ctc = ParakeetForCTC(ParakeetCTCConfig.from_pretrained(os.path.join(CONFIGS, "parakeet_ctc_1.1b")))
    n = sum(p.numel() for p in nano.parameters())
    assert math.isclose(n, 31.6e9, rel_tol=2e-3), n  # "31.6B total parameters" (model card)
    assert list(nano.config.layers_block_type).count("moe") == 23 and nano.config.num_hidden_layers == 52
    e = sum(p.numel() for p in ctc.parameters())
    assert 1.0e9 < e < 1.1e9, e  # "parakeet-ctc-1.1b": FastConformer XXL, 42 layers, d_model 1024


def test_cli_writes_the_plan_json(tmp_path):
    out = tmp_path / "plan.json"
    run = run_cli(["plan", *DEMO, "--world_size", "2", "--out", str(out)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "smallest world size that fits" in run.stdout
    plan = json.loads(out.read_text())
    for key in ("total_params", "trainable_params", "world_size", "gpu_memory_gib", "fits", "min_world_size"):
        assert key in plan
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "total_bytes"):
        assert isinstance(plan["per_rank"][key], int)


def test_cli_help_lists_every_option_with_its_docstring(capsys):
    from salm_mtp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["plan", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--world_size", "--gpu_memory_gib", "--out", "--text_tokens_per_second", "--model.llm.path",
                   "--data.max_duration"):
        assert option in text
    assert "Local HF directory of a Nemotron-H checkpoint" in text  # field docstrings are the help


def test_encoder_activation_checkpointing_keeps_only_layer_inputs(demo_plan):
    """conf/demo.yaml, 60 s per rank (max_duration), bf16 compute (b = 2): F = 6000 mel frames, Fe = 1500 encoder frames (s = 4),
    He = 128, 4 layers, 4 heads, Tc = 20 s / 40 ms = 500: one layer saves Fe (44 He + 2 x 4 x Tc) = 14,448,000
    elements; with AC each layer keeps Fe He = 192,000 and one layer is recomputed."""
    parts = demo_plan["activations"]["parts_bytes"]
    layer, inputs = 1500 * (44 * 128 + 2 * 4 * 500), 1500 * 128
    assert layer == 14_448_000
    assert parts["encoder"] - parts["encoder_with_ac"] == (4 * layer - (4 * inputs + layer)) * 2


def test_hsdp_layouts_by_hand():
    """A rank of HSDP holds what FSDP2 over its shard group holds: per-rank GiB = 40 + 320 / S here, budget 80 GiB,
    so S >= 8 fits (80 GiB exactly), S = 4 does not (120)."""
    gib = 2**30

    def at(shard):
        return {"total_bytes": (40 + 320 / shard) * gib}

    layouts = planner.hsdp_layouts(at, 80 * gib, [4, 8, 16, 64], gpus_per_node=8)
    assert layouts[0] == {"gpus": 4, "nodes": 1, "gpus_per_node": 8, "replicate": None, "shard": None,
                          "total_bytes": None}
    assert [(lay["replicate"], lay["shard"], lay["nodes"]) for lay in layouts[1:]] == [(1, 8, 1), (2, 8, 2), (8, 8, 8)]
    assert layouts[1]["total_bytes"] == 80 * gib


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--world_size", "0", "error: --world_size: must be >= 1, got 0; pass --world_size 1 or more"),
    ("--gpu_memory_gib", "-80", "error: --gpu_memory_gib: must be > 0, got -80.0; pass a positive --gpu_memory_gib"),
])
def test_cli_bad_numbers_are_one_line(flag, value, expected):
    run = run_cli(["plan", *DEMO, flag, value])
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == expected


def test_cli_config_mistakes_inside_the_plan_are_one_line():
    """A check that runs while the planner builds the model (here the encoder's path) ends as one line too."""
    run = run_cli(["plan", *DEMO, "--world_size", "2", "--model.encoder.path=/nope/parakeet"])
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        "error: model.encoder.path='/nope/parakeet' has no config.json: point it at a local HF Parakeet directory")
