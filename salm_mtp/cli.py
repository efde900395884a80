"""The one ``salm-mtp`` command line: LightningCLI over SALMModule and SALMDataModule, and the other tools.

    salm-mtp fit --config conf/demo.yaml --model.mtp.num_layers=2 --trainer.max_steps=100
    salm-mtp validate|test --config conf/demo.yaml --ckpt_path runs/demo/.../last.ckpt
    salm-mtp predict --config conf/demo.yaml --ckpt_path ...   (greedy hypotheses of data.test_manifest)
    salm-mtp evaluate --ckpt runs/demo/.../last.ckpt --out runs/demo/eval   (salm_mtp/evaluate.py)
    salm-mtp export --ckpt runs/demo/.../last.ckpt --out exports/demo      (salm_mtp/io.py)
    salm-mtp plan --config conf/nemotron3_super.yaml --world_size 8 ...   (per-rank memory: salm_mtp/plan.py)
    salm-mtp validate-data data/demo/train_cuts.jsonl.gz                   (salm_mtp/data/validate.py)
    salm-mtp pretrain-encoder fit --config conf/encoder_ctc.yaml           (salm_mtp/pretrain.py)
    salm-mtp make-demo-data --out data/demo                                (salm_mtp/data/demo_corpus.py)

``salm-mtp --help`` lists them (SUBCOMMANDS); ``salm-mtp SUB --help`` shows every option of one.

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

    def add_arguments_to_parser(self, parser) -> None:
        document_data_options(parser)

    def before_instantiate_classes(self) -> None:
        """Refuse an unwritable ``trainer.default_root_dir`` before the Trainer and its loggers touch it (their
        own failure is a long traceback that names no key)."""
        from salm_mtp.errors import check_writable_dir

        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        root = cfg.get("trainer", {}).get("default_root_dir")
        if root and int(os.environ.get("RANK", "0")) == 0:
            check_writable_dir(str(root), "trainer.default_root_dir")

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


def document_data_options(parser) -> None:
    """Give each ``--data.X`` option the docstring of ``DataConfig.X`` as its help: SALMDataModule's arguments are
    DataConfig's fields (same names, defaults and checks), and DataConfig is where they are documented."""
    import docstring_parser

    from salm_mtp.data.datamodule import DataConfig

    docs = {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse_from_object(DataConfig).params
            if p.description}
    for action in parser._actions:
        name = action.dest[len("data."):] if action.dest.startswith("data.") else None
        if name in docs and not action.help:
            action.help = docs[name].replace("%", "%%")  # argparse %-formats help strings


def _bound_malloc_caching() -> None:
    """Hand freed blocks >= 1 MiB back to the OS at once (glibc's M_MMAP_THRESHOLD; bench/scale_memory.py).

    glibc raises that threshold to 32 MiB after the first large free, after which FSDP2's varying 1-32 MiB
    all-gather buffers come from a heap that fragments and never shrinks: each rank then holds ~1 GiB more
    than it uses. ``SALM_MTP_MALLOC_THRESHOLD=0`` keeps glibc's default; other systems are left alone.
    """
    threshold = int(os.environ.get("SALM_MTP_MALLOC_THRESHOLD", 1 << 20))
    if threshold <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


SUBCOMMANDS: dict[str, str] = {
    "fit": "train SALM + MTP (LightningCLI: --config YAML, --model.* / --data.* / --trainer.* overrides)",
    "validate": "validation loss and metrics of a checkpoint on data.val_manifest (--ckpt_path)",
    "test": "test loss and metrics of a checkpoint on data.test_manifest (--ckpt_path)",
    "predict": "greedy hypotheses of data.test_manifest -> <log_dir>/predictions.jsonl (--ckpt_path)",
    "evaluate": "score a checkpoint on a manifest (--decode greedy|mtp) with the run's own data and prompt config",
    "export": "checkpoint -> HF directories for serving and reloading (llm/ with mtp.*, encoder/, adapter)",
    "plan": "per-rank GPU memory of a training config under the real FSDP2 plan (no GPU, no weights)",
    "validate-data": "check manifests (lines, text, durations, audio headers) and list every bad cut",
    "pretrain-encoder": "CTC-pretrain the Parakeet encoder (LightningCLI, conf/encoder_ctc.yaml) -> HF directory",
    "make-demo-data": "make the spoken demo corpus (espeak-ng + sox) and its tokenizer",
}
"""Every subcommand with its one line of ``salm-mtp --help``."""

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def usage() -> str:
    """The top-level ``salm-mtp --help`` text."""
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: salm-mtp SUBCOMMAND [options]   (salm-mtp SUBCOMMAND --help: every option)", "",
             "Speech-aware LLMs with a Multi-Token Prediction head.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _dispatch(argv: list[str], args: list[str] | None) -> int | None:
    """Run one subcommand; returns its exit status (None: 0)."""
    sub = argv[0]
    if sub == "plan":  # not a Trainer subcommand: the memory planner builds no Trainer
        from salm_mtp import plan

        plan.main(argv[1:])  # returns the plan, not a status
        return None
    if sub == "validate-data":  # reads manifests only: no model, no Trainer
        from salm_mtp.data import validate

        return validate.main(argv[1:])
    if sub == "evaluate":
        from salm_mtp import evaluate

        return evaluate.main(argv[1:])
    if sub == "export":
        from salm_mtp.io import export_main

        return export_main(argv[1:])
    if sub == "make-demo-data":
        from salm_mtp.data import demo_corpus

        return demo_corpus.main(argv[1:])
    if sub == "pretrain-encoder":
        from salm_mtp import pretrain

        _bound_malloc_caching()
        _quiet_args_warning()
        pretrain.main(argv[1:])
        return None
    _check_ckpt_arg(argv)  # LightningCLI itself reads --ckpt_path's hyperparameters before any Trainer hook
    if args is not None:
        _quiet_args_warning()
    _run_trainer_cli(args)
    return None


def _quiet_args_warning() -> None:
    """LightningCLI warns when it gets an ``args`` list while sys.argv holds a command line: ours is the rest of
    that command line. sys.argv itself stays as it is (multi-process launchers re-run it for every rank)."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


def main(args: list[str] | None = None) -> None:
    """``salm-mtp SUBCOMMAND ...`` (``args``: the command line after ``salm-mtp``; None: sys.argv[1:])."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        print(f"error: unknown subcommand {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    from salm_mtp.errors import SalmError

    try:
        status = _dispatch(argv, args)
    except SalmError as e:  # bad inputs: one paragraph naming the file/key and the fix, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    if status:
        sys.exit(status)


def _check_ckpt_arg(argv: list[str]) -> None:
    """SalmError (one paragraph) when ``--ckpt_path`` names a missing, truncated or non-torch file."""
    from salm_mtp.errors import check_ckpt_path

    for i, arg in enumerate(argv):
        if arg.startswith("--ckpt_path="):
            check_ckpt_path(arg.split("=", 1)[1])
        elif arg == "--ckpt_path" and i + 1 < len(argv):
            check_ckpt_path(argv[i + 1])


def _run_trainer_cli(args: list[str] | None) -> None:
    _bound_malloc_caching()
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


if __name__ == "__main__":
    main()  # args=None: LightningCLI reads sys.argv itself
