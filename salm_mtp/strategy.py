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
from typing import Literal

from lightning.pytorch.strategies import ModelParallelStrategy

from salm_mtp.checkpointing import (SaveTracker, done_future, failed_future, inprogress_path,
                                   remove_path)
from salm_mtp.errors import SalmError
from salm_mtp.mesh import SHARD_DIMS



class SALMParallelStrategy(ModelParallelStrategy):
    """ModelParallelStrategy whose data-parallel dimension may be replicate x shard (module docstring)."""

    def __init__(self, data_parallel_size: Literal["auto"] | int = "auto",
                 tensor_parallel_size: Literal["auto"] | int = 1, replicate_size: int = 1,
                 async_save: bool = False, **kwargs):
        """Args:
            data_parallel_size: data-parallel ranks in all (replicas x shards); "auto" = the number of nodes.
            tensor_parallel_size: tensor-parallel ranks (1: the model refuses TP while MTP is on).
            replicate_size: replicas R; each holds data_parallel_size / R shards (1: plain FSDP2).
            async_save: write sharded checkpoints in a background thread (torch DCP async_save) while training
                goes on; every save is published atomically either way (salm_mtp/checkpointing.py).
            kwargs: ModelParallelStrategy's other arguments.
        """
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)
        if not isinstance(replicate_size, int) or replicate_size < 1:
            raise SalmError(f"trainer.strategy.init_args.replicate_size must be an integer >= 1, got {replicate_size!r}")
        self.replicate_size = replicate_size
        self.async_save = bool(async_save)
        self.saves = SaveTracker()
        self._save_group = None

    def setup_environment(self) -> None:
        super().setup_environment()  # process group + Lightning's (data_parallel, tensor_parallel) mesh
        self.saves.publisher = self.global_rank == 0  # rank 0's save completes only once every rank's has
        if self.async_save:  # the background writer's own collectives: never interleaved with training's
            import torch.distributed as dist

            self._save_group = dist.new_group(backend="gloo")
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


    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """A sharded checkpoint written under its in-progress name and published (renamed) once every rank's
        shards are on disk: at once, or in the background with ``async_save``. One save is in flight at a time."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError("SALMParallelStrategy.save_checkpoint takes no storage_options")
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        path = str(self.broadcast(os.fspath(filepath)))
        self.saves.wait()
        tmp = inprogress_path(path)
        if self.global_rank == 0:
            remove_path(tmp)  # left by a save that was killed
        self.barrier("salm_save_start")
        os.makedirs(tmp, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        meta_error = None
        if self.global_rank == 0:
            try:
                torch.save(checkpoint, os.path.join(tmp, "meta.pt"))  # loops, callbacks, hyperparameters
            except OSError as e:  # still join the collective save below
                meta_error = e
        try:
            if self.async_save:
                result = dcp.async_save(state, storage_writer=FileSystemWriter(tmp), process_group=self._save_group)
                future = getattr(result, "upload_completion", result)
            else:
                dcp.save(state, storage_writer=FileSystemWriter(tmp))
                future = done_future()
        except Exception as e:  # noqa: BLE001  (DCP raises the same CheckpointException on every rank)
            future = failed_future(e)
        self.saves.start(path, tmp, failed_future(meta_error) if meta_error else future)

    def teardown(self) -> None:
        self.saves.wait()  # never exit with a checkpoint half-written
        super().teardown()

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """Load a sharded directory (saved by any number of ranks: DCP reshards it) or a one-process ``.ckpt``
        file, after its model tensors are checked against the model's both ways (Lightning's own load would drop
        unexpected ones silently and fail on missing ones in a long traceback). Optimizer state is matched to the
        parameters by name in both cases (salm_mtp/optim_state.py)."""
        path = str(self.broadcast(checkpoint_path))
        if os.path.isdir(path):
            check_sharded_keys(path, self.lightning_module.state_dict().keys())
            return self._load_sharded(path, weights_only)
        return self._load_full_file(path, weights_only)

    def _load_sharded(self, path: str, weights_only) -> dict:
        """A sharded directory (any number of ranks wrote it: DCP reshards): model tensors, then each optimizer's
        state for the parameters it trains now, matched by name; parameters it no longer trains are skipped, newly
        trained ones start from fresh state (a changed freeze list), both said in one line."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        from salm_mtp.optim_state import change_line, for_optimizer

        model_state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(model_state, checkpoint_id=path)
        self.model.load_state_dict(model_state["state_dict"], strict=True)
        saved_keys = FileSystemReader(path).read_metadata().state_dict_metadata
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            saved = saved_optimizer_params(saved_keys, key)
            current = get_optimizer_state_dict(self.model, optimizer)
            template = {key: {"state": {n: st for n, st in current["state"].items() if n in saved},
                              "param_groups": current["param_groups"]}}  # the saved groups replace these
            dcp.load(template, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
            state, _, fresh = for_optimizer(template[key], current)
            dropped = sorted(saved - set(current["state"]))  # the template held only what both have
            if dropped or fresh:
                from lightning.pytorch.utilities import rank_zero_info

                rank_zero_info(change_line(dropped, fresh))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(os.path.join(path, "meta.pt"), weights_only=weights_only)

    def _load_full_file(self, path: str, weights_only) -> dict:
        """A one-process checkpoint into this rank's shards: model tensors by name, optimizer state by name (Lightning's
        own path re-keys a one-process optimizer state by the order of ``named_parameters()``, which is not the
        optimizer's group order: moments land on the wrong parameters)."""
        import torch
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from salm_mtp.optim_state import fqn_form

        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)  # no copy per rank
        check_keys(path, checkpoint.get("state_dict", {}).keys(), self.lightning_module.state_dict().keys())
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, strict=True)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for optimizer, saved in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=fqn_form(saved), options=options)
        return checkpoint


def saved_optimizer_params(metadata_keys, key: str = "optimizer_0") -> set[str]:
    """The parameter names a sharded checkpoint holds optimizer state for (its DCP keys are
    ``<key>.state.<parameter name>.<moment>``)."""
    prefix = f"{key}.state."
    return {k[len(prefix):].rsplit(".", 1)[0] for k in metadata_keys if k.startswith(prefix)}


def check_sharded_keys(path: str, model_keys) -> None:
    """SalmError naming the missing and unexpected model tensors of a sharded (DCP) checkpoint directory."""
    from torch.distributed.checkpoint import FileSystemReader

    prefix = "state_dict."
    saved = {k[len(prefix):] for k in FileSystemReader(path).read_metadata().state_dict_metadata
             if k.startswith(prefix)}
    check_keys(path, saved, model_keys)


def check_keys(path: str, saved_keys, model_keys) -> None:
    """SalmError naming the model tensors a checkpoint lacks and the ones it has that the model does not."""
    saved, wanted = set(saved_keys), set(model_keys)
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
