"""Live acceptance while training: at every validation the real speculative decoder runs on the first validation
utterances and logs what it accepts, beside the teacher-forced figures (``val_mtp_acc/depth_k``).

    trainer:
      callbacks:
        - class_path: salm_mtp.live_spec.LiveAcceptance
          init_args: {utterances: 16, mode: auto}

Logged (rank 0's utterances on one process and under FSDP2; every rank's own and summed under DDP):
``val_spec/tokens_per_forward``
(answer tokens per verification forward), ``val_spec/chained_acceptance/depth_k`` (the head's drafts as the decoder
meets them), ``val_spec/ctc_acceptance`` (accepted / proposed CTC draft tokens, ctc modes) and
``val_spec/identical`` (1 when the speculative answers equal greedy's: they always should). The decoding is greedy
(no random numbers) in eval mode under no_grad, so training is unchanged by it (tests/test_live_spec.py compares the
losses with it on and off). Under FSDP2 every forward is a collective, so the ranks must take the same forwards:
every rank decodes rank 0's rows (broadcast), the same computation on the same gathered weights, with the root's own
parameters (embeddings, lm_head) gathered around the decode (tests/recipes/test_fsdp2_fit.py).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import FSDPModule

from salm_mtp.decoding.modes import resolve_mode, speculative_decode
from salm_mtp.decoding.stats import SpecStats
from salm_mtp.generate import greedy_decode
from salm_mtp.parallel import all_reduce_sum


CLIP_KEYS = ("audios", "audio_lens", "clip_rows", "ctc_ids", "ctc_lens")
"""Batch entries with one row per audio clip (salm_mtp/data/dataset.py); the others have one per example."""


def first_rows(batch: dict, n: int) -> dict:
    """The collated batch cut to its first ``n`` examples and their clips."""
    clips = batch["clip_rows"] < n
    return {k: (v[clips] if k in CLIP_KEYS else v[:n] if isinstance(v, (torch.Tensor, list)) else v)
            for k, v in batch.items()}


def rank_zero_rows(part: dict, device: torch.device) -> dict:
    """Rank 0's batch on every rank (broadcast through CPU; FSDP2)."""
    import torch.distributed as dist

    cpu = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in part.items()}]
    dist.broadcast_object_list(cpu, src=0, device=device if device.type != "cpu" else None)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cpu[0].items()}


@contextmanager
def gathered_for_decoding(module: FSDPModule):
    """The FSDP2 units the decoder calls outside their ``forward`` gathered for the block: the root's own parameters
    (embeddings, lm_head, final norm, CTC head) and the MTP head (its depths run through ``forward_depth``). The
    other units (backbone blocks, encoder layers, adapter) gather themselves in their forwards."""
    units = [m for m in (module, getattr(module, "mtp_head", None)) if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def answer_ids_of(trainer):
    """text -> ASR answer tokens as this run's data formats them (its data module's prompt formatter: a chat
    template's turn markers included); None (the default format) when the run has no SALM data module."""
    dm = getattr(trainer, "datamodule", None)
    if dm is None or not hasattr(dm, "get_dataset"):
        return None
    return partial(dm.get_dataset().formatter.answer_ids, "asr")


class LiveAcceptance(L.Callback):
    """Speculative decoding of the first ``utterances`` validation rows at each validation (see the module
    docstring)."""

    def __init__(self, utterances: int = 16, mode: str = "auto", max_new_tokens: int = 64) -> None:
        """
        Args:
            utterances: validation rows decoded per validation (the first ones of the first loader).
            mode: mtp, ctc, ctc+mtp or auto (the one that drafts the most that the model has).
            max_new_tokens: most tokens per answer.
        """
        if utterances < 1:
            raise ValueError(f"LiveAcceptance.utterances must be >= 1, got {utterances}")
        self.utterances, self.mode, self.max_new_tokens = utterances, mode, max_new_tokens
        self.stats: SpecStats | None = None
        self.seen = self.mismatched = 0
        self._resolved: tuple[str | None] | None = None  # (the mode run, None: nothing to measure), found once

    def _usable_mode(self, pl_module) -> str | None:
        """The mode to measure, resolved at the first validation batch (a fallback or a refusal is said once: the
        model's heads do not change during a fit); None when the model has nothing to draft with."""
        if self._resolved is None:
            try:
                mode = resolve_mode(pl_module, self.mode)
                if mode == "greedy":
                    raise ValueError("the model has neither an MTP head nor a CTC head to draft with")
            except ValueError as e:
                rank_zero_warn(f"LiveAcceptance: {e}; nothing measured")
                mode = None
            self._resolved = (mode,)
        return self._resolved[0]

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.stats, self.seen, self.mismatched = None, 0, 0

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or dataloader_idx != 0 or self.seen >= self.utterances:
            return
        mode = self._usable_mode(pl_module)
        if mode is None:
            return
        part = first_rows(batch, min(self.utterances - self.seen, batch["input_ids"].shape[0]))
        sharded = isinstance(pl_module, FSDPModule)
        if sharded:  # rank 0's rows on every rank: the same forwards in the same order (and the same ``seen``)
            part = rank_zero_rows(part, pl_module.device)
        rows = part["input_ids"].shape[0]
        if rows == 0:
            return
        with gathered_for_decoding(pl_module) if sharded else nullcontext():
            tokens, lengths, stats = speculative_decode(pl_module, part, mode, self.max_new_tokens,
                                                        answer_ids=answer_ids_of(trainer))
            ref, ref_len = greedy_decode(pl_module, part, self.max_new_tokens)
        self.mismatched += int(not (torch.equal(tokens, ref) and torch.equal(lengths, ref_len)))
        if self.stats is None:
            self.stats = SpecStats(stats.num_drafts)
        self.stats.add(stats)
        self.seen += rows

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        s = self.stats
        if trainer.sanity_checking or s is None:
            return
        sums = torch.tensor([s.emitted, s.forwards, s.ctc_accepted, s.ctc_drafted, self.mismatched, *s.hits, *s.pairs],
                            dtype=torch.float64, device=pl_module.device)
        # DDP: every rank decoded its own rows (one process: as it is); FSDP2: every rank the same rows, so each sum is
        # world_size times rank 0's and every logged ratio is rank 0's
        sums = all_reduce_sum(sums, trainer)
        emitted, forwards, ctc_acc, ctc_drafted, mismatched = sums[:5].tolist()
        D = s.num_drafts
        hits, pairs = sums[5: 5 + D].tolist(), sums[5 + D:].tolist()
        out = {"val_spec/tokens_per_forward": emitted / forwards if forwards else float("nan"),
               "val_spec/identical": float(mismatched == 0)}
        for k, (h, n) in enumerate(zip(hits, pairs), start=1):
            out[f"val_spec/chained_acceptance/depth_{k}"] = h / n if n else float("nan")
        if ctc_drafted:
            out["val_spec/ctc_acceptance"] = ctc_acc / ctc_drafted
        for name, value in out.items():
            pl_module.log(name, value, sync_dist=False)
