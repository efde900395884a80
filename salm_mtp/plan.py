"""Memory planner: per-rank bytes of a training config under the real FSDP2 plan, without weights or GPUs.

    salm-mtp plan --config conf/nemotron3_super.yaml --world_size 8 \\
        --model.llm.path=data/configs/nemotron3_super_120b_a12b --model.encoder.path=data/configs/parakeet_ctc_1.1b
    salm-mtp plan --config conf/nemotron3_nano_30b.yaml --world_size 8 --gpu_memory_gib 80 --out plan.json \\
        --model.llm.path=data/configs/nemotron3_nano_30b_a3b --model.encoder.path=data/configs/parakeet_ctc_1.1b
    salm-mtp plan --config conf/demo.yaml --model.tokenizer_path=tests/tokenizer --world_size 2

It parses the config like ``salm-mtp fit`` (``model:`` / ``data:`` sections, ``--model.*`` overrides), builds
the SALMModule on the meta device (config.json files only: seconds and < 1 GB RSS even for Super), applies
``model.freeze`` and ``model.parallel.frozen_dtype``, then the real FSDP2 plan of ``salm_mtp.parallel.shard_module``
over a fake process group of ``world_size`` ranks (no processes, no memory). It prints rank 0's view, which is
every rank's: FSDP2 shards dim 0 in ``ceil(d0 / N)``-row chunks, rank 0 holds the largest, and every rank's
shard is padded to that size.

Memory model per rank (bytes; N = data-parallel ranks; c = compute dtype = model.parallel.param_dtype, else the
storage dtype; r = reduce dtype):
    parameters    sum of local shards in their storage dtype (trainable fp32 masters, frozen frozen_dtype)
    gradients     trainable local elements x 4 (FSDP2 keeps sharded fp32 gradients of fp32 parameters)
    optimizer     trainable local elements x 8 (AdamW exp_avg + exp_avg_sq, fp32)
    all-gathered  root group (embeddings, norm_f, lm_head: gathered for the whole step, FSDP2 never reshards its
                  root) + ``prefetch_units`` (2: the unit running and the next one FSDP2 prefetches) x the largest
                  other group, each unsharded in c
    grad buffers  the largest group with trainable parameters, unsharded, in c (autograd's gradient) + in r (the
                  reduce-scatter input): the peak of one group's backward
    activations   the analytic estimate below, with or without activation checkpointing as configured
    overhead      ``overhead_gib`` (CUDA context, NCCL buffers, allocator fragmentation)
Parameters, gradients and optimizer state shrink with N; the rest does not (``data.max_duration`` is per rank),
so the smallest N that fits exists only when they fit the GPU on their own.

Activation model (bytes saved for backward; b = compute dtype size, fp32 parts at 4 bytes; an upper bound:
autograd skips some inputs of frozen linears). Checked per block type on CPU against saved-tensor hooks (attention,
MLP, MoE with and without latent within 2 %; Mamba2 from mamba_ssm's fused kernel, which saves its in_proj output
and scan output; the encoder with the GPU's memory-efficient SDPA instead of the CPU's math path).
Audio per rank: D = data.max_duration seconds; F = D / hop mel frames (hop = 10 ms); Fe = F / s encoder frames
(s = encoder subsampling_factor); A = Fe / k LLM audio positions (k = adapter.stack_frames); text tokens
Tt = D x ``text_tokens_per_second`` (transcript and prompt); T = A + Tt LLM positions.
    encoder       subsampling: F x C x M x (1/4 + 2/16 + 2/64 + 1/64 for s = 8) x b (conv stack outputs, C
                  channels, M mel bins); per conformer layer and frame 44 He x b (feed-forwards 12 each: norm in/out,
                  up 4, dropout mask and output; attention 11: norm in/out, relative keys 4, q+v, q+u/k/v/out;
                  conv module 8; final norm 1; He = encoder width) + 2 x heads x Tc x b for the relative-position
                  score bias (Tc = ``cut_seconds`` / (hop x s) frames per cut: the quadratic term); with
                  model.parallel.encoder_activation_checkpointing each layer keeps its input (Fe x He x b) and one
                  layer's tensors exist at a time (the one recomputed in backward)
    adapter       A x (k He + 2 Ha + H) x b
    LLM io        T x 4 H x b (merged and text embeddings, norm_f in and out)
    per block     norm 8 H + b H (RMSNorm works in fp32), plus per token:
                  *  attention  b (2 heads hd + 2 kv_heads hd) + 4 heads (q, output, k, v; fp32 logsumexp; SDPA
                                keeps no T x T matrix)
                  M  Mamba2     b (d_in_proj + d_inner) (the fused kernel's in_proj output and scan output)
                  E  MoE        4 (H + n_experts) (fp32 router input and logits) + top_k x (b (2 Lx + 2 I) + 4 Lx)
                                (dispatched input, up, relu2, expert output; fp32 weighted output; Lx =
                                moe_latent_size or H) + 2 b I_shared (+ 2 b L with a latent)
                  -  MLP        2 b I
    without AC    every block's internals are saved
    with AC       each backbone block keeps its input (T x H x b) and one block's internals exist at a time (the
                  one recomputed in backward): the sum of inputs + the largest block
    MTP head      per depth 8 H b (enorm, hnorm, concat, final norm) + its blocks' internals (never checkpointed)
    loss          per head (main + D depths) the gathered target rows Tt x H x b and their gradient (computed
                  in the forward, salm_mtp/linear_ce.py), one lm_head chunk min(lm_head_chunk_size, Tt) x V x
                  (b + 4) (logits, fp32 copy turned into the softmax gradient in place), and the lm_head's
                  fp32 gradient buffer V x H x 4 when the lm_head trains
    CTC head      Fe x classes x (b + 4 + 4), when model.ctc_weight > 0
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass

import torch

GIB = 1024**3
_ROOT = "<root>"
_STANDIN_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "data", "configs", "tokenizer")


# ------------------------------------------------------------------------------------------ parsing
@contextlib.contextmanager
def _attribute_docstrings():
    """Let jsonargparse read the config dataclasses' field docstrings (the --help texts), then restore its setting."""
    from jsonargparse import set_parsing_settings

    try:
        from jsonargparse._optionals import get_docstring_parse_options

        before = get_docstring_parse_options()["attribute_docstrings"]
    except (ImportError, KeyError):
        before = False
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        yield
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=before)


