"""Whole-model I/O: a plain ``SALM`` (salm_mtp/salm.py: no training recipe) from a Lightning ``.ckpt``, a
sharded checkpoint directory or an export directory, and export to HF-format directories. Decoding, evaluation,
export and the benchmarks use what this returns; training builds the ``SALMModule`` recipe in its trainer
(``build_module`` builds one outside a trainer). Tensor-level reading is ``salm_mtp.weights``.

    model = load_model("runs/demo/salm/version_0/checkpoints/last.ckpt")   # or a sharded dir, or an export
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
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from salm_mtp import weights
from salm_mtp.model import SALMModule
from salm_mtp.salm import PART_TYPES, SALM, config_from_dict
from salm_mtp.modules.lora import ADAPTER_DIR, base_view, has_lora, save_adapter
from salm_mtp.modules.mtp import SYMBOL_OF_BLOCK, record_mtp_in_config


def _ready(model: SALM, device: str, load_pretrained: bool, init_new: bool) -> SALM:
    model.apply_freeze()
    model.materialize_weights(device, load_pretrained=load_pretrained, init_new=init_new)
    return model


def salm_arguments(config: dict) -> dict:
    """The ``SALM`` arguments of a recorded model config (a checkpoint's hyperparameters, an export's
    salm_config.json): the training recipe's own settings (optim, moe_balance, ...) are left out."""
    names = set(inspect.signature(SALM.__init__).parameters) - {"self"}
    return {k: v for k, v in config_from_dict(config).items() if k in names}


def build_salm(device: str = "cpu", load_pretrained: bool = True, init_new: bool = True, **config) -> SALM:
    """A plain SALM: built on meta, then materialised on ``device`` and filled (pretrained parts read from their
    paths when ``load_pretrained``, the rest initialised unless not ``init_new``: ``SALM.materialize_weights``).
    ``config``: SALM's arguments; recorded training settings among them are ignored."""
    return _ready(SALM(**salm_arguments(config)), device, load_pretrained, init_new)


def build_module(device: str = "cpu", load_pretrained: bool = True, init_new: bool = True, **kwargs) -> SALMModule:
    """The training recipe (SALMModule) outside a trainer, built and filled as ``build_salm`` builds a SALM."""
    return _ready(SALMModule(**config_from_dict(kwargs)), device, load_pretrained, init_new)


def _hyperparameters(saved: dict | None, where: str) -> dict:
    if not saved:
        raise ValueError(f"{where!r} holds no hyper_parameters: cannot rebuild the model")
    return {k: v for k, v in saved.items() if not k.startswith("_")}  # LightningCLI adds _instantiator


def load_lightning_checkpoint(path: str) -> SALM:
    """A SALM (CPU) from a single-file Lightning checkpoint, read with torch's weights-only unpickler (our config
    dataclasses allow-listed): rebuilt from its hyperparameters, every tensor loaded by name (strict)."""
    with torch.serialization.safe_globals(list(PART_TYPES.values())):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_salm(load_pretrained=False, init_new=False, **_hyperparameters(ckpt.get("hyper_parameters"), path))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


def load_sharded_checkpoint(path: str) -> SALM:
    """A SALM (CPU, unsharded) from a ModelParallelStrategy checkpoint directory.

    Lightning writes such a directory when ``save_distributed_checkpoint=True`` (its default): one
    ``torch.distributed.checkpoint`` shard per rank plus ``meta.pt`` with the hyperparameters. The
    module is rebuilt from those and its weights are read in place, in one process, no trainer.
    """
    import torch.distributed.checkpoint as dcp

    meta_file = os.path.join(path, "meta.pt")
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(
            f"{path!r} has no meta.pt: not a checkpoint directory written by Lightning's ModelParallelStrategy "
            "(pass a .ckpt file for single-file checkpoints)"
        )
    meta = torch.load(meta_file, map_location="cpu", weights_only=False)  # our own file: configs are dataclasses
    hparams = _hyperparameters(meta.get("hyper_parameters"), meta_file)
    module = build_salm(load_pretrained=False, init_new=False, **hparams)  # every weight comes from the files
    state = {"state_dict": module.state_dict()}  # tensors sharing the module's storage: loaded in place (strict)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return module


def load_export(export_dir: str, **overrides) -> SALM:
    """A SALM from an ``export_hf`` directory, every weight loaded (the head 1:1)."""
    cfg_file = os.path.join(export_dir, "salm_config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{export_dir!r} has no salm_config.json: not a directory written by `salm-mtp export`")
    with open(cfg_file) as f:
        raw = json.load(f)
    raw["llm"]["path"] = os.path.join(export_dir, raw["llm"]["path"])
    raw["encoder"]["path"] = os.path.join(export_dir, raw["encoder"]["path"])
    raw["adapter"]["path"] = os.path.join(export_dir, "adapter.safetensors")
    raw.update(overrides)
    return build_salm(**raw)


def load_model(path: str) -> SALM:
    """The SALM of a Lightning ``.ckpt``, a sharded checkpoint directory, or an export directory (CPU)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist: pass a .ckpt file, a sharded checkpoint directory "
                                "or an export directory")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "salm_config.json")):
            return load_export(path)
        return load_sharded_checkpoint(path)
    return load_lightning_checkpoint(path)


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


def export_main(argv: list[str] | None = None) -> int:
    """``salm-mtp export``: a checkpoint -> the HF-format export directory (layout in the module docstring)."""
    import shutil

    from salm_mtp.errors import check_ckpt_path
    from salm_mtp.options import parse_options
    from salm_mtp.run_config import find_run_config

    args = parse_options(ExportOptions, argv, prog="salm-mtp export", description=(
        "Export a trained SALM checkpoint to HF-format directories for serving and reloading: OUT/llm (Nemotron-H "
        "with its mtp.* head, tokenizer; config.json in the released Nemotron-3 form), OUT/encoder (Parakeet), "
        "OUT/adapter.safetensors, OUT/salm_config.json and the run's config.yaml."))
    check_ckpt_path(args.ckpt, "--ckpt")
    paths = export_checkpoint(args.ckpt, args.out, mtp_depths=args.mtp_depths, lora=args.lora)
    run_config = find_run_config(args.ckpt)
    if run_config is not None:
        paths["config"] = shutil.copyfile(run_config, os.path.join(args.out, "config.yaml"))
    for name, path in paths.items():
        print(f"{name:12s} {path}")
    return 0
