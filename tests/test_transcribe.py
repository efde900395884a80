"""salm_mtp/transcribe.py: audio files at 8, 16 and 44.1 kHz, stereo, wav and flac, a directory and an unreadable
file through the Python API and `salm-mtp transcribe` (an export of a tiny model); the answers equal greedy decoding
of the same samples, in every decode mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import tiny
from cli_run import run_cli
from salm_mtp.data.prompt import PromptConfig, PromptFormatter
from salm_mtp.generate import decode_text, greedy_decode
from salm_mtp.transcribe import Transcriber, audio_files, read_audio

RATE = 16000


@pytest.fixture(scope="module")
def model(tok_dir):
    torch.manual_seed(0)
    m = tiny.build(tok_dir, ctc_weight=0.3, mtp_layers=2)
    return m.eval()


def _tone(seconds: float, rate: int, freq: float = 330.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """{name: path}: wav at 8, 16, 44.1 kHz, a stereo flac, a directory of two, an unreadable file."""
    d = tmp_path_factory.mktemp("audio")
    sf.write(d / "a8k.wav", _tone(0.5, 8000), 8000)
    sf.write(d / "b16k.wav", _tone(0.7, RATE, 440), RATE)
    sf.write(d / "c44k.wav", _tone(0.4, 44100, 550), 44100)
    sf.write(d / "d_stereo.flac", np.stack([_tone(0.6, RATE, 220), _tone(0.6, RATE, 660)], 1), RATE)
    (d / "sub").mkdir()
    sf.write(d / "sub" / "e.flac", _tone(0.3, RATE, 770), RATE)
    sf.write(d / "sub" / "f.wav", _tone(0.3, RATE, 880), RATE)
    (d / "sub" / "notes.txt").write_text("not audio")
    (d / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    return d


def _greedy_text(model, samples: np.ndarray) -> str:
    t = Transcriber(model, PromptFormatter(model.tokenizer, PromptConfig()), decode="greedy", max_new_tokens=12)
    batch = t._batch([samples], "asr", None)
    tokens, lengths = greedy_decode(model, batch, 12)
    return decode_text(model.tokenizer, tokens, lengths)[0]


def test_read_audio_resamples_and_mixes_down(clips):
    for name, seconds in (("a8k.wav", 0.5), ("b16k.wav", 0.7), ("c44k.wav", 0.4), ("d_stereo.flac", 0.6)):
        x = read_audio(str(clips / name), RATE)
        assert x.dtype == np.float32 and abs(x.size - seconds * RATE) <= 1, name
    stereo = sf.read(clips / "d_stereo.flac", dtype="float32")[0]
    assert np.allclose(read_audio(str(clips / "d_stereo.flac"), RATE), stereo.mean(1), atol=1e-6)
    with pytest.raises(Exception):
        read_audio(str(clips / "broken.wav"), RATE)


def test_directories_expand_to_their_audio_files_in_order(clips):
    files = audio_files([str(clips / "sub"), str(clips / "a8k.wav")])
    assert [f.split("/")[-1] for f in files] == ["e.flac", "f.wav", "a8k.wav"]


@pytest.mark.parametrize("decode", ["greedy", "ctc+mtp", "auto"])
def test_transcribe_equals_greedy_on_the_same_samples(model, clips, decode):
    t = Transcriber(model, PromptFormatter(model.tokenizer, PromptConfig()), decode=decode, max_new_tokens=12,
                    batch_size=3)
    paths = [str(clips / n) for n in ("a8k.wav", "broken.wav", "b16k.wav", "c44k.wav", "d_stereo.flac")]
    rows = list(t.transcribe(paths))
    assert [r.path for r in rows] == paths
    assert rows[1].text is None and rows[1].error.startswith("unreadable audio")
    for r in rows[:1] + rows[2:]:
        assert r.error is None and r.text == _greedy_text(model, read_audio(r.path, RATE)), r.path
    assert t.generate(read_audio(paths[0], RATE)) == [rows[0].text]
    assert t.generate(_tone(0.5, 8000), sample_rate=8000) == [rows[0].text]  # the same resampling


def test_cli_writes_one_jsonl_row_per_file_and_reports_the_unreadable_one(model, clips, tmp_path):
    from salm_mtp.io.export import export_hf

    export_hf(model, str(tmp_path / "exp"))
    out = tmp_path / "rows.jsonl"
    res = run_cli(["transcribe", "--model", str(tmp_path / "exp"), str(clips / "sub"), str(clips / "broken.wav"),
                   str(clips / "b16k.wav"), "--format", "jsonl", "--out", str(out), "--max-new-tokens", "12",
                   "--no-progress"])
    assert res.returncode == 1, res.stderr[-3000:]  # one file could not be read
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"].split("/")[-1] for r in rows] == ["e.flac", "f.wav", "broken.wav", "b16k.wav"]
    assert rows[2]["text"] is None and "unreadable audio" in rows[2]["error"]
    assert all(isinstance(r["text"], str) and r["seconds"] > 0 for i, r in enumerate(rows) if i != 2)
    assert f"skipped {clips / 'broken.wav'}: unreadable audio" in res.stderr
    tsv = run_cli(["transcribe", "--model", str(tmp_path / "exp"), str(clips / "b16k.wav"), "--format", "tsv",
                   "--max-new-tokens", "12", "--no-progress"])
    one_line = " ".join(rows[3]["text"].replace("\t", " ").split("\n"))  # a TSV row stays one line
    assert tsv.returncode == 0 and tsv.stdout.rstrip("\n") == f"{clips / 'b16k.wav'}\t{one_line}"


def test_cli_needs_audio_and_one_model(tmp_path):
    res = run_cli(["transcribe", "--model", str(tmp_path)])
    assert res.returncode == 2 and "AUDIO" in res.stderr
    res = run_cli(["transcribe", "x.wav"])
    assert res.returncode == 2 and "give one of --ckpt" in res.stderr