def build_parser():
    """The ``salm-mtp plan`` parser: the training config's sections plus the planner's options."""
    with _attribute_docstrings():
        return _build_parser()


def _build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from salm_mtp.data.datamodule import DataConfig
    from salm_mtp.model import SALMModule

    p = ArgumentParser(prog="salm-mtp plan", parser_mode="omegaconf+",
                       description="Per-rank memory of a training config under the FSDP2 plan (meta device).")
    p.add_argument("--config", action=ActionConfigFile, help="training YAML (conf/*.yaml), as for salm-mtp fit")
    p.add_class_arguments(SALMModule, "model", help="SALMModule arguments (the config's model: section)")
    # DataConfig holds SALMDataModule's arguments (same names and defaults) with a docstring per field
    p.add_class_arguments(DataConfig, "data", help="data arguments; data.max_duration sizes the activations")
    p.add_argument("--trainer", type=dict, default={},
                   help="the config's trainer: section; devices x num_nodes is the default world size")
    p.add_argument("--seed_everything", type=int | bool | None, default=None, help="read and ignored")
    p.add_argument("--world_size", type=int | None, default=None,
                   help="data-parallel ranks to plan for; null = trainer.devices x trainer.num_nodes")
    p.add_argument("--gpu_memory_gib", type=float, default=80.0, help="memory of one GPU in GiB")
    p.add_argument("--out", type=str | None, default=None, help="write the plan as JSON to this file")
    p.add_argument("--tokenizer", type=str | None, default=None,
                   help="tokenizer to use when model.tokenizer_path / model.llm.path hold none (planning from a bare "
                        "config.json); null = the stand-in data/configs/tokenizer. With model.llm.path set only the "
                        "audio placeholder and CTC class count depend on it")
    p.add_argument("--text_tokens_per_second", type=float, default=5.0,
                   help="text tokens (prompt + transcript) per second of audio in a batch")
    p.add_argument("--cut_seconds", type=float, default=20.0,
                   help="length of one cut: sets the encoder's quadratic attention-score term")
    p.add_argument("--overhead_gib", type=float, default=3.0,
                   help="fixed per-rank overhead in GiB (CUDA context, NCCL buffers, fragmentation)")
    p.add_argument("--prefetch_units", type=int, default=2,
                   help="non-root FSDP groups unsharded at once (the running one + the prefetched one)")
    p.add_argument("--max_world_size", type=int, default=1024,
                   help="largest world size tried when searching the smallest one that fits")
    p.add_argument("--gpus_per_node", type=int, default=8,
                   help="GPUs per node, for the HSDP layouts (nodes x GPUs; shard within a replica, replicate across)")
    p.add_argument("--layout_gpus", type=list[int], default=[8, 16, 32, 64],
                   help="total GPU counts for which the smallest-shard HSDP layout is printed")
    return p


