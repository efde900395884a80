"""What a SALMModule logs from its summed statistics vectors (salm_mtp/loss.py lays them out).

``TrainMetrics``  per training step: every global metric with ``self.log`` (``loss``, ``mtp_loss`` and
                  ``ctc_loss`` on the progress bar), ``padding_ratio``, and the per-source metrics
                  (``source/<name>/...``) summed over the steps since the last log row and written to the
                  loggers on that row (a source with no rows in the window gets no entry: ``self.log`` would
                  repeat its last value, and length-bucketed batches often hold one source only).
``EvalSums``      per validation / test epoch: the statistics summed over the epoch, logged as ``val_*`` /
                  ``test_*``, and per named validation set ``val_loss/<name>``, ``val_main_loss/<name>``.
"""

from __future__ import annotations

import torch

from salm_mtp.lightning_private import logged_step, should_update_logs
from salm_mtp.loss import SOURCE_METRICS, source_metric

PROGRESS_BAR = ("loss", "mtp_loss", "ctc_loss")
"""Training metrics shown on the progress bar."""


class TrainMetrics:
    """Logs one training step's metrics (module docstring)."""

    def __init__(self) -> None:
        self.window: torch.Tensor | None = None
        """Summed statistics since the last per-source log row."""

    def log(self, module, summed: torch.Tensor, batch: dict, skipped: bool) -> None:
        """Log ``summed`` (this step's statistics, all ranks) for ``module``; a skipped step adds nothing to the
        per-source window."""
        bsz = int(batch["input_ids"].shape[0])
        per_source = {source_metric(n, m) for m in SOURCE_METRICS for n in module.source_names}
        for name, value in module.summarise(summed, module.source_names).items():
            if name not in per_source:
                module.log(name, value, prog_bar=name in PROGRESS_BAR, on_step=True, on_epoch=False, batch_size=bsz)
        if not skipped:
            self._per_source(module, summed, per_source)
        padding = 1.0 - float(batch["audio_lens"].sum()) / max(batch["audios"].numel(), 1)
        module.log("padding_ratio", padding, on_step=True, on_epoch=False, batch_size=bsz)

    def _per_source(self, module, summed: torch.Tensor, keys: set[str]) -> None:
        if not module.source_names or module._trainer is None:
            return
        self.window = summed if self.window is None else self.window + summed
        if not should_update_logs(module.trainer):
            return
        window, self.window = self.window, None
        out = {k: v for k, v in module.summarise(window, module.source_names).items() if k in keys}
        for logger in module.loggers:
            logger.log_metrics(out, step=logged_step(module.trainer))  # the row Lightning's own values get


class EvalSums:
    """Statistics summed over a validation / test epoch, overall and per validation set (module docstring)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.sets: dict[int, torch.Tensor] = {}

    def add(self, summed: torch.Tensor, dataloader_idx: int = 0) -> None:
        self.total = summed if self.total is None else self.total + summed
        prev = self.sets.get(dataloader_idx)
        self.sets[dataloader_idx] = summed if prev is None else prev + summed

    def log(self, module, prefix: str) -> None:
        """Log the epoch's metrics as ``<prefix>_<name>`` (and per named set under val), then start over."""
        total, sets, self.total, self.sets = self.total, self.sets, None, {}
        if total is None:
            return
        for name, value in module.summarise(total).items():
            module.log(f"{prefix}_{name}", value, prog_bar=name in ("loss", "mtp_loss"), sync_dist=False)
        if prefix != "val":
            return
        for idx, vec in sorted(sets.items()):
            if idx < len(module.val_names):
                metrics = module.summarise(vec)
                module.log(f"val_loss/{module.val_names[idx]}", metrics["loss"], sync_dist=False)
                module.log(f"val_main_loss/{module.val_names[idx]}", metrics["main_loss"], sync_dist=False)
