"""SALMModule: the training recipe of a SALM (salm_mtp/salm.py, the model itself, which it extends: same
parameter names, so checkpoints hold the SALM's tensors as they are).

  __init__          the SALM's parts on meta (SALM.__init__), the recipe's settings, hyperparameters recorded
  configure_model   precision check -> freezing -> dtype policy (frozen weights may be stored in bf16) -> FSDP2
                    plan on meta -> materialise local shards and fill them (SALM.materialize_weights)
  training_step     main + MTP (+ CTC) losses, global-token normalised and scaled by dp_size; logging
  validation/test   the same statistics summed over the epoch; predict: greedy hypotheses
  configure_optimizers  AdamW over the trainable parameters (salm_mtp/optim.py)
"""

from __future__ import annotations

import os
from dataclasses import asdict

import lightning as L
import torch

from salm_mtp.config import (AdapterConfig, EncoderConfig, FreezeConfig, LLMConfig, LoRAConfig, MTPConfig, OptimConfig,
                             ParallelConfig, check_positive)
from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.data.dataset import failed_row, hyp_rows
from salm_mtp.guard import NonFiniteGuard
from salm_mtp.loss import summarise_stats
from salm_mtp.materialize import is_materialized
from salm_mtp.modules.features import FeatureConfig, SpecAugmentConfig
from salm_mtp.modules.llm import missing_mamba_kernels
from salm_mtp.modules.moe_balance import MoEBalanceConfig, MoEBalancer
from salm_mtp.objective import training_objective
from salm_mtp.optim import build_optimizer
from salm_mtp.parallel import all_reduce_sum, apply_parallelism, apply_param_dtypes, check_precision, data_parallel
from salm_mtp.salm import SALM, absolute_paths, config_from_dict
from salm_mtp.step_metrics import EvalSums, TrainMetrics


