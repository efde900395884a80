"""salm_mtp/lightning_private.py against the installed Lightning: asked inside a training step (where
salm_mtp/model.py asks), its answers name exactly the rows Lightning writes. A Lightning upgrade that renames or
changes them fails here first."""

import csv
import glob
import os

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from salm_mtp.lightning_private import (fit_epoch, injects_distributed_sampler, logged_step, prefetched_batches,
                                       should_update_logs)


class Logged(BoringModel):
    def __init__(self):
        super().__init__()
        self.seen = []

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("x", float(self.global_step))
        self.seen.append((should_update_logs(self.trainer), logged_step(self.trainer)))
        return out


def test_should_update_logs_and_logged_step_match_the_rows_lightning_writes(tmp_path):
    model = Logged()
    trainer = L.Trainer(max_steps=7, log_every_n_steps=3, logger=CSVLogger(str(tmp_path)), enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model)
    (path,) = glob.glob(os.path.join(str(tmp_path), "lightning_logs/version_*/metrics.csv"))
    rows = {int(r["step"]) for r in csv.DictReader(open(path)) if r.get("x")}
    assert rows == {step for update, step in model.seen if update}
    assert len(rows) == 2 and [step for _, step in model.seen] == list(range(7))


class ThreeBatches(torch.utils.data.IterableDataset):
    """No length, as lhotse's samplers: Lightning then fetches one batch ahead (a sized loader it does not)."""

    def __iter__(self):
        return iter([torch.randn(32) for _ in range(3)])


class Fetched(BoringModel):
    def __init__(self):
        super().__init__()
        self.seen = []

    def train_dataloader(self):
        return torch.utils.data.DataLoader(ThreeBatches(), batch_size=None)

    def training_step(self, batch, batch_idx):
        self.seen.append((prefetched_batches(self.trainer), fit_epoch(self.trainer), self.trainer.current_epoch))
        return super().training_step(batch[None], batch_idx)


def test_prefetched_batches_and_fit_epoch_inside_training_steps():
    """Over a loader without length the fit loop holds one batch ahead at every step but an epoch's last (the
    datamodule's resumable loader subtracts it), and fit_epoch is the epoch being trained (what the loop passes to
    set_epoch)."""
    model = Fetched()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model)
    assert [p for p, _, _ in model.seen] == [1, 1, 0, 1, 1, 0]
    assert [(e, current) for _, e, current in model.seen] == [(0, 0)] * 3 + [(1, 1)] * 3
    assert prefetched_batches(None) == 0 and fit_epoch(None) == 0


def test_injects_distributed_sampler_follows_the_trainer_flag():
    assert injects_distributed_sampler(L.Trainer(logger=False, use_distributed_sampler=True))
    assert not injects_distributed_sampler(L.Trainer(logger=False, use_distributed_sampler=False))
