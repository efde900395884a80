"""The resume rule: which model settings may change when a run continues from a checkpoint.

A checkpoint records the model settings it was trained with (``hyper_parameters``: in the ``.ckpt`` file, or
in ``meta.pt`` of a sharded directory). On ``--ckpt_path``, the settings the user gave explicitly (in a
``--config`` file or as flags: every value that differs from the parser's default) are compared with them:

- a setting that changes the set or the shapes of the trained tensors (``REFUSED``: the LLM, encoder, adapter,
  feature and LoRA builds, the MTP depths and pattern, the tokenizer, the CTC head) is refused with one
  paragraph naming each key, both values and the way to do it: start a new run from ``salm-mtp export``;
- any other model setting (loss weights, learning rate and schedule, freeze lists and the head's training mode,
  SpecAugment, expert balancing, precision policy, chunk sizes) is applied, and all such changes are printed in
  one line at start. Optimizer state is matched to parameters by name (salm_mtp/optim_state.py): a parameter no
  longer trained drops its state, a newly trained one starts fresh, and one line says which;
- a setting the user did not give takes the checkpoint's value (so ``--ckpt_path`` alone resumes the run as
  it was), and the run's ``config.yaml`` records the settings actually used.

Data and trainer settings are not in the checkpoint's hyperparameters and always follow the command line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from salm_mtp.errors import SalmError

REFUSED: tuple[str, ...] = (
    "llm.", "encoder.", "adapter.", "features.", "lora.", "mtp.num_layers", "mtp.pattern",
    "mtp.replace_existing_head", "tokenizer_path",
)
"""Prefixes of model keys that change the set or the shapes of the trained tensors."""
SAFE_EXCEPTIONS: tuple[str, ...] = (
    "llm.attn_implementation", "encoder.dropout", "encoder.layerdrop", "llm.path", "encoder.path",
    "adapter.path",
)
"""Keys under a refused prefix that change no tensor (the *.path keys only say where a new run would load from:
a resumed run takes every weight from the checkpoint)."""


class ResumeSettingsError(SalmError):
    """Settings that would change the trained tensors were given with ``--ckpt_path``."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} of a nested mapping (Namespaces and dicts; lists and scalars are leaves)."""
    items = vars(tree) if hasattr(tree, "__dict__") and not isinstance(tree, Mapping) else tree
    if not isinstance(items, Mapping):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in items.items():
        if str(key).startswith("_"):
            continue
        if isinstance(value, Mapping) or (hasattr(value, "__dict__") and type(value).__name__ == "Namespace"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of a ``flatten`` result."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def is_refused(key: str, old: Any, new: Any) -> bool:
    """Whether changing model key ``key`` from ``old`` to ``new`` on resume changes the trained tensors."""
    if key == "ctc_weight":  # 0 <-> > 0 adds or drops the CTC head; a new weight is only a loss weight
        return (float(old or 0) > 0) != (float(new or 0) > 0)
    if key in SAFE_EXCEPTIONS:
        return False
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in REFUSED)


def same_value(a: Any, b: Any, key: str = "") -> bool:
    """Whether two setting values are the same (lists by items, paths absolutely)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if key.endswith("path") and isinstance(a, str) and isinstance(b, str):  # checkpoints record absolute paths
        return os.path.abspath(a) == os.path.abspath(b)
    return a == b


def resolve(saved: Mapping[str, Any], explicit: Mapping[str, Any]) -> tuple[dict, list, list]:
    """(settings to use, safe changes, refused changes) from the checkpoint's flat model settings and the
    user's explicit ones; each change is (key, checkpoint value, new value)."""
    merged = dict(saved)
    safe, refused = [], []
    for key, new in sorted(explicit.items()):
        if key not in saved:  # a setting this checkpoint predates: use the user's
            merged[key] = new
            continue
        old = saved[key]
        if same_value(old, new, key):
            continue
        (refused if is_refused(key, old, new) else safe).append((key, old, new))
        merged[key] = new
    return merged, safe, refused


def refusal_message(path: str, refused: list) -> str:
    """One paragraph: every refused key with both values, and how to do it instead."""
    keys = "; ".join(f"model.{k}: checkpoint {old!r}, now {new!r}" for k, old, new in refused)
    return (f"--ckpt_path {path!r} was trained with other model settings that change its tensors ({keys}). "
            "Resuming keeps the trained model as it is: drop these flags (or use the run's own config.yaml) to "
            "resume it, or start a new run from its weights: salm-mtp export --ckpt CKPT --out EXPORT, then "
            "salm-mtp fit ... --model.llm.path=EXPORT/llm --model.encoder.path=EXPORT/encoder "
            "--model.adapter.path=EXPORT/adapter.safetensors with the new settings")


def changes_line(changes: list) -> str:
    """One line listing the safe changes applied on resume."""
    return "resuming with changed settings: " + "; ".join(
        f"model.{k} {old!r} -> {new!r}" for k, old, new in changes)


def checkpoint_record(path: str) -> dict | None:
    """What a ``.ckpt`` file (memory-mapped: its tensors are not read) or a sharded directory's ``meta.pt`` holds
    besides the weights' values (hyperparameters, ``global_step``, loops); None when it cannot be read."""
    import torch

    file = os.path.join(path, "meta.pt") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        return None
    try:
        return torch.load(file, weights_only=True, map_location="cpu", mmap=True)
    except Exception:  # noqa: BLE001  (unreadable files are check_ckpt_path's to report)
        return None


def checkpoint_hparams(path: str, record: dict | None = None) -> dict | None:
    """The model settings recorded in a ``.ckpt`` file or a sharded directory's ``meta.pt`` (None: none);
    ``record``: its ``checkpoint_record`` when the caller has read it."""
    ckpt = record if record is not None else checkpoint_record(path)
    if not ckpt:
        return None
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)
    return hparams or None
