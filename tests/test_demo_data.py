"""Tests for salm_mtp/demo/corpus.py and `salm-mtp make-demo-data` (tiny corpora)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
from lhotse import CutSet
from transformers import AutoTokenizer

from cli_run import run_cli
from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.demo.corpus import make_demo_data
from salm_mtp.demo.texts import (
    HELD_OUT_BASE_VOICE,
    HELD_OUT_SPLITS,
    HELD_OUT_VARIANT,
    KINDS,
    NUMBER_WORDS,
    SEEN_VOICES,
    SPLITS,
    UNSEEN_VOICES,
    VOCABULARY,
    plan_corpus,
    plan_split,
    words_to_digits,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="espeak-ng/sox not installed"
)


def manifest_text(out: Path, split: str) -> str:
    return gzip.decompress((out / f"{split}_cuts.jsonl.gz").read_bytes()).decode()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same request (seed 0, 6/2/2) made twice into different directories."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    metas = [make_demo_data(d, 6, 2, 2, seed=0, progress=False) for d in (a, b)]
    return a, b, metas


def test_words_to_digits():
    assert words_to_digits("three seven nine") == "3 7 9"
    assert words_to_digits("zero one") == "0 1"
    assert len(VOCABULARY) == 39 and set(NUMBER_WORDS) <= set(VOCABULARY)


def test_plan_mixes_tasks_and_stays_in_the_vocabulary():
    utts = plan_split("train", 2000, seed=0)
    share = sum(u.task == "ast" for u in utts) / len(utts)
    assert 0.12 < share < 0.18
    assert {w for u in utts for w in u.text.split()} <= set(VOCABULARY)
    for u in utts:
        if u.task == "ast":
            assert 2 <= len(u.text.split()) <= 6 and set(u.text.split()) <= set(NUMBER_WORDS)
    assert plan_split("train", 50, seed=0) == utts[:50]  # a prefix: deterministic
    assert plan_split("train", 50, seed=1) != utts[:50]
    assert plan_split("dev", 50, seed=0) != utts[:50]


def test_same_seed_gives_identical_manifests_and_tokenizer(two_runs):
    a, b, metas = two_runs
    assert metas[0] == metas[1]
    for split in SPLITS:
        assert manifest_text(a, split) == manifest_text(b, split)
        assert (a / f"{split}_cuts.jsonl.gz").read_bytes() == (b / f"{split}_cuts.jsonl.gz").read_bytes()
    tok_a, tok_b = (AutoTokenizer.from_pretrained(d / "tokenizer") for d in (a, b))
    assert tok_a.get_vocab() == tok_b.get_vocab()


def test_manifest_content(two_runs):
    a, _, metas = two_runs
    assert sum(metas[0]["splits"]["train"]["tasks"].values()) == 6
    for split, n in zip(SPLITS, (6, 2, 2, 2)):
        cuts = CutSet.from_file(a / f"{split}_cuts.jsonl.gz")
        assert [c.id for c in cuts] == [f"{split}-{i:06d}" for i in range(n)]
        for cut in cuts:
            (sup,) = cut.supervisions
            assert 0.5 <= cut.duration <= 4.0 and cut.sampling_rate == 16000
            assert (a / cut.recording.sources[0].source).is_file()
            assert sup.custom["task"] in ("asr", "ast")
            if sup.custom["task"] == "ast":
                assert sup.custom["target_text"] == words_to_digits(sup.text)


def test_ast_targets_are_digits_of_the_spoken_words(tmp_path):
    utts = plan_split("train", 40, seed=0)
    n = next(i for i, u in enumerate(utts) if u.task == "ast") + 1  # enough clips to hold an ast one
    make_demo_data(tmp_path, n, 1, 1, seed=0, synthetic=True, progress=False)
    cuts = CutSet.from_file(tmp_path / "train_cuts.jsonl.gz")
    ast = [c.supervisions[0] for c in cuts if c.supervisions[0].custom["task"] == "ast"]
    assert ast and all(s.custom["target_text"] == words_to_digits(s.text) for s in ast)
    assert all(len(s.custom["target_text"].split()) == len(s.text.split()) for s in ast)


@needs_espeak
def test_real_speech_is_recorded_as_not_synthetic(two_runs):
    a, _, metas = two_runs
    assert metas[0]["synthetic"] is False
    assert json.loads((a / "meta.json").read_text())["synthetic"] is False


def test_different_seed_differs_and_rerun_reuses(two_runs, tmp_path, capsys):
    a, _, _ = two_runs
    make_demo_data(tmp_path, 6, 2, 2, seed=1, progress=False)
    assert manifest_text(tmp_path, "train") != manifest_text(a, "train")
    capsys.readouterr()
    make_demo_data(tmp_path, 6, 2, 2, seed=1, progress=False)
    assert "reusing" in capsys.readouterr().out


def test_synthetic_fallback_is_labelled(tmp_path, capsys):
    meta = make_demo_data(tmp_path, 3, 1, 1, seed=0, synthetic=True, progress=False)
    assert meta["synthetic"] is True
    assert json.loads((tmp_path / "meta.json").read_text())["synthetic"] is True
    assert "SYNTHETIC" in capsys.readouterr().err
    cut = CutSet.from_file(tmp_path / "train_cuts.jsonl.gz")[0]
    assert cut.supervisions[0].speaker == "synthetic-tones"


def test_demo_corpus_feeds_the_datamodule(two_runs, monkeypatch, tmp_path):
    a, _, _ = two_runs
    monkeypatch.chdir(tmp_path)
    dm = SALMDataModule(
        train_manifest=str(a / "train_cuts.jsonl.gz"), tokenizer_path=str(a / "tokenizer"), max_duration=30
    )
    batches = list(dm.train_dataloader())
    assert sorted(i for b in batches for i in b["ids"]) == [f"train-{i:06d}" for i in range(6)]
    unk = dm.get_tokenizer().unk_token_id
    for batch in batches:
        assert batch["num_dropped"] == 0
        assert batch["input_ids"].max() < len(dm.get_tokenizer())
        assert not (batch["input_ids"] == unk).any() and not (batch["ctc_ids"] == unk).any()


def test_cli_script(tmp_path):
    out = tmp_path / "demo"
    run = run_cli(["make-demo-data", "--out", str(out), "--num-train", "2", "--num-dev", "1", "--num-test", "1",
                   "--synthetic", "--no-progress"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 5 clips" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "audio", "dev_cuts.jsonl.gz", "meta.json", "test_cuts.jsonl.gz", "test_unseen_voice_cuts.jsonl.gz",
        "tokenizer", "train_cuts.jsonl.gz",
    ]  # fmt: skip
    assert len(list((out / "audio").glob("*.flac"))) == 5


def test_cli_mix_writes_the_mixing_sets_over_the_corpus_clips(tmp_path):
    out = tmp_path / "demo"
    run = run_cli(["make-demo-data", "--out", str(out), "--num-train", "3", "--num-dev", "2", "--num-test", "2",
                   "--synthetic", "--no-progress", "--mix"])
    assert run.returncode == 0, run.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    for split in ("train", "dev", "test"):
        assert {f"talk_{split}.jsonl", f"text_{split}.jsonl"} <= names
        assert f"talk_{split}.jsonl: " in run.stdout
    clips = {p.name for p in (out / "audio").glob("*.flac")}
    talk = [json.loads(line) for line in open(out / "talk_train.jsonl")]
    used = {os.path.basename(t["value"]) for c in talk for t in c["conversations"] if t["type"] == "audio"}
    assert talk and used and used <= clips  # every audio turn is one of the corpus's own clips


def test_held_out_splits_share_no_text_and_no_unseen_voice_with_train():
    plans = plan_corpus({"train": 3000, "dev": 150, "test": 150, "test_unseen_voice": 150}, seed=3)
    train_texts = {u.text for u in plans["train"]}
    train_voices = {u.voice for u in plans["train"]}
    for split in HELD_OUT_SPLITS:
        assert plans[split] and not {u.text for u in plans[split]} & train_texts, split
    assert {u.voice for u in plans["test_unseen_voice"]} <= set(UNSEEN_VOICES)
    assert not train_voices & set(UNSEEN_VOICES)
    assert {u.voice for u in plans["dev"] + plans["test"]} <= set(SEEN_VOICES)
    assert not any(v.startswith(HELD_OUT_BASE_VOICE) or v.endswith(HELD_OUT_VARIANT) for v in train_voices)
    assert len(SEEN_VOICES) == 49 and len(UNSEEN_VOICES) == 15 and not set(SEEN_VOICES) & set(UNSEEN_VOICES)
    # the redraws keep the task mix and every kind of utterance in train
    assert {u.kind for u in plans["train"]} == set(KINDS)
    assert 0.12 < sum(u.task == "ast" for u in plans["train"]) / 3000 < 0.18
    # the kinds are what the text says
    for u in plans["train"][:300]:
        words = u.text.split()
        if u.kind == "numbers":
            assert set(words) <= set(NUMBER_WORDS)
        elif u.kind == "copula":
            assert "is" in words
        else:
            assert not set(words) & set(NUMBER_WORDS) and "is" not in words


def test_every_cut_carries_its_groups_against_train(tmp_path):
    meta = make_demo_data(tmp_path, 40, 6, 6, seed=0, synthetic=True, progress=False, num_unseen_voice=5)
    train = CutSet.from_file(tmp_path / "train_cuts.jsonl.gz")
    train_texts = {c.supervisions[0].text for c in train}
    train_voices = {c.supervisions[0].custom["voice"] for c in train}
    for split, n in zip(SPLITS, (40, 6, 6, 5)):
        cuts = list(CutSet.from_file(tmp_path / f"{split}_cuts.jsonl.gz"))
        assert len(cuts) == n
        for cut in cuts:
            sup = cut.supervisions[0]
            groups = sup.custom["groups"]
            assert set(groups) == {"text", "voice", "kind"} and groups["kind"] in KINDS
            assert groups["text"] == ("seen" if sup.text in train_texts else "unseen")
            assert groups["voice"] == ("seen" if sup.custom["voice"] in train_voices else "unseen")
            if split != "train":
                assert groups["text"] == "unseen"
            if split == "test_unseen_voice":
                assert groups["voice"] == "unseen"
        assert meta["splits"][split]["unseen_text"] == sum(c.supervisions[0].custom["groups"]["text"] == "unseen"
                                                           for c in cuts)
    assert meta["held_out"]["base_voice"] == HELD_OUT_BASE_VOICE and meta["held_out"]["variant"] == HELD_OUT_VARIANT
    assert len(meta["audio_sha256"]) == 64


def test_audio_hash_follows_the_audio(tmp_path):
    from salm_mtp.demo.corpus import audio_hash

    for name, data in (("a.flac", b"one"), ("b.flac", b"two")):
        (tmp_path / name).write_bytes(data)
    h = audio_hash(tmp_path, ["b.flac", "a.flac"])
    assert h == audio_hash(tmp_path, ["a.flac", "b.flac"])  # order-free
    (tmp_path / "b.flac").write_bytes(b"tw0")
    assert audio_hash(tmp_path, ["a.flac", "b.flac"]) != h


@needs_espeak
def test_real_corpus_records_its_tools(two_runs):
    _, _, metas = two_runs
    assert "eSpeak NG" in metas[0]["tools"]["espeak-ng"] and "SoX" in metas[0]["tools"]["sox"]


def test_cli_refuses_a_directory_it_did_not_write(tmp_path):
    """A user's own directory with a train_cuts.jsonl.gz: refused (exit 2, nothing touched) unless --force."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train_cuts.jsonl.gz").write_bytes(b"my own manifest")
    args = ["make-demo-data", "--out", str(out), "--num-train", "2", "--num-dev", "1", "--num-test", "1",
            "--synthetic", "--no-progress"]
    run = run_cli(args)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: --out {str(out)!r} is not empty and make-demo-data did not write it (no meta.json or "
        ".salm_demo_corpus): its *_cuts.jsonl.gz, tokenizer/ and audio/*.flac would be overwritten; pass a new or "
        "empty directory, or --force to write there anyway")
    assert sorted(p.name for p in out.iterdir()) == ["train_cuts.jsonl.gz"]
    assert (out / "train_cuts.jsonl.gz").read_bytes() == b"my own manifest"
    assert run_cli(args + ["--force"]).returncode == 0
    assert (out / "meta.json").is_file() and not (out / ".salm_demo_corpus").exists()
    rerun = run_cli(args)  # its own corpus now: reused, no --force needed
    assert rerun.returncode == 0 and "reusing the demo corpus" in rerun.stdout
