"""The resumable training loader: it counts the batches it hands out, and a resumed run skips them (sampler
metadata only, no audio read); the count is exact at any data-parallel size change that divides it, else the same
global number of batches is kept and said. DataLoader workers ignore stop signals: the main process decides
(salm_mtp/callbacks.py: Preemption). Saved by Lightning's fit loop with every checkpoint (salm_mtp/data/datamodule.py).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from lhotse import CutSet
from lhotse.dataset.sampling.base import CutSampler
from torch.utils.data import DataLoader, Sampler

from salm_mtp.data.dataset import SALMDataset

log = logging.getLogger(__name__)


class ResumableSampler(Sampler):
    """Wraps a lhotse sampler: forwards ``set_epoch``; the next iteration skips ``skip`` batches.

    Skipped batches are drawn from the lhotse sampler (cheap: cut metadata only) and never
    reach the dataset, so no audio is read for them. ``skip`` applies once, to the current
    epoch; changing the epoch clears it. When ``skip`` covers the whole epoch (a checkpoint
    taken after its last batch) the iteration goes on with the next epoch, ``skipped`` = 0.
    """

    def __init__(self, sampler: CutSampler) -> None:
        self.sampler = sampler
        self.skip = 0
        self.skipped = 0
        """Batches skipped at the start of the running iteration (0 after a rollover)."""

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self.skip = 0
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[CutSet]:
        skip, self.skip, self.skipped = self.skip, 0, 0
        batches = iter(self.sampler)
        while self.skipped < skip and next(batches, None) is not None:
            self.skipped += 1
        # explicit next(), not `yield from batches`: iter() again would restart a lhotse sampler
        batch = next(batches, None)
        if batch is None and skip > 0:  # the resumed epoch was complete: start the next one
            self.sampler.set_epoch(self.sampler.epoch + 1)
            batches, self.skipped = iter(self.sampler), 0
            batch = next(batches, None)
        while batch is not None:
            yield batch
            batch = next(batches, None)


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
"""Signals that ask a run to stop (schedulers, ``timeout``, Ctrl-C, SLURM's pre-emption warning)."""


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals.

    SLURM, ``timeout`` and a terminal's Ctrl-C signal the whole process group. A worker killed by SIGTERM makes the
    main process raise "DataLoader worker ... is killed by signal" before the pre-emption checkpoint is written;
    ignoring it leaves the decision to the main process (salm_mtp.callbacks.Preemption), which shuts the workers
    down itself (they also exit when the main process dies)."""
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` with ``state_dict``/``load_state_dict``.

    ``state_dict() == {"epoch": e, "batches_done": n}``: the first n batches of epoch e were
    consumed; after ``load_state_dict`` the next iteration starts with batch n + 1 of epoch e.
    ``pending`` (optional) returns how many yielded batches the consumer has not used yet
    (Lightning's prefetch buffer); they are not counted as done.
    """

    def __init__(self, dataset: SALMDataset, sampler: ResumableSampler, num_workers: int = 0, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, **kwargs)
        self.batches_done = 0
        """Batches of the current epoch yielded (including those skipped on resume)."""
        self.pending: Callable[[], int] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.batches_done = self.sampler.skip
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for i, batch in enumerate(batches):
            if i == 0:  # the sampler has now applied the skip (or rolled over to a new epoch)
                self.batches_done = self.sampler.skipped
            self.batches_done += 1
            yield batch

    stream: dict | None = None
    """What the training stream is made of (``SALMDataModule.stream_signature``), saved with the position."""
    dp_size: int = 1
    """Data-parallel ranks reading the stream (each takes its own batches)."""

    def state_dict(self) -> dict:
        pending = self.pending() if self.pending is not None else 0
        return {"epoch": self.sampler.epoch, "batches_done": max(0, self.batches_done - pending),
                "stream": self.stream, "dp_size": self.dp_size}

    def load_state_dict(self, state_dict: dict) -> None:
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches_done"])
        saved_stream, saved_dp = state_dict.get("stream"), int(state_dict.get("dp_size") or self.dp_size)
        if saved_stream is not None and self.stream is not None and saved_stream != self.stream:
            changed = sorted(k for k in set(saved_stream) | set(self.stream) if saved_stream.get(k) != self.stream.get(k))
            rank_zero_warn(f"the training data differ from the checkpoint's ({', '.join(f'data.{k}' for k in changed)}"
                           f"): the checkpoint's position (epoch {epoch}, batch {done}) belongs to the old stream, so "
                           "the new one starts from its beginning")
            epoch, done = 0, 0
        elif saved_dp != self.dp_size:
            # each rank read every dp_size-th batch of one stream: keep the global number of batches consumed
            total = done * saved_dp
            new = total // self.dp_size
            rank_zero_warn(f"resuming on {self.dp_size} data-parallel ranks from a checkpoint of {saved_dp}: the "
                           f"{total} batches the old ranks consumed (epoch {epoch}) are skipped as {new} per rank"
                           + ("" if total % self.dp_size == 0 else f" ({total - new * self.dp_size} more are read again)"))
            done = new
        self.sampler.set_epoch(epoch)
        self.sampler.skip = done
        self.batches_done = self.sampler.skip
