"""Multi-Token Prediction head for Nemotron-H (docs/design.md §2; Nemotron V3 / DeepSeek-V3 style).

Depth k (1..D) predicts token t+1+k from the previous depth's hidden state and the input
embedding k positions ahead::

    h_0 = backbone output after norm_f                               (B, T, H)
    x   = eh_proj(cat[enorm(e_k), hnorm(h_{k-1})])                    e_k = embeds rolled left by k
    x   = block_j(x) for each sublayer j of the depth's pattern      (norm -> mixer -> residual)
    h_k = final_layernorm(x)                                          lm_head(h_k) -> token t+1+k

Sublayers are transformers' own ``NemotronHBlock`` so parameter names and initialisation match
released checkpoints: ``mtp.layers.{i}.{norm,mixer.*}``, with ``enorm/hnorm/eh_proj`` on the first
sublayer of a depth and ``final_layernorm`` on its last; ``i`` is global over the flattened depths.
The head owns no embedding or lm_head: it reuses the backbone's.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from transformers import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock, NemotronHRMSNorm

from salm_mtp.config import BLOCK_SYMBOLS, MTPConfig, check_pattern
from salm_mtp.modules.merge import shift_left

SYMBOL_OF_BLOCK = {v: k for k, v in BLOCK_SYMBOLS.items()}


def backbone_pattern(llm_config: NemotronHConfig) -> str:
    """The backbone's block pattern, e.g. ``"M*EM-*"``."""
    return "".join(SYMBOL_OF_BLOCK[t] for t in llm_config.layers_block_type)


def shipped_mtp(llm_config: NemotronHConfig) -> tuple[int, str] | None:
    """(D, pattern) of the head the checkpoint config declares, or None.

    Presence is decided by ``num_nextn_predict_layers > 0``: the config's MTP pattern property
    reads ``"*E"`` even for checkpoints without a head.
    """
    d = int(getattr(llm_config, "num_nextn_predict_layers", 0) or 0)
    if d <= 0:
        return None
    return d, "".join(SYMBOL_OF_BLOCK[t] for t in llm_config.mtp_layers_block_type)


def resolve_mtp(llm_config: NemotronHConfig, cfg: MTPConfig) -> tuple[int, str]:
    """Decide (D, pattern) from the user's MTP config and what the checkpoint ships.

    Raises ValueError naming the key when the choice contradicts a shipped head or asks for a
    block type the backbone cannot build.
    """
    shipped = None if cfg.replace_existing_head else shipped_mtp(llm_config)
    D = cfg.num_layers if cfg.num_layers is not None else (shipped[0] if shipped else 0)
    if D == 0:
        return 0, cfg.pattern or (shipped[1] if shipped else "")
    backbone = backbone_pattern(llm_config)
    default = shipped[1] if shipped else ("*E" if "E" in backbone else "*-")
    pattern = check_pattern(cfg.pattern or default, "model.mtp.pattern")
    physical = 1 if cfg.use_repeated_layer else D
    if shipped and (physical, pattern) != shipped:
        raise ValueError(
            f"the checkpoint ships an MTP head with {shipped[0]} physical depth(s) and pattern {shipped[1]!r} but "
            f"model.mtp asks for {physical} (D={D}, use_repeated_layer={cfg.use_repeated_layer}), pattern "
            f"{pattern!r}: a shipped head is loaded 1:1, never rebuilt. "
            f"Set --model.mtp.num_layers={shipped[0]} --model.mtp.pattern={shipped[1]} (or null), or 0 to drop it"
        )
    missing = sorted(set(pattern) - set(backbone))
    if missing:
        raise ValueError(
            f"model.mtp.pattern={pattern!r} uses block types {missing} that the backbone ({backbone!r}) has none "
            f"of, so the LLM config holds no real sizes for them; use symbols from {sorted(set(backbone))} "
            "(e.g. '*-' for dense LLMs, '*E' for MoE LLMs); set --model.mtp.pattern"
        )
    return D, pattern


def mtp_block_config(llm_config: NemotronHConfig, pattern: str, num_physical_depths: int) -> NemotronHConfig:
    """A copy of the LLM config whose block-type list also covers the MTP sublayers' global indices."""
    cfg = copy.deepcopy(llm_config)
    cfg.layers_block_type = list(llm_config.layers_block_type) + [
        BLOCK_SYMBOLS[s] for s in pattern * num_physical_depths
    ]
    return cfg


