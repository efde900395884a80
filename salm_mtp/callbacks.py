"""Callbacks every run gets (``SALMModule.configure_callbacks``): skipped-cut accounting, pre-emption, the
random generators' states across a resume (``ResumeRNG``), and the per-step chores (``TrainMonitor``: lr and
throughput metrics, the tokenizer saved with the run, the one-process allocator policy).

BadCutReport   counts the cuts the data left out (salm_mtp.data.policy): metrics ``skipped_cuts/<reason>``
               (this rank's counts), ``skipped_cuts.jsonl`` in the run dir (``.rank<r>`` suffix when
               several ranks), and the totals printed when the run ends (fit, validate, test, predict).
Preemption     SIGTERM, SIGINT and SIGUSR1 (SLURM's pre-emption warning with ``--signal=USR1@<secs>``; the
               SLURM plugin's requeue signal when it has another one) only set a flag. At the next step
               boundary (after the optimizer step) every rank agrees on it (all-reduce), saves a resumable
               checkpoint ``<checkpoint dir>/preempted-step<N>.ckpt`` (model, head, optimizer, scheduler,
               sampler position, RNG: the same state as a periodic checkpoint, so the resumed losses
               equal the uninterrupted ones) and exits with code 128 + the signal number (143 for
               SIGTERM, 130 for SIGINT, 138 for SIGUSR1): the code a shell reports for a process killed
               by that signal, so a scheduler counts the run as interrupted, not as done. Resume with
               ``salm-mtp fit ... --ckpt_path <that file>``. A second SIGINT stops at once.
"""

from __future__ import annotations

import os
import signal
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from salm_mtp.checkpointing import tracker_of
from salm_mtp.malloc import keep_freed_memory_if_alone
from salm_mtp.parallel import all_reduce_sum


class Preempted(SystemExit):
    """Raised after the pre-emption checkpoint is written; its code is 128 + the signal number."""


class BadCutReport(L.Callback):
    """Counts skipped cuts from every batch the loops take, logs them as metrics, prints the totals."""

    def _log(self, trainer):
        return getattr(getattr(trainer, "datamodule", None), "skip_log", None)

    def setup(self, trainer, pl_module, stage: str) -> None:
        skip_log = self._log(trainer)
        log_dir = trainer.log_dir  # a broadcast under multi-process strategies: every rank must ask
        if skip_log is not None and log_dir:
            suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
            skip_log.set_path(os.path.join(log_dir, f"skipped_cuts{suffix}.jsonl"))

    def _report(self, trainer, batch) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "report_skipped") and isinstance(batch, dict):
            dm.report_skipped(batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._report(trainer, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        skip_log = self._log(trainer)
        if skip_log is not None:
            for reason, n in sorted(skip_log.counts.items()):
                pl_module.log(f"skipped_cuts/{reason}", float(n), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._report(trainer, batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._report(trainer, batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._report(trainer, batch)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        skip_log = self._log(trainer)
        if skip_log is not None:
            rank = f"rank {trainer.global_rank}: " if trainer.world_size > 1 else ""
            (rank_zero_warn if skip_log.total else rank_zero_info)(f"{rank}{stage}: {skip_log.summary()}")


class Preemption(L.Callback):
    """Signal -> checkpoint at the next step boundary on every rank -> exit 128 + signum (module docstring)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _signals(self, trainer) -> list[int]:
        sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
        requeue = getattr(env, "requeue_signal", None)
        if requeue is not None and requeue not in sigs:
            sigs.append(requeue)
        return sigs

    def _handler(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        print(f"salm-mtp: received signal {signum}: saving a checkpoint at the end of this step, then exiting "
              f"with code {128 + self.signum}", flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning's own SIGTERM handler (its exits 0 without saving): ours replaces it for the run
        self.signum = 0
        for s in self._signals(trainer):
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except (ValueError, OSError):  # not the main thread, or not settable here
                pass

    def _restore(self) -> None:
        for s, h in self._previous.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError, TypeError):
                pass
        self._previous.clear()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(float(self.signum > 0), device=pl_module.device)
        if not bool(all_reduce_sum(flag, trainer) > 0):  # every rank decides alike
            return
        signum = self.signum or signal.SIGTERM
        ckpt = trainer.checkpoint_callback
        ckpt_dir = getattr(ckpt, "dirpath", None) or os.path.join(trainer.log_dir or trainer.default_root_dir,
                                                                  "checkpoints")
        path = os.path.join(ckpt_dir, f"preempted-step{trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)  # collective: every rank writes its part
        saves = tracker_of(trainer.strategy)
        if saves is not None:
            saves.wait()  # an asynchronous save finishes (and is published) before the process exits
        rank_zero_info(f"salm-mtp: pre-empted by signal {signum} after step {trainer.global_step}; resumable "
                       f"checkpoint: {path}; exiting with code {128 + signum} (resume with --ckpt_path {path})")
        self._restore()
        raise Preempted(128 + signum)


def rng_state() -> dict:
    """This process's random number generator states (torch CPU and CUDA, Python, NumPy), checkpoint-safe types."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate()),
             "numpy": [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


class ResumeRNG(L.Callback):
    """Saves every rank's RNG states in the checkpoint and restores them right before the first training step after
    a resume, so SpecAugment masks (and anything else drawn from the global generators) continue as in an
    uninterrupted run: restoring at load time would not do, because creating the data iterator after the load
    draws from the generator. On another number of ranks each rank takes the state of rank ``rank % saved``."""

    def __init__(self) -> None:
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        import torch.distributed as dist

        mine = rng_state()
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)  # every rank builds the checkpoint dict: a collective is safe
        else:
            states = [mine]
        checkpoint["salm_rng"] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("salm_rng")
        if states:
            self._pending = states[trainer.global_rank % len(states)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None


class TrainMonitor(L.Callback):
    """Per training step ``lr``, ``utts_per_s`` and the MoE layers' ``moe_imbalance/<layer>``; the run's tokenizer
    saved in its log dir; the one-process allocator policy (salm_mtp/malloc.py)."""

    def __init__(self) -> None:
        self._t_last: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a broadcast under multi-process strategies: every rank must ask
        if trainer.is_global_zero and log_dir:
            pl_module.tokenizer.save_pretrained(os.path.join(log_dir, "tokenizer"))

    def on_train_start(self, trainer, pl_module) -> None:
        keep_freed_memory_if_alone(pl_module.device.type, trainer.world_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bsz = int(batch["input_ids"].shape[0])
        if trainer.optimizers:
            pl_module.log("lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                          batch_size=max(bsz, 1))
        now = time.perf_counter()
        if self._t_last is not None:
            pl_module.log("utts_per_s", bsz / max(now - self._t_last, 1e-9), on_step=True, on_epoch=False,
                          batch_size=max(bsz, 1))
        self._t_last = now
        metrics, pl_module.moe_metrics = pl_module.moe_metrics, {}
        for name, value in metrics.items():  # each trainable MoE layer's expert-load imbalance of the step
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
