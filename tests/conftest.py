"""Shared fixtures: a tiny on-disk lhotse corpus of sine-wave FLAC clips (no speech tools), a tiny tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import AudioSource, CutSet, MonoCut, Recording, SupervisionSegment

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")

import tiny  # noqa: E402  (tiny models and batches, also used by multi-process test workers)

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_sine_corpus(root: Path, n: int = 12, sample_rate: int = 16000, name: str = "cuts") -> Path:
    """n clips (0.10 s, 0.11 s, ...) of sine waves under root/audio, manifest root/{name}.jsonl.gz.

    Cut i: id "c{i:03d}", text = two number words (i // 10, i % 10); every third cut is an
    "ast" cut with target_text = the digits. Audio paths are relative to ``root``.
    """
    (root / "audio").mkdir(parents=True, exist_ok=True)
    cuts = []
    for i in range(n):
        cid = f"c{i:03d}"
        num_samples = int(sample_rate * (0.10 + 0.01 * i))
        t = np.arange(num_samples) / sample_rate
        sf.write(root / "audio" / f"{cid}.flac", 0.5 * np.sin(2 * np.pi * (200 + 20 * i) * t), sample_rate)
        text = f"{NUMBERS[(i // 10) % 10]} {NUMBERS[i % 10]}"
        custom = {"task": "asr"}
        if i % 3 == 2:
            custom = {"task": "ast", "target_text": f"{(i // 10) % 10} {i % 10}"}
        dur = num_samples / sample_rate
        rec = Recording(
            id=cid,
            sources=[AudioSource(type="file", channels=[0], source=f"audio/{cid}.flac")],
            sampling_rate=sample_rate,
            num_samples=num_samples,
            duration=dur,
        )
        sup = SupervisionSegment(id=cid, recording_id=cid, start=0.0, duration=dur, text=text, custom=custom)
        cuts.append(MonoCut(id=cid, start=0.0, duration=dur, channel=0, recording=rec, supervisions=[sup]))
    path = root / f"{name}.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


@pytest.fixture
def sine_corpus(tmp_path: Path):
    """Factory: ``sine_corpus(n=12, sample_rate=16000, name="cuts") -> manifest path``."""

    def make(n: int = 12, sample_rate: int = 16000, name: str = "cuts") -> Path:
        return write_sine_corpus(tmp_path, n=n, sample_rate=sample_rate, name=name)

    return make


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> str:
    """Directory of the tiny test tokenizer."""
    return tiny.tokenizer_dir(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A 24-clip sine corpus shared by the tests of one module (CLI runs)."""
    return str(write_sine_corpus(tmp_path_factory.mktemp("corpus"), n=24))
