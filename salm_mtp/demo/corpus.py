"""A small spoken demo corpus made with espeak-ng + sox, written as lhotse manifests.

    salm-mtp make-demo-data --out data/demo --num-train 4000
    salm-mtp make-demo-data --out /tmp/demo --num-train 300 --seed 1

Two tasks (``supervision.custom["task"]``), about 85 % / 15 %:
    asr  sequences of 2-6 number words ("three seven nine") or short sentences from a tiny
         grammar ("the red cat sees a big dog"); answer = transcript (``supervision.text``).
    ast  a deterministic "translation" of number words to digits: spoken "three seven nine",
         transcript "three seven nine", target ``supervision.custom["target_text"] = "3 7 9"``.
The vocabulary is 39 words. Each clip is spoken by an English espeak-ng voice and variant with
a random rate and pitch (seeded), converted by sox to 16 kHz mono 16-bit FLAC, 0.5-4 s long.

Held out (the figures measured on dev and test are about speech the model has not learned by heart):
    text   dev, test and test_unseen_voice are drawn first; train redraws any text they hold, so no dev or
           test transcript occurs in train.
    voice  one base voice (``HELD_OUT_BASE_VOICE``) and one variant (``HELD_OUT_VARIANT``) speak only in
           ``test_unseen_voice``; train, dev and test use the other 7 x 7 voices.
Every cut's supervision carries ``custom["groups"]``: ``{"text": "seen"|"unseen", "voice": "seen"|"unseen",
"kind": "numbers"|"svo"|"sv"|"copula"}``, computed against train (``salm-mtp evaluate`` reports WER per group).

Layout under ``out``::

    audio/{split}-{index:06d}.flac
    {train,dev,test,test_unseen_voice}_cuts.jsonl.gz   one MonoCut per clip: recording + one supervision
    tokenizer/                       demo BPE tokenizer trained on the train texts
    meta.json                        the request, per-task counts, durations, "synthetic", the held-out
                                     voices, espeak-ng/sox versions and a hash of the audio

Audio paths in the manifests are relative to ``out``: load them with
``salm_mtp.data.datamodule.load_cuts``, which resolves them from the manifest's directory.
The same seed gives byte-identical manifests and tokenizer (sorted ids, no timestamps).

Without espeak-ng or sox the audio is a clearly labelled synthetic stand-in (one tone per
word); a loud warning is printed and ``meta.json`` records ``"synthetic": true``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from lhotse import AudioSource, MonoCut, Recording, SupervisionSegment
from tqdm import tqdm

from salm_mtp.data.tokenizer import train_tokenizer
from salm_mtp.demo.texts import (FORMAT_VERSION, HELD_OUT_BASE_VOICE, HELD_OUT_VARIANT, MAX_SECONDS, MIN_SECONDS,
                                  SAMPLE_RATE, SEEN_VOICES, SPLITS, UNSEEN_VOICES, VOCABULARY, Utterance, groups_of,
                                  plan_corpus)
from salm_mtp.errors import OutputDirError


def have_speech_tools() -> bool:
    """True when both espeak-ng and sox are on PATH."""
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def _speak(utt: Utterance, path: Path, rate: int) -> None:
    """espeak-ng (22.05 kHz wav on stdout) | sox -> 16 kHz mono 16-bit FLAC at ``path``."""
    espeak = ["espeak-ng", "-v", utt.voice, "-s", str(rate), "-p", str(utt.pitch), "--stdout", utt.text]
    # -R: repeatable; -D: no dither (no random noise): same input, same bytes.
    sox = ["sox", "-R", "-D", "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(path)]
    wav = subprocess.run(espeak, check=True, capture_output=True).stdout
    subprocess.run(sox, input=wav, check=True, capture_output=True)


def _tone_word(word: str) -> np.ndarray:
    """Synthetic stand-in for a spoken word: a 0.2 s tone whose pitch names the word."""
    freq = 200.0 * 2 ** (VOCABULARY.index(word) / 12) if word in VOCABULARY else 150.0
    t = np.arange(int(0.2 * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.hanning(t.size)).astype(np.float32)


def _synthesise(utt: Utterance, path: Path, synthetic: bool) -> int:
    """Write one clip to ``path``; return its length in samples (clip kept in 0.5-4 s)."""
    lo, hi = int(MIN_SECONDS * SAMPLE_RATE), int(MAX_SECONDS * SAMPLE_RATE)
    if synthetic:
        gap = np.zeros(int(0.05 * SAMPLE_RATE), dtype=np.float32)
        audio = np.concatenate([np.concatenate([_tone_word(w), gap]) for w in utt.text.split()])
        sf.write(path, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        frames = audio.shape[0]
    else:
        rate = utt.rate
        for _ in range(4):  # too long: speak faster (deterministic retries)
            _speak(utt, path, rate)
            frames = sf.info(path).frames
            if frames <= hi:
                break
            rate = int(rate * 1.25)
    if lo <= frames <= hi:
        return frames
    audio, _ = sf.read(path, dtype="float32")
    # too short: pad with trailing silence; still too long (rare): cut
    audio = np.pad(audio, (0, lo - audio.shape[0])) if audio.shape[0] < lo else audio[:hi]
    sf.write(path, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return int(audio.shape[0])


def _make_cut(utt: Utterance, num_samples: int, synthetic: bool, groups: dict[str, str]) -> MonoCut:
    duration = num_samples / SAMPLE_RATE
    recording = Recording(
        id=utt.id,
        sources=[AudioSource(type="file", channels=[0], source=f"audio/{utt.id}.flac")],
        sampling_rate=SAMPLE_RATE,
        num_samples=num_samples,
        duration=duration,
    )
    custom = {"task": utt.task, "voice": utt.voice, "rate": utt.rate, "pitch": utt.pitch, "groups": groups}
    if utt.task == "ast":
        custom["target_text"] = utt.target_text
    supervision = SupervisionSegment(
        id=utt.id,
        recording_id=utt.id,
        start=0.0,
        duration=duration,
        channel=0,
        text=utt.text,
        language="en",
        speaker="synthetic-tones" if synthetic else utt.voice,
        custom=custom,
    )
    return MonoCut(
        id=utt.id, start=0.0, duration=duration, channel=0, recording=recording, supervisions=[supervision]
    )


def _write_manifest(cuts: list[MonoCut], path: Path) -> None:
    """jsonl.gz, sorted by id, gzip header without name/mtime: same cuts, same bytes."""
    lines = "".join(json.dumps(c.to_dict(), sort_keys=True) + "\n" for c in sorted(cuts, key=lambda c: c.id))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(lines.encode("utf-8"))
    os.replace(tmp, path)


def _request(seed: int, num_train: int, num_dev: int, num_test: int, num_unseen_voice: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_dev": num_dev,
        "num_test": num_test,
        "num_test_unseen_voice": num_unseen_voice,
    }


def tool_versions() -> dict[str, str | None]:
    """First line of ``espeak-ng --version`` and ``sox --version`` (None when missing)."""
    out = {}
    for tool in ("espeak-ng", "sox"):
        try:
            res = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
            out[tool] = (res.stdout or res.stderr).strip().splitlines()[0].strip()
        except (OSError, IndexError, subprocess.SubprocessError):
            out[tool] = None
    return out


def audio_hash(audio_dir: Path, names: list[str]) -> str:
    """sha256 over the named clips' bytes in sorted order: two corpora with the same hash have the same audio."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0")
        h.update((audio_dir / name).read_bytes())
    return h.hexdigest()


