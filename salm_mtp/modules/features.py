"""Log-mel features computed inside the model (batched, on the input's device), plus SpecAugment.

`LogMelFeatures` reproduces `transformers.ParakeetFeatureExtractor` number for number (checked to
1e-4 in tests/test_features.py), but works on an already padded `(B, S)` batch with explicit
lengths, so the data loader only ships raw waveforms and the STFT runs on the GPU:

    preemphasis (masked to the valid samples) -> STFT (centred, zero padded, symmetric Hann window
    of win_length inside n_fft) -> power spectrum -> slaney mel filterbank -> log(x + 2**-24)
    -> per-feature mean/std over the valid frames -> padded frames set to 0

Dimension legend: B batch, S samples, F frames (S // hop_length + 1), M mel bins (n_mels).

`SpecAugment` masks random mel bands and time spans of those features (NeMo-style, mask value 0)
and only acts in training mode.

    feats = LogMelFeatures(FeatureConfig())
    x, mask = feats(audios, audio_lens)                   # (B, F, 80), (B, F)
    x = SpecAugment(SpecAugmentConfig(enabled=True))(x, mask)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from salm_mtp.errors import config_error

LOG_ZERO_GUARD = 2.0**-24
"""Added to the mel power before the log, as ParakeetFeatureExtractor (and NeMo) do."""

NORM_EPS = 1e-5
"""Added to the per-feature std before dividing, as ParakeetFeatureExtractor does."""


@dataclass
class FeatureConfig:
    """Log-mel front end; the defaults are Parakeet's (ParakeetFeatureExtractor defaults)."""

    sample_rate: int = 16000
    """Audio sample rate in Hz; waveforms must already be at this rate."""
    n_mels: int = 80
    """Number of mel filters, i.e. the feature dimension M fed to the encoder."""
    n_fft: int = 512
    """FFT size; n_fft // 2 + 1 frequency bins."""
    win_length: int = 400
    """Hann window length in samples (25 ms at 16 kHz), zero padded to n_fft."""
    hop_length: int = 160
    """Frame shift in samples (10 ms at 16 kHz)."""
    preemphasis: float = 0.97
    """Preemphasis coefficient: y[t] = x[t] - preemphasis * x[t-1]; 0.0 disables it."""
    normalize: str = "per_feature"
    """"per_feature": each mel bin to zero mean / unit std over the utterance's valid frames;
    "none": raw log-mel."""

    def __post_init__(self) -> None:
        if self.normalize not in ("per_feature", "none"):
            raise ValueError(
                f"features.normalize must be 'per_feature' or 'none', got {self.normalize!r}; "
                "set --model.features.normalize"
            )
        for name in ("sample_rate", "n_mels", "n_fft", "win_length", "hop_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"features.{name} must be > 0, got {getattr(self, name)}; set --model.features.{name}")
        if self.win_length > self.n_fft:
            raise ValueError(
                f"features.win_length ({self.win_length}) must be <= features.n_fft ({self.n_fft}); "
                "lower --model.features.win_length or raise --model.features.n_fft"
            )
        if not 0.0 <= self.preemphasis < 1.0:
            raise ValueError(f"features.preemphasis must be in [0, 1), got {self.preemphasis}; set --model.features.preemphasis")

    def num_frames(self, audio_lens: torch.Tensor) -> torch.Tensor:
        """Valid feature frames per utterance, ParakeetFeatureExtractor's formula.

        Args:
            audio_lens: (B,) long, valid samples per utterance.
        Returns:
            (B,) long: (audio_lens + 2 * (n_fft // 2) - n_fft) // hop_length (= audio_lens // hop for even n_fft).
        """
        return torch.div(audio_lens + self.n_fft // 2 * 2 - self.n_fft, self.hop_length, rounding_mode="floor")


def _mel_filterbank(cfg: FeatureConfig) -> torch.Tensor:
    """(M, n_fft // 2 + 1) float32 slaney mel filterbank, as ParakeetFeatureExtractor builds it."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=cfg.n_fft // 2 + 1,
        num_mel_filters=cfg.n_mels,
        min_frequency=0.0,
        max_frequency=cfg.sample_rate / 2,
        sampling_rate=cfg.sample_rate,
        norm="slaney",
        mel_scale="slaney",
        dtype=np.float32,
    )  # (n_freq, M)
    return torch.from_numpy(np.ascontiguousarray(fb.T))


class LogMelFeatures(nn.Module):
    """Waveforms -> normalised log-mel features and their frame mask (no parameters, no grad)."""

    def __init__(self, config: FeatureConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else FeatureConfig()
        # Non-persistent: derived from the config, so never saved, but they follow .to(device).
        self.register_buffer("mel_filters", _mel_filterbank(self.config), persistent=False)  # (M, n_freq)
        self.register_buffer(
            "window", torch.hann_window(self.config.win_length, periodic=False), persistent=False
        )  # (win_length,)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) (Lightning "bf16-true") would round the filterbank and window;
        # rebuild them in float32 on their new device instead, the features are computed in fp32.
        super()._apply(fn, recurse)
        if self.mel_filters.dtype != torch.float32:
            device = self.mel_filters.device
            self.mel_filters = _mel_filterbank(self.config).to(device)
            self.window = torch.hann_window(self.config.win_length, periodic=False, device=device)
        return self

    @torch.no_grad()
    def forward(self, audios: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute features for a padded batch.

        Args:
            audios: (B, S) float waveforms; samples at or past audio_lens[b] are ignored.
            audio_lens: (B,) long, valid samples per row.
        Returns:
            features: (B, F, M) float32, F = S // hop_length + 1; 0 on padded frames.
            feature_mask: (B, F) bool, True on the num_frames(audio_lens) valid frames.
        """
        if audios.dim() != 2:
            raise ValueError(f"audios must be (B, S), got shape {tuple(audios.shape)}; batch mono waveforms")
        if audio_lens.shape != audios.shape[:1]:
            raise ValueError(f"audio_lens must be (B,) = ({audios.shape[0]},), got shape {tuple(audio_lens.shape)}")
        cfg = self.config
        device = audios.device
        audio_lens = audio_lens.to(device=device, dtype=torch.long)
        with torch.autocast(device_type=device.type, enabled=False):  # STFT and log in fp32 under AMP
            x = audios.float()  # (B, S)
            sample_mask = torch.arange(x.shape[1], device=device)[None, :] < audio_lens[:, None]  # (B, S)
            if cfg.preemphasis > 0.0:
                x = torch.cat([x[:, :1], x[:, 1:] - cfg.preemphasis * x[:, :-1]], dim=1)
            x = x.masked_fill(~sample_mask, 0.0)  # padding behaves as the extractor's zero padding

            stft = torch.stft(
                x,
                cfg.n_fft,
                hop_length=cfg.hop_length,
                win_length=cfg.win_length,
                window=self.window.float(),
                center=True,
                pad_mode="constant",
                return_complex=True,
            )  # (B, n_freq, F) complex64
            power = torch.view_as_real(stft).pow(2).sum(-1)  # (B, n_freq, F)
            del stft
            mel = torch.log(self.mel_filters.float() @ power + LOG_ZERO_GUARD)  # (B, M, F)
            feats = mel.transpose(1, 2)  # (B, F, M)

            lengths = cfg.num_frames(audio_lens)  # (B,)
            feature_mask = torch.arange(feats.shape[1], device=device)[None, :] < lengths[:, None]  # (B, F)
            m = feature_mask.unsqueeze(-1)  # (B, F, 1)
            if cfg.normalize == "per_feature":
                # Unbiased variance as in the extractor; the clamps only matter for utterances with
                # fewer than 2 frames, where the extractor itself returns inf/nan.
                n = lengths.clamp(min=1).unsqueeze(-1).to(feats.dtype)  # (B, 1)
                n1 = (lengths - 1).clamp(min=1).unsqueeze(-1).to(feats.dtype)  # (B, 1)
                masked = feats * m
                mean = (masked.sum(dim=1) / n).unsqueeze(1)  # (B, 1, M)
                var = (((masked - mean) ** 2) * m).sum(dim=1) / n1  # (B, M)
                feats = (feats - mean) / (var.sqrt().unsqueeze(1) + NORM_EPS)
            feats = feats * m
        return feats, feature_mask


@dataclass
class SpecAugmentConfig:
    """SpecAugment on log-mel features (mask value 0); defaults are NeMo Parakeet's, off by default."""

    enabled: bool = False
    """Apply the masks (in training mode only); False makes SpecAugment the identity."""
    freq_masks: int = 2
    """Mel-band masks per utterance."""
    freq_width: int = 27
    """Largest mel-band mask width in bins; each width is uniform in [1, freq_width]."""
    time_masks: int = 10
    """Time masks per utterance."""
    time_width: float = 0.05
    """Largest time mask width as a fraction of the utterance's valid frames (at least 1 frame);
    each width is uniform in [1, max(1, floor(time_width * frames))]."""

    def __post_init__(self) -> None:
        if self.freq_masks < 0 or self.time_masks < 0:
            raise config_error("model.spec_augment.freq_masks / time_masks",
                               f"must be >= 0, got {self.freq_masks}, {self.time_masks}",
                               "set --model.spec_augment.freq_masks / time_masks")
        if self.freq_width < 1:
            raise ValueError(f"spec_augment.freq_width must be >= 1, got {self.freq_width}; set --model.spec_augment.freq_width")
        if not 0.0 < self.time_width <= 1.0:
            raise ValueError(
                f"spec_augment.time_width is a fraction of the frames in (0, 1], got {self.time_width}; "
                "set --model.spec_augment.time_width"
            )


def _span_mask(start: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K) starts and widths -> (B, size) bool, True inside any of the K spans [start, start + width)."""
    idx = torch.arange(size, device=start.device)[None, None, :]  # (1, 1, size)
    inside = (idx >= start[..., None]) & (idx < (start + width)[..., None])  # (B, K, size)
    return inside.any(dim=1)


class SpecAugment(nn.Module):
    """Random mel-band and time masks, set to 0; identity in eval mode or when disabled.

    Widths are drawn from [1, max] (not NeMo's [0, max]) so that `freq_masks=n` always masks n spans
    (they may overlap). Time masks stay inside each utterance's valid frames.
    """

    def __init__(self, config: SpecAugmentConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else SpecAugmentConfig()

    @torch.no_grad()
    def forward(
        self, features: torch.Tensor, feature_mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Mask a batch.

        Args:
            features: (B, F, M) log-mel features.
            feature_mask: (B, F) bool valid frames.
            generator: optional RNG; with one seeded the same way the masks are identical. Random
                numbers are drawn on its device (on features' device when None).
        Returns:
            (B, F, M) features with the masked cells set to 0 (the input itself when not training).
        """
        cfg = self.config
        if not (self.training and cfg.enabled) or (cfg.freq_masks == 0 and cfg.time_masks == 0):
            return features
        B, F, M = features.shape
        device = features.device
        rng_device = generator.device if generator is not None else device

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=rng_device).to(device)

        # Mel bands: width in [1, min(freq_width, M)], start in [0, M - width].
        fw_max = min(cfg.freq_width, M)
        fw = 1 + (uniform(B, cfg.freq_masks) * fw_max).long().clamp(max=fw_max - 1)  # (B, Kf)
        f0 = (uniform(B, cfg.freq_masks) * (M - fw + 1)).long().clamp(max=M - fw)  # (B, Kf)
        band = _span_mask(f0, fw, M)  # (B, M)

        # Time spans inside the valid frames: width in [1, max(1, floor(time_width * T_b))] (<= T_b).
        lens = feature_mask.sum(dim=1)  # (B,)
        tw_max = (lens.double() * cfg.time_width).floor().long().clamp(min=1)[:, None]  # (B, 1)
        tw = 1 + (uniform(B, cfg.time_masks) * tw_max).long().clamp(max=tw_max - 1)  # (B, Kt)
        tw = torch.minimum(tw, lens[:, None])  # 0 for empty utterances
        t0 = (uniform(B, cfg.time_masks) * (lens[:, None] - tw + 1)).long().clamp(min=0)  # (B, Kt)
        t0 = torch.minimum(t0, (lens[:, None] - tw).clamp(min=0))
        span = _span_mask(t0, tw, F)  # (B, F)

        drop = band[:, None, :] | span[:, :, None]  # (B, F, M)
        return features.masked_fill(drop, 0.0)
