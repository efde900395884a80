"""Tests for salm_mtp/data/dataset.py: collation shapes, padding, exact values, bad audio."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from salm_mtp.data.dataset import CTC_PAD_ID, SALMDataset
from salm_mtp.data.datamodule import load_cuts
from salm_mtp.data.prompt import PromptFormatter
from salm_mtp.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["zero one two three four five six seven eight nine", "0 1 2 3 4 5 6 7 8 9"], None, 80)


def collate(tokenizer, manifest, n=None):
    cuts = load_cuts(manifest).to_eager()
    return SALMDataset(tokenizer, PromptFormatter(tokenizer))[cuts if n is None else cuts.subset(first=n)]


def test_collation_shapes_padding_and_values(tokenizer, sine_corpus, tmp_path):
    batch = collate(tokenizer, sine_corpus(n=3))  # clips of 1600, 1760, 1920 samples; c002 is ast
    fmt = PromptFormatter(tokenizer)
    assert batch["ids"] == ["c000", "c001", "c002"]
    assert batch["tasks"] == ["asr", "asr", "ast"]
    assert batch["answers"] == ["zero zero", "zero one", "0 2"]
    assert batch["num_dropped"] == 0

    # audio: exact samples, zero padded to the longest clip
    assert batch["audios"].dtype == torch.float32 and batch["audios"].shape == (3, 1920)
    assert batch["audio_lens"].tolist() == [1600, 1760, 1920]
    for i, n in enumerate([1600, 1760, 1920]):
        ref, _ = sf.read(tmp_path / "audio" / f"c{i:03d}.flac", dtype="float32")
        assert torch.equal(batch["audios"][i, :n], torch.from_numpy(ref))
        assert not batch["audios"][i, n:].any()

    # tokens: each row is the formatter's encoding, right-padded with the pad id
    encs = [fmt.encode("asr", "zero zero"), fmt.encode("asr", "zero one"), fmt.encode("ast", "0 2")]
    T = max(len(e.input_ids) for e in encs)
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (3, T)
    assert batch["input_ids"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.bool
    for i, e in enumerate(encs):
        L = len(e.input_ids)
        assert batch["input_lens"][i] == L and batch["prompt_lens"][i] == e.prompt_len
        assert batch["input_ids"][i, :L].tolist() == e.input_ids
        assert (batch["input_ids"][i, L:] == tokenizer.pad_token_id).all()
        assert batch["loss_mask"][i].tolist() == e.loss_mask + [False] * (T - L)
        assert batch["input_ids"][i].tolist().count(fmt.audio_token_id) == 1

    # CTC targets: the transcript (also for ast), no special tokens, padded with -100
    ctc = [tokenizer.encode(t, add_special_tokens=False) for t in ("zero zero", "zero one", "zero two")]
    U = max(map(len, ctc))
    assert batch["ctc_ids"].shape == (3, U)
    for i, ids in enumerate(ctc):
        assert batch["ctc_lens"][i] == len(ids)
        assert batch["ctc_ids"][i].tolist() == ids + [CTC_PAD_ID] * (U - len(ids))


def test_unreadable_audio_is_dropped_and_counted(tokenizer, sine_corpus, tmp_path, caplog):
    manifest = sine_corpus(n=4)
    (tmp_path / "audio" / "c001.flac").unlink()  # missing
    (tmp_path / "audio" / "c002.flac").write_bytes(b"not a flac file")  # corrupt
    with caplog.at_level(logging.WARNING, logger="salm_mtp.data.dataset"):
        batch = collate(tokenizer, manifest)
    assert batch["ids"] == ["c000", "c003"]
    assert batch["num_dropped"] == 2
    assert batch["audios"].shape[0] == batch["input_ids"].shape[0] == batch["ctc_ids"].shape[0] == 2
    assert batch["audio_lens"].tolist() == [1600, 2080]
    messages = [r.getMessage() for r in caplog.records]
    assert any("c001" in m and "c001.flac" in m for m in messages)
    assert any("c002" in m and "c002.flac" in m for m in messages)
    assert [(b["cut_id"], b["reason"]) for b in batch["skipped"]] == [("c001", "unreadable_audio"),
                                                                     ("c002", "unreadable_audio")]


def test_all_dropped_gives_an_empty_batch(tokenizer, sine_corpus, tmp_path):
    manifest = sine_corpus(n=2)
    for f in (tmp_path / "audio").glob("*.flac"):
        f.unlink()
    batch = collate(tokenizer, manifest)
    assert batch["num_dropped"] == 2 and batch["ids"] == []
    assert batch["audios"].shape == (0, 0) and batch["input_ids"].shape == (0, 0)
    assert batch["audio_lens"].shape == (0,) and batch["prompt_lens"].shape == (0,)


def test_other_sample_rates_are_resampled_to_16k(tokenizer, sine_corpus):
    batch = collate(tokenizer, sine_corpus(n=2, sample_rate=8000))  # 800 and 880 samples at 8 kHz
    assert batch["audio_lens"].tolist() == [1600, 1760]
    assert np.isclose(batch["audios"][0, :1600].abs().max().item(), 0.5, atol=0.05)


def test_unknown_task_is_a_bad_cut(tokenizer, sine_corpus):
    from salm_mtp.data.policy import BadCutError

    cuts = load_cuts(sine_corpus(n=2)).to_eager()
    cuts[0].supervisions[0].custom["task"] = "qa"
    batch = SALMDataset(tokenizer)[cuts]  # skip (default): dropped and listed
    assert batch["ids"] == ["c001"]
    assert [(b["cut_id"], b["reason"]) for b in batch["skipped"]] == [("c000", "bad_task")]
    assert "unknown task 'qa'" in batch["skipped"][0]["detail"]
    with pytest.raises(BadCutError, match="cut 'c000'.*bad_task: unknown task 'qa'"):
        SALMDataset(tokenizer, policy="raise")[cuts]
