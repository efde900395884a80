"""The Lightning half of ``salm-mtp``: ``fit | validate | test | predict`` as a LightningCLI over SALMModule and
SALMDataModule (salm_mtp/cli.py dispatches here; importing this module imports Lightning and the model).

YAML files and overrides are merged in OmegaConf's "omegaconf+" mode: ``${...}`` interpolations
are resolved after the command-line overrides, so an override reaches every field that
interpolates it. The resolved config is saved as ``config.yaml`` in the run's log directory.
"""

from __future__ import annotations

import json
import os
import re
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
        """Parse the command line; a mistake in it is one ``error: <key>: ...`` line (``parse_error``)."""
        self._raw_args = args  # kept to tell explicit settings from defaults (_parse_ckpt_path)
        try:
            super().parse_arguments(parser, args)
        except Exception as e:  # noqa: BLE001 - the parser raises (exit_on_error=False) instead of printing usage
            raise parse_error(e) from None

    def instantiate_classes(self) -> None:
        """Build the model, data module and trainer; what their configuration checks raise (wrapped by jsonargparse
        in union and instantiation errors) is one ``error: <key>: ...`` line, exit 2 (errors.as_config_error)."""
        from salm_mtp.errors import config_errors_in_one_line

        with config_errors_in_one_line():
            super().instantiate_classes()

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
        record = resume.checkpoint_record(path) if path else None
        if sub == "fit":
            check_steps_left(self.config[sub].get("trainer", {}).get("max_steps"),
                             record.get("global_step") if record else None, path)
        saved = resume.checkpoint_hparams(path, record) if record else None
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


def check_steps_left(max_steps: int | None, step: int | None, ckpt_path: str) -> None:
    """ConfigError when ``trainer.max_steps`` leaves nothing to train: 0 or below -1 (one process trains nothing,
    then reports another run's checkpoint as this one's), or at / below the step ``--ckpt_path`` resumes from."""
    from salm_mtp.errors import config_error

    if max_steps is None or max_steps == -1:
        return
    if max_steps < 1:
        raise config_error("trainer.max_steps", f"{max_steps} trains nothing",
                           "set --trainer.max_steps to the number of optimizer steps (or -1 with "
                           "--trainer.max_epochs and --model.optim.decay_steps)")
    if step is not None and step >= max_steps:
        raise config_error("trainer.max_steps", f"{max_steps} is not above step {step} of --ckpt_path {ckpt_path!r}: "
                           "nothing would be trained", f"raise --trainer.max_steps above {step} to train on")


def parse_error(exc: BaseException):
    """The one-line ConfigError of a command line jsonargparse refused: a check of ours inside it, else the parser's
    innermost complaint under the keys that lead to it (``data.inputs: name: Expected a <class 'str'>. Got value:
    False``), without its union alternatives and value dumps."""
    from salm_mtp.errors import ConfigError, as_config_error

    found = as_config_error(exc)
    if found is not None:
        return found
    text = str(exc)
    keys = re.findall(r'Parser key "([^"]+)":', text)
    lines = [ln.strip() for ln in text.splitlines()]
    last = max((i for i, ln in enumerate(lines) if ln.startswith("Parser key")), default=-1)
    noise = ("Given value", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Parser key",
             "Does not validate against any", "- Problem with given class_path")
    what = next((ln.lstrip("- ") for ln in lines[last + 1:] if ln and not ln.startswith(noise)), lines[0])
    fix = "see `salm-mtp fit --help` for the keys and their types"
    if re.search(r"Expected a <class 'str'>\. Got value: (True|False)$", what):
        fix = "YAML reads off, no, yes, on, true and false as booleans: quote the value, e.g. name: \"off\""
    return ConfigError(": ".join([*keys[:1], *([".".join(keys[1:])] if len(keys) > 1 else []), what]) + f"; {fix}")


def check_config_files(args: list[str]) -> None:
    """Each ``--config FILE`` of the command line must be a readable UTF-8 text file; ConfigError names it
    (jsonargparse's own failure on a binary file is a UnicodeDecodeError that names no file)."""
    from salm_mtp.errors import ConfigError

    for i, arg in enumerate(args):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            args[i + 1] if arg == "--config" and i + 1 < len(args) else None)
        if path is None:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                f.read()
        except FileNotFoundError:
            raise ConfigError(f"--config {path!r}: no such file; pass a YAML config (e.g. conf/demo.yaml)") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config {path!r}: not a UTF-8 text file (byte {e.start}: {e.reason}); pass a YAML "
                              "config (e.g. conf/demo.yaml)") from None
        except OSError as e:
            raise ConfigError(f"--config {path!r}: cannot be read ({e.strerror or e}); pass a readable YAML "
                              "config") from None


def run_trainer_cli(args: list[str] | None) -> None:
    """``salm-mtp fit|validate|test|predict ...`` (``args``: the command line after ``salm-mtp``; None: sys.argv)."""
    bound_malloc_caching()
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config field docstrings are the --help
    # Our logged values are already reduced over the data-parallel group (SALMModule.summarise):
    # Lightning's advice to add sync_dist=True would average them a second time.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(")
    check_config_files(list(args) if args is not None else sys.argv[1:])
    SALMCLI(
        SALMModule,
        SALMDataModule,
        parser_kwargs={"parser_mode": "omegaconf+", "prog": "salm-mtp", "exit_on_error": False},
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