class MTPHead(nn.Module):
    """D MTP depths over a Nemotron-H backbone. Attach as ``llm.mtp`` so names are ``mtp.layers.*``."""

    def __init__(self, llm_config: NemotronHConfig, num_depths: int, pattern: str, use_repeated_layer: bool = False):
        super().__init__()
        if num_depths < 1:
            raise ValueError(f"model.mtp.num_layers must be >= 1 to build a head, got {num_depths}")
        check_pattern(pattern, "model.mtp.pattern")
        self.num_depths = num_depths
        self.pattern = pattern
        self.use_repeated_layer = use_repeated_layer
        physical = 1 if use_repeated_layer else num_depths
        block_cfg = mtp_block_config(llm_config, pattern, physical)
        self.block_config = block_cfg  # its _attn_implementation decides the mask (causal_masks)
        H, eps = llm_config.hidden_size, llm_config.layer_norm_epsilon
        first_index = llm_config.num_hidden_layers
        layers = []
        for i in range(physical * len(pattern)):
            block = NemotronHBlock(block_cfg, layer_idx=first_index + i)
            j = i % len(pattern)
            if j == 0:  # fusion lives on the depth's first sublayer (checkpoint layout)
                block.enorm = NemotronHRMSNorm(H, eps=eps)
                block.hnorm = NemotronHRMSNorm(H, eps=eps)
                block.eh_proj = nn.Linear(2 * H, H, bias=False)
            if j == len(pattern) - 1:
                block.final_layernorm = NemotronHRMSNorm(H, eps=eps)
            layers.append(block)
        self.layers = nn.ModuleList(layers)

    def depth_blocks(self, k: int) -> list[NemotronHBlock]:
        """Sublayers used at depth k (1-based)."""
        d = 0 if self.use_repeated_layer else k - 1
        n = len(self.pattern)
        return list(self.layers[d * n : (d + 1) * n])

    def causal_masks(self, x: torch.Tensor, past_key_values=None, position_ids: torch.Tensor | None = None,
                     k: int = 1) -> dict:
        """Per block type, the mask transformers' Nemotron-H builds for depth k's layers (causal for attention
        under every implementation: eager gets an explicit (B, 1, T, past + T) mask, sdpa its causal flag).

        With a cache, the past length is read from depth k's first attention layer: the head's layer indices
        start after the backbone's, so the cache's layer 0 (what a bare ``get_seq_length()`` reads) may be
        empty or a Mamba layer."""
        from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

        attn_idx = next((b.layer_idx for b in self.depth_blocks(k) if b.block_type == "full_attention"), None)
        if position_ids is None:
            past = 0
            if past_key_values is not None and attn_idx is not None:
                past = past_key_values.get_seq_length(attn_idx)
            position_ids = (torch.arange(x.shape[1], device=x.device) + past).unsqueeze(0)
        kw = dict(config=self.block_config, inputs_embeds=x, attention_mask=None, past_key_values=past_key_values,
                  position_ids=position_ids)
        masks = {"linear_attention": create_recurrent_attention_mask(**kw)}
        if attn_idx is not None:
            masks["full_attention"] = create_causal_mask(**kw, layer_idx=attn_idx)
        return masks

    def forward_depth(self, k: int, h_prev: torch.Tensor, e_k: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """One depth: h_prev (B, T, H) and e_k (B, T, H) -> h_k (B, T, H), already final-normed.

        ``block_kwargs`` go to every block (e.g. ``past_key_values``, ``position_ids`` when decoding); the
        causal masks are built here unless given as ``attention_mask={block_type: mask}``.
        """
        blocks = self.depth_blocks(k)
        first = blocks[0]
        x = first.eh_proj(torch.cat([first.enorm(e_k), first.hnorm(h_prev)], dim=-1))  # embedding first
        masks = block_kwargs.pop("attention_mask", None)
        if masks is None:
            masks = self.causal_masks(x, block_kwargs.get("past_key_values"), block_kwargs.get("position_ids"), k)
        for block in blocks:
            x = block(x, attention_mask=masks.get(block.block_type), **block_kwargs)
        return blocks[-1].final_layernorm(x)

    def forward(self, h0: torch.Tensor, embeds: torch.Tensor) -> list[torch.Tensor]:
        """h0 (B, T, H) post-norm_f backbone output, embeds (B, T, H) merged input embeddings.

        Returns D tensors (B, T, H); the k-th feeds lm_head to predict token t+1+k. Rolling the
        merged embeddings (not token ids) keeps audio positions carrying their audio embeddings.
        """
        outs, h = [], h0
        for k in range(1, self.num_depths + 1):
            h = self.forward_depth(k, h, shift_left(embeds, k, 0.0))
            outs.append(h)
        return outs


def build_mtp_head(llm, cfg: MTPConfig) -> MTPHead | None:
    """Build (never load, never initialise) the head the configs ask for; None if D = 0.

    Its weights are filled later with the rest of the model (``SALMModule.materialize_weights``): loaded
    1:1 when the checkpoint ships the head, else initialised like the backbone (its own ``_init_weights``,
    the head being ``llm.mtp``), or copied from the loaded backbone with ``mtp.init_from_backbone``.
    """
    D, pattern = resolve_mtp(llm.config, cfg)
    if D == 0:
        return None
    return MTPHead(llm.config, D, pattern, cfg.use_repeated_layer)


def backbone_pairs(head: MTPHead, llm) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(head tensor, backbone tensor) pairs of ``mtp.init_from_backbone``: each MTP sublayer's norm and
    mixer (parameters and persistent buffers) from the backbone's last block of the same type."""
    last_of_type = {}
    for block in llm.model.layers:
        last_of_type[block.block_type] = block
    pairs = []
    for block in head.layers:
        src = last_of_type[block.block_type]
        for part in ("norm", "mixer"):
            dst_sd = getattr(block, part).state_dict(keep_vars=True)
            src_sd = getattr(src, part).state_dict(keep_vars=True)
            pairs += [(dst_sd[k], src_sd[k]) for k in dst_sd]
    return pairs


def record_mtp_in_config(llm_config: NemotronHConfig, head: MTPHead | None) -> None:
    """Write the physical depth count and the pattern into the LLM config so exports declare the head.

    A repeated-layer head stores one physical depth: that is what its tensors hold and what serving
    stacks iterate; the number of iterations D stays in the SALM config (``model.mtp.num_layers``).
    """
    if head is None:
        llm_config.num_nextn_predict_layers = 0
        return
    llm_config.num_nextn_predict_layers = 1 if head.use_repeated_layer else head.num_depths
    llm_config.mtp_layers_block_type = [BLOCK_SYMBOLS[s] for s in head.pattern]
