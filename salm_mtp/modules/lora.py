"""LoRA adapters on the Nemotron-H LLM through HF peft (``model.lora``; docs/design.md §5 for the build order).

    with meta_parameters():  apply_lora(module.llm, cfg, include_head)   # peft wraps the target nn.Linear layers
    ...  FSDP2 plan, materialise (the adapters sit inside their block's group, trainable fp32)
    with base_view(module):  fill / init the base weights                # checkpoint names, transformers' own init
    init_parameters(module, adapter names, seed, adapter_inits(module))   # A: kaiming-uniform per seed_for, B: 0
    with base_view(module.llm, merged=True):  llm.save_pretrained(dir)   # export: a plain Nemotron-H, no peft needed

Names. peft turns ``x.weight`` into ``x.base_layer.weight`` and adds ``x.lora_A.default.weight`` (r, in) and
``x.lora_B.default.weight`` (out, r); the module's forward is ``base(x) + (alpha / r) * B(A(dropout(x)))``.
Checkpoints and exports keep the plain names: :func:`base_view` swaps each wrapped layer back for its base
layer while tensors are read, initialised or written, so the key map lives in this one place.

What is adapted (``LoRAConfig.target_modules``): Linear layers by name suffix. Routed MoE experts are fused
3-D parameters (no Linear modules) and stay frozen; Mamba2 ``out_proj`` is refused (the fused CUDA kernel
reads ``out_proj.weight`` itself, which would silently skip the adapter). The MTP head is left out unless
``mtp_head`` is set and the head was shipped with the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from salm_mtp.config import LoRAConfig
from salm_mtp.errors import config_error

ADAPTER_DIR = "lora_adapter"
"""Sub-directory of an export holding the adapter alone in peft's format (``export_hf(..., lora="adapter")``)."""
PEFT_PREFIX = "base_model.model."
"""Prefix of tensor names in peft's adapter files (``PeftModel`` wraps the LLM as ``base_model.model``)."""


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (``...lora_A.<adapter>.weight`` / ``lora_B``)."""
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The checkpoint name of a (possibly wrapped) parameter: ``x.base_layer.weight`` -> ``x.weight``."""
    return name.replace(".base_layer.", ".")


def peft_config(cfg: LoRAConfig, include_head: bool):
    """The ``peft.LoraConfig`` of ``cfg`` (the MTP head excluded unless ``include_head``)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      exclude_modules=None if include_head else r"mtp\..*", bias="none")


def apply_lora(llm: nn.Module, cfg: LoRAConfig, include_head: bool) -> list[str]:
    """Wrap the target layers of ``llm`` (in place) with LoRA adapters; returns the wrapped module names.

    Call under ``materialize.meta_parameters()``: adapters are created on meta like every other weight.
    peft marks everything but the adapters as frozen; the base parameters' own ``requires_grad`` is put
    back here, freezing is ``SALMModule.apply_freeze``'s job (one place for every rule).
    """
    from peft import inject_adapter_in_model

    linear = [n for n, m in llm.named_modules() if isinstance(m, nn.Linear) and (include_head or not n.startswith("mtp."))]
    if not any(n == t or n.endswith("." + t) for n in linear for t in cfg.target_modules):  # peft's suffix rule
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise config_error("model.lora.target_modules", f"{cfg.target_modules} matches no Linear layer of the LLM",
                           f"its Linear layers are named {names}; set --model.lora.target_modules")
    before = {n: p.requires_grad for n, p in llm.named_parameters()}
    inject_adapter_in_model(peft_config(cfg, include_head), llm)
    for n, p in llm.named_parameters():
        if not is_adapter_param(n):
            p.requires_grad_(before[base_name(n)])
    return [n for n, _ in lora_layers(llm)]


def lora_layers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer under ``root``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in root.named_modules() if isinstance(m, LoraLayer)]


def has_lora(root: nn.Module) -> bool:
    return bool(lora_layers(root))


@torch.no_grad()
def merged_layer(layer: nn.Module) -> nn.Module:
    """A copy of ``layer``'s base Linear whose weight is base + sum of its adapters' (alpha / r) * B @ A (fp32 math)."""
    base = layer.get_base_layer()
    weight = base.weight.float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            weight = weight + layer.get_delta_weight(adapter).float()
    out = copy.copy(base)  # shallow: give the copy its own parameter dict before replacing the weight
    out._parameters = dict(base._parameters)
    out._parameters["weight"] = nn.Parameter(weight.to(base.weight.dtype), requires_grad=False)
    return out


@contextlib.contextmanager
def base_view(root: nn.Module, merged: bool = False) -> Iterator[None]:
    """Inside, every LoRA layer under ``root`` is replaced by its base layer (``merged``: by a merged copy).

    Parameter and state-dict names are then the checkpoint's (``x.weight``), and the modules are the ones
    transformers' init code expects (Nemotron-H rescales ``out_proj.weight`` by name). The adapters are put
    back on exit; the base tensors are the same objects inside and out (FSDP2 shards included).
    """
    swaps = []
    for name, layer in lora_layers(root):
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        parent._modules[child] = merged_layer(layer) if merged else layer.get_base_layer()
        swaps.append((parent, child, layer))
    try:
        yield
    finally:
        for parent, child, layer in swaps:
            parent._modules[child] = layer


def _kaiming_a(m: nn.Module) -> None:
    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))  # peft's default for A (nn.Linear's own init, no bias)


def _zeros(m: nn.Module) -> None:
    nn.init.zeros_(m.weight)  # B = 0: the adapted model starts as the base model


def adapter_inits(root: nn.Module) -> dict[str, Callable[[nn.Module], None]]:
    """Init functions of the adapter Linear modules under ``root`` by module name (for ``init_parameters``)."""
    out: dict[str, Callable[[nn.Module], None]] = {}
    for name, layer in lora_layers(root):
        for adapter in layer.lora_A:
            out[f"{name}.lora_A.{adapter}"] = _kaiming_a
            out[f"{name}.lora_B.{adapter}"] = _zeros
    return out


def adapter_state_dict(llm: nn.Module, skip_head: bool = True) -> dict[str, torch.Tensor]:
    """The adapters of ``llm`` under peft's file names (``base_model.model.<module>.lora_A.weight``).

    The MTP head's adapters are left out by default: a plain ``NemotronHForCausalLM`` (what peft wraps) has no
    ``mtp`` module. The merged export carries them.
    """
    out = {}
    for name, layer in lora_layers(llm):
        if skip_head and name.startswith("mtp."):
            continue
        for adapter in layer.lora_A:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach()
    return out


def save_adapter(llm: nn.Module, cfg: LoRAConfig, out_dir: str, base_model: str | None = None) -> str:
    """Write the adapters alone in peft's format (``adapter_config.json``, ``adapter_model.safetensors``).

    ``peft.PeftModel.from_pretrained(NemotronHForCausalLM.from_pretrained(base), out_dir)`` then reproduces the
    LoRA model's LLM, given the base weights the adapters were trained on (``base_model``: recorded as
    ``base_model_name_or_path``, e.g. model.llm.path). Returns ``out_dir``.
    """
    from salm_mtp.io.weights import save_tensors

    state = adapter_state_dict(llm)
    if not state:
        raise ValueError("the model has no LoRA adapters to export (model.lora.r=0): export without --lora adapter")
    os.makedirs(out_dir, exist_ok=True)
    pc = peft_config(cfg, include_head=False)
    pc.base_model_name_or_path = base_model
    pc.save_pretrained(out_dir)
    save_tensors(state, os.path.join(out_dir, "adapter_model.safetensors"))
    return out_dir
