"""What the benchmarks share: a process's memory figures from /proc, the peak reset, writing a result file, and the
``--device`` option (cpu or cuda) with "peak memory on this device": the resident set's high-water mark from /proc
on cpu (``rss_hwm``), torch.cuda's allocator peak on cuda (``cuda_max_allocated``)."""

from __future__ import annotations

import json
import os

STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
DEVICES = ("cpu", "cuda")
"""What ``--device`` accepts."""
MEMORY_MEASURES = {"cpu": "rss_hwm", "cuda": "cuda_max_allocated"}
"""The peak-memory figure each device reports (named in every result as ``memory``)."""


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


def add_device_arg(parser) -> None:
    """Add ``--device {cpu,cuda}`` (default cpu) to an argparse parser."""
    parser.add_argument("--device", default="cpu", choices=DEVICES,
                        help="where tensors, models and timings run (default cpu); memory figures: the process's "
                             "resident-set peak on cpu, torch.cuda's max_memory_allocated on cuda")


def parse_device_args(parser, argv=None):
    """``parser.parse_args(argv)``, its ``--device`` checked: argparse's own error (naming ``--device``) when this
    process cannot use it."""
    args = parser.parse_args(argv)
    try:
        check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    return args


def check_device(device: str) -> str:
    """``device`` itself when this process can use it; ValueError naming ``--device`` otherwise."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                             "use --device cpu")
    return device


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on cpu): call before reading a timer."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_start(device: str) -> tuple[float, bool]:
    """Start a peak-memory window: (MiB in use now, whether the peak was reset exactly).

    cpu: VmRSS, then VmHWM reset to it (``/proc/self/clear_refs``; False where the kernel refuses);
    cuda: the allocator's memory_allocated after reset_peak_memory_stats (always exact)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20, True
    before = read_status()["VmRSS"]
    return before, reset_hwm()


def peak_since(device: str, before: float) -> float:
    """MiB the window's peak rose above ``before`` (peak_start's figure): VmHWM or max_memory_allocated."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - before
    return read_status()["VmHWM"] - before


def process_peak(device: str) -> float:
    """The process's peak so far in MiB: VmHWM on cpu, max_memory_allocated on cuda (since the last reset)."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return read_status().get("VmHWM", float("nan"))


def write_result(res: dict, path: str) -> None:
    """Write a benchmark's result as JSON at ``path`` (its directory created) and say where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {path}")
