"""CTC pretraining of the Parakeet encoder: the demo's stand-in for a pretrained ASR encoder.

Real SALM recipes start from a pretrained ASR encoder; a random tiny encoder makes the LLM ignore
the audio for most of a short run (docs/design.md §8). This trains ``ParakeetEncoder`` + a CTC head on
the transcripts (tokenised with the LLM tokenizer) and, at the end of fit, writes a HF Parakeet
CTC directory that ``--model.encoder.path`` loads:

    salm-mtp pretrain-encoder fit --config conf/encoder_ctc.yaml [--model.export_dir=DIR]

then train SALM on top of it: ``salm-mtp fit --config conf/demo.yaml --model.encoder.path=DIR``.

The stage stops on quality: after the validation at which ``val_wer <= target_wer`` it ends (``trainer.max_steps``
is only the cap) and writes ``DIR/pretrain_result.json`` ({"val_wer", "target_wer", "reached", "step"}).
``require_target(DIR)`` (what ``scripts/run_demo.sh`` calls) refuses an encoder that did not reach its target.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch

from salm_mtp.config import EncoderConfig, OptimConfig
from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.data.tokenizer import ensure_audio_placeholder, load_tokenizer
from salm_mtp.errors import config_error
from salm_mtp.io.weights import save_encoder_hf
from salm_mtp.loss import ctc_sum
from salm_mtp.malloc import keep_freed_memory_if_alone
from salm_mtp.metrics import wer
from salm_mtp.modules.encoder import AudioEncoder, encoder_config_from
from salm_mtp.modules.features import FeatureConfig, LogMelFeatures, SpecAugment, SpecAugmentConfig
from salm_mtp.optim import build_optimizer


def ctc_greedy(logits: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best-path decoding: (B, F, C) logits -> per-row token ids (repeats merged, blanks dropped)."""
    best = logits.argmax(-1)  # (B, F)
    out = []
    for row, n in zip(best.tolist(), lengths.tolist()):
        ids, prev = [], None
        for t in row[:n]:
            if t != prev and t != blank:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


