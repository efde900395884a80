"""Test-only callback for tests/test_robustness.py: a real SIGTERM to the own process at a chosen step."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """Sends SIGTERM to this process when training step ``$SALM_TEST_KILL_AT_STEP`` starts."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == int(os.environ["SALM_TEST_KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGTERM)
