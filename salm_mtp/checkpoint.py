"""Loading pretrained parts from local HF directories (``mtp.*`` included) and HF-format export.

transformers drops ``mtp.*`` tensors on load (``_keys_to_ignore_on_load_unexpected``), so we read
the safetensors ourselves, for the backbone and the head alike:
  * ``backbone.`` (on-disk prefix of Nemotron-H) becomes ``model.``;
  * per-expert ``...experts.{e}.{up,down}_proj.weight`` are stacked into the fused in-memory
    ``...experts.{up,down}_proj`` of shape (E, out, in).
Every missing or unexpected tensor is reported by name: nothing is silently re-initialised.

Export layout (``export_hf``)::

    DIR/llm/          HF Nemotron-H: config.json (num_nextn_predict_layers, mtp_layers_block_type),
                      model.safetensors with backbone.* / lm_head.* / mtp.layers.{i}.* (per expert), tokenizer
    DIR/encoder/      HF Parakeet CTC (or bare encoder) directory
    DIR/adapter.safetensors, DIR/salm_config.json
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

EXPERT_RE = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint directory does not hold what the model needs."""


def checkpoint_files(path: str) -> dict[str, str]:
    """Map every tensor name of a local HF directory to its safetensors file."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(
        f"{path!r} holds no model.safetensors or model.safetensors.index.json: not a local HF checkpoint directory"
    )


def read_tensors(files: dict[str, str], keys: list[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors, opening each shard once."""
    by_file = defaultdict(list)
    for k in keys:
        by_file[files[k]].append(k)
    out = {}
    for file, names in by_file.items():
        with safe_open(file, "pt") as f:
            for k in names:
                out[k] = f.get_tensor(k)
    return out


def fuse_experts(state: dict[str, torch.Tensor], num_experts: int | None = None) -> dict[str, torch.Tensor]:
    """Stack per-expert ``X.experts.{e}.P.weight`` into ``X.experts.P`` (E, out, in); other keys unchanged.

    Raises CheckpointError naming the first missing expert tensor (any of ``range(num_experts)``,
    or a gap in the indices found when ``num_experts`` is None).
    """
    groups: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    out = {}
    for k, v in state.items():
        m = EXPERT_RE.match(k)
        if m:
            groups[f"{m['prefix']}.{m['proj']}"][int(m["idx"])] = v
        else:
            out[k] = v
    for name, experts in groups.items():
        n = num_experts if num_experts is not None else max(experts) + 1
        gap = [e for e in range(n) if e not in experts]
        if gap:
            prefix, proj = name.rsplit(".", 1)
            raise CheckpointError(f"missing tensor {prefix}.{gap[0]}.{proj}.weight (experts {gap} absent)")
        out[name] = torch.stack([experts[e] for e in range(n)])
    return out


def _to_module_key(k: str) -> str:
    return "model." + k[len("backbone.") :] if k.startswith("backbone.") else k


def _load_exact(
    module: nn.Module, state: dict[str, torch.Tensor], what: str, prefix: str = "",
    own: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy ``state`` into ``own`` (default: all of ``module.state_dict()``; pass a subset to load
    part of a module), failing with the names of missing / unexpected / misshapen tensors."""
    own = module.state_dict() if own is None else own
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{prefix}{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {[prefix + k for k in missing[:20]]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {[prefix + k for k in unexpected[:20]]}")
    if shapes:
        problems.append(f"shape mismatches {shapes[:20]}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    with torch.no_grad():  # state_dict tensors share the parameters' storage: copies land in the module
        for k, v in state.items():
            own[k].copy_(v)


def has_mtp_tensors(path: str) -> bool:
    """Whether a local HF directory really holds ``mtp.*`` tensors."""
    return any(k.startswith("mtp.") for k in checkpoint_files(path))


def load_llm_weights(llm: nn.Module, path: str, load_mtp: bool) -> None:
    """Load a Nemotron-H checkpoint into a built ``NemotronHForCausalLM``.

    The backbone and lm_head must match exactly. With ``load_mtp`` the attached ``llm.mtp`` head is
    loaded 1:1 from the shipped ``mtp.*`` tensors (any missing or unexpected one fails by name).
    Without it, ``mtp.*`` tensors are skipped: either MTP is disabled, or the head was built fresh
    because the checkpoint declares none (the "build and attach" case).
    """
    files = checkpoint_files(path)
    head = getattr(llm, "mtp", None)
    backbone_keys = [k for k in files if not k.startswith("mtp.")]
    experts = getattr(llm.config, "n_routed_experts", None)
    state = fuse_experts({_to_module_key(k): v for k, v in read_tensors(files, backbone_keys).items()}, experts)
    if getattr(llm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    target = {k: v for k, v in llm.state_dict().items() if not k.startswith("mtp.")}
    if getattr(llm.config, "tie_word_embeddings", False):
        target.pop("lm_head.weight", None)
    _load_exact(llm, state, f"LLM checkpoint {path!r}", own=target)
    if load_mtp:
        if head is None:
            raise CheckpointError(f"load_mtp=True but the LLM has no attached mtp head to load {path!r} into")
        load_mtp_weights(head, path, files, num_experts=experts)


def load_mtp_weights(
    head: nn.Module, path: str, files: dict[str, str] | None = None, num_experts: int | None = None
) -> None:
    """Load the ``mtp.*`` tensors of a checkpoint 1:1 into ``head``; any missing or unexpected one fails by name."""
    files = files or checkpoint_files(path)
    keys = [k for k in files if k.startswith("mtp.")]
    if not keys:
        raise CheckpointError(f"MTP head from {path!r}: the checkpoint holds no mtp.* tensors")
    state = fuse_experts(read_tensors(files, keys), num_experts)  # fused under full names: errors name them
    state = {k[len("mtp.") :]: v for k, v in state.items()}
    _load_exact(head, state, f"MTP head from {path!r}", prefix="mtp.")


def load_encoder_weights(audio_encoder: nn.Module, path: str) -> None:
    """Load a Parakeet CTC directory (``encoder.*``, ``ctc_head.*``) or a bare encoder directory.

    A CTC head in the checkpoint is loaded when the module has one; a module CTC head that the
    checkpoint lacks is an error (it would silently start from random weights).
    """
    files = checkpoint_files(path)
    raw = read_tensors(files, list(files))
    if not any(k.startswith("encoder.") for k in raw):
        raw = {f"encoder.{k}": v for k, v in raw.items()}
    if getattr(audio_encoder, "ctc_head", None) is None:
        raw = {k: v for k, v in raw.items() if not k.startswith("ctc_head.")}
    _load_exact(audio_encoder, raw, f"encoder checkpoint {path!r}")


def save_tensors(module_state: dict[str, torch.Tensor], file: str) -> None:
    """Write a state dict as safetensors (contiguous CPU copies)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in module_state.items()}, file)


