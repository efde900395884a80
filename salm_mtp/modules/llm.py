"""Nemotron-H LLM: build the architecture from a local config.json or an inline config (no weights read)."""

from __future__ import annotations

import importlib.util
import os
import warnings

from transformers import NemotronHConfig, NemotronHForCausalLM

from salm_mtp.config import BLOCK_SYMBOLS, LLMConfig
from salm_mtp.errors import MissingInputError


def llm_config_from(cfg: LLMConfig, vocab_size: int) -> NemotronHConfig:
    """The HF config of the LLM: read from ``cfg.path`` or made from the inline fields.

    ``vocab_size`` (the tokenizer's size) is used for inline builds only: a checkpoint's own
    vocabulary is the source of truth for loaded models.
    """
    if cfg.path is not None:
        if not os.path.isfile(os.path.join(cfg.path, "config.json")):
            raise MissingInputError(
                f"model.llm.path={cfg.path!r} has no config.json: point it at a local HF Nemotron-H directory "
                "or set --model.llm.path=null to build a random LLM from model.llm.*"
            )
        config = NemotronHConfig.from_pretrained(cfg.path)
        if config.model_type != "nemotron_h":
            raise ValueError(f"model.llm.path={cfg.path!r} holds model_type {config.model_type!r}, not 'nemotron_h'")
    else:
        config = NemotronHConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            layers_block_type=[BLOCK_SYMBOLS[s] for s in cfg.pattern],
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size,
            mamba_num_heads=cfg.mamba_num_heads,
            mamba_head_dim=cfg.mamba_head_dim,
            ssm_state_size=cfg.ssm_state_size,
            n_groups=1,
            chunk_size=64,
            n_routed_experts=cfg.n_routed_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
            moe_latent_size=cfg.moe_latent_size,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    config._attn_implementation = cfg.attn_implementation
    return config


def build_llm(cfg: LLMConfig, vocab_size: int) -> NemotronHForCausalLM:
    """A randomly initialised NemotronHForCausalLM; load weights with ``checkpoint.load_llm_weights``."""
    return NemotronHForCausalLM(llm_config_from(cfg, vocab_size))


MAMBA_KERNELS = ("mamba_ssm", "causal_conv1d")
"""CUDA kernels transformers' Nemotron-H uses when installed (``pip install .[gpu]``); else a slow pure-torch scan."""


def missing_mamba_kernels(llm, device) -> list[str]:
    """The kernel packages a CUDA run of this LLM lacks (warned about once); [] on CPU or without Mamba blocks."""
    if str(device).split(":")[0] != "cuda" or "linear_attention" not in set(llm.config.layers_block_type):
        return []
    missing = [m for m in MAMBA_KERNELS if importlib.util.find_spec(m) is None]
    if missing:
        warnings.warn(
            f"CUDA run of a Nemotron-H with Mamba2 blocks but {missing} not installed: transformers falls back to its "
            "pure-torch reference scan, correct but several times slower and more memory-hungry. Install the kernels "
            "with `pip install -c constraints.txt .[gpu]` (builds against your CUDA toolkit)",
            stacklevel=2,
        )
    return missing
