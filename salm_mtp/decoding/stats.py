"""What a speculative decode did (``SpecStats``), counted from its steps (``step_counts``); the figures are defined
in salm_mtp/decoding/speculative.py's docstring."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from salm_mtp.metrics import mean_accepted_length


@dataclass
class SpecStats:
    """Counts of a speculative decode (sums over rows and steps; see the module docstring)."""

    num_drafts: int
    forwards: int = 0
    """verification forwards, one per row per step while the row decodes"""
    emitted: int = 0
    """tokens those forwards emitted (accepted drafts + the backbone's own), after eos / max_new_tokens cuts"""
    hits: list[int] = field(default_factory=list)
    """per depth k: steps where drafts 1..k were all accepted and depth k's token is part of the answer"""
    pairs: list[int] = field(default_factory=list)
    """per depth k: steps where depth k's draft predicted a token of the answer"""
    batch_forwards: int = 0
    """batched backbone calls (prefills + verification steps): what the wall time pays for"""
    prefills: int = 0
    """row prefills that verified nothing (a row's backbone forwards = prefills + forwards)"""
    ctc_drafted: int = 0
    """draft tokens the CTC transcript proposed (decoding/ctc.py), over the steps that used one"""
    ctc_accepted: int = 0
    """of those, tokens the verification accepted"""
    ctc_steps: int = 0
    """verification forwards of rows that carried a CTC draft (the per-depth MTP figures leave them out)"""

    def __post_init__(self):
        self.hits = self.hits or [0] * self.num_drafts
        self.pairs = self.pairs or [0] * self.num_drafts

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / self.forwards if self.forwards else math.nan

    @property
    def ctc_acceptance(self) -> float:
        """Accepted / proposed CTC draft tokens."""
        return self.ctc_accepted / self.ctc_drafted if self.ctc_drafted else math.nan

    def chained_acceptance(self) -> list[float]:
        return [h / n if n else math.nan for h, n in zip(self.hits, self.pairs)]

    def mean_accepted_length(self) -> float:
        """1 + the sum of the chained acceptances (metrics.mean_accepted_length)."""
        return mean_accepted_length(self.chained_acceptance())

    def add(self, other: SpecStats) -> None:
        self.forwards += other.forwards
        self.emitted += other.emitted
        self.batch_forwards += other.batch_forwards
        self.prefills += other.prefills
        self.ctc_drafted += other.ctc_drafted
        self.ctc_accepted += other.ctc_accepted
        self.ctc_steps += other.ctc_steps
        self.hits = [a + b for a, b in zip(self.hits, other.hits)]
        self.pairs = [a + b for a, b in zip(self.pairs, other.pairs)]

    def as_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "tokens_per_forward": self.tokens_per_forward,
                "chained_acceptance": self.chained_acceptance(), "mean_accepted_length": self.mean_accepted_length(),
                "verify_forwards": self.forwards, "emitted_tokens": self.emitted, "batch_forwards": self.batch_forwards,
                "prefills": self.prefills,
                "ctc_drafted": self.ctc_drafted, "ctc_accepted": self.ctc_accepted, "ctc_steps": self.ctc_steps,
                "ctc_acceptance": self.ctc_acceptance}


def step_counts(accepted: torch.Tensor, before: torch.Tensor, active: torch.Tensor, lengths: torch.Tensor,
                num_drafts: int, mtp_rows: torch.Tensor | None = None) -> SpecStats:
    """The figures of a decode from its steps.

    Args:
        accepted: (S, b) drafts accepted at step s by row b (0..D).
        before: (S, b) answer tokens row b had before step s (its drafts then predicted tokens before ..
            before + D - 1; the backbone's own token is number before + accepted).
        active: (S, b) bool, row b was still decoding at step s.
        lengths: (b,) final answer lengths (after the eos / max_new_tokens cut).
        num_drafts: D.
        mtp_rows: (S, b) bool, row b's drafts at step s came from the MTP head (default: all); only those steps
            count in the per-depth figures.
    """
    left = (lengths[None, :] - before).clamp(min=0)  # answer tokens still to come at each step
    out = SpecStats(num_drafts, forwards=int(active.sum()),
                    emitted=int((torch.minimum(accepted + 1, left) * active).sum()))
    mtp = active if mtp_rows is None else active & mtp_rows
    for k in range(1, num_drafts + 1):
        real = mtp & (left >= k)  # depth k's draft predicted answer token before + k - 1
        out.pairs[k - 1] = int(real.sum())
        out.hits[k - 1] = int((real & (accepted >= k)).sum())
    return out
