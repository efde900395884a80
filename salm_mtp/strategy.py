"""``SALMParallelStrategy``: Lightning's ModelParallelStrategy with hybrid sharding (HSDP) across nodes.

Lightning's ModelParallelStrategy builds a 2-D device mesh ``(data_parallel, tensor_parallel)``: with 64 or 104
ranks every FSDP2 unit is sharded over one flat group, and every all-gather crosses the slow inter-node links.
``replicate_size`` R > 1 splits the data-parallel ranks into R replicas of ``data_parallel_size / R`` shards
each (typically: shard within a node, replicate across nodes)::

    mesh dims  ("dp_replicate", "dp_shard", "tensor_parallel")   sizes (R, dp / R, tp)
    "data_parallel"  = dp_replicate x dp_shard, flattened: the group that batches differ over (lhotse samplers,
                       the loss's global token count and its dp_size factor), exactly as without HSDP
    FSDP2            fully_shard(unit, mesh=mesh["dp_replicate", "dp_shard"]): parameters sharded within a
                     replica, gradients reduce-scattered there and all-reduced across replicas

The MTP head and the encoder are sharded on the same mesh as the backbone (salm_mtp/parallel.py).

    trainer:
      strategy:
        class_path: salm_mtp.strategy.SALMParallelStrategy
        init_args: {data_parallel_size: 32, tensor_parallel_size: 1, replicate_size: 4}   # 4 nodes x 8 GPUs
"""

from __future__ import annotations

import os

from lightning.pytorch.strategies import ModelParallelStrategy

from salm_mtp.errors import SalmError

SHARD_DIMS = ("dp_replicate", "dp_shard")
"""Mesh dims FSDP2 shards over under HSDP (replicate, shard)."""


class SALMParallelStrategy(ModelParallelStrategy):
    """ModelParallelStrategy whose data-parallel dimension may be replicate x shard (module docstring)."""

    def __init__(self, data_parallel_size="auto", tensor_parallel_size=1, replicate_size: int = 1, **kwargs):
        """Args:
            data_parallel_size: data-parallel ranks in all (replicas x shards); "auto" = the number of nodes.
            tensor_parallel_size: tensor-parallel ranks (1: the model refuses TP while MTP is on).
            replicate_size: replicas R; each holds data_parallel_size / R shards (1: plain FSDP2).
            kwargs: ModelParallelStrategy's other arguments.
        """
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)
        if not isinstance(replicate_size, int) or replicate_size < 1:
            raise SalmError(f"trainer.strategy.init_args.replicate_size must be an integer >= 1, got {replicate_size!r}")
        self.replicate_size = replicate_size

    def setup_environment(self) -> None:
        super().setup_environment()  # process group + Lightning's (data_parallel, tensor_parallel) mesh
        r = self.replicate_size
        if r == 1:
            return
        from torch.distributed.device_mesh import init_device_mesh

        dp, tp = int(self._data_parallel_size), int(self._tensor_parallel_size)
        if dp % r:
            raise SalmError(f"trainer.strategy.init_args.replicate_size={r} does not divide data_parallel_size={dp}; "
                            "choose replicas x shards = data_parallel_size (e.g. nodes x GPUs per node)")
        mesh = init_device_mesh(self.root_device.type, (r, dp // r, tp),
                                mesh_dim_names=(*SHARD_DIMS, "tensor_parallel"))
        mesh[SHARD_DIMS]._flatten("data_parallel")
        self._device_mesh = mesh
        self.lightning_module._device_mesh = mesh


    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """Lightning's load, after the sharded checkpoint's model tensors are checked against the model's both ways
        (Lightning's own load would drop unexpected ones silently and fail on missing ones in a long traceback)."""
        path = str(self.broadcast(checkpoint_path))
        if os.path.isdir(path):
            check_sharded_keys(path, self.lightning_module.state_dict().keys())
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def check_sharded_keys(path: str, model_keys) -> None:
    """SalmError naming the missing and unexpected model tensors of a sharded (DCP) checkpoint directory."""
    from torch.distributed.checkpoint import FileSystemReader

    prefix = "state_dict."
    saved = {k[len(prefix):] for k in FileSystemReader(path).read_metadata().state_dict_metadata
             if k.startswith(prefix)}
    wanted = set(model_keys)
    missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
    if not missing and not unexpected:
        return

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    parts = ([f"{len(missing)} tensors the model has are not in it ({names(missing)})"] if missing else []) + \
            ([f"{len(unexpected)} tensors in it are not in the model ({names(unexpected)})"] if unexpected else [])
    raise SalmError(f"--ckpt_path {path!r} does not match the model: {'; '.join(parts)}. It was written by another "
                    "model build (or code version); resume it with the settings it was trained with (its run's "
                    "config.yaml), or start a new run from it through salm-mtp export")


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
