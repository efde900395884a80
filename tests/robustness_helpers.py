"""Test-only callback for tests/test_robustness.py: a real SIGTERM to the own process at a chosen step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import lightning as L


class KillAtStep(L.Callback):
    """Sends SIGTERM to this process (to its whole process group with ``$SALM_TEST_KILL_GROUP=1``, as SLURM,
    ``timeout`` and a terminal's Ctrl-C do) when training step ``$SALM_TEST_KILL_AT_STEP`` starts."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == int(os.environ["SALM_TEST_KILL_AT_STEP"]):
            if os.environ.get("SALM_TEST_KILL_GROUP") == "1":
                # the whole group, from another process, as a scheduler or `timeout` sends it: torch's DataLoader
                # workers exit quietly on a SIGTERM from their own parent but die by one from anyone else
                pgid = os.getpgid(0)
                if pgid != os.getpid():  # only a run started in its own session (start_new_session=True)
                    raise RuntimeError(f"KillAtStep: this process ({os.getpid()}) does not lead its process group "
                                       f"({pgid}); refusing to signal the group")
                code = f"import os, signal; os.killpg({pgid}, signal.SIGTERM)"
                subprocess.Popen([sys.executable, "-c", code], start_new_session=True).wait()
            else:
                os.kill(os.getpid(), signal.SIGTERM)
