"""Self-speculative decoding, the calls: which modes a model can run (``supported_modes``, ``auto_mode``) and the
decode itself (``speculative_decode``, ``mtp_decode``) over ``SpeculativeDecoder`` (salm_mtp/decoding/speculative.py,
where the algorithm is described).

    tokens, lengths, stats = speculative_decode(model, batch, "ctc+mtp")   # == greedy_decode(model, batch)
    tokens, lengths, stats = mtp_decode(model, batch, max_new_tokens=64)
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from salm_mtp.data.prompt import PromptConfig, PromptFormatter
from salm_mtp.decoding.ctc import answer_drafts
from salm_mtp.decoding.speculative import SpeculativeDecoder
from salm_mtp.decoding.stats import SpecStats
from salm_mtp.generate import (_eos_id, _lengths_after_eos, _pad_id, _row_groups, encode_prompts, inference,
                               left_padding_exact)
from salm_mtp.modules.merge import MergedInputs

log = logging.getLogger(__name__)

MODES = ("mtp", "ctc", "ctc+mtp")
"""Speculative decoding modes: drafts from the MTP head, from the encoder's CTC transcript (ASR rows), or both
(the CTC draft while the answer follows it, the head's after the first disagreement)."""


def default_answer_ids(tokenizer):
    """text -> ASR answer tokens in the default data.prompt format (a run with its own prompt settings passes its
    data module's ``PromptFormatter.answer_ids`` instead)."""
    return partial(PromptFormatter(tokenizer, PromptConfig()).answer_ids, "asr")


def supported_modes(module) -> list[str]:
    """The decode modes ``module`` can run: greedy, then each speculative mode it has the drafts for."""
    has_ctc = getattr(module.audio, "ctc_head", None) is not None
    return ["greedy"] + [m for m in MODES if ("mtp" not in m or module.num_mtp_depths)
                         and (not m.startswith("ctc") or has_ctc)]


def auto_mode(module) -> str:
    """``--decode auto``: the mode that drafts the most, ctc+mtp when the model has both heads, then ctc, mtp,
    greedy (every mode gives greedy's tokens; on the demo ctc and ctc+mtp are the fastest, bench/decode.py)."""
    supported = supported_modes(module)
    return next(m for m in ("ctc+mtp", "ctc", "mtp", "greedy") if m in supported)


def resolve_mode(module, requested: str) -> str:
    """``requested`` (greedy, a MODES entry, or auto) as the mode ``module`` runs: a mode whose drafts the model
    lacks falls back to what it has (ctc+mtp without a CTC head -> mtp, without an MTP head -> ctc; ctc or mtp alone
    -> greedy), said in one warning; every mode gives greedy's tokens. ValueError for an unknown mode."""
    if requested not in ("auto", "greedy", *MODES):
        raise ValueError(f"--decode {requested!r}: use one of auto, greedy, {', '.join(MODES)}")
    mode = auto_mode(module) if requested == "auto" else requested
    has = {"ctc": getattr(module.audio, "ctc_head", None) is not None, "mtp": module.num_mtp_depths > 0}
    kept = [p for p in mode.split("+") if p != "greedy" and has[p]]
    runs = "+".join(kept) or "greedy"
    if runs != mode:
        lacks = " and no ".join({"ctc": "CTC head", "mtp": "MTP head"}[p] for p in mode.split("+") if not has[p])
        log.warning("--decode %s: this model has no %s to draft with: decoding with %s (the same tokens)", mode,
                    lacks, runs)
    return runs


def decode_row_groups(module, prompt: MergedInputs, D: int, max_new_tokens: int, eos_id: int | None, pad_id: int,
                      batched: bool, stats: SpecStats, drafter=None,
                      answers: list[list[int] | None] | None = None) -> torch.Tensor:
    """Speculative decoding of every row group of ``prompt`` (one group when left padding is exact);
    adds each group's figures to ``stats`` and returns tokens (B, max_new_tokens), pad after each row's end.

    ``drafter(decoder, rows)``, if given, returns the ``draft_token(k, h)`` replacing the head's drafts
    (bench/decode.py's oracle feeds greedy's own tokens through it). ``answers``: per row, a whole-answer draft
    (decoding/ctc.py) or None.
    """
    B, dev = prompt.lengths.numel(), prompt.inputs_embeds.device
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    for rows in _row_groups(prompt.lengths, batched):
        group_answers = [answers[r] for r in rows.tolist()] if answers is not None else None
        with SpeculativeDecoder(module, D, max_new_tokens, eos_id, pad_id, group_answers) as dec:
            if drafter is not None:
                dec.draft_token = drafter(dec, rows)
            dec.prefill(prompt.inputs_embeds[rows], prompt.lengths[rows])
            while not dec.finished:
                dec.step()
            t, s = dec.result()
        tokens[rows] = t
        stats.add(s)
    return tokens


def speculative_decode(module, batch: dict, mode: str = "mtp", max_new_tokens: int = 64,
                       num_drafts: int | None = None, stop_at_eos: bool = True, batched: bool | None = None,
                       answer_ids=None, prompt: MergedInputs | None = None, audio: tuple | None = None):
    """Greedy answer tokens of every row of ``batch`` by self-speculative decoding (``mode``: MODES).

    Args mirror :func:`salm_mtp.generate.greedy_decode`; ``num_drafts`` = D, the MTP drafts per step (the
    head's first D depths; default all of them); ``answer_ids``: text -> ASR answer tokens as training formatted
    them, for the CTC drafts (decoding/ctc.py; default: a ``PromptFormatter`` with the default data.prompt). ``prompt`` and ``audio`` (encoder
    output, lengths): what ``encode_prompts(module, batch, with_audio=True)`` gives, when the caller has it.

    Returns:
        tokens (B, L), lengths (B,) exactly as ``greedy_decode`` returns them, and a :class:`SpecStats`.
    """
    if mode not in MODES:
        raise ValueError(f"decode mode {mode!r}: use one of {', '.join(MODES)}")
    depths = module.num_mtp_depths
    use_mtp, use_ctc = "mtp" in mode, mode.startswith("ctc")
    if use_mtp and depths == 0:
        raise ValueError(f"--decode {mode}: the model has no MTP head to draft with; use "
                         f"{'ctc' if use_ctc else 'greedy'}")
    if use_ctc and getattr(module.audio, "ctc_head", None) is None:
        raise ValueError(f"--decode {mode} needs the encoder's CTC head (this model has none: model.ctc_weight=0 and "
                         f"no CTC head in model.encoder.path): use {'mtp' if use_mtp else 'greedy'}")
    D = (depths if num_drafts is None else num_drafts) if use_mtp else 0
    if use_mtp and not 1 <= D <= depths:
        raise ValueError(f"num_drafts must be in 1..{depths} (the head's depths), got {num_drafts}; set --num-drafts")
    eos_id = _eos_id(module) if stop_at_eos else None
    pad_id = _pad_id(module)
    stats = SpecStats(D)
    with inference(module):
        if prompt is None or (use_ctc and audio is None):
            prompt, *audio = encode_prompts(module, batch, with_audio=True)
        B = prompt.lengths.numel()
        dev = prompt.inputs_embeds.device
        if B == 0 or max_new_tokens <= 0:
            return (torch.zeros(B, 0, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.long, device=dev),
                    stats)
        if use_ctc and answer_ids is None:
            answer_ids = default_answer_ids(module.tokenizer)
        answers = answer_drafts(module, batch, *audio, answer_ids) if use_ctc else None
        if batched is None:
            batched = left_padding_exact(module.llm)
        tokens = decode_row_groups(module, prompt, D, max_new_tokens, eos_id, pad_id, batched, stats,
                                   answers=answers)
        lengths = _lengths_after_eos(tokens, eos_id)
        L = int(lengths.max())
        tokens = tokens[:, :L].masked_fill(torch.arange(L, device=dev)[None, :] >= lengths[:, None], pad_id)
    return tokens, lengths, stats


def mtp_decode(module, batch: dict, max_new_tokens: int = 64, num_drafts: int | None = None,
               stop_at_eos: bool = True, prompt: MergedInputs | None = None, batched: bool | None = None):
    """``speculative_decode`` with MTP drafts only (``prompt``: the encoded prompts, when the caller has them)."""
    return speculative_decode(module, batch, "mtp", max_new_tokens, num_drafts, stop_at_eos, batched, prompt=prompt)
