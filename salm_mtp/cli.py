"""``salm-mtp`` command line: LightningCLI over SALMModule and SALMDataModule.

    salm-mtp fit --config conf/demo.yaml --model.mtp.num_layers=2 --trainer.max_steps=100
    salm-mtp validate|test --config conf/demo.yaml --ckpt_path runs/demo/.../last.ckpt

YAML files and overrides are merged in OmegaConf's "omegaconf+" mode: ``${...}`` interpolations
are resolved after the command-line overrides, so an override reaches every field that
interpolates it. The resolved config is saved as ``config.yaml`` in the run's log directory.
"""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.model import SALMModule


class SALMCLI(LightningCLI):
    """LightningCLI that reports where a fit wrote its logs and checkpoints."""

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a broadcast under multi-process strategies: every rank must ask
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        lines = [f"logs:        {log_dir}"]
        if log_dir and os.path.isfile(os.path.join(log_dir, "metrics.csv")):
            lines.append(f"metrics:     {os.path.join(log_dir, 'metrics.csv')}")
        if ckpt is not None:
            lines.append(f"checkpoint:  {ckpt.last_model_path or ckpt.best_model_path or '(none saved)'}")
        rank_zero_info("\n".join(["", "salm-mtp fit finished", *lines]))


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Our logged values are already reduced over the data-parallel group (SALMModule.summarise):
    # Lightning's advice to add sync_dist=True would average them a second time.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(")
    SALMCLI(
        SALMModule,
        SALMDataModule,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
