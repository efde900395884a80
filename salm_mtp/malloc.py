"""glibc malloc policy of salm-mtp processes: bounded caching while loading and for multi-process runs, freed
memory kept for reuse while one process trains on the CPU.

    bound_malloc_caching()            # the CLI, before anything loads (and every rank of a multi-process run)
    keep_freed_memory_if_alone(device_type, world_size)   # on_train_start of the training modules

PyTorch's CPU tensors come from glibc malloc, and its two defaults both cost something here:

* bounded (``bound_malloc_caching``): blocks >= 1 MiB are mmap()ed and handed back at free. glibc would raise its
  threshold to 32 MiB after the first large free, after which FSDP2's varying 1-32 MiB all-gather buffers come from
  a heap that fragments and never shrinks: each rank then holds far more than it uses (bench/results/scale_memory.json).
* kept (``keep_freed_memory``): freed blocks stay in the heap, the heap is never trimmed. A step on the CPU frees
  and re-allocates the same activations every time, and the reference (kernel-free) Mamba2 scan builds transient
  tensors of hundreds of MiB: bounded, every one is page-faulted in again, and a CPU run spends a large share of
  its time in the kernel (docs/guide.md, "Memory per rank, measured", has the demo-mix figures). The price is a
  heap that stays at its peak, as a GPU caching allocator's does.

``SALM_MTP_MALLOC_THRESHOLD=N`` fixes glibc's mmap threshold at N bytes for the whole run (0: glibc's defaults);
glibc's own ``MALLOC_*`` / ``GLIBC_TUNABLES`` variables, when set, are left to act alone. Off Linux/glibc nothing
changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

from salm_mtp.errors import SalmError

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
THRESHOLD_VARIABLE = "SALM_MTP_MALLOC_THRESHOLD"
BOUNDED_THRESHOLD = 1 << 20


def _mallopt():
    """glibc's mallopt, or None (not Linux, not glibc, or the user set glibc's own variables)."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in USER_VARIABLES):
        return None
    try:
        fn = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def bound_malloc_caching() -> bool:
    """Hand freed blocks >= 1 MiB (or ``SALM_MTP_MALLOC_THRESHOLD``) back to the OS at once; True when set."""
    raw = os.environ.get(THRESHOLD_VARIABLE, str(BOUNDED_THRESHOLD))
    try:
        threshold = int(raw)
    except ValueError:
        raise SalmError(f"{THRESHOLD_VARIABLE}={raw!r} is not a whole number of bytes: set it to e.g. 1048576, "
                        "or 0 for glibc's defaults") from None
    mallopt = _mallopt()
    if threshold <= 0 or mallopt is None:
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def keep_freed_memory(mmap_threshold: int = (1 << 31) - 1, top_pad: int = 64 << 20) -> bool:
    """Serve blocks under ``mmap_threshold`` bytes from the heap and never trim it; True when set. Does nothing
    when ``SALM_MTP_MALLOC_THRESHOLD`` fixes the threshold for the run."""
    mallopt = _mallopt()
    if mallopt is None or THRESHOLD_VARIABLE in os.environ:
        return False
    done = [mallopt(M_MMAP_THRESHOLD, mmap_threshold), mallopt(M_TRIM_THRESHOLD, -1), mallopt(M_TOP_PAD, top_pad)]
    return all(r == 1 for r in done)


def keep_freed_memory_if_alone(device_type: str, world_size: int) -> bool:
    """``keep_freed_memory()`` when one process trains on the CPU (the training modules' on_train_start); other
    runs keep the bounded policy. True when the settings took."""
    return device_type == "cpu" and world_size == 1 and keep_freed_memory()
