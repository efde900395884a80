"""What a run depended on, written beside its logs as ``environment.json``.

Two runs of the same command can differ when the machine, the libraries or the corpus differ (the demo's
CTC encoder is sensitive to every bit of its input). ``RunEnvironment`` records, at the start of fit:

    torch / transformers / lightning / lhotse versions, Python, the platform, torch's intra-op thread
    count and CPU capability (the vector kernels it dispatches to), CUDA device names when any, and the
    corpus: the ``meta.json`` beside each train / val manifest (the demo corpus records its seed, espeak-ng
    and sox versions and a sha256 of its audio there).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata

import lightning as L
import torch

PACKAGES = ("torch", "transformers", "lightning", "lhotse", "tokenizers", "numpy")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def corpus_meta(manifests: list[str]) -> dict[str, dict]:
    """{directory: its meta.json content} for the manifests' directories that hold one (make-demo-data's)."""
    out: dict[str, dict] = {}
    for path in manifests:
        meta = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.json")
        if os.path.isfile(meta) and os.path.dirname(meta) not in out:
            try:
                with open(meta) as f:
                    content = json.load(f)
            except (OSError, ValueError):
                continue
            keep = ("format_version", "seed", "synthetic", "audio_sha256", "tools", "held_out",
                    "num_train", "num_dev", "num_test", "num_test_unseen_voice")
            out[os.path.dirname(meta)] = {k: content[k] for k in keep if k in content}
    return out


def run_environment(manifests: list[str]) -> dict:
    """The environment.json content (module docstring)."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "corpus": corpus_meta(manifests),
    }
    return env


def data_manifests(datamodule) -> list[str]:
    """The train / val manifest paths a SALMDataModule reads (its single-manifest fields and its sources)."""
    cfg = getattr(datamodule, "cfg", None)
    if cfg is None:
        return []
    paths = [p for p in (cfg.train_manifest, cfg.val_manifest) if p]
    for source in list(cfg.inputs or []) + list(cfg.val_inputs or []):  # InputConfig (DataConfig converts them)
        paths += source.files()
    return paths


class RunEnvironment(L.Callback):
    """Writes ``environment.json`` into the run's log directory when fit starts (rank 0)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a broadcast under multi-process strategies: every rank calls it
        if not trainer.is_global_zero or not log_dir:
            return
        os.makedirs(log_dir, exist_ok=True)
        env = run_environment(data_manifests(getattr(trainer, "datamodule", None)))
        with open(os.path.join(log_dir, "environment.json"), "w") as f:
            json.dump(env, f, indent=2, sort_keys=True)