def _warm_up(synthetic: bool, scratch: Path) -> None:
    """One throw-away synthesis before the real ones: the first espeak-ng call after installing it came out
    different from a regeneration (a one-off state at first use), so no clip of the corpus is ever the first."""
    if synthetic:
        return
    utt = Utterance(id="warmup", task="asr", text="one two three", voice=SEEN_VOICES[0], rate=160, pitch=50)
    _speak(utt, scratch, utt.rate)
    scratch.unlink(missing_ok=True)


MARKER = ".salm_demo_corpus"
"""File make-demo-data writes first into its --out (and removes once meta.json is written): a non-empty directory
with neither is someone else's."""


def not_ours(out: Path) -> bool:
    """Whether ``out`` is a non-empty directory (or a file) that make-demo-data did not write."""
    if out.exists() and not out.is_dir():
        return True
    return out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file() and not (out / MARKER).is_file()


def _can_reuse(out: Path, request: dict, synthetic: bool) -> bool:
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    files = [out / f"{s}_cuts.jsonl.gz" for s in SPLITS] + [out / "tokenizer" / "tokenizer.json"]
    same = all(meta.get(k) == v for k, v in request.items())
    # a synthetic corpus is replaced by real speech as soon as the tools are available
    upgrade = meta.get("synthetic", True) and not synthetic
    return same and not upgrade and all(f.is_file() for f in files)


