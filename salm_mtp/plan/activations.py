"""The analytic activation estimate of one rank (term by term in salm_mtp/plan/__init__.py)."""

from __future__ import annotations

import math

import torch


def block_bytes(kind: str, c, b: int) -> int:
    """Bytes per token saved inside one Nemotron-H block of type ``kind`` (module docstring), its norm included.

    ``c`` is the NemotronHConfig, ``b`` the compute dtype's size (fp32 parts are counted at 4 bytes).
    """
    H = c.hidden_size
    norm = 8 * H + b * H  # NemotronHRMSNorm works in fp32: input copy and normalized (fp32), output (b)
    if kind == "full_attention":
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        inner = b * (2 * q + 2 * kv) + 4 * c.num_attention_heads  # q, out, k, v; fp32 logsumexp
    elif kind == "linear_attention":
        d_inner = c.mamba_num_heads * c.mamba_head_dim
        d_in_proj = 2 * d_inner + 2 * c.n_groups * c.ssm_state_size + c.mamba_num_heads
        inner = b * (d_in_proj + d_inner) + 4 * c.n_groups  # mamba_split_conv1d_scan_combined: zxbcdt, out_x, rstd
    elif kind == "moe":
        lat = c.moe_latent_size
        lx = lat or H
        per_choice = b * (2 * lx + 2 * c.moe_intermediate_size) + 4 * lx  # input, up, relu2, output; fp32 product
        inner = (4 * (H + c.n_routed_experts)  # router: fp32 input copy and logits
                 + c.num_experts_per_tok * per_choice
                 + b * 2 * c.moe_shared_expert_intermediate_size + (b * 2 * lat if lat else 0))
    elif kind == "mlp":
        inner = b * 2 * c.intermediate_size
    else:
        raise ValueError(f"unknown Nemotron-H block type {kind!r}")
    return norm + inner


def activation_estimate(module, lm_head_chunk_size: int, max_duration: float, text_tokens_per_second: float,
                        cut_seconds: float) -> dict:
    """Analytic activation bytes of one rank's batch, with and without activation checkpointing (module docstring)."""
    from salm_mtp.parallel import _dtype

    par = module.cfg_parallel
    b = (_dtype(par.param_dtype) or torch.float32).itemsize
    feat = module.features.config
    enc = module.audio.encoder.config
    llm = module.llm.config
    k = module.adapter.k
    hop = feat.hop_length / feat.sample_rate
    F = max_duration / hop
    Fe = F / enc.subsampling_factor
    A = Fe / k
    Tt = max_duration * text_tokens_per_second
    T = A + Tt
    Tc = cut_seconds / (hop * enc.subsampling_factor)
    He, H = enc.hidden_size, llm.hidden_size
    stages = int(math.log2(enc.subsampling_factor))
    # stage 1 keeps its ReLU output, later stages their depthwise and ReLU outputs; + the final linear's input
    stage_sum = sum((1 if i == 1 else 2) / 4**i for i in range(1, stages + 1)) + 1 / 4**stages
    sub = F * enc.subsampling_conv_channels * feat.n_mels * stage_sum
    layer = Fe * (44 * He + 2 * enc.num_attention_heads * Tc)  # one Conformer layer's saved tensors (elements)
    encoder = (sub + enc.num_hidden_layers * layer) * b
    # encoder_activation_checkpointing: each layer keeps its input; one layer is recomputed at a time in backward
    encoder_ac = (sub + enc.num_hidden_layers * Fe * He + layer) * b
    if module.audio.ctc_head is not None:
        encoder += Fe * module.audio.ctc_head.out_channels * (b + 8)
        encoder_ac += Fe * module.audio.ctc_head.out_channels * (b + 8)
    ha = module.adapter.proj[0].out_features
    adapter = A * (k * He + 2 * ha + H) * b
    io = T * 4 * H * b
    kinds = list(llm.layers_block_type)
    per_kind = {kind: block_bytes(kind, llm, b) for kind in set(kinds)}  # bytes per token
    blocks_no_ac = sum(T * per_kind[kind] for kind in kinds)
    blocks_ac = len(kinds) * T * H * b + T * max(per_kind.values())  # inputs + the block recomputed in backward
    head = module.mtp_head
    mtp = 0.0
    for d in range(1, module.num_mtp_depths + 1):
        mtp += T * (8 * H * b + sum(block_bytes(blk.block_type, llm, b) for blk in head.depth_blocks(d)))
    rows = min(lm_head_chunk_size, Tt)  # model.lm_head_chunk_size: target rows per lm_head chunk of the loss
    w = module.llm.lm_head.weight
    grad_buffer = w.numel() * 4 if w.requires_grad else 0  # linear_ce's fp32 dW, forward to backward
    loss = 2 * (1 + module.num_mtp_depths) * Tt * H * b + rows * llm.vocab_size * (b + 4) + grad_buffer
    common = encoder + adapter + io + mtp + loss
    counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    return {
        "assumptions": {"max_duration_s": max_duration, "text_tokens_per_second": text_tokens_per_second,
                        "cut_seconds": cut_seconds, "hop_s": hop, "compute_bytes": b},
        "mel_frames": int(F), "encoder_frames": int(Fe), "audio_positions": int(A), "text_tokens": int(Tt),
        "llm_positions": int(T), "blocks": counts,
        "per_token_block_bytes": {kind: per_kind[kind] for kind in sorted(per_kind)},
        "parts_bytes": {"encoder": int(encoder), "encoder_with_ac": int(encoder_ac), "adapter": int(adapter),
                        "llm_io": int(io),
                        "backbone_without_ac": int(blocks_no_ac), "backbone_with_ac": int(blocks_ac),
                        "mtp_head": int(mtp), "loss": int(loss)},
        "without_ac_bytes": int(common + blocks_no_ac),
        "with_ac_bytes": int(common + blocks_ac),
    }
