"""salm_mtp.malloc: the bounded policy mmaps (and returns) large blocks, the kept one serves them from the heap;
the user's own settings switch both off. Each case runs in a fresh process (glibc settings are process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy")

PROBE = r"""
import ctypes, sys, torch
from salm_mtp import malloc

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def mmapped_by(nbytes):
    before = libc.mallinfo2().hblkhd
    x = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    during = libc.mallinfo2().hblkhd
    del x
    return during - before

took = {"bounded": malloc.bound_malloc_caching, "kept": malloc.keep_freed_memory,
        "kept_if_alone": lambda: malloc.keep_freed_memory_if_alone(sys.argv[2], int(sys.argv[3]))}[sys.argv[1]]()
print(took, mmapped_by(8 << 20), mmapped_by(200 << 20))
"""


def _probe(mode: str, *args: str, **env) -> tuple[str, int, int]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "SALM_MTP_MALLOC_THRESHOLD"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, *args], env={**full, **env}, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_bounded_mmaps_blocks_of_a_mebibyte_and_more():
    took, small, large = _probe("bounded")
    assert took == "True"
    assert small >= 8 << 20 and large >= 200 << 20


def test_kept_serves_large_blocks_from_the_heap():
    took, small, large = _probe("kept")
    assert took == "True"
    assert small == 0 and large == 0


def test_only_a_single_cpu_process_keeps_freed_memory():
    took, _, large = _probe("kept_if_alone", "cpu", "1")
    assert took == "True" and large == 0
    for device, world in (("cuda", "1"), ("cpu", "2")):
        took, _, large = _probe("kept_if_alone", device, world)
        assert took == "False" and large >= 200 << 20, (device, world)


def test_glibc_variables_of_the_user_switch_both_off():
    assert _probe("kept", MALLOC_MMAP_THRESHOLD_="4096")[0] == "False"
    assert _probe("bounded", GLIBC_TUNABLES="glibc.malloc.trim_threshold=0")[0] == "False"


def test_a_fixed_threshold_holds_for_the_whole_run():
    assert _probe("kept", SALM_MTP_MALLOC_THRESHOLD="65536")[0] == "False"  # training does not override it
    assert _probe("bounded", SALM_MTP_MALLOC_THRESHOLD="0")[0] == "False"  # 0: glibc's defaults


def test_a_threshold_that_is_not_a_number_names_the_variable(monkeypatch):
    from salm_mtp.errors import SalmError
    from salm_mtp.malloc import bound_malloc_caching

    monkeypatch.setenv("SALM_MTP_MALLOC_THRESHOLD", "1MiB")
    with pytest.raises(SalmError, match="SALM_MTP_MALLOC_THRESHOLD='1MiB'"):
        bound_malloc_caching()
