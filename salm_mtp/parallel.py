"""Data-parallel facts the loss needs, and the FSDP2 sharding plan (docs/design.md §3-4).

Under Lightning's ``ModelParallelStrategy`` ``SALMModule.configure_model()`` calls
:func:`apply_parallelism`, which shards the module with ``torch.distributed.fsdp.fully_shard`` over
the mesh's ``data_parallel`` dimension, bottom-up::

    llm.model.layers[i]   one group per backbone block (class named in llm._no_split_modules)
    audio.encoder.layers[i]  one group per Conformer layer (with a low param_dtype each BatchNorm first gets
                          its own fp32 group); encoder_activation_checkpointing recomputes each in backward
    audio.encoder         the rest of the conformer (subsampling, positions; its CTC head, if any, stays in
                          the root group)
    adapter
    llm.mtp               the MTP head, its own group (never folded into the LLM's)
    <the SALMModule>      root: what is left (embeddings, norm_f, lm_head, CTC head)

Why the root is the LightningModule itself: the step never calls ``llm.forward`` (it embeds the
prompt, runs ``llm.model`` and applies ``lm_head.weight`` in the chunked loss), so a group rooted at
``llm`` would never be all-gathered. The leftovers live in the SALMModule's group instead, and the
Lightning step methods are registered as FSDP forward methods: each step all-gathers the root
group once, keeps it gathered until backward (FSDP2 never reshards its root after forward), and
reduce-scatters its gradients at the end of backward, after the embedding gradient exists. (The
backbone call ``self(inputs_embeds)`` inside the step re-enters the root's hooks: FSDP2 treats a
group that is already in its forward as gathered and registers nothing twice.)

Gradients: FSDP2 and DDP average over dp ranks; the loss multiplies by dp_size (loss.py), so the
gradient equals that of the global-batch token mean (tests/test_parallel.py checks it to 1e-5).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
"""Entry points of a Lightning step: each runs as a forward of the FSDP2 root."""


def data_parallel(trainer) -> tuple[int, object | None]:
    """(dp_size, process group) of the data-parallel dimension; (1, None) outside distributed runs.

    Under ModelParallelStrategy the group is the device mesh's ``data_parallel`` dimension (tensor-
    parallel peers hold the same batch); under DDP (and any other strategy) it is the whole world
    (group None = WORLD).
    """
    if trainer is None or not (dist.is_available() and dist.is_initialized()):
        return 1, None
    from salm_mtp.mesh import trainer_dp_mesh

    sub = trainer_dp_mesh(trainer)
    if sub is not None:
        return sub.size(), sub.get_group()
    return dist.get_world_size(), None


def all_reduce_sum(t: torch.Tensor, trainer) -> torch.Tensor:
    """Sum ``t`` over the data-parallel group (a no-op in single-process runs); returns a new tensor."""
    size, group = data_parallel(trainer)
    t = t.detach().clone()
    if size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


# ---------------------------------------------------------------------------------------- checks
def check_parallel_config(module, tensor_parallel_size: int | None = None) -> None:
    """Refuse parallel layouts the model cannot run; errors name the key to change.

    ``tensor_parallel_size`` is the strategy's own (its mesh), checked alongside the config's.
    """
    cfg = module.cfg_parallel
    tp = max(cfg.tensor_parallel_size, tensor_parallel_size or 1)
    pp = cfg.pipeline_parallel_size
    for key, size, what in (("tensor_parallel_size", tp, "tensor"), ("pipeline_parallel_size", pp, "pipeline")):
        if size <= 1:
            continue
        if module.mtp_enabled:
            raise ValueError(
                f"model.parallel.{key}={size} with an MTP head (model.mtp.num_layers={module.num_mtp_depths}): "
                f"{what} parallelism with MTP is not supported (the head needs the full hidden state of every "
                f"position{' and the last pipeline stage would own it' if what == 'pipeline' else ''}). "
                f"Set --model.parallel.{key}=1 (and the strategy's {key}=1), or --model.mtp.num_layers=0"
            )
        raise ValueError(
            f"model.parallel.{key}={size}: {what} parallelism is not implemented by salm_mtp.parallel "
            f"(FSDP2 data parallel only); set --model.parallel.{key}=1 (and the strategy's {key}=1)"
        )


def check_layerdrop(module) -> None:
    """Layerdrop makes ranks skip different encoder blocks: FSDP2's collectives would then mismatch."""
    p = float(getattr(module.audio.encoder, "layerdrop", 0.0) or 0.0)
    if p > 0:
        raise ValueError(
            f"model.encoder.layerdrop={p} under FSDP2: each rank would skip different encoder blocks, so their "
            "all-gathers and reduce-scatters would not match. Set --model.encoder.layerdrop=0"
        )


