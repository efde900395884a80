"""Test-only callback for the any-world-size resume tests (tests/recipes/test_fsdp2_fit.py): what a run restored."""

from __future__ import annotations

import os

import lightning as L
import torch


def _plain(value):
    """A tensor as a plain CPU tensor (DTensors gathered by the caller), anything else as it is."""
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


class DumpRestoredState(L.Callback):
    """At train start (after ``--ckpt_path`` is restored) rank 0 saves to ``$SALM_TEST_DUMP``: the full model state
    and the full optimizer state keyed by parameter name, gathered from every rank under FSDP2."""

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        from torch.distributed.tensor import DTensor

        from salm_mtp.optim_state import by_name

        optimizer = trainer.optimizers[0]
        if any(isinstance(p, DTensor) for p in pl_module.parameters()):
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model = get_model_state_dict(pl_module, options=options)  # collectives: every rank
            optim = get_optimizer_state_dict(pl_module, optimizer, options=options)
        else:
            model, optim = pl_module.state_dict(), optimizer.state_dict()
        if trainer.global_rank != 0:
            return
        named, groups = by_name(optim)
        torch.save({"model": {k: _plain(v) for k, v in model.items()},
                    "optim": {n: {k: _plain(v) for k, v in s.items()} for n, s in named.items()},
                    "lr": [g["lr"] for g in groups], "world_size": trainer.world_size,
                    "global_step": trainer.global_step}, os.environ["SALM_TEST_DUMP"])


class HoldSave(L.Callback):
    """Holds the background write of the checkpoint saved at step ``$SALM_TEST_HOLD_AT`` until training starts step
    ``$SALM_TEST_HOLD_AT + 1``; there rank 0 records (``$SALM_TEST_HOLD_LOG``, JSON) whether that checkpoint was
    already published, then releases the write, or with ``$SALM_TEST_HOLD_KILL=1`` kills this process (SIGKILL:
    no clean-up of any kind) with the write still held."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        import threading

        import torch.distributed.checkpoint.filesystem as fs

        self.at = int(os.environ["SALM_TEST_HOLD_AT"])
        self.release = threading.Event()
        original = fs.FileSystemWriter.write_data
        marker, release = f"step{self.at}.ckpt", self.release

        def write_data(writer, plan, planner):
            if marker in str(writer.path):
                release.wait(timeout=120)  # a blocking save would stop training here: the test then times out
            return original(writer, plan, planner)

        self._restore = lambda: setattr(fs.FileSystemWriter, "write_data", original)
        fs.FileSystemWriter.write_data = write_data

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release.set()
        self._restore()  # the next run in this process (tests/dist/cli_session.py) writes unheld

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import json
        import signal

        if trainer.global_step != self.at + 1:
            return
        ckpt_dir = trainer.checkpoint_callback.dirpath
        if trainer.global_rank == 0:
            with open(os.environ["SALM_TEST_HOLD_LOG"], "w") as f:
                json.dump({"step": trainer.global_step,
                           "published": os.path.exists(os.path.join(ckpt_dir, f"step{self.at}.ckpt")),
                           "in_progress": os.path.isdir(os.path.join(ckpt_dir, f".step{self.at}.ckpt.inprogress"))}, f)
        if os.environ.get("SALM_TEST_HOLD_KILL") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        self.release.set()
