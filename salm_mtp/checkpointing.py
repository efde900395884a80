"""Checkpoints that never leave a half-written ``last``: in-progress paths, atomic publish, async saves, retention.

Every save is written under an in-progress name beside its final one (``.step600.ckpt.inprogress``: a directory of
shards, or a file) and renamed to the final name only when every rank's part is on disk (``os.replace``: atomic
on one file system). A save killed midway leaves only the in-progress name behind, which nothing reads.

``SaveTracker`` holds the saves not yet published and what to do once each is (point ``last`` at it, prune older
ones). The sharded kind saves asynchronously when ``SALMParallelStrategy(async_save=True)``: torch DCP copies this
rank's tensors to host memory, returns, and writes them in a background thread while training goes on; one save is
in flight at a time (the next waits for it). A write that fails (disk full, file too large, no permission) gives
one line naming the checkpoint and the error; the previous checkpoint stays ``last`` and training goes on.

``SALMCheckpoint`` is Lightning's ModelCheckpoint over these saves: ``last.ckpt`` is a link moved (atomically) to
each newly published checkpoint of the latest step (the periodic one, or ``latest-step<N>.ckpt`` when the top-k rule
kept none at that step), and ``keep_last_n`` keeps the n newest (plus the best
by ``monitor`` and the one ``last`` names).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from salm_mtp.errors import SalmError

INPROGRESS = ".inprogress"
"""Suffix of a checkpoint being written (with a leading dot on the name: hidden, never a ``*.ckpt`` match)."""


LATEST = "latest-step"
"""Name prefix of the checkpoint ``last`` names when no periodic or top-k checkpoint was saved at that step."""


def inprogress_path(final: str) -> str:
    """Where ``final`` is written until it is published."""
    head, name = os.path.split(os.fspath(final))
    return os.path.join(head, f".{name}{INPROGRESS}")


def remove_path(path: str) -> None:
    """Remove a checkpoint file, directory or link (nothing when absent)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def publish(tmp: str, final: str) -> None:
    """Move a finished in-progress checkpoint to its final name (replacing an older one of that name)."""
    if os.path.lexists(final):
        remove_path(final)
    os.replace(tmp, final)


def point(link: str, target: str) -> None:
    """Make ``link`` a relative symlink to ``target``, atomically (a reader sees the old target or the new one)."""
    tmp = f"{link}.tmp-link"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(target, os.path.dirname(os.path.abspath(link))), tmp)
    os.replace(tmp, link)


def disk_note(path: str) -> str:
    """What the disk under ``path`` has left, for a failed write's message."""
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return "is the disk full or a file size limit (ulimit -f) reached?"
    return f"{free / 2**20:.0f} MiB free on that disk; is it full, or a file size limit (ulimit -f) reached?"


def failure_line(final: str, error: BaseException, previous: str | None) -> str:
    """One line: the checkpoint that was not written, why, and what stays resumable."""
    keep = f"the previous checkpoint {previous} stays the one to resume" if previous else "no earlier checkpoint exists"
    return f"checkpoint {final} was not saved ({type(error).__name__}: {error}); {keep}; training goes on"


def done_future() -> Future:
    """A future that has already completed (a synchronous save)."""
    future: Future = Future()
    future.set_result(None)
    return future


def failed_future(error: BaseException) -> Future:
    """A future that has already failed (a synchronous save that raised)."""
    future: Future = Future()
    future.set_exception(error)
    return future


@dataclass
class _Pending:
    tmp: str
    future: Future
    then: list[Callable[[], None]] = field(default_factory=list)


class SaveTracker:
    """The saves of one process that are started but not yet published (module docstring).

    ``publisher``: whether this process renames finished saves (rank 0 for the sharded kind, where one rank's
    finished future means every rank's shards and the metadata are on disk).
    """

    def __init__(self, publisher: bool = True, warn: Callable[[str], None] = rank_zero_warn) -> None:
        self.publisher = publisher
        self.warn = warn
        self.pending: dict[str, _Pending] = {}
        self.published: list[str] = []
        self.failed: list[str] = []

    def start(self, final: str, tmp: str, future: Future) -> None:
        """Register a save of ``final`` being written to ``tmp``; ``future`` completes when it is on disk."""
        self.pending[os.fspath(final)] = _Pending(os.fspath(tmp), future)
        self.poll()

    def when_published(self, final: str, action: Callable[[], None]) -> None:
        """Run ``action`` once ``final`` is published (now if it already is; never if its save fails)."""
        final = os.fspath(final)
        if final in self.pending:
            self.pending[final].then.append(action)
        elif final not in self.failed:
            action()

    def poll(self) -> None:
        """Publish every save whose writing has finished (main thread: between steps)."""
        for final in [f for f, p in self.pending.items() if p.future.done()]:
            self._finish(final)

    def wait(self) -> None:
        """Wait for every save in flight and publish it (before the next save, at the end of a run)."""
        for final in list(self.pending):
            self.pending[final].future.exception()  # blocks until done, raises nothing
            self._finish(final)

    def _finish(self, final: str) -> None:
        pending = self.pending.pop(final)
        error = pending.future.exception()
        if error is not None:
            self.failed.append(final)
            if self.publisher:
                remove_path(pending.tmp)
            self.warn(failure_line(final, error, self.published[-1] if self.published else None))
            return
        if self.publisher:
            publish(pending.tmp, final)
        self.published.append(final)
        for action in pending.then:
            action()


