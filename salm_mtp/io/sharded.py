"""Checkpoint reading for one-process runs: a sharded FSDP2 directory resumes in one process too.

Lightning's one-process strategies read ``--ckpt_path`` with ``torch.load``: a sharded directory (written by
``SALMParallelStrategy`` on any number of ranks) fails with ``IsADirectoryError``. ``SALMCheckpointIO`` reads such
a directory into the one-file form instead: every shard gathered in this process (torch DCP, no process group),
``meta.pt``'s loop, callback and hyperparameter state beside it, and the optimizer state keyed by parameter name
(matched to the one-process optimizer by name when it loads: salm_mtp/optim_state.py). Files load as before.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from salm_mtp.checkpointing import SaveTracker, write_file_atomically
from salm_mtp.errors import SalmError

META = "meta.pt"
"""The file Lightning writes beside the shards: everything but model and optimizer tensors."""


def read_sharded(path: str) -> dict[str, Any]:
    """A sharded checkpoint directory as a one-file Lightning checkpoint dict (all tensors on the CPU)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    meta_file = os.path.join(path, META)
    if not os.path.isfile(meta_file):
        raise SalmError(f"--ckpt_path {path!r} is a directory without {META}: not a sharded checkpoint written by "
                        "salm-mtp (pass its .ckpt directory, or a .ckpt file)")
    tensors: dict[str, Any] = {}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed")
        _load_state_dict(tensors, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    checkpoint = torch.load(meta_file, map_location="cpu", weights_only=False)  # our own file (Lightning's format)
    checkpoint["state_dict"] = tensors.pop("state_dict")
    optimizers = sorted((k for k in tensors if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [tensors.pop(k) for k in optimizers]  # name-keyed (FQN) form
    return checkpoint


class SALMCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that also reads sharded checkpoint directories (module docstring) and writes each file
    under an in-progress name first (salm_mtp/checkpointing.py: a killed or failed save never replaces a good one)."""

    def __init__(self) -> None:
        super().__init__()
        self.saves = SaveTracker()

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        def write(tmp: str) -> None:
            TorchCheckpointIO.save_checkpoint(self, checkpoint, tmp, storage_options)

        write_file_atomically(write, str(path), self.saves)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if os.path.isdir(path):
            return read_sharded(str(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def use_for(trainer) -> None:
    """Give a one-process (or DDP) trainer's strategy ``SALMCheckpointIO``; sharded strategies read directories
    themselves (SALMParallelStrategy.load_checkpoint)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy) or not hasattr(strategy, "checkpoint_io"):
        return
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = SALMCheckpointIO()