def _has_tokenizer(path: str | None) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return path is not None and any(os.path.isfile(os.path.join(path, n)) for n in names)


def model_kwargs(cfg, tokenizer: str | None = None) -> tuple[dict, str | None]:
    """SALMModule keyword arguments from the parsed ``model`` section, and a note when a stand-in tokenizer is used.

    A config pointing model.llm.path at a bare config.json (data/configs/*) has no tokenizer; the LLM's vocabulary
    comes from config.json, so a stand-in tokenizer changes no parameter count (unless an inline encoder gets a
    CTC head sized by it).
    """
    from salm_mtp.salm import config_from_dict

    kw = config_from_dict(cfg.model.as_dict())
    tok = kw.get("tokenizer_path") or kw["llm"].path
    if _has_tokenizer(tok):
        return kw, None
    if kw["llm"].path is None:
        raise FileNotFoundError(
            f"model.tokenizer_path={kw.get('tokenizer_path')!r} holds no tokenizer and model.llm.path is null: the "
            "inline LLM's vocabulary is the tokenizer's size. Set --model.tokenizer_path (e.g. tests/tokenizer or "
            "data/demo/tokenizer)"
        )
    kw["tokenizer_path"] = tokenizer or os.path.relpath(_STANDIN_TOKENIZER)
    return kw, f"no tokenizer at {tok!r}: using {kw['tokenizer_path']!r} (the vocabulary comes from config.json)"


def build_module(kwargs: dict):
    """The SALMModule of ``kwargs`` on meta, frozen and cast as configure_model would before sharding."""
    from salm_mtp.model import SALMModule
    from salm_mtp.parallel import apply_param_dtypes

    module = SALMModule(**kwargs)
    module.apply_freeze()
    apply_param_dtypes(module)
    return module


# ----------------------------------------------------------------------------------------- sharding
@contextlib.contextmanager
def fake_data_parallel(world_size: int):
    """A ``data_parallel`` device mesh over a fake process group of ``world_size`` ranks (this process is rank 0).

    No process is started and collectives are no-ops: enough for ``fully_shard`` on meta parameters. The group
    is destroyed on exit, so the planner leaves no distributed state behind.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}; set --world_size")
    if dist.is_initialized():
        raise RuntimeError("salm-mtp plan needs its own fake process group: run it outside torch.distributed")
    hook = sys.excepthook  # init_process_group installs a rank-prefixing one that destroy_process_group keeps
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


@dataclass
class ParamRecord:
    """One parameter as FSDP2 sharded it."""

    name: str
    shape: tuple[int, ...]
    """Global (unsharded) shape."""
    dtype: torch.dtype
    """Storage dtype."""
    trainable: bool
    group: str
    """FSDP group (module name; ``<root>`` for the SALMModule)."""
    compute_dtype: torch.dtype
    """Dtype the group all-gathers it in (its MixedPrecisionPolicy.param_dtype, else the storage dtype)."""

    def local_numel(self, n: int) -> int:
        """Elements of rank 0's shard (= every rank's padded shard) over ``n`` ranks: ceil(d0 / n) rows."""
        if not self.shape:
            return 1
        return math.ceil(self.shape[0] / n) * math.prod(self.shape[1:])

    def gathered_numel(self, n: int) -> int:
        """Elements of the unsharded all-gather output over ``n`` ranks (padded to n equal shards)."""
        return self.local_numel(n) * n


def _group_policy_dtype(fsdp_module, default: torch.dtype | None) -> torch.dtype | None:
    state = fsdp_module._get_fsdp_state()  # FSDP2 internals; falls back to the config's param_dtype
    group = getattr(state, "_fsdp_param_group", None)
    policy = getattr(group, "mp_policy", None) or getattr(state, "_mp_policy", None)
    return policy.param_dtype if policy is not None else default


def shard_records(module, world_size: int) -> tuple[list[ParamRecord], list[str]]:
    """Shard ``module`` (on meta) with the real plan over a fake group; returns its parameters and group names.

    Checks that rank 0's local shapes match ``ParamRecord.local_numel`` (dim-0 chunks), which the planner then
    uses for any other world size.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from salm_mtp.parallel import _dtype, check_parallel_config, shard_module

    check_parallel_config(module)
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # shard_module logs one line per group
    try:
        with fake_data_parallel(world_size) as mesh:
            shard_module(module, mesh["data_parallel"])
            default = _dtype(module.cfg_parallel.param_dtype)
            groups = {name: _group_policy_dtype(m, default) for name, m in module.named_modules()
                      if isinstance(m, FSDPModule)}
            records = []
            for name, p in module.named_parameters():
                owner = max((g for g in groups if g == "" or name.startswith(g + ".")), key=len)
                cdt = groups[owner] if groups[owner] is not None and p.dtype.is_floating_point else p.dtype
                rec = ParamRecord(name, tuple(p.shape), p.dtype, p.requires_grad, owner or _ROOT, cdt)
                local = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                if local != rec.local_numel(world_size):
                    raise RuntimeError(f"{name}: FSDP2 gave rank 0 {local} elements, the planner expected "
                                       f"{rec.local_numel(world_size)} (dim-0 chunks); salm_mtp.plan needs updating")
                records.append(rec)
    finally:
        quiet.setLevel(level)
    return records, [g or _ROOT for g in groups]


