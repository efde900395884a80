"""Data-parallel facts the loss needs, and the FSDP2 sharding plan (DESIGN.md §3-4)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def data_parallel(trainer) -> tuple[int, object | None]:
    """(dp_size, process group) of the data-parallel dimension; (1, None) outside distributed runs.

    Under ModelParallelStrategy the group is the device mesh's ``data_parallel`` dimension;
    under DDP (and any other strategy) it is the whole world.
    """
    if trainer is None or not (dist.is_available() and dist.is_initialized()):
        return 1, None
    mesh = getattr(trainer.strategy, "device_mesh", None) if hasattr(trainer.strategy, "_device_mesh") else None
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        sub = mesh["data_parallel"]
        return sub.size(), sub.get_group()
    return dist.get_world_size(), None


def all_reduce_sum(t: torch.Tensor, trainer) -> torch.Tensor:
    """Sum ``t`` over the data-parallel group (a no-op in single-process runs); returns a new tensor."""
    size, group = data_parallel(trainer)
    t = t.detach().clone()
    if size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def apply_parallelism(module) -> None:
    """Shard ``module`` when it runs under Lightning's ModelParallelStrategy; a no-op otherwise."""
    trainer = module._trainer
    if trainer is None:
        return
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(trainer.strategy, ModelParallelStrategy):
        return
    raise NotImplementedError("FSDP2 sharding plan: in progress")