# ------------------------------------------------------------------------------- precision
LOW_PRECISION_TRUE = ("bf16-true", "16-true", "bf16", "16", "half", "transformer-engine")


def check_precision(module, trainer) -> None:
    """Refuse precision settings that would round what must stay fp32; errors name the keys.

    Lightning's ``*-true`` precisions cast every parameter and buffer after configure_model: the MoE
    routers' ``e_score_correction_bias`` (fp32 in the checkpoint: 1.000..1.003 all become 1.0 in bf16,
    routing changes), the trainable master weights (bf16 drops lr-sized updates) and the feature buffers.
    """
    precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
    cfg = module.cfg_parallel
    if precision in LOW_PRECISION_TRUE:
        raise ValueError(
            f"trainer.precision={precision} casts every tensor of the model to low precision after configure_model: "
            "the MoE routers' fp32 e_score_correction_bias would be rounded (routing no longer matches the released "
            "model) and trainable master weights would drop small updates. Set --trainer.precision=32-true with "
            "--model.parallel.param_dtype=bfloat16 --model.parallel.reduce_dtype=float32 (FSDP2 bf16 compute over "
            "fp32 master weights) and --model.parallel.frozen_dtype=bfloat16 to store frozen weights in bf16"
        )
    if cfg.frozen_dtype not in (None, "float32"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        fsdp = trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)
        if fsdp and cfg.param_dtype != cfg.frozen_dtype:
            raise ValueError(
                f"model.parallel.frozen_dtype={cfg.frozen_dtype} needs model.parallel.param_dtype={cfg.frozen_dtype} "
                f"(got {cfg.param_dtype}): FSDP2 computes a group in one dtype; set --model.parallel.param_dtype="
                f"{cfg.frozen_dtype} or --model.parallel.frozen_dtype=null"
            )
        if trainer is not None and not fsdp and not precision.endswith("-mixed"):
            raise ValueError(
                f"model.parallel.frozen_dtype={cfg.frozen_dtype} without FSDP2 needs autocast: set "
                f"--trainer.precision=bf16-mixed, use ModelParallelStrategy with model.parallel.param_dtype, or "
                "--model.parallel.frozen_dtype=null"
            )


def keep_fp32(module) -> set[str]:
    """Names of tensors that stay fp32 in every mode: those matching the LLM's ``_keep_in_fp32_modules_strict``."""
    keys = set(getattr(module.llm, "_keep_in_fp32_modules_strict", None) or ())
    return {n for n, _ in [*module.named_parameters(), *module.named_buffers()] if any(k in n for k in keys)}


def apply_param_dtypes(module) -> list[str]:
    """Store frozen parameters in ``model.parallel.frozen_dtype`` (on meta, before sharding); returns their names.

    Trainable parameters stay fp32 (master weights, sharded; FSDP2's param_dtype casts them for compute
    only); tensors in :func:`keep_fp32` and all buffers are never cast.
    """
    dtype = _dtype(module.cfg_parallel.frozen_dtype)
    if dtype in (None, torch.float32):
        return []
    keep = keep_fp32(module)
    changed = []
    for name, p in module.named_parameters():
        if not p.requires_grad and name not in keep and p.dtype != dtype:
            p.data = p.data.to(dtype)
            changed.append(name)
    return changed


def broadcast_seed(seed: int | None) -> int:
    """``seed`` or, if null, this process's global torch seed, taken from rank 0 when distributed."""
    value = torch.tensor((torch.initial_seed() if seed is None else seed) % (2**63 - 1), dtype=torch.int64)
    if seed is None and dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        value = value.to(device)
        dist.broadcast(value, src=0)
    return int(value)


# ------------------------------------------------------------------------------------ the plan
def _info(msg: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"[salm_mtp.parallel] {msg}")


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _already_sharded(m: nn.Module) -> bool:
    """Whether ``m`` is an FSDPModule, or every one of its parameters already belongs to an FSDP group."""
    from torch.distributed.fsdp import FSDPModule

    params = list(m.parameters())
    return isinstance(m, FSDPModule) or (bool(params) and all(isinstance(p, DTensor) for p in params))


