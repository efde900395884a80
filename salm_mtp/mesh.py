"""Reading a device mesh: its data-parallel dimension and what FSDP2 shards over (plain FSDP2 or HSDP).

The mesh is built by salm_mtp.strategy.SALMParallelStrategy; the data code (which ranks read which batches) and the
sharding plan (salm_mtp/parallel.py) only read it, through these functions.
"""

from __future__ import annotations

SHARD_DIMS = ("dp_replicate", "dp_shard")
"""Mesh dims FSDP2 shards over under HSDP (replicate, shard)."""


def data_parallel_mesh(mesh):
    """The mesh's data-parallel dimension (flattened replicate x shard under HSDP); None without one."""
    if mesh is None:
        return None
    try:
        return mesh["data_parallel"]
    except (KeyError, RuntimeError, ValueError):
        return None


def shard_mesh(mesh):
    """What FSDP2 shards over: the 2-D (replicate, shard) mesh under HSDP, else the data-parallel dimension."""
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if all(d in names for d in SHARD_DIMS):
        return mesh[SHARD_DIMS]
    return mesh["data_parallel"]


def trainer_dp_mesh(trainer):
    """The data-parallel dimension of a trainer's device mesh; None without a trainer, a mesh, or before the
    strategy has built it (the one lookup behind the data's rank and the loss's dp size)."""
    if trainer is None:
        return None
    try:
        mesh = getattr(trainer.strategy, "device_mesh", None)
    except (AttributeError, RuntimeError):  # ModelParallelStrategy before setup_environment() built the mesh
        mesh = None
    return data_parallel_mesh(mesh)