# ------------------------------------------------------------------------------------ bytes per rank
def group_sizes(records: list[ParamRecord], n: int, reduce_dtype: torch.dtype | None) -> dict[str, dict]:
    """Per FSDP group: parameters, unsharded all-gather bytes and the backward gradient-buffer peak over n ranks."""
    out: dict[str, dict] = {}
    for r in records:
        g = out.setdefault(r.group, {"params": 0, "gathered_bytes": 0, "grad_buffer_bytes": 0, "trainable": False})
        g["params"] += math.prod(r.shape)
        g["gathered_bytes"] += r.gathered_numel(n) * r.compute_dtype.itemsize
        if r.trainable:  # autograd's unsharded gradient + the reduce-scatter input
            g["trainable"] = True
            reduce_size = (reduce_dtype or r.compute_dtype).itemsize
            g["grad_buffer_bytes"] += r.gathered_numel(n) * (r.compute_dtype.itemsize + reduce_size)
    return out


def per_rank(records: list[ParamRecord], n: int, reduce_dtype: torch.dtype | None, activation_bytes: int,
             overhead_bytes: int, prefetch_units: int) -> dict:
    """Rank 0's bytes over ``n`` ranks (module docstring: the memory model)."""
    by_kind: dict[str, int] = {}
    params = grads = optim = 0
    for r in records:
        local = r.local_numel(n)
        b = local * r.dtype.itemsize
        key = f"{'trainable' if r.trainable else 'frozen'}/{str(r.dtype).removeprefix('torch.')}"
        by_kind[key] = by_kind.get(key, 0) + b
        params += b
        if r.trainable:
            grads += b  # sharded gradient in the parameter's dtype (fp32 masters)
            optim += 2 * b  # AdamW exp_avg, exp_avg_sq
    groups = group_sizes(records, n, reduce_dtype)
    root = groups.get(_ROOT, {"gathered_bytes": 0})["gathered_bytes"]
    others = [(k, g) for k, g in groups.items() if k != _ROOT]
    largest_name, largest = max(others, key=lambda kv: kv[1]["gathered_bytes"], default=(None, {"gathered_bytes": 0}))
    trainable = [(k, g) for k, g in groups.items() if g["trainable"]]
    grad_name, grad_group = max(trainable, key=lambda kv: kv[1]["grad_buffer_bytes"],
                                default=(None, {"grad_buffer_bytes": 0}))
    gathered = root + prefetch_units * largest["gathered_bytes"]
    total = params + grads + optim + gathered + grad_group["grad_buffer_bytes"] + activation_bytes + overhead_bytes
    return {
        "params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optim,
        "params_by_kind": dict(sorted(by_kind.items())),
        "gathered_bytes": gathered, "root_gathered_bytes": root,
        "largest_unit": {"name": largest_name, "params": largest.get("params", 0),
                         "gathered_bytes": largest["gathered_bytes"]},
        "grad_buffer_bytes": grad_group["grad_buffer_bytes"], "grad_buffer_unit": grad_name,
        "activation_bytes": activation_bytes, "overhead_bytes": overhead_bytes, "total_bytes": total,
    }


