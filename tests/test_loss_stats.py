"""The statistics vector of salm_mtp/loss.py (layout + summary) and the logged ``loss`` of a training step:
it must be the loss the optimiser differentiates, CTC and MoE aux loss included."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import tiny
from salm_mtp.loss import CEStats, stat_names, stats_vector, summarise_stats
from salm_mtp.modules.moe_balance import MoEBalanceConfig


def test_layout_and_summary_on_hand_built_sums():
    assert stat_names(1) == ["main.ce", "main.correct", "main.count", "main.div",
                             "depth_1.ce", "depth_1.correct", "depth_1.count", "depth_1.div",
                             "ctc.ce", "ctc.count", "aux.loss"]
    t = torch.tensor
    stats = [CEStats(t(8.0), t(3.0), t(4.0)), CEStats(t(6.0), t(1.0), t(3.0))]
    vec = stats_vector(stats, ctc=(t(10.0), t(5.0)), aux=t(0.25))
    assert vec.tolist() == [8, 3, 4, 0, 6, 1, 3, 0, 10, 5, 0.25]
    m = summarise_stats(vec, num_depths=1, loss_scaling_factor=0.5, ctc_weight=0.3)
    assert m["main_loss"] == 2.0 and m["main_acc"] == 0.75 and m["target_tokens"] == 4
    assert m["mtp_loss/depth_1"] == 2.0 and m["mtp_acc/depth_1"] == pytest.approx(1 / 3)
    assert m["mtp_loss"] == 0.5 * 6.0 / 4.0  # normalised by the main head's count, as optimised
    assert m["ctc_loss"] == 2.0 and m["moe_aux_loss"] == 0.25
    assert m["loss"] == pytest.approx(2.0 + 0.75 + 0.3 * 2.0 + 0.25)
    plain = summarise_stats(stats_vector(stats), num_depths=1, loss_scaling_factor=0.5)
    assert "ctc_loss" not in plain and "moe_aux_loss" not in plain and plain["loss"] == 2.75


class _Record(L.Callback):
    """The loss training_step returned (what backward runs on) and the ``loss`` logged in the same step."""

    def __init__(self):
        self.rows: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((float(outputs["loss"]), float(trainer.callback_metrics["loss"])))


@pytest.mark.parametrize("aux_weight", [0.0, 0.01])
def test_logged_loss_is_the_optimised_loss_with_ctc(tmp_path, tok_dir, aux_weight):
    torch.manual_seed(0)
    module = tiny.build(tok_dir, ctc_weight=0.7, moe_balance=MoEBalanceConfig(aux_loss_weight=aux_weight))
    # clips long enough (1 s, 0.8 s) that the encoder has more frames than CTC targets: a finite CTC loss
    batches = [tiny.make_batch(module.tokenizer, ["one two three", "the cat"], [16000, 12800], seed=s)
               for s in (0, 1)]
    rec = _Record()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[rec])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert len(rec.rows) == 2
    for optimised, logged in rec.rows:
        assert logged == pytest.approx(optimised, rel=1e-6)
    logged = trainer.callback_metrics
    ctc_term = 0.7 * float(logged["ctc_loss"])
    assert ctc_term > 0.1  # the CTC term is a real part of the sum (so leaving it out would fail above)
    assert float(logged["loss"]) == pytest.approx(
        float(logged["main_loss"]) + float(logged["mtp_loss"]) + ctc_term + float(logged.get("moe_aux_loss", 0.0)),
        rel=1e-6)
    assert ("moe_aux_loss" in logged) == (aux_weight > 0)
