"""salm_mtp/lightning_private.py against the installed Lightning: asked inside a training step (where
salm_mtp/model.py asks), its answers name exactly the rows Lightning writes. A Lightning upgrade that renames or
changes them fails here first."""

import csv
import glob
import os

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from salm_mtp.lightning_private import logged_step, should_update_logs


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
