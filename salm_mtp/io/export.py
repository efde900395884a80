"""Export to HF-format directories for serving and reloading (``salm-mtp export``).

    model = load_model("runs/demo/salm/version_0/checkpoints/last.ckpt")   # salm_mtp/io/checkpoints.py
    export_hf(model, "exports/demo")
    salm-mtp export --ckpt runs/demo/salm/version_0/checkpoints/last.ckpt --out exports/demo [--mtp-depths 1]

Export layout (``export_hf``)::

    DIR/llm/          HF Nemotron-H: config.json, model.safetensors with backbone.* / lm_head.* /
                      mtp.layers.{i}.* (per expert), tokenizer
    DIR/encoder/      HF Parakeet CTC (or bare encoder) directory
    DIR/adapter.safetensors, DIR/salm_config.json
    DIR/config.yaml   the run's resolved config (``salm-mtp export`` copies it when the checkpoint's run has one;
                      ``salm-mtp evaluate --model DIR`` reads its data and prompt settings from it)

``llm/`` is written for older consumers too (docs/design.md §6): config.json carries, beside the lists
transformers 5 reads (``layers_block_type``, ``mtp_layers_block_type``), the released Nemotron-3 fields
``hybrid_override_pattern`` / ``mtp_hybrid_override_pattern`` strings and an integer ``num_hidden_layers``;
tokenizer_config.json names ``PreTrainedTokenizerFast`` (transformers 4.x; 5.x reads it too) instead of
transformers 5's ``TokenizersBackend``. Serving stacks (vLLM, llama.cpp) take one MTP depth:
``mtp_depths=1`` exports only the first.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from salm_mtp.io import weights
from salm_mtp.io.checkpoints import load_model
from salm_mtp.salm import SALM
from salm_mtp.modules.lora import ADAPTER_DIR, base_view, has_lora, save_adapter
from salm_mtp.modules.mtp import SYMBOL_OF_BLOCK, record_mtp_in_config


SERVED_MTP_DEPTHS = 1
"""MTP depths vLLM and llama.cpp serve (deeper heads only by repeating depth 1)."""


def first_depths(head, n: int):
    """A view of ``head`` with only its first ``n`` depths (shares the parameters; for export)."""
    D = head.num_depths
    if not 1 <= n <= D:
        raise ValueError(f"--mtp-depths must be between 1 and the head's {D} depths, got {n}")
    view = copy.copy(head)  # nn.Module shallow copy: own _modules dict, same parameter tensors
    view._modules = dict(head._modules)
    view.num_depths = n
    if not head.use_repeated_layer:
        view.layers = torch.nn.ModuleList(list(head.layers)[: n * len(head.pattern)])
    return view


def write_legacy_llm_fields(llm_dir: str) -> None:
    """Add the released Nemotron-3 config fields and a transformers-4 tokenizer class to an ``llm/`` export."""
    cfg_file = os.path.join(llm_dir, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    layers = cfg["layers_block_type"]
    cfg["hybrid_override_pattern"] = "".join(SYMBOL_OF_BLOCK[t] for t in layers)
    cfg["num_hidden_layers"] = len(layers)
    if cfg.get("num_nextn_predict_layers"):
        cfg["mtp_hybrid_override_pattern"] = "".join(SYMBOL_OF_BLOCK[t] for t in cfg["mtp_layers_block_type"])
    with open(cfg_file, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    tok_file = os.path.join(llm_dir, "tokenizer_config.json")
    if os.path.isfile(tok_file):
        with open(tok_file) as f:
            tok = json.load(f)
        if tok.get("tokenizer_class") in (None, "TokenizersBackend"):  # the transformers 5-only name
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        extra = tok.get("extra_special_tokens")
        if isinstance(extra, list):  # transformers 5 writes a list; 4.x reads named ones (a dict) there
            del tok["extra_special_tokens"]
            tok["additional_special_tokens"] = list(dict.fromkeys(tok.get("additional_special_tokens", []) + extra))
        with open(tok_file, "w") as f:
            json.dump(tok, f, indent=2, ensure_ascii=False)


def export_hf(module: SALM, out_dir: str, mtp_depths: int | None = None, lora: str = "merge") -> dict[str, str]:
    """Write an unsharded SALM (or SALMModule) as HF-format directories (layout in the module docstring).

    Returns the paths written. ``DIR/llm`` is a plain Nemotron-H checkpoint: serving stacks and
    ``--model.llm.path=DIR/llm`` load its head back 1:1. ``mtp_depths``: export only the head's first
    depths (None: all; serving stacks take 1, and a warning says so when more are written).
    LoRA adapters (model.lora.r > 0) are always merged into ``DIR/llm``'s base weights (a plain Nemotron-H: no
    peft needed to serve it; ``salm_config.json`` says r=0). ``lora="adapter"`` also writes the backbone's adapters
    alone in peft's format to ``DIR/lora_adapter/`` (``peft.PeftModel.from_pretrained`` onto the base LLM they were
    trained on, model.llm.path; the MTP head's adapters live in the merged export only).
    """
    if lora not in ("merge", "adapter"):
        raise ValueError(f"lora={lora!r}: use 'merge' (LoRA merged into llm/) or 'adapter' (merged, and the adapter "
                         "alone in peft's format)")
    if lora == "adapter" and not has_lora(module.llm):
        raise ValueError("lora='adapter' but the model has no LoRA adapters (model.lora.r=0): export without it")
    llm_dir, enc_dir = os.path.join(out_dir, "llm"), os.path.join(out_dir, "encoder")
    os.makedirs(llm_dir, exist_ok=True)
    os.makedirs(enc_dir, exist_ok=True)
    head = module.mtp_head
    export_head = head if head is None or mtp_depths is None else first_depths(head, mtp_depths)
    if export_head is not None and export_head.num_depths > SERVED_MTP_DEPTHS:
        warnings.warn(
            f"exporting an MTP head with {export_head.num_depths} depths: vLLM and llama.cpp serve depth 1 only "
            "(llama.cpp's converter requires num_nextn_predict_layers == 1); pass --mtp-depths 1 to export only "
            "the first depth", UserWarning, stacklevel=2)
    if export_head is not head:
        module.llm.mtp = export_head
    try:
        record_mtp_in_config(module.llm.config, export_head)
        with base_view(module.llm, merged=True):  # LoRA merged into plain Linear layers: checkpoint names
            module.llm.save_pretrained(llm_dir)  # per-expert on-disk names, mtp.layers.{i}.* included
    finally:
        if export_head is not head:
            module.llm.mtp = head
        record_mtp_in_config(module.llm.config, head)
    module.tokenizer.save_pretrained(llm_dir)
    write_legacy_llm_fields(llm_dir)

    weights.save_encoder_hf(module.audio, enc_dir)
    weights.save_tensors(module.adapter.state_dict(), os.path.join(out_dir, "adapter.safetensors"))

    salm = module.salm_config()
    salm["llm"]["path"], salm["encoder"]["path"], salm["tokenizer_path"] = "llm", "encoder", None
    salm["adapter"]["path"] = "adapter.safetensors"
    salm["mtp"]["replace_existing_head"] = False  # the exported head is the one to load
    written = {}
    if lora == "adapter":
        written["lora_adapter"] = save_adapter(module.llm, module.cfg_lora, os.path.join(out_dir, ADAPTER_DIR),
                                               base_model=module.cfg_llm.path)
    if has_lora(module.llm):
        salm["lora"].update(r=0, mtp_head=False)  # merged: the exported LLM is a plain one
    if export_head is not head:
        salm["mtp"]["num_layers"] = export_head.num_depths
    with open(os.path.join(out_dir, "salm_config.json"), "w") as f:
        json.dump(salm, f, indent=2, default=list)
    return {"llm": llm_dir, "encoder": enc_dir, "root": out_dir, **written}


def export_checkpoint(ckpt_path: str, out_dir: str, mtp_depths: int | None = None, lora: str = "merge") -> dict[str, str]:
    """Load a Lightning checkpoint (.ckpt file or sharded directory) into an unsharded module and export it."""
    return export_hf(load_model(ckpt_path), out_dir, mtp_depths=mtp_depths, lora=lora)


@dataclass
class ExportOptions:
    """The options of ``salm-mtp export`` (salm_mtp/options.py makes the parser and its help from them)."""

    ckpt: str
    """Lightning checkpoint: a .ckpt file, or a sharded FSDP2 checkpoint directory"""
    out: str
    """output directory (created)"""
    mtp_depths: int | None = None
    """export only the MTP head's first N depths (default: all; vLLM and llama.cpp serve 1)"""
    lora: Literal["merge", "adapter"] = "merge"
    """merge: LoRA adapters merged into OUT/llm; adapter: merged, and the backbone's adapters alone in peft's format
    under OUT/lora_adapter"""
    force: bool = False
    """replace a non-empty --out (refused otherwise: stale files beside the new ones would be read by loaders)"""


