"""Whole-model I/O: build a SALMModule from a Lightning ``.ckpt``, a sharded checkpoint directory or an
export directory, and export one to HF-format directories. The only module that both builds a
``SALMModule`` and reads or writes its files (tensor-level reading is ``salm_mtp.weights``).

    module = load_model("runs/demo/salm/version_0/checkpoints/last.ckpt")   # or a sharded dir, or an export
    export_hf(module, "exports/demo")

Export layout (``export_hf``)::

    DIR/llm/          HF Nemotron-H: config.json (num_nextn_predict_layers, mtp_layers_block_type),
                      model.safetensors with backbone.* / lm_head.* / mtp.layers.{i}.* (per expert), tokenizer
    DIR/encoder/      HF Parakeet CTC (or bare encoder) directory
    DIR/adapter.safetensors, DIR/salm_config.json
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from salm_mtp import weights as W
from salm_mtp.model import PART_TYPES, SALMModule, config_from_dict
from salm_mtp.modules.mtp import record_mtp_in_config


def build_module(device: str = "cpu", load_pretrained: bool = True, init_new: bool = True, **kwargs) -> SALMModule:
    """A SALMModule outside a trainer: built on meta, then materialised on ``device`` and filled
    (pretrained parts read from their paths when ``load_pretrained``, the rest initialised unless not
    ``init_new``: see ``SALMModule.materialize_weights``)."""
    module = SALMModule(**config_from_dict(kwargs))
    module.apply_freeze()
    module.materialize_weights(device, load_pretrained=load_pretrained, init_new=init_new)
    return module


def load_lightning_checkpoint(path: str, map_location: str = "cpu") -> SALMModule:
    """A single-file Lightning checkpoint with torch's weights-only unpickler (our config dataclasses
    allow-listed); ``load_from_checkpoint`` runs ``configure_model`` (materialise, no reads) first."""
    with torch.serialization.safe_globals(list(PART_TYPES.values())):
        return SALMModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)


def load_sharded_checkpoint(path: str) -> SALMModule:
    """An unsharded SALMModule (CPU) from a ModelParallelStrategy checkpoint directory.

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
    hparams = meta.get("hyper_parameters")
    if not hparams:
        raise ValueError(f"{meta_file!r} holds no hyper_parameters: cannot rebuild the SALMModule")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # LightningCLI adds _instantiator
    module = build_module(load_pretrained=False, init_new=False, **hparams)  # every weight comes from the files
    state = {"state_dict": module.state_dict()}  # tensors sharing the module's storage: loaded in place (strict)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return module


def load_export(export_dir: str, **overrides) -> SALMModule:
    """A SALMModule from an ``export_hf`` directory, every weight loaded (the head 1:1)."""
    cfg_file = os.path.join(export_dir, "salm_config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{export_dir!r} has no salm_config.json: not a directory written by scripts/export.py")
    with open(cfg_file) as f:
        raw = json.load(f)
    raw["llm"]["path"] = os.path.join(export_dir, raw["llm"]["path"])
    raw["encoder"]["path"] = os.path.join(export_dir, raw["encoder"]["path"])
    raw["adapter"]["path"] = os.path.join(export_dir, "adapter.safetensors")
    raw.update(overrides)
    return build_module(**raw)


def load_model(path: str) -> SALMModule:
    """The SALMModule of a Lightning ``.ckpt``, a sharded checkpoint directory, or an export directory (CPU)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist: pass a .ckpt file, a sharded checkpoint directory "
                                "or an export directory")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "salm_config.json")):
            return load_export(path)
        return load_sharded_checkpoint(path)
    return load_lightning_checkpoint(path)


def export_hf(module: SALMModule, out_dir: str) -> dict[str, str]:
    """Write an unsharded SALMModule as HF-format directories (layout in the module docstring).

    Returns the paths written. ``DIR/llm`` is a plain Nemotron-H checkpoint: serving stacks and
    ``--model.llm.path=DIR/llm`` load its head back 1:1.
    """
    llm_dir, enc_dir = os.path.join(out_dir, "llm"), os.path.join(out_dir, "encoder")
    os.makedirs(llm_dir, exist_ok=True)
    os.makedirs(enc_dir, exist_ok=True)
    record_mtp_in_config(module.llm.config, module.mtp_head)
    module.llm.save_pretrained(llm_dir)  # per-expert on-disk names, mtp.layers.{i}.* included
    module.tokenizer.save_pretrained(llm_dir)

    W.save_encoder_hf(module.audio, enc_dir)
    W.save_tensors(module.adapter.state_dict(), os.path.join(out_dir, "adapter.safetensors"))

    salm = module.salm_config()
    salm["llm"]["path"], salm["encoder"]["path"], salm["tokenizer_path"] = "llm", "encoder", None
    salm["adapter"]["path"] = "adapter.safetensors"
    salm["mtp"]["replace_existing_head"] = False  # the exported head is the one to load
    with open(os.path.join(out_dir, "salm_config.json"), "w") as f:
        json.dump(salm, f, indent=2, default=list)
    return {"llm": llm_dir, "encoder": enc_dir, "root": out_dir}


def export_checkpoint(ckpt_path: str, out_dir: str) -> dict[str, str]:
    """Load a Lightning checkpoint (.ckpt file or sharded directory) into an unsharded module and export it."""
    return export_hf(load_model(ckpt_path), out_dir)
