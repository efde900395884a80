"""LogMelFeatures against transformers' ParakeetFeatureExtractor; SpecAugment masks on hand-sized inputs."""

import pytest
import torch
from transformers import ParakeetFeatureExtractor

from salm_mtp.modules.features import FeatureConfig, LogMelFeatures, SpecAugment, SpecAugmentConfig


def _batch(lengths, seed=0):
    """(B, S) waveforms padded with garbage (not zeros) past each length, and the lengths."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    audios = torch.randn(len(lengths), S, generator=g) * 0.1
    for b, n in enumerate(lengths):
        audios[b, n:] = 5.0  # must be ignored
    return audios, torch.tensor(lengths)


def test_matches_parakeet_feature_extractor():
    audios, lens = _batch([16000, 11234])
    hf = ParakeetFeatureExtractor()
    ref = hf([audios[0, :16000].numpy(), audios[1, :11234].numpy()], sampling_rate=16000, return_tensors="pt")

    feats, mask = LogMelFeatures(FeatureConfig())(audios, lens)

    assert feats.shape == ref["input_features"].shape == (2, 101, 80)
    assert torch.equal(mask, ref["attention_mask"])
    assert mask.sum(1).tolist() == [100, 70]  # 16000 // 160, 11234 // 160
    torch.testing.assert_close(feats, ref["input_features"].float(), atol=1e-4, rtol=0)
    assert (feats[1, 70:] == 0).all()


def test_num_frames_and_no_normalize_shape():
    cfg = FeatureConfig(normalize="none")
    assert cfg.num_frames(torch.tensor([0, 159, 160, 16000])).tolist() == [0, 0, 1, 100]
    feats, mask = LogMelFeatures(cfg)(torch.zeros(1, 320), torch.tensor([320]))
    assert feats.shape == (1, 3, 80) and mask.tolist() == [[True, True, False]]
    # Silence: log of the guard value on valid frames, 0 on padding.
    torch.testing.assert_close(feats[0, :2], torch.full((2, 80), float(torch.log(torch.tensor(2.0**-24)))))
    assert (feats[0, 2] == 0).all()


def test_buffers_follow_module_and_stay_fp32():
    feats = LogMelFeatures()
    assert set(dict(feats.named_buffers())) == {"mel_filters", "window"}
    assert feats.state_dict() == {}  # non-persistent
    before = feats.mel_filters.clone()
    feats.to(torch.bfloat16)
    assert feats.mel_filters.dtype == torch.float32 and torch.equal(feats.mel_filters, before)


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="features.normalize"):
        FeatureConfig(normalize="per_utterance")
    with pytest.raises(ValueError, match="spec_augment.time_width"):
        SpecAugmentConfig(time_width=0.0)


def _features(B=2, F=50, M=80, lens=(50, 30)):
    x = torch.randn(B, F, M, generator=torch.Generator().manual_seed(1)) + 10.0  # no natural zeros
    mask = torch.arange(F)[None, :] < torch.tensor(lens)[:, None]
    return x * mask[..., None], mask


def test_spec_augment_identity_in_eval_or_disabled():
    x, mask = _features()
    aug = SpecAugment(SpecAugmentConfig(enabled=True)).eval()
    assert torch.equal(aug(x, mask), x)
    off = SpecAugment(SpecAugmentConfig(enabled=False)).train()
    assert torch.equal(off(x, mask), x)


def test_spec_augment_exact_counts():
    # One band of width 1 and one frame (time_width * 50 = 1, * 30 -> 1) per utterance:
    # zeroed valid cells = frames + mels - 1 (the band and the frame cross once).
    x, mask = _features()
    cfg = SpecAugmentConfig(enabled=True, freq_masks=1, freq_width=1, time_masks=1, time_width=0.02)
    aug = SpecAugment(cfg).train()
    y = aug(x, mask, generator=torch.Generator().manual_seed(0))
    for b, n in enumerate((50, 30)):
        valid = y[b, :n]
        assert int((valid == 0).sum()) == n + 80 - 1
        assert int((valid == 0).all(dim=0).sum()) == 1  # one full band
        assert int((valid == 0).all(dim=1).sum()) == 1  # one full frame
    assert torch.equal(y[1, 30:], x[1, 30:])  # padding untouched (already 0)
    # Only zeros are introduced; everything else is unchanged.
    assert torch.equal(y[y != 0], x[y != 0])


def test_spec_augment_deterministic_under_generator():
    x, mask = _features()
    aug = SpecAugment(SpecAugmentConfig(enabled=True)).train()
    a = aug(x, mask, generator=torch.Generator().manual_seed(7))
    b = aug(x, mask, generator=torch.Generator().manual_seed(7))
    c = aug(x, mask, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a == 0).sum() > (x == 0).sum()
