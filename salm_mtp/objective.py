"""The SALM training objective, for one batch on one rank:

    loss = dp_size * ( (CE_main + lambda / D * sum_k CE_k) / N_global          CE summed over this rank's targets
                       + ctc_weight * CTC / N_ctc_global + MoE aux loss )

with every count global (summed over the data-parallel group), so the gradients DDP / FSDP2 average equal one
process's on the same global batch (docs/design.md; the loss terms themselves: salm_mtp/loss.py). The statistics
vector it returns, summed over the group, is what every logged metric is computed from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from salm_mtp.loss import combine_losses, head_stats, stats_vector
from salm_mtp.modules.merge import IGNORE_INDEX

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sum over the data-parallel group (identity in one process)."""


def training_objective(module, batch: dict, sources: tuple[str, ...], reduce: Reduce, dp_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(optimised loss, globally summed statistics vector, batch size).

    The statistics vector is laid out by ``salm_mtp.loss.stat_names`` (summed CE, hits, counts and
    divergences of the main head and each depth, CTC sum and count, MoE aux loss), all-reduced over the
    dp group; ``summarise`` turns it into the logged metrics, whose ``loss`` is the one optimised here.
    """
    head_only = module.head_only
    with module.balancer.collecting(module.training):  # expert loads of this step's forward only
        with torch.no_grad() if head_only else contextlib.nullcontext():  # head_only: no graph before the head
            merged, enc, enc_lens = module.prepare_inputs(batch)
            h0 = module(merged.inputs_embeds)
        hiddens = module.mtp_hiddens(h0, merged.inputs_embeds)
    n_global = reduce((merged.targets != IGNORE_INDEX).sum().float())
    weight = module.llm.lm_head.weight
    groups = batch.get("source_ids") if sources else None
    if sources and groups is None:  # every rank must lay out the same statistics vector
        groups = torch.full((int(batch["input_ids"].shape[0]),), -1, dtype=torch.long)
    stats = head_stats(
        h0,
        hiddens,
        weight,
        merged.targets,
        mtp_weight=weight.detach() if (module.cfg_mtp.detach_backbone or head_only) else None,
        chunk_size=module.lm_head_chunk_size,
        mtp_loss=module.cfg_mtp.loss,
        lk_lambda=module.cfg_mtp.lk_lambda,
        groups=groups,
        num_groups=len(sources),
        mtp_coef=module.cfg_mtp.loss_scaling_factor / max(len(hiddens), 1),  # combine_losses' weight per depth
    )
    scale = dp_size if module.cfg_parallel.scale_loss_by_dp_size else 1
    loss, _, _ = combine_losses(stats, n_global, module.cfg_mtp.loss_scaling_factor, scale)
    aux = module.balancer.aux_loss() if module.training else 0.0
    loss = loss + aux * scale
    ctc = None
    if module.ctc_weight > 0 and not head_only:
        ctc = module.ctc_stats(enc, enc_lens, batch)
        ctc_global = reduce(ctc[1]).clamp(min=1.0)
        loss = loss + module.ctc_weight * ctc[0] / ctc_global * scale
    summed = reduce(stats_vector(stats, ctc, aux))
    return loss, summed, int(batch["input_ids"].shape[0])