def candidate_world_sizes(limit: int) -> list[int]:
    """Powers of two and multiples of 8 up to ``limit``, ascending."""
    powers = {2**i for i in range(int(math.log2(max(limit, 1))) + 1)}
    return sorted(powers | set(range(8, limit + 1, 8)))


# ------------------------------------------------------------------------------------- activations
def block_bytes(kind: str, c, b: int) -> int:
    """Bytes per token saved inside one Nemotron-H block of type ``kind`` (module docstring), its norm included.

    ``c`` is the NemotronHConfig, ``b`` the compute dtype's size (fp32 parts are counted at 4 bytes).
    """
    H = c.hidden_size
    norm = 8 * H + b * H  # NemotronHRMSNorm works in fp32: input copy and normalized (fp32), output (b)
    if kind == "full_attention":
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        inner = b * (2 * q + 2 * kv) + 4 * c.num_attention_heads  # q, out, k, v; fp32 logsumexp
    elif kind == "linear_attention":
        d_inner = c.mamba_num_heads * c.mamba_head_dim
        d_in_proj = 2 * d_inner + 2 * c.n_groups * c.ssm_state_size + c.mamba_num_heads
        inner = b * (d_in_proj + d_inner) + 4 * c.n_groups  # mamba_split_conv1d_scan_combined: zxbcdt, out_x, rstd
    elif kind == "moe":
        lat = c.moe_latent_size
        lx = lat or H
        per_choice = b * (2 * lx + 2 * c.moe_intermediate_size) + 4 * lx  # input, up, relu2, output; fp32 product
        inner = (4 * (H + c.n_routed_experts)  # router: fp32 input copy and logits
                 + c.num_experts_per_tok * per_choice
                 + b * 2 * c.moe_shared_expert_intermediate_size + (b * 2 * lat if lat else 0))
    elif kind == "mlp":
        inner = b * 2 * c.intermediate_size
    else:
        raise ValueError(f"unknown Nemotron-H block type {kind!r}")
    return norm + inner


def activation_estimate(module, max_duration: float, text_tokens_per_second: float, cut_seconds: float) -> dict:
    """Analytic activation bytes of one rank's batch, with and without activation checkpointing (module docstring)."""
    from salm_mtp.parallel import _dtype

    par = module.cfg_parallel
    b = (_dtype(par.param_dtype) or torch.float32).itemsize
    feat = module.features.config
    enc = module.audio.encoder.config
    llm = module.llm.config
    k = module.adapter.k
    hop = feat.hop_length / feat.sample_rate
    F = max_duration / hop
    Fe = F / enc.subsampling_factor
    A = Fe / k
    Tt = max_duration * text_tokens_per_second
    T = A + Tt
    Tc = cut_seconds / (hop * enc.subsampling_factor)
    He, H = enc.hidden_size, llm.hidden_size
    stages = int(math.log2(enc.subsampling_factor))
    # stage 1 keeps its ReLU output, later stages their depthwise and ReLU outputs; + the final linear's input
    stage_sum = sum((1 if i == 1 else 2) / 4**i for i in range(1, stages + 1)) + 1 / 4**stages
    sub = F * enc.subsampling_conv_channels * feat.n_mels * stage_sum
    layer = Fe * (44 * He + 2 * enc.num_attention_heads * Tc)  # one Conformer layer's saved tensors (elements)
    encoder = (sub + enc.num_hidden_layers * layer) * b
    # encoder_activation_checkpointing: each layer keeps its input; one layer is recomputed at a time in backward
    encoder_ac = (sub + enc.num_hidden_layers * Fe * He + layer) * b
    if module.audio.ctc_head is not None:
        encoder += Fe * module.audio.ctc_head.out_channels * (b + 8)
        encoder_ac += Fe * module.audio.ctc_head.out_channels * (b + 8)
    ha = module.adapter.proj[0].out_features
    adapter = A * (k * He + 2 * ha + H) * b
    io = T * 4 * H * b
    kinds = list(llm.layers_block_type)
    per_kind = {kind: block_bytes(kind, llm, b) for kind in set(kinds)}  # bytes per token
    blocks_no_ac = sum(T * per_kind[kind] for kind in kinds)
    blocks_ac = len(kinds) * T * H * b + T * max(per_kind.values())  # inputs + the block recomputed in backward
    head = module.mtp_head
    mtp = 0.0
    for d in range(1, module.num_mtp_depths + 1):
        mtp += T * (8 * H * b + sum(block_bytes(blk.block_type, llm, b) for blk in head.depth_blocks(d)))
    rows = min(module.lm_head_chunk_size, Tt)
    w = module.llm.lm_head.weight
    grad_buffer = w.numel() * 4 if w.requires_grad else 0  # linear_ce's fp32 dW, forward to backward
    loss = 2 * (1 + module.num_mtp_depths) * Tt * H * b + rows * llm.vocab_size * (b + 4) + grad_buffer
    common = encoder + adapter + io + mtp + loss
    counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    return {
        "assumptions": {"max_duration_s": max_duration, "text_tokens_per_second": text_tokens_per_second,
                        "cut_seconds": cut_seconds, "hop_s": hop, "compute_bytes": b},
        "mel_frames": int(F), "encoder_frames": int(Fe), "audio_positions": int(A), "text_tokens": int(Tt),
        "llm_positions": int(T), "blocks": counts,
        "per_token_block_bytes": {kind: per_kind[kind] for kind in sorted(per_kind)},
        "parts_bytes": {"encoder": int(encoder), "encoder_with_ac": int(encoder_ac), "adapter": int(adapter),
                        "llm_io": int(io),
                        "backbone_without_ac": int(blocks_no_ac), "backbone_with_ac": int(blocks_ac),
                        "mtp_head": int(mtp), "loss": int(loss)},
        "without_ac_bytes": int(common + blocks_no_ac),
        "with_ac_bytes": int(common + blocks_ac),
    }