class CTCPretrainModule(L.LightningModule):
    """Features -> ParakeetEncoder -> CTC head, trained on the transcript tokens."""

    def __init__(
        self,
        encoder: EncoderConfig = EncoderConfig(),
        features: FeatureConfig = FeatureConfig(),
        spec_augment: SpecAugmentConfig = SpecAugmentConfig(),
        optim: OptimConfig = OptimConfig(),
        tokenizer_path: str | None = None,
        export_dir: str | None = None,
        target_wer: float | None = None,
    ):
        """CTC pretraining of the encoder described by ``encoder``.

        Args:
            encoder: encoder architecture (``--model.encoder.*``); a ``path`` continues from that directory.
            features: log-mel front end.
            spec_augment: SpecAugment in training.
            optim: optimiser and schedule.
            tokenizer_path: tokenizer whose ids are the CTC classes (the SALM run must use the same one).
            export_dir: where the HF Parakeet CTC directory is written at the end of fit.
            target_wer: stop after the first validation whose val_wer (greedy CTC, fraction) is at or below this;
                null: train to trainer.max_steps. The reached value is recorded in export_dir/pretrain_result.json.
        """
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer_path)
        ensure_audio_placeholder(self.tokenizer)
        self.features = LogMelFeatures(features)
        self.spec_augment = SpecAugment(spec_augment)
        enc_cfg, _ = encoder_config_from(encoder)
        self.audio = AudioEncoder(enc_cfg, len(self.tokenizer) + 1)
        if target_wer is not None and not 0.0 <= target_wer <= 1.0:
            raise config_error("model.target_wer", f"must be in [0, 1] (a fraction), got {target_wer}",
                               "set --model.target_wer=0.15 or null")
        self.cfg_encoder, self.cfg_optim, self.export_dir = encoder, optim, export_dir
        self.target_wer = target_wer
        self.last_val_wer: float | None = None
        self._val: list = []

    def setup(self, stage: str) -> None:
        dm = self._trainer.datamodule if self._trainer is not None else None
        if isinstance(dm, SALMDataModule):
            dm.connect(self.tokenizer)

    def configure_model(self) -> None:
        if self.cfg_encoder.path is not None and self._trainer is not None:
            from salm_mtp.io.fill import fill_encoder

            fill_encoder(self, self.cfg_encoder.path, with_ctc_head=True)

    def _logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        feats, fmask = self.features(batch["audios"], batch["audio_lens"])
        enc, lens = self.audio(self.spec_augment(feats, fmask), fmask)
        return self.audio.ctc_head(enc), lens

    def on_train_start(self) -> None:
        keep_freed_memory_if_alone(self.device.type, self.trainer.world_size)  # salm_mtp/malloc.py

    def training_step(self, batch: dict, batch_idx: int):
        if batch["input_ids"].shape[0] == 0:
            return None
        logits, lens = self._logits(batch)
        total, count = ctc_sum(logits, lens, batch["ctc_ids"], batch["ctc_lens"], self.audio.blank_id)
        loss = total / count.clamp(min=1)
        self.log("ctc_loss", loss, prog_bar=True, batch_size=len(batch["ids"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["input_ids"].shape[0] == 0:
            return
        logits, lens = self._logits(batch)
        total, count = ctc_sum(logits, lens, batch["ctc_ids"], batch["ctc_lens"], self.audio.blank_id)
        hyps = [self.tokenizer.decode(ids) for ids in ctc_greedy(logits, lens, self.audio.blank_id)]
        refs = [self.tokenizer.decode(r[: int(n)].tolist()) for r, n in zip(batch["ctc_ids"], batch["ctc_lens"])]
        self._val.append((float(total), float(count), refs, hyps))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        total = sum(v[0] for v in self._val) / max(sum(v[1] for v in self._val), 1.0)
        refs = [r for v in self._val for r in v[2]]
        hyps = [h for v in self._val for h in v[3]]
        self._val = []
        value = wer(refs, hyps)["wer"]
        self.log("val_ctc_loss", total, prog_bar=True)
        self.log("val_wer", value, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        self.last_val_wer = value
        if self.target_wer is not None and value <= self.target_wer and self.trainer.state.fn == "fit":
            self.print(f"val_wer {100 * value:.1f}% <= target {100 * self.target_wer:.1f}% at step "
                       f"{self.global_step}: stopping")
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return build_optimizer(self, self.cfg_optim)

    def configure_callbacks(self):
        from salm_mtp.provenance import RunEnvironment

        return [RunEnvironment()]

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            save_encoder_hf(self.audio, self.export_dir)
            reached = self.target_wer is None or (self.last_val_wer is not None and self.last_val_wer <= self.target_wer)
            result = {"val_wer": self.last_val_wer, "target_wer": self.target_wer, "reached": reached,
                      "step": self.global_step, "max_steps": self.trainer.max_steps}
            with open(os.path.join(self.export_dir, RESULT_FILE), "w") as f:
                json.dump(result, f, indent=2)
            print(f"encoder:     {os.path.abspath(self.export_dir)} (HF Parakeet CTC directory)")
            wer_text = "n/a" if self.last_val_wer is None else f"{100 * self.last_val_wer:.1f}%"
            print(f"val_wer:     {wer_text} at step {self.global_step}"
                  + ("" if self.target_wer is None else f" (target {100 * self.target_wer:.1f}%)"))


RESULT_FILE = "pretrain_result.json"
"""Written into the export directory at the end of fit: the last val_wer, the target and whether it was reached."""


def require_target(export_dir: str) -> int:
    """0 when the encoder in ``export_dir`` reached its target val_wer; else print why and what to do, return 1."""
    path = os.path.join(export_dir, RESULT_FILE)
    if not os.path.isfile(path):
        print(f"error: {path} is missing: the CTC pretraining did not finish (see its log above); rerun it")
        return 1
    with open(path) as f:
        r = json.load(f)
    if r.get("reached"):
        return 0
    got = "no validation ran" if r.get("val_wer") is None else f"val WER {100 * r['val_wer']:.1f}%"
    print(f"error: the CTC encoder in {export_dir} ended at {got} after {r.get('step')} steps, above its target "
          f"{100 * r['target_wer']:.1f}%; the SALM stage would inherit it, so it is not started. Give the encoder "
          f"more steps (ENC_STEPS={2 * max(int(r.get('max_steps') or 0), 1)} bash scripts/run_demo.sh), or look at "
          f"its val_wer curve (metrics.csv of the encoder_ctc run) and the corpus (meta.json)")
    return 1


def main(args: list[str] | None = None) -> None:
    """``salm-mtp pretrain-encoder fit|validate ...``: a LightningCLI over CTCPretrainModule and SALMDataModule
    (the same data code and ``omegaconf+`` config merging as ``salm-mtp fit``)."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from salm_mtp.trainer_cli import close_process_group

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config field docstrings are the --help
    LightningCLI(CTCPretrainModule, SALMDataModule, parser_kwargs={"parser_mode": "omegaconf+",
                                                                   "prog": "salm-mtp pretrain-encoder"},
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args)
    close_process_group()  # only after a clean run: a failed rank's peers may still be inside a collective
