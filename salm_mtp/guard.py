"""``NonFiniteGuard``: a training step whose loss is nan/inf on any rank is skipped (no update, BatchNorm statistics
put back), counted and logged; too many in a row, or an update that makes a weight non-finite, stops the run with
one paragraph (``NonFiniteError``) before any checkpoint could hold a bad weight.

    guard = NonFiniteGuard(max_consecutive=20)
    saved = guard.running_stats(module)            # before the forward
    if guard.skip(loss, reduce):                   # every rank decides alike (``reduce``: a sum over the dp group)
        guard.restore(saved)
    ...optimizer step...
    guard.check_weights(module, reduce, step)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.utilities import rank_zero_warn

from salm_mtp.errors import NonFiniteError, config_error

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sum of a tensor over the data-parallel group (identity in one process)."""


class NonFiniteGuard:
    """Counts of skipped steps and the rules above (module docstring)."""

    def __init__(self, max_consecutive: int = 20) -> None:
        if max_consecutive < 1:
            raise config_error("model.max_nonfinite_steps", f"must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        """Training steps skipped for a non-finite loss in this process's run (not restored on resume)."""
        self.consecutive = 0
        self.last_skipped = False
        """Whether the latest step was skipped (its optimizer step and router-bias update must not happen)."""

    @staticmethod
    def running_stats(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, copy) of every BatchNorm running statistic a training forward updates (a few KiB)."""
        out = []
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
                out += [(b, b.detach().clone()) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                        if b is not None]
        return out

    @staticmethod
    def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put the BatchNorm statistics back (the skipped forward moved them toward nan)."""
        for buf, value in saved:
            buf.copy_(value)

    def skip(self, loss: torch.Tensor, reduce: Reduce, step: int, lr: float) -> bool:
        """True (on every rank alike) when any rank's loss is nan/inf: the step is skipped, counted and warned
        about; NonFiniteError after ``max_consecutive`` in a row."""
        bad = torch.logical_not(torch.isfinite(loss.detach())).float()
        self.last_skipped = bool(reduce(bad) > 0)
        if not self.last_skipped:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        n, limit = self.consecutive, self.max_consecutive
        rank_zero_warn(f"step {step}: non-finite loss ({float(loss.detach()):g}): step skipped, weights untouched "
                       f"({n} consecutive, stop at {limit})")
        if n >= limit:
            raise NonFiniteError(
                f"{n} consecutive training steps had a non-finite loss (last at step {step}, lr {lr:g}); stopping. "
                "The weights stayed finite and the checkpoints hold no non-finite weights. Lower --model.optim.lr "
                "(or check the data: `salm-mtp validate-data MANIFEST`) and resume from the last checkpoint; "
                f"--model.max_nonfinite_steps (now {limit}) sets how many are tolerated")
        return True

    @staticmethod
    def check_weights(module: torch.nn.Module, reduce: Reduce, step: int) -> None:
        """NonFiniteError when an optimizer step left a non-finite trainable weight (or float buffer) on any rank:
        raised before any checkpoint of this step is written, so every checkpoint holds finite weights."""
        bad = torch.zeros((), device=next(module.parameters()).device)
        tensors = [p for p in module.parameters() if p.requires_grad]
        tensors += [b for b in module.buffers() if b.is_floating_point()]
        for p in tensors:
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += torch.logical_not(torch.isfinite(local.detach())).any().float()
        if bool(reduce(bad) > 0):
            raise NonFiniteError(
                f"the optimizer step at step {step} made weights non-finite (finite loss, exploding update); "
                "stopping before any checkpoint holds them. Lower --model.optim.lr and resume from the last "
                "checkpoint")
