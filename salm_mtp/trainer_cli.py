"""The Lightning half of ``salm-mtp``: ``fit | validate | test | predict`` as a LightningCLI over SALMModule and
SALMDataModule (salm_mtp/cli.py dispatches here; importing this module imports Lightning and the model).

YAML files and overrides are merged in OmegaConf's "omegaconf+" mode: ``${...}`` interpolations
are resolved after the command-line overrides, so an override reaches every field that
interpolates it. The resolved config is saved as ``config.yaml`` in the run's log directory.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.malloc import bound_malloc_caching
from salm_mtp.model import SALMModule


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes ``salm-mtp predict`` hypotheses to ``<log_dir>/predictions[.rank].jsonl`` as they come."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.path: str | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir or "."
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, f"predictions{suffix}.jsonl")
        open(self.path, "w").close()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.path, "a") as f:
            for row in prediction:
                f.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(f"predictions: {self.path}")


class SALMCLI(LightningCLI):
    """LightningCLI that reports where a fit wrote its logs and checkpoints, and writes predictions."""

    def parse_arguments(self, parser, args) -> None:
        self._raw_args = args  # kept to tell explicit settings from defaults (_parse_ckpt_path)
        super().parse_arguments(parser, args)

    def _explicit_model_keys(self, sub: str) -> set[str] | None:
        """The model keys the user gave (in --config files or as flags), re-parsed without defaults; None when
        that cannot be told (then every value that differs from its default counts as given)."""
        from salm_mtp import resume

        args = getattr(self, "_raw_args", None)
        if args is None:
            args = sys.argv[1:]
        if not isinstance(args, (list, tuple)):
            return None
        try:
            given = self.parser.parse_args(list(args), defaults=False)
        except (Exception, SystemExit):  # noqa: BLE001
            return None
        model = given.get(sub, {}).get("model") if hasattr(given, "get") else None
        return set(resume.flatten(model)) if model is not None else set()

    def _parse_ckpt_path(self) -> None:
        """The resume rule (salm_mtp/resume.py) instead of Lightning's, which replaced every --model.* setting by
        the checkpoint's: explicit settings that change the trained tensors are refused, the others applied and
        listed, and settings left at their defaults take the checkpoint's values."""
        from salm_mtp import resume

        sub = self.config.get("subcommand")
        if not sub:
            return
        path = self.config[sub].get("ckpt_path")
        saved = resume.checkpoint_hparams(path) if path else None
        if not saved:
            return
        current = resume.flatten(self.config[sub]["model"])
        given = self._explicit_model_keys(sub)
        if given is None:
            defaults = resume.flatten(self._subcommand_parsers[sub].get_defaults().get("model"))
            given = {k for k, v in current.items() if k not in defaults or not resume.same_value(defaults[k], v)}
        explicit = {k: v for k, v in current.items() if k in given}
        merged, safe, refused = resume.resolve(resume.flatten(saved), explicit)
        if refused:
            raise resume.ResumeSettingsError(resume.refusal_message(path, refused))
        if safe and int(os.environ.get("RANK", "0")) == 0:
            print(resume.changes_line(safe), flush=True)
        merged = {k: v for k, v in merged.items() if k in current}  # keys this version of the code knows
        self.config = self.parser.parse_object({sub: {"model": resume.unflatten(merged)}}, self.config)

    def before_instantiate_classes(self) -> None:
        """Refuse an unwritable ``trainer.default_root_dir`` before the Trainer and its loggers touch it (their
        own failure is a long traceback that names no key)."""
        from salm_mtp.errors import check_writable_dir

        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        root = cfg.get("trainer", {}).get("default_root_dir")
        if root and int(os.environ.get("RANK", "0")) == 0:
            check_writable_dir(str(root), "trainer.default_root_dir")

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with a checkpoint reader that takes sharded directories in one process too."""
        from salm_mtp.io import sharded as checkpoint_io

        trainer = super().instantiate_trainer(**kwargs)
        checkpoint_io.use_for(trainer)
        return trainer

    def before_predict(self) -> None:
        self.trainer.callbacks.append(JsonlPredictionWriter())

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


def run_trainer_cli(args: list[str] | None) -> None:
    """``salm-mtp fit|validate|test|predict ...`` (``args``: the command line after ``salm-mtp``; None: sys.argv)."""
    bound_malloc_caching()
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config field docstrings are the --help
    # Our logged values are already reduced over the data-parallel group (SALMModule.summarise):
    # Lightning's advice to add sync_dist=True would average them a second time.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(")
    SALMCLI(
        SALMModule,
        SALMDataModule,
        parser_kwargs={"parser_mode": "omegaconf+", "prog": "salm-mtp"},
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
    close_process_group()  # only after a clean run: a failed rank's peers may still be inside a collective


def close_process_group() -> None:
    """Destroy the default process group when a run made one. Lightning leaves it alive; a gloo/NCCL group still
    alive at interpreter exit can abort a rank ("terminate called without an active exception", SIGABRT) after
    the run itself succeeded, which torchrun then reports as a failed job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
