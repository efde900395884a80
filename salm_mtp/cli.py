"""The one ``salm-mtp`` command line: LightningCLI over SALMModule and SALMDataModule, and the other tools.

    salm-mtp fit --config conf/demo.yaml --model.mtp.num_layers=2 --trainer.max_steps=100
    salm-mtp validate|test --config conf/demo.yaml --ckpt_path runs/demo/.../last.ckpt
    salm-mtp predict --config conf/demo.yaml --ckpt_path ...   (greedy hypotheses of data.test_manifest)
    salm-mtp evaluate --ckpt runs/demo/.../last.ckpt --out runs/demo/eval   (salm_mtp/evaluation/)
    salm-mtp export --ckpt runs/demo/.../last.ckpt --out exports/demo      (salm_mtp/io/export.py)
    salm-mtp plan --config conf/nemotron3_super.yaml --world_size 8 ...   (per-rank memory: salm_mtp/plan/)
    salm-mtp validate-data data/demo/train_cuts.jsonl.gz                   (salm_mtp/data/validate.py)
    salm-mtp pretrain-encoder fit --config conf/encoder_ctc.yaml           (salm_mtp/pretrain.py)
    salm-mtp transcribe --model exports/demo clips/ talk.flac               (salm_mtp/transcribe.py)
    salm-mtp make-demo-data --out data/demo                                (salm_mtp/demo/cli.py)

``salm-mtp --help`` lists them (SUBCOMMANDS); ``salm-mtp SUB --help`` shows every option of one.

Nothing heavy is imported before a subcommand is chosen: the Lightning subcommands live in
salm_mtp/trainer_cli.py (LightningCLI, omegaconf+ config merging), the others in their modules.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

def _lightning(argv: list[str], args: list[str] | None) -> None:
    """fit | validate | test | predict: LightningCLI (salm_mtp/trainer_cli.py) reads the whole command line."""
    _check_ckpt_arg(argv)  # LightningCLI itself reads --ckpt_path's hyperparameters before any Trainer hook
    from salm_mtp.trainer_cli import run_trainer_cli

    if args is not None:
        _quiet_args_warning()
    run_trainer_cli(args)


def _pretrain(argv: list[str], args: list[str] | None) -> None:
    from salm_mtp import pretrain
    from salm_mtp.malloc import bound_malloc_caching

    bound_malloc_caching()
    _quiet_args_warning()
    pretrain.main(argv[1:])


def _call(target: str):
    """A subcommand that takes the rest of the command line: ``"module:function"``, imported when chosen."""

    def run(argv: list[str], args: list[str] | None):
        import importlib

        module, function = target.split(":")
        result = getattr(importlib.import_module(module), function)(argv[1:])
        return result if isinstance(result, int) else None  # the planner returns its plan

    return run


SUBCOMMANDS: dict[str, tuple[str, Callable]] = {
    "fit": ("train SALM + MTP (LightningCLI: --config YAML, --model.* / --data.* / --trainer.* overrides)", _lightning),
    "validate": ("validation loss and metrics of a checkpoint on data.val_manifest (--ckpt_path)", _lightning),
    "test": ("test loss and metrics of a checkpoint on data.test_manifest (--ckpt_path)", _lightning),
    "predict": ("greedy hypotheses of data.test_manifest -> <log_dir>/predictions.jsonl (--ckpt_path)", _lightning),
    "evaluate": ("score a checkpoint on a manifest (--decode greedy|mtp) with the run's own data and prompt config",
                 _call("salm_mtp.evaluation.cli:main")),
    "export": ("checkpoint -> HF directories for serving and reloading (llm/ with mtp.*, encoder/, adapter)",
               _call("salm_mtp.io.export:export_main")),
    "plan": ("per-rank GPU memory of a training config under the real FSDP2 plan (no GPU, no weights)",
             _call("salm_mtp.plan.cli:main")),
    "validate-data": ("check manifests (lines, text, durations, audio headers) and list every bad cut",
                      _call("salm_mtp.data.validate:main")),
    "pretrain-encoder": ("CTC-pretrain the Parakeet encoder (LightningCLI, conf/encoder_ctc.yaml) -> HF directory",
                         _pretrain),
    "transcribe": ("audio files or directories -> one line of text each, no manifest (--decode auto: CTC/MTP drafts)",
                   _call("salm_mtp.transcribe:main")),
    "make-demo-data": ("make the spoken demo corpus (espeak-ng + sox) and its tokenizer",
                       _call("salm_mtp.demo.cli:main")),
}
"""The one CLI table: subcommand -> (its line of ``salm-mtp --help``, what runs it). Nothing heavy is imported
before a subcommand is chosen."""


def usage() -> str:
    """The top-level ``salm-mtp --help`` text."""
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: salm-mtp SUBCOMMAND [options]   (salm-mtp SUBCOMMAND --help: every option)", "",
             "Speech-aware LLMs with a Multi-Token Prediction head.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (text, _) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _dispatch(argv: list[str], args: list[str] | None) -> int | None:
    """Run one subcommand; returns its exit status (None: 0)."""
    return SUBCOMMANDS[argv[0]][1](argv, args)


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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args is None:
        _leave_distributed_run()


def _leave_distributed_run() -> None:
    """End a finished multi-process run's process without interpreter finalisation. Gloo's C++ worker threads
    can still own tensors with Python references (FSDP2's collectives); freeing them while the interpreter is being
    torn down aborts the process (SIGABRT, "terminate called without an active exception") after the run succeeded,
    and torchrun then reports the job as failed (pytorch/pytorch#179291). The exit handlers still run first (loggers,
    thread pools), with the interpreter alive; then the process leaves with status 0."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check_ckpt_arg(argv: list[str]) -> None:
    """SalmError (one paragraph) when ``--ckpt_path`` names a missing, truncated or non-torch file."""
    from salm_mtp.errors import check_ckpt_path

    for i, arg in enumerate(argv):
        if arg.startswith("--ckpt_path="):
            check_ckpt_path(arg.split("=", 1)[1])
        elif arg == "--ckpt_path" and i + 1 < len(argv):
            check_ckpt_path(argv[i + 1])


if __name__ == "__main__":
    main()  # args=None: LightningCLI reads sys.argv itself
