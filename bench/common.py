"""What the benchmarks share: a process's memory figures from /proc, the peak reset, writing a result file."""

from __future__ import annotations

import json
import os

STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def read_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process in MiB ({} if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_KEYS:
                    out[key] = int(rest.split()[0]) / 1024.0  # kB -> MiB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_result(res: dict, path: str) -> None:
    """Write a benchmark's result as JSON at ``path`` (its directory created) and say where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {path}")