def save_encoder_hf(audio_encoder: nn.Module, out_dir: str) -> None:
    """Write an AudioEncoder as a HF Parakeet CTC directory (bare encoder config when it has no CTC head).

    The blank is the last class (``pad_token_id = vocab_size - 1``), as in released Parakeet CTC models.
    """
    from transformers import ParakeetCTCConfig

    os.makedirs(out_dir, exist_ok=True)
    enc_config = audio_encoder.encoder.config
    if audio_encoder.ctc_head is not None:
        classes = audio_encoder.ctc_head.out_channels
        cfg = ParakeetCTCConfig(encoder_config=enc_config.to_dict(), vocab_size=classes, pad_token_id=classes - 1)
    else:
        cfg = enc_config
    cfg.save_pretrained(out_dir)
    save_tensors(audio_encoder.state_dict(), os.path.join(out_dir, "model.safetensors"))


def export_hf(module, out_dir: str) -> dict[str, str]:
    """Write an unsharded SALMModule as HF-format directories (layout in the module docstring).

    Returns the paths written. ``DIR/llm`` is a plain Nemotron-H checkpoint: serving stacks and
    ``--model.llm.path=DIR/llm`` load its head back 1:1.
    """
    from salm_mtp.modules.mtp import record_mtp_in_config

    llm_dir, enc_dir = os.path.join(out_dir, "llm"), os.path.join(out_dir, "encoder")
    os.makedirs(llm_dir, exist_ok=True)
    os.makedirs(enc_dir, exist_ok=True)
    record_mtp_in_config(module.llm.config, module.mtp_head)
    module.llm.save_pretrained(llm_dir)  # per-expert on-disk names, mtp.layers.{i}.* included
    module.tokenizer.save_pretrained(llm_dir)

    save_encoder_hf(module.audio, enc_dir)
    save_tensors(module.adapter.state_dict(), os.path.join(out_dir, "adapter.safetensors"))

    salm = module.salm_config()
    salm["llm"]["path"], salm["encoder"]["path"], salm["tokenizer_path"] = "llm", "encoder", None
    with open(os.path.join(out_dir, "salm_config.json"), "w") as f:
        json.dump(salm, f, indent=2, default=list)
    return {"llm": llm_dir, "encoder": enc_dir, "root": out_dir}


def load_export(export_dir: str, **overrides):
    """Build a SALMModule from an ``export_hf`` directory and load every weight (head 1:1)."""
    from safetensors.torch import load_file

    from salm_mtp.model import SALMModule, config_from_dict

    cfg_file = os.path.join(export_dir, "salm_config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{export_dir!r} has no salm_config.json: not a directory written by scripts/export.py")
    with open(cfg_file) as f:
        raw = json.load(f)
    raw["llm"]["path"] = os.path.join(export_dir, raw["llm"]["path"])
    raw["encoder"]["path"] = os.path.join(export_dir, raw["encoder"]["path"])
    raw.update(overrides)
    module = SALMModule(**config_from_dict(raw))
    module.load_pretrained()
    _load_exact(module.adapter, load_file(os.path.join(export_dir, "adapter.safetensors")), "adapter", "adapter.")
    return module


def export_checkpoint(ckpt_path: str, out_dir: str) -> dict[str, str]:
    """Load a Lightning checkpoint (unsharded .ckpt file) into an unsharded module and export it."""
    from salm_mtp.model import SALMModule

    if os.path.isdir(ckpt_path):
        from salm_mtp.parallel import load_sharded_checkpoint

        module = load_sharded_checkpoint(ckpt_path)
    else:
        module = SALMModule.load_checkpoint(ckpt_path)
    return export_hf(module, out_dir)
