"""Test-only callback for tests/test_robustness.py: a real SIGTERM to the own process at a chosen step."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """Sends SIGTERM to this process (to its whole process group with ``$SALM_TEST_KILL_GROUP=1``, as SLURM,
    ``timeout`` and a terminal's Ctrl-C do) when training step ``$SALM_TEST_KILL_AT_STEP`` starts."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == int(os.environ["SALM_TEST_KILL_AT_STEP"]):
            if os.environ.get("SALM_TEST_KILL_GROUP") == "1":
                os.killpg(os.getpgid(0), signal.SIGTERM)
            else:
                os.kill(os.getpid(), signal.SIGTERM)
