"""Audio side: Parakeet (FastConformer) encoder, its optional CTC head, and the modality adapter.

Building never reads weights: ``build_encoder`` reads at most a local ``config.json``;
the tensors are loaded in a separate step (``SALMModule.materialize_weights``).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from transformers import ParakeetCTCConfig, ParakeetEncoder, ParakeetEncoderConfig
from transformers.models.parakeet.modeling_parakeet import ParakeetEncoderCTCHead

from salm_mtp.config import AdapterConfig, EncoderConfig
from salm_mtp.errors import MissingInputError


def encoder_config_from(cfg: EncoderConfig) -> tuple[ParakeetEncoderConfig, ParakeetCTCConfig | None]:
    """The encoder's HF config (and the CTC config when ``cfg.path`` is a Parakeet CTC directory)."""
    if cfg.path is None:
        enc = ParakeetEncoderConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            subsampling_conv_channels=cfg.subsampling_conv_channels,
            subsampling_factor=cfg.subsampling_factor,
            scale_input=cfg.scale_input,
            conv_kernel_size=cfg.conv_kernel_size,
            dropout=cfg.dropout,
            activation_dropout=cfg.dropout,
            attention_dropout=cfg.dropout,
            layerdrop=cfg.layerdrop,
        )
        return enc, None
    config_file = os.path.join(cfg.path, "config.json")
    if not os.path.isfile(config_file):
        raise MissingInputError(
            f"model.encoder.path={cfg.path!r} has no config.json: point it at a local HF Parakeet directory "
            "(e.g. one written by `salm-mtp pretrain-encoder`) or set --model.encoder.path=null"
        )
    with open(config_file) as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    if model_type == "parakeet_ctc":
        ctc = ParakeetCTCConfig.from_pretrained(cfg.path)
        enc = ctc.encoder_config
    elif model_type == "parakeet_encoder":
        ctc, enc = None, ParakeetEncoderConfig.from_pretrained(cfg.path)
    else:
        raise ValueError(
            f"model.encoder.path={cfg.path!r} holds model_type {model_type!r}; expected 'parakeet_ctc' or "
            "'parakeet_encoder'"
        )
    enc.layerdrop = cfg.layerdrop
    enc.dropout = enc.activation_dropout = enc.attention_dropout = cfg.dropout
    return enc, ctc


class AudioEncoder(nn.Module):
    """ParakeetEncoder plus an optional CTC head (kept when the checkpoint has one or CTC is trained)."""

    def __init__(self, enc_config: ParakeetEncoderConfig, ctc_vocab_size: int | None):
        super().__init__()
        self.encoder = ParakeetEncoder(enc_config)
        self.ctc_head = (
            ParakeetEncoderCTCHead(enc_config.hidden_size, ctc_vocab_size, kernel_size=1) if ctc_vocab_size else None
        )

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def blank_id(self) -> int:
        """CTC blank: the last class, as in Parakeet CTC checkpoints (pad_token_id = vocab size)."""
        assert self.ctc_head is not None
        return self.ctc_head.out_channels - 1

    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, F, n_mels), feature_mask (B, F) -> hidden (B, F', He), lengths (B,) with F' ~ F/8."""
        out = self.encoder(input_features=features, attention_mask=feature_mask.long())
        return out.last_hidden_state, out.attention_mask.sum(-1)


class Adapter(nn.Module):
    """Stack ``k`` encoder frames and project them to the LLM width with a 2-layer MLP.

    Frame stacking never mixes padded frames into real ones (a convolution would), so a row's
    audio embeddings do not depend on how much the batch padded it.
    """

    def __init__(self, cfg: AdapterConfig, in_size: int, out_size: int):
        super().__init__()
        self.k = cfg.stack_frames
        self.proj = nn.Sequential(
            nn.Linear(in_size * self.k, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, out_size)
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, F', He), lengths (B,) -> (B, ceil(F'/k), H), (B,)."""
        B, F, He = x.shape
        valid = torch.arange(F, device=x.device)[None, :] < lengths[:, None]  # (B, F')
        x = x * valid[..., None]  # zero padded frames: a stacked group may end past the row's length
        pad = (-F) % self.k
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))  # (B, F'+pad, He)
        T = (F + pad) // self.k
        x = x.reshape(B, T, He * self.k)
        out_lens = torch.div(lengths + self.k - 1, self.k, rounding_mode="floor")
        # Zero the padded positions (their projection is the bias alone). A new tensor, too: a Linear over a 3-D input
        # returns a view, and FSDP2 warns that an in-place op on its wrapped module's view output would skip the
        # all-gather's pre-backward hook (tests/test_parallel.py: no such warning, gradients equal one process's).
        keep = torch.arange(T, device=x.device)[None, :] < out_lens[:, None]  # (B, T)
        return self.proj(x) * keep[..., None], out_lens
