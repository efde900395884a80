"""AdamW with linear warm-up and a cosine decay to a floor, over the trainable parameters only."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_info

from salm_mtp.config import OptimConfig
from salm_mtp.errors import config_error
from salm_mtp.optim_state import register_by_name_loading


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, cosine to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_kernel(implementation: str, params: list[torch.Tensor]) -> dict:
    """AdamW keyword arguments for ``model.optim.implementation`` (auto: fused when every parameter lives on a
    device torch has a fused AdamW for, else foreach)."""
    if implementation == "auto":
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        ok = set(_get_fused_kernels_supported_devices())
        implementation = "fused" if all(p.device.type in ok and p.is_floating_point() for p in params) else "foreach"
    if implementation == "fused":
        return {"fused": True}
    return {"foreach": implementation == "foreach"}


def build_optimizer(module, o: OptimConfig) -> dict:
    """Lightning ``configure_optimizers`` result; no weight decay on norms and biases (ndim < 2)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    if not decay and not no_decay:
        raise ValueError("model.freeze froze every parameter: nothing to train; relax --model.freeze.patterns")
    # Named parameters: the saved state carries each group's param_names, and loading matches them by name
    # (salm_mtp/optim_state.py), so a checkpoint resumes under another freeze list, world size or group rule.
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), **adamw_kernel(o.implementation, [p for _, p in decay + no_decay]),
    )
    register_by_name_loading(opt, lambda: {n: tuple(p.shape) for n, p in module.named_parameters()},
                             report=rank_zero_info)
    # Not trainer.estimated_stepping_batches: it iterates the train loader before a checkpoint is
    # restored (losing the resumable loader's position) and the lhotse loader has no length anyway.
    total = o.decay_steps or module.trainer.max_steps
    if total is None or total < 1:
        raise config_error("trainer.max_steps", f"the cosine schedule needs a length (got max_steps="
                           f"{module.trainer.max_steps}, decay_steps={o.decay_steps})",
                           "set --trainer.max_steps or --model.optim.decay_steps")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, o.warmup_steps, total, o.min_lr_ratio)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