def export_main(argv: list[str] | None = None) -> int:
    """``salm-mtp export``: a checkpoint -> the HF-format export directory (layout in the module docstring)."""
    import shutil

    from salm_mtp.errors import SalmError, check_ckpt_path
    from salm_mtp.options import parse_options
    from salm_mtp.run_config import find_run_config

    args = parse_options(ExportOptions, argv, prog="salm-mtp export", description=(
        "Export a trained SALM checkpoint to HF-format directories for serving and reloading: OUT/llm (Nemotron-H "
        "with its mtp.* head, tokenizer; config.json in the released Nemotron-3 form), OUT/encoder (Parakeet), "
        "OUT/adapter.safetensors, OUT/salm_config.json and the run's config.yaml."))
    check_ckpt_path(args.ckpt, "--ckpt")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SalmError(f"--out {args.out!r} is a file; pass a directory (new or empty)")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise SalmError(f"--out {args.out!r} is not empty: an export beside old files leaves stale ones that loaders "
                        "read (an adapter, a shard index); pass a new or empty directory, or --force to replace it")
    staging = out + ".exporting"  # written whole, then moved into place: --out is never half an export
    shutil.rmtree(staging, ignore_errors=True)
    paths = export_checkpoint(args.ckpt, staging, mtp_depths=args.mtp_depths, lora=args.lora)
    run_config = find_run_config(args.ckpt)
    if run_config is not None:
        paths["config"] = shutil.copyfile(run_config, os.path.join(staging, "config.yaml"))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(staging, out)
    for name, path in paths.items():
        print(f"{name:12s} {out + path[len(staging):] if path.startswith(staging) else path}")
    return 0