def backbone_blocks(llm) -> list[tuple[str, nn.Module]]:
    """(name, block) of the backbone blocks: modules of ``llm.model.layers`` whose class is in ``_no_split_modules``."""
    names = set(getattr(llm, "_no_split_modules", None) or ())
    blocks = [(f"llm.model.layers.{i}", b) for i, b in enumerate(llm.model.layers) if type(b).__name__ in names]
    if not blocks:
        found = sorted({type(b).__name__ for b in llm.model.layers})
        raise ValueError(f"no backbone block to shard: llm.model.layers holds {found}, llm._no_split_modules is "
                         f"{sorted(names)}")
    return blocks


def shard_module(module, dp_mesh) -> list[str]:
    """Apply the FSDP2 plan (module docstring) over ``dp_mesh``; returns the names of the groups made.

    A unit that is already sharded (an FSDPModule, or one whose parameters an earlier group took,
    e.g. a head wrapped together with part of the LLM) is skipped and logged, never wrapped again.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    cfg = module.cfg_parallel
    check_layerdrop(module)
    mp = MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype), reduce_dtype=_dtype(cfg.reduce_dtype))
    # The root keeps its inputs as they come: the batch's waveforms feed the fp32 log-mel front end.
    mp_root = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                   cast_forward_inputs=False)
    dp = dp_mesh.size()
    layout = f" (replicate x shard = {' x '.join(map(str, dp_mesh.shape))})" if dp_mesh.ndim > 1 else ""
    made: list[str] = []

    def wrap(name: str, m: nn.Module, policy=mp) -> bool:
        if _already_sharded(m):
            _info(f"skip {name} ({type(m).__name__}): already sharded by an earlier fully_shard")
            return False
        n, cls = sum(p.numel() for p in m.parameters() if not isinstance(p, DTensor)), type(m).__name__
        fully_shard(m, mesh=dp_mesh, mp_policy=policy)
        made.append(name)
        _info(f"fully_shard {name} ({cls}, {n / 1e6:.3f}M params) over data_parallel={dp}{layout}")
        return True

    blocks = backbone_blocks(module.llm)
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint  # hooks only: parameter names unchanged

        for name, block in blocks:
            if not _already_sharded(block):
                checkpoint(block)  # before fully_shard: recompute (and re-gather) the block in backward
        _info(f"activation checkpointing on {len(blocks)} backbone blocks")
    for name, block in blocks:
        wrap(name, block)
    if mp.param_dtype not in (None, torch.float32):
        # FSDP2 casts parameters, never buffers: a BatchNorm with low-precision weights and fp32 running
        # statistics fails (CPU) or loses precision. Each one gets an fp32 group; its output goes back
        # to the compute dtype for the next conv.
        bn_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=mp.reduce_dtype,
                                         output_dtype=mp.param_dtype, cast_forward_inputs=True)
        for name, m in module.audio.encoder.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                wrap(f"audio.encoder.{name} (fp32)", m, bn_policy)
    enc_layers = list(getattr(module.audio.encoder, "layers", []))
    if cfg.encoder_activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for layer in enc_layers:
            if not _already_sharded(layer):
                checkpoint(layer)
        _info(f"activation checkpointing on {len(enc_layers)} encoder layers")
    for i, layer in enumerate(enc_layers):  # one unit per Conformer layer: one layer gathered at a time
        wrap(f"audio.encoder.layers.{i}", layer)
    wrap("audio.encoder", module.audio.encoder)
    wrap("adapter", module.adapter)
    head = module.mtp_head
    if head is not None:
        wrap("llm.mtp", head)  # separately: the LLM's leftovers go to the root, never the head
    if wrap("<root> SALMModule (embeddings, norm_f, lm_head, CTC head)", module, mp_root):
        for method in STEP_METHODS:  # once only: a second registration would nest the root's hooks
            if hasattr(module, method):
                register_fsdp_forward_method(module, method)
    left = [n for n, p in module.named_parameters() if not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"FSDP2 plan left {len(left)} parameters unsharded, e.g. {left[:3]}")
    return made


def apply_parallelism(module) -> None:
    """Shard ``module`` when it runs under Lightning's ModelParallelStrategy; a no-op otherwise.

    Parallel layouts the model refuses (tensor / pipeline parallel with MTP) fail under any strategy.
    """
    trainer = module._trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = trainer.strategy if trainer is not None else None
    if not isinstance(strategy, ModelParallelStrategy):
        check_parallel_config(module)
        return
    from salm_mtp.mesh import shard_mesh

    mesh = strategy.device_mesh
    check_parallel_config(module, mesh["tensor_parallel"].size() if "tensor_parallel" in mesh.mesh_dim_names else 1)
    shard_module(module, shard_mesh(mesh))  # 2-D (replicate, shard) under HSDP: salm_mtp/strategy.py