class SALMModule(SALM, L.LightningModule):
    """The training recipe of a SALM (salm_mtp/salm.py): losses, steps, logging, optimiser, sharding and filling."""

    def __init__(
        self,
        encoder: EncoderConfig = EncoderConfig(),
        adapter: AdapterConfig = AdapterConfig(),
        llm: LLMConfig = LLMConfig(),
        mtp: MTPConfig = MTPConfig(),
        optim: OptimConfig = OptimConfig(),
        features: FeatureConfig = FeatureConfig(),
        spec_augment: SpecAugmentConfig = SpecAugmentConfig(),
        freeze: FreezeConfig = FreezeConfig(),
        parallel: ParallelConfig = ParallelConfig(),
        moe_balance: MoEBalanceConfig = MoEBalanceConfig(),
        lora: LoRAConfig = LoRAConfig(),
        tokenizer_path: str | None = None,
        ctc_weight: float = 0.0,
        lm_head_chunk_size: int = 256,
        init_seed: int | None = None,
        max_nonfinite_steps: int = 20,
    ):
        """Build the model from typed configs.

        Args:
            encoder: audio encoder (``--model.encoder.*``).
            adapter: modality adapter (``--model.adapter.*``).
            llm: Nemotron-H LLM (``--model.llm.*``).
            mtp: MTP head (``--model.mtp.*``).
            optim: optimiser and schedule (``--model.optim.*``).
            features: log-mel front end (``--model.features.*``).
            spec_augment: SpecAugment (``--model.spec_augment.*``).
            freeze: parameters to freeze by regex (``--model.freeze.*``).
            parallel: FSDP2 / DP options (``--model.parallel.*``).
            moe_balance: expert-load balancing of trainable MoE routers (``--model.moe_balance.*``).
            lora: LoRA adapters on the LLM (``--model.lora.*``; r=0 = off).
            tokenizer_path: tokenizer directory; null = the LLM directory's tokenizer.
            ctc_weight: weight of an encoder CTC auxiliary loss on the transcript (0 = off).
            lm_head_chunk_size: target rows per lm_head chunk in the loss: one chunk of logits (rows x vocab, fp32)
                exists at a time; smaller = less memory, more passes over the lm_head's gradient buffer
                (bench/loss_memory.py).
            init_seed: seed of the new (not loaded) parameters' initialisation; each module's values
                depend only on it and the module's name, so N ranks start from the weights 1 process
                would. null = rank 0's global seed (seed_everything).
            max_nonfinite_steps: a step whose loss is nan/inf (on any rank) is skipped: no update; after this
                many consecutive ones the run stops with an error (non-zero exit).
        """
        # Checkpoints written through LightningCLI store the parts as plain dicts: accept both.
        parts = config_from_dict(dict(encoder=encoder, adapter=adapter, llm=llm, mtp=mtp, optim=optim,
                                      features=features, spec_augment=spec_augment, freeze=freeze,
                                      parallel=parallel, moe_balance=moe_balance, lora=lora))
        # the checkpoint's hyperparameters name the directories absolutely: it loads from any working directory
        encoder, llm, adapter = (absolute_paths(parts[k]) for k in ("encoder", "llm", "adapter"))
        mtp, optim, features, spec_augment, freeze, parallel = (
            parts[k] for k in ("mtp", "optim", "features", "spec_augment", "freeze", "parallel"))  # recorded as such
        tokenizer_path = os.path.abspath(tokenizer_path) if tokenizer_path else tokenizer_path
        super().__init__(encoder=encoder, adapter=adapter, llm=llm, mtp=mtp, features=features,
                         spec_augment=spec_augment, freeze=freeze, parallel=parallel,
                         lora=parts["lora"], tokenizer_path=tokenizer_path, ctc_weight=ctc_weight,
                         init_seed=init_seed)  # SALM: every part, on meta
        self.save_hyperparameters()
        # LightningCLI records the parsed config as given (relative paths included): record the absolute ones
        for key, part in (("encoder", encoder), ("llm", llm), ("adapter", adapter)):
            if isinstance(self.hparams.get(key), dict):
                self.hparams[key]["path"] = part.path
        if self.hparams.get("tokenizer_path"):
            self.hparams["tokenizer_path"] = tokenizer_path
        self.cfg_optim = optim
        self.lm_head_chunk_size = check_positive(lm_head_chunk_size, "model.lm_head_chunk_size")  # no clamping
        self.guard = NonFiniteGuard(max_nonfinite_steps)  # nan/inf steps skipped; a bad update stops the run

        self.balancer = MoEBalancer(parts["moe_balance"])
        self.balancer.attach(self)  # hooks on every router; only trainable ones are counted and updated
        self.train_metrics, self.eval_sums = TrainMetrics(), EvalSums()  # what is logged (salm_mtp/step_metrics.py)
        self.moe_metrics: dict[str, float] = {}
        """Each trainable MoE layer's expert-load imbalance (max / mean load) of the latest optimizer step."""
        self.source_names: tuple[str, ...] = ()
        """Training data sources (data.inputs names, from the data module): per-source metrics source/<name>/main_loss, ..."""
        self.val_names: tuple[str, ...] = ()
        """Named validation sets (data.val_inputs, from the data module): val_loss/<name>."""

    def configure_model(self) -> None:
        """Freeze, set dtypes, shard (FSDP2) and fill the weights; runs once (Lightning calls it again on resume).

        Under a trainer the pretrained tensors of model.llm.path / model.encoder.path are read, unless the
        run restores a checkpoint (``--ckpt_path``), which holds every weight. Outside a trainer
        (``load_from_checkpoint``) nothing is read either: the caller loads the state dict.
        """
        if is_materialized(self):
            return
        trainer = self._trainer
        check_precision(self, trainer)
        self.apply_freeze()
        if trainer is not None:  # outside a trainer (evaluation, export) every tensor stays fp32
            apply_param_dtypes(self)
        apply_parallelism(self)  # on meta: each rank keeps a plan of its shards, no memory yet
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        missing_mamba_kernels(self.llm, device)
        load = trainer is not None and getattr(trainer, "ckpt_path", None) is None
        self.materialize_weights(device, load_pretrained=load)

    def setup(self, stage: str) -> None:
        dm = self._trainer.datamodule if self._trainer is not None else None
        if isinstance(dm, SALMDataModule):  # the model's tokenizer and audio rate in, the data's names out
            dm.connect(self.tokenizer, self.audio_positions_per_second())
            self.source_names, self.val_names = tuple(dm.source_names()), tuple(dm.val_names())

    def configure_callbacks(self):
        """Every run's chores (salm_mtp/callbacks.py) and its environment.json (salm_mtp/provenance.py)."""
        from salm_mtp.callbacks import BadCutReport, Preemption, ResumeRNG, TrainMonitor
        from salm_mtp.provenance import RunEnvironment

        return [BadCutReport(), Preemption(), RunEnvironment(), ResumeRNG(), TrainMonitor()]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A one-file checkpoint's tensors checked against the model both ways before they load (one paragraph
        naming the missing and unexpected ones; SALMParallelStrategy does the same for its own loads)."""
        if "state_dict" in checkpoint and self._trainer is not None and self._trainer.ckpt_path:
            from salm_mtp.strategy import check_keys

            check_keys(self._trainer.ckpt_path, checkpoint["state_dict"].keys(), self.state_dict().keys())

    def compute_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(optimised loss, globally summed statistics vector, batch size): salm_mtp/objective.py."""
        return training_objective(self, batch, self.source_names if self.training else (), self._reduce,
                                  data_parallel(self._trainer)[0])

    def summarise(self, summed: torch.Tensor, sources: tuple[str, ...] | list[str] = ()) -> dict[str, float]:
        """Global metrics from a summed statistics vector (what is logged; ``salm_mtp.loss.summarise_stats``);
        ``sources``: the data sources whose entries the vector holds (training on data.inputs)."""
        return summarise_stats(summed, self.num_mtp_depths, self.cfg_mtp.loss_scaling_factor, self.cfg_mtp.loss,
                               self.ctc_weight, sources)

    def _skip_empty(self, batch: dict) -> bool:
        """True when any data-parallel rank's batch lost every clip (unreadable audio): decided together, so all
        ranks skip the step and no collective waits forever."""
        empty = torch.tensor(float(batch["input_ids"].shape[0] == 0), device=batch["input_ids"].device)
        return bool(all_reduce_sum(empty, self._trainer) > 0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if self._skip_empty(batch):
            return None  # no backward, no optimiser step, on every rank
        running = self.guard.running_stats(self)
        loss, summed, bsz = self.compute_losses(batch)
        skip = self.guard.skip(loss, self._reduce, self.global_step, self._lr())
        if skip:  # the forward already moved BatchNorm statistics toward nan: put them back
            self.guard.restore(running)
        self.train_metrics.log(self, summed, batch, skip)
        self.log("nonfinite_steps", float(self.guard.skipped), on_step=True, on_epoch=False, batch_size=bsz)
        return None if skip else loss

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel group (identity in one process)."""
        return all_reduce_sum(t, self._trainer)

    def _lr(self) -> float:
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        return optimizers[0].param_groups[0]["lr"] if optimizers else float("nan")

    def on_train_start(self) -> None:
        self.train()  # Lightning leaves modes as they are: apply head_only's eval modes (SALM.train)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the aux-loss-free bias update of trainable routers (before any callback, so a
        checkpoint written at the end of this step holds the updated biases: resuming is exact)."""
        super().optimizer_step(*args, **kwargs)
        self.guard.check_weights(self, self._reduce, self.global_step)
        if self.guard.last_skipped:  # non-finite loss: no update of anything, router biases included
            self.guard.last_skipped = False
            self.balancer.loads = {}
            return
        if self.balancer.loads:
            self.moe_metrics = self.balancer.step(self._reduce)  # logged by TrainMonitor

    def _eval_step(self, batch: dict, dataloader_idx: int = 0) -> None:
        if not self._skip_empty(batch):
            self.eval_sums.add(self.compute_losses(batch)[1], dataloader_idx)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self.eval_sums.log(self, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self.eval_sums.log(self, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        from salm_mtp.generate import greedy_generate

        failed = [failed_row(b["cut_id"], b["reason"], b["detail"]) for b in batch.get("skipped", ())]
        if batch["input_ids"].shape[0] == 0:  # every cut of the batch was unreadable
            return failed
        return failed + hyp_rows(batch, greedy_generate(self, batch))  # the rows salm-mtp evaluate writes

    def configure_optimizers(self):
        return build_optimizer(self, self.cfg_optim)

    def salm_config(self) -> dict:
        """The constructor arguments as plain data (written next to exports)."""
        return {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in self.hparams.items()}


