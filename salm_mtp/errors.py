"""The one error type users see, and the pre-flight checks of paths a run needs.

``SalmError`` carries a one-paragraph message that names the file or key and the fix; the ``salm-mtp``
entry point prints it without a traceback and exits with code 2 (``exit_code``). Everything that
stops a run because of its inputs (a bad cut under ``data.on_bad_cut=raise``, an unreadable
``--ckpt_path``, an unwritable output directory, a missing tokenizer, too many non-finite losses)
raises a subclass of it.

    salm-mtp fit ... --ckpt_path runs/x/last.ckpt      # truncated file
    error: --ckpt_path 'runs/x/last.ckpt' is not a readable checkpoint (truncated or not a torch
    checkpoint: File is not a zip file); pass another checkpoint, e.g. an earlier step*.ckpt of the run
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager


class SalmError(Exception):
    """An error in the inputs of a run; its message says what is wrong and how to fix it."""

    exit_code: int = 2


class ConfigError(SalmError, ValueError):
    """A configuration value (a YAML key, a ``--key`` override or a command's option) is wrong. The message reads
    ``<key>: <what is wrong>; <what to do>`` (``config_error``); a ValueError, so code that validates values
    raises it where it reads them."""


def config_error(key: str, problem: str, fix: str | None = None) -> ConfigError:
    """``ConfigError("<key>: <problem>; <fix>")``; the fix defaults to ``set --<key>``."""
    return ConfigError(f"{key}: {problem}; {fix or f'set --{key}'}")


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def as_config_error(exc: BaseException) -> SalmError | None:
    """The configuration mistake behind ``exc``, raised while a command line was read and its classes built: the
    SalmError in its chain (``__cause__`` / ``__context__``; jsonargparse wraps what a dataclass check raises in
    union and instantiation errors), else the innermost ValueError / TypeError / FileNotFoundError that this
    package raised (its message names the key and the fix) as a ConfigError; None when neither is there (a bug:
    the traceback is kept)."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, SalmError):
            return e
    for e in reversed(chain):  # the innermost first: the check that failed, not its wrappers
        if isinstance(e, (ValueError, TypeError, FileNotFoundError)) and _raised_here(e):
            return ConfigError(str(e).strip())
    return None


@contextmanager
def config_errors_in_one_line() -> Iterator[None]:
    """Run the block; an exception that ``as_config_error`` traces to a configuration mistake is raised as that one-line
    error instead (the ``salm-mtp`` entry point prints it, exit 2); any other keeps its traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - classified below, re-raised unchanged when it is not a config mistake
        found = as_config_error(e)
        if found is None:
            raise
        raise found from None


def _raised_here(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by a function of this package (its traceback's last frame is in salm_mtp/)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep)


class CheckpointReadError(SalmError):
    """``--ckpt_path`` cannot be read."""


class OutputDirError(SalmError):
    """An output directory cannot be written."""


class MissingInputError(SalmError, FileNotFoundError):
    """A configured input (tokenizer, manifest, model directory) is missing or unreadable."""


class NonFiniteError(SalmError):
    """Training produced non-finite losses or weights and stopped (no checkpoint holds such weights)."""


def check_ckpt_path(path: str | None, key: str = "--ckpt_path") -> None:
    """Raise CheckpointReadError (naming ``key``, the option that gave it) unless ``path`` is None, a complete
    torch zip checkpoint or a sharded (torch.distributed.checkpoint) directory with its ``.metadata``. Reads only
    the zip directory. The one check of every command that takes a checkpoint (fit/validate/test/predict,
    evaluate, export)."""
    if path is None or path in ("last", "best", "hpc", "registry"):  # Lightning's symbolic names
        return
    fix = ("pass a .ckpt file or sharded checkpoint directory that `salm-mtp fit` wrote under <log_dir>/checkpoints/ "
           "(e.g. an earlier step*.ckpt of the run)")
    if not os.path.exists(path):
        raise CheckpointReadError(f"{key} {path!r} does not exist; {fix}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "salm_config.json")) and os.path.isdir(os.path.join(path, "llm")):
            raise CheckpointReadError(
                f"{key} {path!r} is an export (`salm-mtp export`), not a training checkpoint: to train on from it "
                f"use --model.llm.path={os.path.join(path, 'llm')} --model.encoder.path={os.path.join(path, 'encoder')}"
                f" (no --ckpt_path); to evaluate or transcribe it pass --model {path}")
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CheckpointReadError(
                f"{key} {path!r} is a directory without .metadata: not a complete sharded checkpoint "
                f"(its save was interrupted?); {fix}")
        return
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointReadError(
            f"{key} {path!r} is not a readable checkpoint (truncated or not a torch checkpoint: {e}); "
            f"{fix}") from None
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointReadError(f"{key} {path!r} is a zip file but not a torch checkpoint; {fix}")


def check_writable_dir(path: str, key: str) -> None:
    """Create ``path`` if needed and check a file can be written there; OutputDirError names ``key``."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".salm_write_check"):
            pass
    except OSError as e:
        raise OutputDirError(
            f"{key}={path!r} is not a writable directory ({e.strerror or e}); set --{key} to a directory you "
            "can write") from None
