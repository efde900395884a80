"""``make_plan``: a training config -> per-rank memory, the smallest world size that fits, HSDP layouts."""

from __future__ import annotations

import math
from salm_mtp.plan.build import GIB, build_model, build_parser, model_kwargs
from salm_mtp.plan.activations import activation_estimate
from salm_mtp.plan.shards import candidate_world_sizes, group_sizes, per_rank, shard_records


def part_of(name: str) -> str:
    if ".lora_A." in name or ".lora_B." in name:  # LoRA adapters (model.lora), counted apart from their base
        return "llm.mtp.lora" if name.startswith("llm.mtp.") else "llm.lora"
    if name.startswith("llm.mtp."):
        return "llm.mtp"
    return "llm" if name.startswith("llm.") else name.split(".", 1)[0]


def world_size_of(opts, trainer: dict) -> int:
    if opts.world_size is not None:
        return opts.world_size
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if not isinstance(devices, int) or not isinstance(nodes, int):
        raise ValueError(f"trainer.devices={devices!r} is not a number of GPUs: set --world_size")
    return devices * nodes


def config_files(argv: list[str]) -> list[str]:
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
    return plan_from_config(build_parser().parse_args(list(args)), config_files(list(args)))


def plan_from_config(cfg, config_files: list[str] | None = None) -> dict:
    """Build, shard and count the parsed config ``cfg`` (a ``build_parser()`` namespace)."""
    from salm_mtp.parallel import LOW_PRECISION_TRUE, _dtype

    trainer = dict(cfg.trainer or {})
    n = world_size_of(cfg, trainer)
    kwargs, note = model_kwargs(cfg, cfg.tokenizer)
    notes = [note] if note else []
    module = build_model(kwargs)
    records, groups = shard_records(module, n)
    par = module.cfg_parallel
    precision = str(trainer.get("precision", "32-true"))
    if precision in LOW_PRECISION_TRUE:
        notes.append(f"trainer.precision={precision}: training refuses it (salm_mtp.parallel.check_precision); planned "
                     "as 32-true with model.parallel dtypes")
    if par.frozen_dtype not in (None, "float32") and par.param_dtype != par.frozen_dtype:
        notes.append(f"model.parallel.frozen_dtype={par.frozen_dtype} with param_dtype={par.param_dtype}: FSDP2 training "
                     f"refuses it (one compute dtype per group); set --model.parallel.param_dtype={par.frozen_dtype}")
    acts = activation_estimate(module, kwargs["lm_head_chunk_size"], cfg.data.max_duration,
                               cfg.text_tokens_per_second, cfg.cut_seconds)
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
        by_part[part_of(r.name)] = by_part.get(part_of(r.name), 0) + math.prod(r.shape)
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