def _loud_warning(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!! WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def make_demo_data(
    out: str | Path = "data/demo",
    num_train: int = 4000,
    num_dev: int = 200,
    num_test: int = 200,
    seed: int = 0,
    workers: int = 2,
    force: bool = False,
    synthetic: bool | None = None,
    progress: bool = True,
    num_unseen_voice: int | None = None,
) -> dict:
    """Generate (or reuse) the demo corpus under ``out``; return its ``meta.json`` content.

    Args:
        out: output directory (created).
        num_train, num_dev, num_test: utterances per split.
        seed: RNG seed; same seed -> identical manifests and tokenizer.
        workers: parallel espeak-ng/sox pipelines.
        force: regenerate even when ``meta.json`` matches the request, and write into a non-empty directory that
            make-demo-data did not write (refused without it: ``OutputDirError``).
        synthetic: None = espeak-ng when available, else synthetic tones (with a warning);
            True = synthetic tones; False = espeak-ng (error when missing).
        progress: show tqdm progress bars.
        num_unseen_voice: utterances of ``test_unseen_voice`` (voices never heard in train); None: ``num_test``.
    """
    num_unseen_voice = num_test if num_unseen_voice is None else num_unseen_voice
    sizes = {"train": num_train, "dev": num_dev, "test": num_test, "test_unseen_voice": num_unseen_voice}
    for split, value in sizes.items():
        if value < 1:
            flag = "--num-unseen-voice" if split == "test_unseen_voice" else f"--num-{split}"
            raise ValueError(f"num_{split} must be >= 1, got {value}; set {flag}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}; set --workers")
    out = Path(out).resolve()
    tools = have_speech_tools()
    if synthetic is False and not tools:
        raise FileNotFoundError("espeak-ng and sox are needed for real speech: apt-get install espeak-ng sox")
    synthetic = not tools if synthetic is None else synthetic
    request = _request(seed, num_train, num_dev, num_test, num_unseen_voice)
    if not force and _can_reuse(out, request, synthetic):
        print(f"reusing the demo corpus in {out} (meta.json matches; --force regenerates)")
        return json.loads((out / "meta.json").read_text())
    if not force and not_ours(out):
        raise OutputDirError(f"--out {str(out)!r} is not empty and make-demo-data did not write it (no meta.json or "
                             f"{MARKER}): its *_cuts.jsonl.gz, tokenizer/ and audio/*.flac would be overwritten; pass "
                             "a new or empty directory, or --force to write there anyway")
    if synthetic:
        _loud_warning(
            "espeak-ng or sox not found (or synthetic requested): the demo audio is SYNTHETIC "
            "TONES, not speech. Install espeak-ng and sox for real speech."
        )

    start = time.time()
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()  # ours from now on: a re-run after an interruption may write here again
    (out / "meta.json").unlink(missing_ok=True)  # the corpus is incomplete until meta.json exists
    plans = plan_corpus(sizes, seed)
    wanted = {f"{u.id}.flac" for utts in plans.values() for u in utts}
    for stale in audio_dir.glob("*.flac"):  # clips of an earlier, larger corpus
        if stale.name not in wanted:
            stale.unlink()
    train_texts = {u.text for u in plans["train"]}
    train_voices = {u.voice for u in plans["train"]}

    meta = dict(
        request,
        synthetic=synthetic,
        sample_rate=SAMPLE_RATE,
        splits={},
        held_out={"base_voice": HELD_OUT_BASE_VOICE, "variant": HELD_OUT_VARIANT,
                  "unseen_voices": list(UNSEEN_VOICES)},
        tools=tool_versions() if not synthetic else {},
    )
    _warm_up(synthetic, audio_dir / "warmup.flac")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for split, utts in plans.items():
            def work(u: Utterance) -> int:
                return _synthesise(u, audio_dir / f"{u.id}.flac", synthetic)

            lengths = list(tqdm(pool.map(work, utts), total=len(utts), desc=split, disable=not progress))
            groups = [groups_of(u, train_texts, train_voices) for u in utts]
            cuts = [_make_cut(u, n, synthetic, g) for u, n, g in zip(utts, lengths, groups)]
            _write_manifest(cuts, out / f"{split}_cuts.jsonl.gz")
            meta["splits"][split] = {
                "tasks": dict(sorted(Counter(u.task for u in utts).items())),
                "kinds": dict(sorted(Counter(u.kind for u in utts).items())),
                "unseen_text": sum(g["text"] == "unseen" for g in groups),
                "unseen_voice": sum(g["voice"] == "unseen" for g in groups),
                "hours": round(sum(lengths) / SAMPLE_RATE / 3600, 4),
                "min_seconds": round(min(lengths) / SAMPLE_RATE, 3),
                "max_seconds": round(max(lengths) / SAMPLE_RATE, 3),
            }
    meta["audio_sha256"] = audio_hash(audio_dir, sorted(wanted))

    texts = [t for u in plans["train"] for t in (u.text, u.target_text) if t is not None]
    train_tokenizer(texts, out / "tokenizer")
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / MARKER).unlink(missing_ok=True)  # meta.json says it is ours now
    total = sum(sizes.values())
    elapsed = time.time() - start
    print(f"wrote {total} clips to {out} in {elapsed:.1f} s ({total / elapsed:.0f} clips/s); "
          f"audio sha256 {meta['audio_sha256'][:16]}")
    return meta
