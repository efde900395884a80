"""Decoding one batch for evaluation: greedy (and MTP self-speculative) hypotheses, teacher-forced agreement of the
head, the main head's accuracy; how to decode in ``DecodeSettings`` (fixed for a run), sums in ``Totals``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from salm_mtp import metrics
from salm_mtp.data.dataset import failed_row, hyp_rows
from salm_mtp.data.policy import BadCut
from salm_mtp.decoding.modes import speculative_decode
from salm_mtp.decoding.stats import SpecStats
from salm_mtp.generate import decode_text, device_of, encode_prompts, greedy_decode, inference, mtp_drafts
from salm_mtp.modules.merge import IGNORE_INDEX


@dataclass(frozen=True)
class DecodeSettings:
    """How an evaluation decodes: the same for every batch."""

    max_new_tokens: int = 64
    """Most tokens generated per row."""
    decode: str = "greedy"
    """greedy, or a speculative mode (mtp, ctc, ctc+mtp: salm_mtp.decoding.modes.MODES) decoded as well
    (hypotheses from it, timed against greedy)."""
    num_drafts: int | None = None
    """mtp drafts per step (None: every depth of the head)."""
    answer_ids: Callable[[str], list[int]] | None = None
    """ctc modes: a transcript -> the answer's tokens as the run's prompt formatter makes them (None: plain)."""


@dataclass
class Totals:
    """Sums over batches (fractions are formed once at the end)."""

    rows: list[dict] = field(default_factory=list)
    num_failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    audio_seconds: float = 0.0
    """Seconds of audio decoded (RTFx = audio_seconds / decode seconds)."""
    acc_hits: list[float] = field(default_factory=list)
    acc_count: list[int] = field(default_factory=list)
    chain_hits: list[int] = field(default_factory=list)
    chain_count: list[int] = field(default_factory=list)
    main_correct: int = 0
    main_count: int = 0
    main_nll: float = 0.0
    spec: SpecStats | None = None
    greedy_seconds: float = 0.0
    spec_seconds: float = 0.0
    greedy_row_forwards: int = 0
    spec_mismatched_rows: int = 0
    batches: int = 0
    last_spec_seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    """Cuts the data code left out, per reason (SkipLog.counts)."""
    prompts: dict[str, list[int]] = field(default_factory=dict)
    """Per task, the prompt token ids of the first row of that task (what the model was fed)."""


def teacher_forced_hits(module, batch: dict) -> tuple[int, int, float]:
    """(correct, count, summed cross-entropy in nats) of the main head on the reference answer tokens
    (answer + eos), teacher-forced."""
    with inference(module):
        merged, _, _ = module.prepare_inputs(batch)
        h0 = module(merged.inputs_embeds)  # (B, T', H)
        keep = merged.targets != IGNORE_INDEX  # (B, T')
        logits = module.llm.lm_head(h0[keep]).float()  # (N, V): logits only where a target is
        target = merged.targets[keep]  # (N,)
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return int((logits.argmax(-1) == target).sum()), int(keep.sum()), float(nll)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_batch(module, batch: dict, settings: DecodeSettings, totals: Totals) -> None:
    """Decode one collated batch and add its hypotheses and statistics to ``totals`` (the cuts it left out
    are the caller's: ``add_failed``)."""
    if batch["input_ids"].shape[0] == 0:
        return
    for i, task in enumerate(batch["tasks"]):
        if task not in totals.prompts:
            totals.prompts[task] = batch["input_ids"][i, : int(batch["prompt_lens"][i])].tolist()
    dev = device_of(module)
    batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    _sync(dev)
    t0 = time.perf_counter()
    prompt, *audio = encode_prompts(module, batch, with_audio=True)
    _sync(dev)
    t_enc = time.perf_counter() - t0
    max_new_tokens = settings.max_new_tokens
    totals.audio_seconds += float(batch["audio_lens"].sum()) / module.features.config.sample_rate
    if settings.decode != "greedy":
        tokens, lengths = _greedy_and_spec(module, batch, prompt, audio, settings, totals)
        totals.seconds += t_enc + totals.last_spec_seconds
    else:
        tokens, lengths = greedy_decode(module, batch, max_new_tokens=max_new_tokens, prompt=prompt)
        _sync(dev)
        totals.seconds += time.perf_counter() - t0
    totals.tokens += int(lengths.sum())
    hyps = decode_text(module.tokenizer, tokens.cpu(), lengths.cpu())
    totals.rows += hyp_rows(batch, hyps)

    if module.num_mtp_depths and tokens.shape[1] > 0:
        drafts = mtp_drafts(module, batch, tokens, lengths, prompt=prompt)
        valid = torch.arange(tokens.shape[1], device=dev)[None, :] < lengths[:, None]
        fractions = metrics.mtp_acceptance(tokens.cpu(), drafts.cpu(), valid.cpu())
        if not totals.acc_hits:
            totals.acc_hits, totals.acc_count = [0.0] * len(fractions), [0] * len(fractions)
        for k, frac in enumerate(fractions, start=1):
            n = int(valid[:, k:].sum())  # the pairs mtp_acceptance scored for depth k
            if n:
                totals.acc_hits[k - 1] += round(frac * n)
                totals.acc_count[k - 1] += n
        chained = metrics.chained_acceptance_counts(tokens.cpu(), drafts.cpu(), valid.cpu())
        if not totals.chain_hits:
            totals.chain_hits, totals.chain_count = [0] * len(chained), [0] * len(chained)
        for k, (hits, n) in enumerate(chained):
            totals.chain_hits[k] += hits
            totals.chain_count[k] += n

    correct, count, nll = teacher_forced_hits(module, batch)
    totals.main_correct += correct
    totals.main_count += count
    totals.main_nll += nll


def add_failed(totals: Totals, skipped: list[BadCut]) -> None:
    """A hyps row (hyp None, error "<reason>: <detail>") per skipped cut; manifest lines that are not cuts
    have no id and are only counted (metrics.skipped_cuts)."""
    for bad in skipped:
        if bad.cut_id is not None:
            totals.rows.append(failed_row(bad.cut_id, bad.reason, bad.detail))
            totals.num_failed += 1


def _greedy_and_spec(module, batch: dict, prompt, audio, settings: DecodeSettings, totals: Totals):
    """Greedy and speculative decoding of the same encoded prompts (which runs first alternates per batch); the
    speculative tokens, timings and counts go to ``totals``."""
    dev = device_of(module)
    order = ("greedy", "mtp") if totals.batches % 2 == 0 else ("mtp", "greedy")
    totals.batches += 1
    out = {}
    for which in order:
        _sync(dev)
        t0 = time.perf_counter()
        if which == "greedy":
            out["greedy"] = greedy_decode(module, batch, max_new_tokens=settings.max_new_tokens, prompt=prompt)
        else:
            out["mtp"] = speculative_decode(module, batch, settings.decode, settings.max_new_tokens,
                                            num_drafts=settings.num_drafts, prompt=prompt, audio=audio,
                                            answer_ids=settings.answer_ids)
        _sync(dev)
        dt = time.perf_counter() - t0
        if which == "greedy":
            totals.greedy_seconds += dt
        else:
            totals.spec_seconds += dt
            totals.last_spec_seconds = dt
    (g_tokens, g_lengths), (tokens, lengths, stats) = out["greedy"], out["mtp"]
    if totals.spec is None:
        totals.spec = SpecStats(stats.num_drafts)
    totals.spec.add(stats)
    totals.greedy_row_forwards += int(g_lengths.sum())  # greedy: one backbone forward per token (prefill incl.)
    totals.spec_mismatched_rows += sum(
        int(n) != int(gn) or not torch.equal(tokens[b, :n], g_tokens[b, :n])
        for b, (n, gn) in enumerate(zip(lengths.tolist(), g_lengths.tolist())))
    return tokens, lengths
