"""``salm-mtp`` run inside the test process: what a subprocess would give (exit status, stdout, stderr), without the
~8 s of importing torch, Lightning and transformers again.

    out = run_cli(["fit", "--config", "conf/tiny.yaml", ...], cwd=tmp_path, env={"SALM_X": "1"})
    assert out.returncode == 0, out.stdout + out.stderr

Only for runs that need no process of their own: signals, multi-process launches and the console script itself
keep their subprocesses (tests/test_robustness.py, tests/recipes/test_fsdp2_fit.py, tests/recipes/test_packaging.py). The run sees
``cwd`` and ``env`` (added to the test's environment) and leaves the process as it found it: environment, working
directory, warning filters (warnings are printed, as a fresh process prints them), signal handlers, logging streams and the root logger's handlers (none during the run,
as in a fresh process), torch's default dtype, grad mode and thread count. Output is caught
at the file descriptors (C libraries, tqdm) and in every logging stream handler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def _captured():
    """Yields (out, err) temporary files that receive fd 1 / fd 2, sys.stdout / sys.stderr and logging streams."""
    sys.stdout.flush()
    sys.stderr.flush()
    files = [tempfile.TemporaryFile(mode="w+", encoding="utf-8") for _ in range(2)]
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = sys.stdout, sys.stderr
    handlers = {h: h.stream for h in _stream_handlers()}
    try:
        for fd, f in zip((1, 2), files):
            os.dup2(f.fileno(), fd)
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", closefd=True)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", closefd=True)
        for h, stream in handlers.items():
            h.setStream(sys.stdout if stream is saved_streams[0] or getattr(stream, "name", None) == "<stdout>"
                        else sys.stderr)
        yield files
    finally:
        for h, stream in handlers.items():
            h.setStream(stream)
        for h in set(_stream_handlers()) - set(handlers):  # added during the run: point them back too
            h.setStream(saved_streams[1])
        ours = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = saved_streams
        for stream in ours:
            stream.flush()
            stream.close()
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(args: list[str], cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
            threads: int | None = None) -> CliResult:
    """``salm-mtp *args`` in this process (``threads``: torch's intra-op threads during the run, as
    ``OMP_NUM_THREADS`` sets them for a subprocess); an exception other than SystemExit is exit status 1 with its
    traceback on stderr, as the interpreter would print it."""
    from salm_mtp import cli

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    saved_dtype, saved_grad = torch.get_default_dtype(), torch.is_grad_enabled()
    saved_threads = torch.get_num_threads()
    root = logging.getLogger()
    saved_root = root.handlers[:], root.level
    root.handlers = []  # pytest's capture handlers out: as in a fresh process, warnings reach stderr (lastResort)
    code = 0
    with warnings.catch_warnings(), _captured() as (out, err):
        os.environ.update({"WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        warnings.showwarning = _print_warning  # not pytest's recorder: a fresh process prints them
        os.chdir(cwd or ROOT)
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            cli.main(list(map(str, args)))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001  (what the interpreter prints for an uncaught exception)
            traceback.print_exc(file=sys.stderr)
            code = 1
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            for s, handler in saved_signals.items():
                signal.signal(s, handler)
            torch.set_default_dtype(saved_dtype)
            torch.set_grad_enabled(saved_grad)
            torch.set_num_threads(saved_threads)
            root.handlers, _ = saved_root
            root.setLevel(saved_root[1])
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read())
        f.close()
    return CliResult(code, *texts)
