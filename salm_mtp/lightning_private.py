"""The only places salm_mtp reads Lightning's private state, each because no public API gives it;
tests/test_lightning_private.py fails loudly when a Lightning upgrade changes one of them.

- ``should_update_logs``: whether this training step writes a log row (``log_every_n_steps``), so metrics written
  to the loggers directly land on the same rows as ``self.log``'s (per-source metrics: salm_mtp/model.py).
- ``logged_step``: the step number Lightning gives that row.
- ``prefetched_batches``: train batches the fit loop fetched ahead and has not handed to ``training_step`` yet, so a
  checkpoint's loader state counts only the batches trained on (salm_mtp/data/datamodule.py, mid-epoch resume).
- ``fit_epoch``: the epoch the fit loop runs next (what it passes to ``set_epoch``), for samplers built by hand.
- ``injects_distributed_sampler``: whether the Trainer would replace our lhotse samplers by a DistributedSampler
  (``--trainer.use_distributed_sampler``), checked before it does.

Imports nothing of salm_mtp: any layer may use it (tests/test_imports.py).
"""

from __future__ import annotations


def should_update_logs(trainer) -> bool:
    """Whether the current training step writes a row to the loggers."""
    return bool(trainer._logger_connector.should_update_logs)


def logged_step(trainer) -> int:
    """The ``step`` of the row Lightning writes for the current training step."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def prefetched_batches(trainer) -> int:
    """Train batches fetched but not yet given to ``training_step``: the fit loop reads one batch ahead
    (``_PrefetchDataFetcher.batches``) to know which batch is the last; 0 outside a fit."""
    fetcher = getattr(getattr(trainer, "fit_loop", None), "_data_fetcher", None)
    return len(getattr(fetcher, "batches", None) or ())


def fit_epoch(trainer) -> int:
    """The epoch the fit loop runs next; 0 without a trainer."""
    fit_loop = getattr(trainer, "fit_loop", None)
    return int(fit_loop.epoch_progress.current.processed) if fit_loop is not None else 0


def injects_distributed_sampler(trainer) -> bool:
    """Whether the Trainer replaces the loaders' samplers with a DistributedSampler when it runs on several
    processes (``use_distributed_sampler``, default true)."""
    return bool(getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False))
