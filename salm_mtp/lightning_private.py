"""The only places salm_mtp reads Lightning's private state, each because no public API gives it;
tests/test_lightning_private.py fails loudly when a Lightning upgrade changes one of them.

- ``should_update_logs``: whether this training step writes a log row (``log_every_n_steps``), so metrics written
  to the loggers directly land on the same rows as ``self.log``'s (per-source metrics: salm_mtp/model.py).
- ``logged_step``: the step number Lightning gives that row.
"""

from __future__ import annotations


def should_update_logs(trainer) -> bool:
    """Whether the current training step writes a row to the loggers."""
    return bool(trainer._logger_connector.should_update_logs)


def logged_step(trainer) -> int:
    """The ``step`` of the row Lightning writes for the current training step."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
