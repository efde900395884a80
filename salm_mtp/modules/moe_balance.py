"""Expert-load balancing of trainable Nemotron-H MoE layers (Nemotron-3 / DeepSeek-V3 style, docs/design.md §10).

A newly built MoE sublayer (an MTP head's ``E``, or an inline LLM) would otherwise never balance its
experts: routing can collapse onto a few of them. For every router whose weight trains:

  * aux-loss-free balancing: after each optimizer step, with ``load_e`` the number of tokens routed
    to expert e during the step (summed over data-parallel ranks),
        e_score_correction_bias[e] += bias_update_rate * sign(mean_e(load) - load_e)
    (the bias only shifts top-k selection, never the gate weights);
  * optionally a small sequence-wise auxiliary loss, per row b of the batch (T positions, K experts
    per token, E experts, s' = sigmoid scores normalised over experts per token):
        f_e = E / (K T) * #{t : e in topk(t)}      P_e = mean_t s'_e(t)      L_aux = alpha * mean_b sum_e f_e P_e
    (padding positions of a row are counted too: a small bias of the statistic, not of the routing).

Frozen routers are left untouched (neither counted nor updated). ``imbalance`` = max load / mean load
per layer (1 = perfectly balanced) is what the trainer logs as ``moe_imbalance/<layer>``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from salm_mtp.errors import config_error


@dataclass
class MoEBalanceConfig:
    """Load balancing of trainable MoE routers (frozen ones are never changed)."""

    bias_update_rate: float = 1e-3
    """u of the aux-loss-free update e_score_correction_bias += u * sign(mean load - load) after every optimizer step
    (DeepSeek-V3's gamma = 1e-3); 0 = off."""
    aux_loss_weight: float = 0.0
    """alpha of the sequence-wise auxiliary balance loss added to the optimised loss (DeepSeek-V3: 1e-4); 0 = off."""

    def __post_init__(self) -> None:
        for key in ("bias_update_rate", "aux_loss_weight"):
            if getattr(self, key) < 0:
                raise config_error(f"model.moe_balance.{key}", f"must be >= 0, got {getattr(self, key)}")


def is_router(m: nn.Module) -> bool:
    """A top-k MoE router with an ``e_score_correction_bias`` (Nemotron-H's NemotronHTopkRouter)."""
    return hasattr(m, "e_score_correction_bias") and hasattr(m, "top_k") and hasattr(m, "weight")


def sequence_aux_loss(router_logits: torch.Tensor, topk_indices: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (module docstring), without alpha.

    Args:
        router_logits: (B*T, E) fp32 router logits (differentiable).
        topk_indices: (B*T, K) chosen experts.
        batch: B, to split the flattened tokens into rows.
        top_k: K.
    """
    n, E = router_logits.shape
    T = n // batch
    scores = router_logits.sigmoid()
    scores = scores / scores.sum(-1, keepdim=True).clamp(min=1e-20)  # (B*T, E) s'
    P = scores.view(batch, T, E).mean(1)  # (B, E)
    hits = torch.zeros(n, E, device=router_logits.device).scatter_(1, topk_indices, 1.0)
    f = hits.view(batch, T, E).sum(1) * (E / (top_k * T))  # (B, E)
    return (f * P).sum(-1).mean()


class MoEBalancer:
    """Collects per-expert loads of trainable routers during training forwards and applies the updates.

        balancer = MoEBalancer(cfg); balancer.attach(model)
        with balancer.collecting(training): ... forward ...
        loss = loss + balancer.aux_loss()
        metrics = balancer.step(all_reduce)        # after the optimizer step
    """

    def __init__(self, cfg: MoEBalanceConfig):
        self.cfg = cfg
        self.routers: dict[str, nn.Module] = {}
        self.loads: dict[str, torch.Tensor] = {}
        self._aux: list[torch.Tensor] = []
        self._active = False

    def attach(self, root: nn.Module) -> list[str]:
        """Hook every router under ``root``; returns their names."""
        for name, m in root.named_modules():
            if is_router(m):
                self.routers[name] = m
                m.register_forward_hook(self._hook(name))
        return list(self.routers)

    def trainable(self, name: str) -> bool:
        return bool(self.routers[name].weight.requires_grad)

    @contextlib.contextmanager
    def collecting(self, on: bool) -> Iterator[None]:
        """Count loads (and aux terms) only inside: training forwards, never activation-checkpoint recomputes."""
        prev, self._active = self._active, on
        try:
            yield
        finally:
            self._active = prev

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: tuple) -> None:
            if not self._active or not module.weight.requires_grad:
                return
            router_logits, _, topk_indices = output
            counts = torch.bincount(topk_indices.detach().flatten(), minlength=router_logits.shape[-1]).float()
            self.loads[name] = self.loads[name] + counts if name in self.loads else counts
            if self.cfg.aux_loss_weight > 0:
                hidden = inputs[0]
                batch = hidden.shape[0] if hidden.dim() == 3 else 1
                self._aux.append(sequence_aux_loss(router_logits, topk_indices, batch, module.top_k))

        return hook

    def aux_loss(self) -> torch.Tensor | float:
        """alpha * the summed sequence aux losses collected since the last call (0.0 when off)."""
        terms, self._aux = self._aux, []
        if not terms or self.cfg.aux_loss_weight <= 0:
            return 0.0
        return self.cfg.aux_loss_weight * torch.stack(terms).sum()

    @torch.no_grad()
    def step(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
        """Apply the bias update from the collected (``reduce``-summed over ranks) loads; returns imbalances."""
        out = {}
        for name in sorted(self.loads):
            load = reduce(self.loads[name])
            mean = load.mean()
            out[f"moe_imbalance/{name}"] = float(load.max() / mean.clamp(min=1e-9))
            router = self.routers[name]
            if self.cfg.bias_update_rate > 0 and self.trainable(name):
                bias = router.e_score_correction_bias
                bias.add_(torch.sign(mean - load).to(bias.device, bias.dtype) * self.cfg.bias_update_rate)
        self.loads = {}
        return out