def tracker_of(strategy) -> SaveTracker | None:
    """The SaveTracker of a strategy (SALMParallelStrategy) or of its checkpoint IO (SALMCheckpointIO)."""
    saves = getattr(strategy, "saves", None)
    if isinstance(saves, SaveTracker):
        return saves
    io = getattr(strategy, "_checkpoint_io", None)
    saves = getattr(io, "saves", None)
    return saves if isinstance(saves, SaveTracker) else None


def write_file_atomically(write: Callable[[str], None], final: str, saves: SaveTracker | None) -> None:
    """A one-file checkpoint: ``write(tmp)``, then publish; an OSError becomes ``saves``' one-line failure."""
    tmp = inprogress_path(final)
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    try:
        write(tmp)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a failed write as a RuntimeError
        remove_path(tmp)
        error = e if isinstance(e, OSError) else OSError(f"writing {tmp} failed ({e}); {disk_note(final)}")
        if saves is None:
            raise error from None
        saves.start(final, tmp, failed_future(error))
        return
    if saves is None:
        publish(tmp, final)
    else:
        saves.start(final, tmp, done_future())


class SALMCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last`` is a link moved to each published save, with ``keep_last_n`` retention."""

    def __init__(self, *args, keep_last_n: int | None = None, **kwargs) -> None:
        """Args:
            keep_last_n: keep only the n newest checkpoints this callback wrote (plus the best by ``monitor`` and
                the one ``last`` names); None: ModelCheckpoint's ``save_top_k`` alone decides.
            args, kwargs: ModelCheckpoint's (``save_last: true``: ``last.ckpt`` is a link, not a second save).
        """
        super().__init__(*args, **kwargs)
        if keep_last_n is not None:
            if not isinstance(keep_last_n, int) or keep_last_n < 1:
                raise SalmError(f"checkpoint callback keep_last_n must be an integer >= 1 or null, got {keep_last_n!r}")
            if self.save_top_k != -1:
                raise SalmError(f"checkpoint callback keep_last_n={keep_last_n} decides which checkpoints are kept: "
                                f"set its save_top_k to -1 (it is {self.save_top_k})")
        self.keep_last_n = keep_last_n
        self._written: list[str] = []

    def _saves(self, trainer) -> SaveTracker | None:
        return tracker_of(trainer.strategy)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        saves = self._saves(trainer)
        is_last = os.path.basename(filepath).startswith((self.CHECKPOINT_NAME_LAST, LATEST))
        if saves is not None and self.keep_last_n and trainer.is_global_zero and not is_last:
            saves.when_published(filepath, lambda: self._prune(filepath))

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        """``last.ckpt`` -> this step's checkpoint: the one just saved (top-k, periodic), else a new
        ``latest-step<N>.ckpt`` (which replaces the previous one of that kind once ``last`` has moved on)."""
        saves = self._saves(trainer)
        if not self.save_last or saves is None:
            return super()._save_last_checkpoint(trainer, monitor_candidates)
        link = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        self.last_model_path = link
        target = self._last_checkpoint_saved
        previous_latest = getattr(self, "_latest", None)
        if not target or self._last_global_step_saved != trainer.global_step:
            target = os.path.join(os.path.dirname(link), f"{LATEST}{trainer.global_step}{self.FILE_EXTENSION}")
            self._save_checkpoint(trainer, target)
            self._latest = target
        if trainer.is_global_zero:
            def move_last(target=target, previous=previous_latest) -> None:
                point(link, target)
                if previous and previous != target:
                    remove_path(previous)  # a latest-step checkpoint nothing names any more

            saves.when_published(target, move_last)

    def _link_checkpoint(self, trainer, filepath: str, linkpath: str) -> None:  # Lightning: a staticmethod
        saves = self._saves(trainer)
        if saves is None:
            return ModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            saves.when_published(filepath, lambda: point(linkpath, filepath))

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        saves = self._saves(trainer)
        if saves is None:
            return super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            saves.when_published(filepath, lambda: remove_path(filepath))

    def _prune(self, newest: str) -> None:
        """Remove this callback's checkpoints beyond the ``keep_last_n`` newest (never the best or ``last``'s)."""
        if newest not in self._written:
            self._written.append(newest)
        keep = set(self._written[-self.keep_last_n:])
        keep.add(self.best_model_path)
        last = self.last_model_path
        if last and os.path.islink(last):
            keep.add(os.path.join(os.path.dirname(last), os.readlink(last)))
        for path in [p for p in self._written if p not in keep]:
            remove_path(path)
            self._written.remove(path)

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        saves = self._saves(trainer)
        if saves is not None:
            saves.poll()  # publish finished saves (and run their links) between steps
        super().on_train_batch_end(trainer, *args, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        saves = self._saves(trainer)
        if saves is not None:
            saves.wait()  # the run ends with every checkpoint on disk and ``last`` on the newest

    def on_exception(self, trainer, pl_module, exception) -> None:
        saves = self._saves(trainer)
        if saves is not None:
            saves.wait()
