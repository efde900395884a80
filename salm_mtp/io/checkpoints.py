"""Whole models from files: a plain ``SALM`` (salm_mtp/salm.py: no training recipe) from a Lightning ``.ckpt``, a
sharded checkpoint directory or an export directory. Decoding, evaluation, export and the benchmarks use what this
returns; training builds the ``SALMModule`` recipe in its trainer (``build_module`` builds one outside a trainer).

    model = load_model("runs/demo/salm/version_0/checkpoints/last.ckpt")   # or a sharded dir, or an export
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import warnings

import torch

from salm_mtp.model import SALMModule
from salm_mtp.salm import PART_TYPES, SALM, config_from_dict


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
    hparams = {k: v for k, v in saved.items() if not k.startswith("_")}  # LightningCLI adds _instantiator
    return located_paths(hparams, where)


def located_paths(hparams: dict, where: str) -> dict:
    """``hparams`` with each relative model path (tokenizer_path, encoder.path, llm.path: relative to the directory
    the run was started in) that does not exist from here found from the checkpoint ``where`` upwards (the run's
    directory is one of its ancestors): a checkpoint loads from any working directory."""
    anchors = [os.path.dirname(os.path.abspath(where))]
    while os.path.dirname(anchors[-1]) != anchors[-1]:
        anchors.append(os.path.dirname(anchors[-1]))

    def find(path):
        if not isinstance(path, str) or os.path.isabs(path) or os.path.exists(path):
            return path
        return next((os.path.join(a, path) for a in anchors if os.path.exists(os.path.join(a, path))), path)

    out = dict(hparams)
    if "tokenizer_path" in out:
        out["tokenizer_path"] = find(out["tokenizer_path"])
    for part in ("encoder", "llm"):
        cfg = out.get(part)
        if isinstance(cfg, dict) and "path" in cfg:
            out[part] = {**cfg, "path": find(cfg["path"])}
        elif dataclasses.is_dataclass(cfg) and hasattr(cfg, "path"):
            out[part] = dataclasses.replace(cfg, path=find(cfg.path))
    return out


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