# -------------------------------------------------------------------------------------------- plan
def _part(name: str) -> str:
    if ".lora_A." in name or ".lora_B." in name:  # LoRA adapters (model.lora), counted apart from their base
        return "llm.mtp.lora" if name.startswith("llm.mtp.") else "llm.lora"
    if name.startswith("llm.mtp."):
        return "llm.mtp"
    return "llm" if name.startswith("llm.") else name.split(".", 1)[0]


def _world_size(opts, trainer: dict) -> int:
    if opts.world_size is not None:
        return opts.world_size
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if not isinstance(devices, int) or not isinstance(nodes, int):
        raise ValueError(f"trainer.devices={devices!r} is not a number of GPUs: set --world_size")
    return devices * nodes


def _config_files(argv: list[str]) -> list[str]:
    """The --config files named in ``argv`` (the parsed namespace does not keep them in omegaconf+ mode)."""
    out = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return out + [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]


def hsdp_layouts(at, budget: float, gpus: list[int], gpus_per_node: int) -> list[dict]:
    """For each total GPU count N: the HSDP layout with the smallest shard group S (S divides N) whose per-rank
    memory fits ``budget``, as replicas x shards and nodes x GPUs. A rank of HSDP holds what a rank of FSDP2 over
    S ranks holds (the replicas only all-reduce gradients), so its memory is ``at(S)``; None where no S fits."""
    out = []
    for total in gpus:
        found = None
        for shard in (d for d in range(1, total + 1) if total % d == 0):
            r = at(shard)
            if r["total_bytes"] <= budget:
                found = {"gpus": total, "nodes": math.ceil(total / gpus_per_node), "gpus_per_node": gpus_per_node,
                         "replicate": total // shard, "shard": shard, "total_bytes": r["total_bytes"]}
                break
        out.append(found or {"gpus": total, "nodes": math.ceil(total / gpus_per_node), "gpus_per_node": gpus_per_node,
                             "replicate": None, "shard": None, "total_bytes": None})
    return out


def make_plan(args: list[str]) -> dict:
    """Parse ``args`` as ``salm-mtp plan`` does and plan; returns the plan (the JSON that --out writes)."""
    return plan_from_config(build_parser().parse_args(list(args)), _config_files(list(args)))


def plan_from_config(cfg, config_files: list[str] | None = None) -> dict:
    """Build, shard and count the parsed config ``cfg`` (a ``build_parser()`` namespace)."""
    from salm_mtp.parallel import LOW_PRECISION_TRUE, _dtype

    trainer = dict(cfg.trainer or {})
    n = _world_size(cfg, trainer)
    kwargs, note = model_kwargs(cfg, cfg.tokenizer)
    notes = [note] if note else []
    module = build_module(kwargs)
    records, groups = shard_records(module, n)
    par = module.cfg_parallel
    precision = str(trainer.get("precision", "32-true"))
    if precision in LOW_PRECISION_TRUE:
        notes.append(f"trainer.precision={precision}: training refuses it (salm_mtp.parallel.check_precision); planned "
                     "as 32-true with model.parallel dtypes")
    if par.frozen_dtype not in (None, "float32") and par.param_dtype != par.frozen_dtype:
        notes.append(f"model.parallel.frozen_dtype={par.frozen_dtype} with param_dtype={par.param_dtype}: FSDP2 training "
                     f"refuses it (one compute dtype per group); set --model.parallel.param_dtype={par.frozen_dtype}")
    acts = activation_estimate(module, cfg.data.max_duration, cfg.text_tokens_per_second, cfg.cut_seconds)
    act = acts["with_ac_bytes"] if par.activation_checkpointing else acts["without_ac_bytes"]
    if par.encoder_activation_checkpointing:
        act -= acts["parts_bytes"]["encoder"] - acts["parts_bytes"]["encoder_with_ac"]
    overhead = int(cfg.overhead_gib * GIB)
    budget = cfg.gpu_memory_gib * GIB
    reduce_dtype = _dtype(par.reduce_dtype)

    def at(world: int) -> dict:
        return per_rank(records, world, reduce_dtype, act, overhead, cfg.prefetch_units)

    if cfg.gpus_per_node < 1:
        raise ValueError(f"--gpus_per_node must be >= 1, got {cfg.gpus_per_node}")
    rank = at(n)
    layouts = hsdp_layouts(at, budget, cfg.layout_gpus, cfg.gpus_per_node)
    search = [{"world_size": w, "total_bytes": at(w)["total_bytes"]} for w in candidate_world_sizes(cfg.max_world_size)]
    fitting = [s["world_size"] for s in search if s["total_bytes"] <= budget]
    by_part: dict[str, int] = {}
    for r in records:
        by_part[_part(r.name)] = by_part.get(_part(r.name), 0) + math.prod(r.shape)
    total = sum(math.prod(r.shape) for r in records)
    trainable = sum(math.prod(r.shape) for r in records if r.trainable)
    return {
        "config": config_files or [],
        "world_size": n, "rank": 0, "gpu_memory_gib": cfg.gpu_memory_gib,
        "total_params": total, "trainable_params": trainable, "frozen_params": total - trainable,
        "params_by_part": by_part,
        "precision": {"param_dtype": par.param_dtype, "reduce_dtype": par.reduce_dtype,
                      "frozen_dtype": par.frozen_dtype, "activation_checkpointing": par.activation_checkpointing,
                      "encoder_activation_checkpointing": par.encoder_activation_checkpointing,
                      "trainer.precision": precision},
        "per_rank": rank, "fits": rank["total_bytes"] <= budget,
        "min_world_size": fitting[0] if fitting else None,
        "min_world_size_per_rank": at(fitting[0]) if fitting else None,
        "activations": acts,
        "fsdp_groups": {k: v for k, v in sorted(group_sizes(records, n, reduce_dtype).items(),
                                                key=lambda kv: -kv[1]["gathered_bytes"])},
        "num_fsdp_groups": len(groups),
        "search": search,
        "hsdp_layouts": layouts,
        "assumptions": {"prefetch_units": cfg.prefetch_units, "overhead_gib": cfg.overhead_gib,
                        "optimizer": "AdamW, 2 fp32 states per trainable element",
                        "rank": "rank 0 (largest dim-0 chunk; FSDP2 pads every rank's shard to it)"},
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------ output
def _g(b: float) -> str:
    return f"{b / GIB:9.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_plan(plan: dict) -> str:
    """The plan as a readable table (GiB = 2**30 bytes)."""
    r, a, pr = plan["per_rank"], plan["activations"], plan["precision"]
    ac = pr["activation_checkpointing"]
    lu = r["largest_unit"]
    k = plan["assumptions"]["prefetch_units"]
    compute = pr["param_dtype"] or "float32"
    reduce = pr["reduce_dtype"] or compute
    other_ac = a["without_ac_bytes"] if ac else a["with_ac_bytes"]
    budget = plan["gpu_memory_gib"]
    rows = [(f"parameters  {kind.replace('/', ' ')}", b, "") for kind, b in r["params_by_kind"].items()]
    rows += [
        ("gradients   trainable, sharded", r["grads_bytes"], ""),
        ("optimizer   AdamW exp_avg + exp_avg_sq", r["optimizer_bytes"], ""),
        (f"all-gather  root + {k} x largest unit ({compute})", r["gathered_bytes"],
         f"root {_g(r['root_gathered_bytes']).strip()}; largest {lu['name']} ({_count(lu['params'])} params)"),
        ("grad peak   one trainable unit, unsharded", r["grad_buffer_bytes"],
         f"{r['grad_buffer_unit']}: {compute} grads + {reduce} reduce-scatter input"),
        (f"activations AC {'on' if ac else 'off'}", r["activation_bytes"],
         f"AC {'off' if ac else 'on'}: {_g(other_ac).strip()}"),
        ("overhead    CUDA context, NCCL, fragmentation", r["overhead_bytes"], ""),
        ("total", r["total_bytes"], f"of {budget:g} GiB: {'fits' if plan['fits'] else 'does NOT fit'}"),
    ]
    parts = " | ".join(f"{name} {_count(v)}" for name, v in plan["params_by_part"].items())
    lines = [
        f"salm-mtp plan: {' '.join(plan['config']) or '(no config file)'}",
        f"  {plan['world_size']} data-parallel ranks, FSDP2 ({plan['num_fsdp_groups']} groups); rank 0 shown: the "
        "largest shard, every rank's is padded to it",
        f"  parameters {plan['total_params']:,} = trainable {plan['trainable_params']:,} + frozen "
        f"{plan['frozen_params']:,}",
        f"    {parts}",
        f"  model.parallel: param_dtype {pr['param_dtype']}, reduce_dtype {pr['reduce_dtype']}, frozen_dtype "
        f"{pr['frozen_dtype']}, activation_checkpointing {ac}, encoder_activation_checkpointing "
        f"{pr.get('encoder_activation_checkpointing')}; trainer.precision {pr['trainer.precision']}",
        "",
        f"  {'per rank':<46}{'GiB':>9}",
    ]
    lines += [f"  {label:<46}{_g(b)}   {detail}".rstrip() for label, b, detail in rows]
    lines += [
        "",
        f"  activations: {a['assumptions']['max_duration_s']:g} s of audio per rank = {a['mel_frames']:,} mel frames "
        f"-> {a['encoder_frames']:,} encoder frames -> {a['audio_positions']:,} audio + {a['text_tokens']:,} text "
        f"({a['assumptions']['text_tokens_per_second']:g}/s) = {a['llm_positions']:,} LLM positions",
        "    " + ", ".join(f"{name} {_g(v).strip()}" for name, v in a["parts_bytes"].items()) + " GiB",
    ]
    m = plan["min_world_size"]
    if m is None:
        floor = r["gathered_bytes"] + r["grad_buffer_bytes"] + r["activation_bytes"] + r["overhead_bytes"]
        lines.append(f"  no world size up to {plan['search'][-1]['world_size']} fits {budget:g} GiB: what does not "
                     f"shrink with N (all-gather, grad peak, activations, overhead) is {_g(floor).strip()} GiB; lower "
                     "data.max_duration or train fewer parameters")
    else:
        lines.append(f"  smallest world size that fits {budget:g} GiB: {m} "
                     f"({_g(plan['min_world_size_per_rank']['total_bytes']).strip()} GiB per rank)")
    layouts = plan.get("hsdp_layouts") or []
    if layouts:
        lines.append(f"  HSDP layouts (shard within a replica, replicate across; {budget:g} GiB per GPU):")
        for lay in layouts:
            where = f"{lay['nodes']} node{'s' if lay['nodes'] > 1 else ''} x {lay['gpus_per_node']} GPUs"
            if lay["shard"] is None:
                lines.append(f"    {lay['gpus']:>5} GPUs ({where}): no shard size fits")
            else:
                lines.append(f"    {lay['gpus']:>5} GPUs ({where}): replicate {lay['replicate']} x shard {lay['shard']}, "
                             f"{_g(lay['total_bytes']).strip()} GiB per rank")
    lines += [f"  note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> dict:
    """``salm-mtp plan``: print the table, write --out; returns the plan."""
    argv = sys.argv[1:] if args is None else list(args)
    cfg = build_parser().parse_args(argv)
    plan = plan_from_config(cfg, _config_files(argv))
    print(format_plan(plan))
    out = cfg.out
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(plan, f, indent=1)
        print(f"  plan written to {out}")
    return plan


if __name__ == "__main__":
    main()
