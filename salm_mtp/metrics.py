"""Evaluation metrics as pure functions: WER / CER (jiwer), BLEU (sacrebleu), MTP draft acceptance,
top-1 accuracy.

Text metrics take parallel lists of reference and hypothesis strings and return plain dicts of
Python numbers, ready to log or dump as JSON:

    wer(["a b c d"], ["a x c"])   -> {"wer": 0.5, "errors": 2, "ref_words": 4, ...}
    bleu(refs, hyps)              -> {"bleu": 31.2, "num": 100}

Conventions (one place, so reports agree):
- WER/CER normalise both sides first, with the normaliser named by ``normalizer`` (``NORMALIZERS``):
  "basic" (`normalize_text`, the default of these functions and of training's val_wer), "whisper_english"
  (Whisper's English normaliser, as the Open ASR Leaderboard and NeMo's evaluation scripts use it; the
  default of ``salm-mtp evaluate``), or "none" (the raw strings split on whitespace). BLEU scores raw text
  with sacrebleu's default 13a tokenizer (the standard, comparable BLEU).
- An undefined value (nothing to score) is `nan`, never a silent 0.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Callable, Sequence

import torch

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lowercase, delete punctuation, collapse whitespace.

    Punctuation is every Unicode category-P character (.,!?'"-: and friends), deleted rather than
    replaced by a space, as jiwer's RemovePunctuation does: "Don't stop." -> "dont stop",
    "well-known" -> "wellknown". Symbols (category S, e.g. "$", "+") and digits are kept.
    """
    text = text.lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return _SPACES.sub(" ", text).strip()


NORMALIZERS = ("whisper_english", "basic", "none")
"""Text normalisers WER/CER can apply before scoring (``get_normalizer``)."""


@functools.lru_cache(maxsize=None)
def get_normalizer(name: str) -> Callable[[str], str]:
    """The normaliser called ``name`` (one of ``NORMALIZERS``).

    whisper_english: ``whisper_normalizer.english.EnglishTextNormalizer`` (the port of openai/whisper's
        normaliser): lowercase, punctuation and fillers removed, contractions and British spellings
        standardised, spoken numbers written as digits ("three seven nine" -> "379", "twenty one" -> "21").
    basic: `normalize_text` (lowercase, punctuation deleted, whitespace collapsed).
    none: the text as it is (split on whitespace by WER).
    """
    if name == "whisper_english":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    if name == "basic":
        return normalize_text
    if name == "none":
        return lambda text: _SPACES.sub(" ", text).strip()
    raise ValueError(f"unknown normalizer {name!r}; choose one of {', '.join(NORMALIZERS)} (--normalizer)")


def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses; pass one hypothesis per reference")


def _error_rate(refs: Sequence[str], hyps: Sequence[str], unit: str, normalizer: str = "basic") -> dict:
    """Shared WER/CER: edit errors over normalised text, with empty sides handled outside jiwer.

    unit "words": tokens are words; "chars": tokens are characters (spaces included, as jiwer.cer).
    Empty reference (after normalisation): jiwer cannot score it, so every hypothesis token counts
    as an insertion error and the reference adds 0 to the denominator. Empty hypothesis: every
    reference token is a deletion.
    """
    import jiwer

    _check_pairs(refs, hyps)
    norm = get_normalizer(normalizer)

    def tokens(s: str) -> list[str]:
        return s.split() if unit == "words" else list(s)

    errors = ref_len = num_empty_refs = num_empty_hyps = 0
    scored_refs: list[str] = []
    scored_hyps: list[str] = []
    for ref, hyp in zip(refs, hyps):
        ref, hyp = norm(ref), norm(hyp)
        num_empty_refs += ref == ""
        num_empty_hyps += hyp == ""
        if ref == "":
            errors += len(tokens(hyp))  # insertions
        elif hyp == "":
            errors += len(tokens(ref))  # deletions
            ref_len += len(tokens(ref))
        else:
            scored_refs.append(ref)
            scored_hyps.append(hyp)
    if scored_refs:
        out = (jiwer.process_words if unit == "words" else jiwer.process_characters)(scored_refs, scored_hyps)
        errors += out.substitutions + out.deletions + out.insertions
        ref_len += out.substitutions + out.deletions + out.hits
    if ref_len > 0:
        rate = errors / ref_len
    elif len(refs) == 0:
        rate = math.nan
    else:  # only empty references: 0 if the hypotheses are empty too, else unbounded
        rate = 0.0 if errors == 0 else math.inf
    return {
        "rate": rate,
        "errors": errors,
        "ref_len": ref_len,
        "num_empty_refs": num_empty_refs,
        "num_empty_hyps": num_empty_hyps,
    }


def wer(refs: Sequence[str], hyps: Sequence[str], normalizer: str = "basic") -> dict:
    """Corpus word error rate over strings normalised by ``normalizer`` (`get_normalizer`).

    Returns:
        wer: errors / ref_words (nan for an empty corpus; inf when every reference is empty but
            some hypothesis is not; 0.0 when both are all empty).
        errors: substitutions + deletions + insertions, summed over the corpus. A pair with an
            empty reference contributes its hypothesis word count (all insertions); a pair with an
            empty hypothesis contributes its reference word count (all deletions).
        ref_words: reference words in the corpus (denominator).
        num_empty_refs / num_empty_hyps: pairs whose reference / hypothesis is empty after
            normalisation.
    """
    r = _error_rate(refs, hyps, "words", normalizer)
    return {"wer": r["rate"], "errors": r["errors"], "ref_words": r["ref_len"],
            "num_empty_refs": r["num_empty_refs"], "num_empty_hyps": r["num_empty_hyps"]}


def cer(refs: Sequence[str], hyps: Sequence[str], normalizer: str = "basic") -> dict:
    """Corpus character error rate over strings normalised by ``normalizer`` (spaces count as characters).

    Same conventions as `wer`; returns keys cer, errors, ref_chars, num_empty_refs, num_empty_hyps.
    """
    r = _error_rate(refs, hyps, "chars", normalizer)
    return {"cer": r["rate"], "errors": r["errors"], "ref_chars": r["ref_len"],
            "num_empty_refs": r["num_empty_refs"], "num_empty_hyps": r["num_empty_hyps"]}


def wer_by_group(rows: Sequence[dict], normalizer: str) -> dict[str, dict]:
    """WER of every evaluation group the rows carry.

    ``rows``: dicts with "ref", "hyp" and "groups" ({group name: value}, e.g. {"text": "unseen", "kind":
    "numbers"}; rows without groups count in no group). Returns {"name=value": {"num", "wer", "wer_raw",
    "errors", "ref_words"}} sorted by key; "wer" uses ``normalizer``, "wer_raw" the raw strings ("none").
    """
    members: dict[str, list[dict]] = {}
    for row in rows:
        for name, value in (row.get("groups") or {}).items():
            members.setdefault(f"{name}={value}", []).append(row)
    out = {}
    for key in sorted(members):
        refs, hyps = [r["ref"] for r in members[key]], [r["hyp"] for r in members[key]]
        w, raw = wer(refs, hyps, normalizer), wer(refs, hyps, "none")
        out[key] = {"num": len(refs), "wer": w["wer"], "wer_raw": raw["wer"], "errors": w["errors"],
                    "ref_words": w["ref_words"]}
    return out


def bleu(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Corpus BLEU (sacrebleu.corpus_bleu, one reference per hypothesis, default 13a tokenizer and
    exp smoothing) on the raw strings.

    Returns:
        bleu: score in [0, 100] (nan for an empty corpus).
        num: number of sentence pairs.
    """
    import sacrebleu

    _check_pairs(refs, hyps)
    if len(refs) == 0:
        return {"bleu": math.nan, "num": 0}
    return {"bleu": float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score), "num": len(refs)}


def mtp_acceptance(main_tokens: torch.Tensor, draft_tokens: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """Per-depth agreement of MTP drafts with the main model's own greedy tokens.

    Args:
        main_tokens: (N, L) long, the main model's greedy token at each position of N sequences.
        draft_tokens: (N, D, L) long; draft_tokens[n, k-1, t] is depth k's argmax produced at step t,
            a prediction of main_tokens[n, t + k] (k = 1..D).
        valid: (N, L) bool, positions of main_tokens that count (e.g. generated, not padding).
    Returns:
        D floats; entry k-1 = fraction of pairs (n, t) with t + k < L and valid[n, t + k] where
        draft_tokens[n, k-1, t] == main_tokens[n, t + k]; nan for a depth with no such pair.
        This is the per-depth marginal agreement, not the chained acceptance of speculative decoding
        (which also needs depths 1..k-1 to agree).
    """
    main_tokens, draft_tokens, valid = (torch.as_tensor(t) for t in (main_tokens, draft_tokens, valid))
    if main_tokens.dim() != 2 or draft_tokens.dim() != 3 or valid.shape != main_tokens.shape:
        raise ValueError(
            f"expected main_tokens (N, L), draft_tokens (N, D, L), valid (N, L); got {tuple(main_tokens.shape)}, "
            f"{tuple(draft_tokens.shape)}, {tuple(valid.shape)}"
        )
    N, D, L = draft_tokens.shape
    if (N, L) != tuple(main_tokens.shape):
        raise ValueError(f"draft_tokens {tuple(draft_tokens.shape)} does not match main_tokens {tuple(main_tokens.shape)} in N, L")
    valid = valid.bool()
    out: list[float] = []
    for k in range(1, D + 1):
        pred = draft_tokens[:, k - 1, : L - k]  # (N, L-k): predictions made at t = 0..L-k-1
        target = main_tokens[:, k:]  # (N, L-k): the tokens they predict, at t + k
        keep = valid[:, k:]  # (N, L-k)
        n = int(keep.sum())
        out.append(float(((pred == target) & keep).sum()) / n if n else math.nan)
    return out



def chained_acceptance_counts(main_tokens: torch.Tensor, draft_tokens: torch.Tensor,
                              valid: torch.Tensor) -> list[tuple[int, int]]:
    """Per depth k, (hits, pairs) of chained acceptance along the greedy path (speculative decoding's).

    Depth k counts as accepted at step t only if depths 1..k all drafted the greedy tokens
    ``main_tokens[n, t + j]`` (j = 1..k). With every earlier depth right, depth k's inputs equal the
    teacher-forced ones, so this is exactly what a self-speculative decoder drafting at step t accepts.
    Pairs are (n, t) with ``valid[n, t + k]``, as in :func:`mtp_acceptance`.
    """
    main_tokens, draft_tokens, valid = (torch.as_tensor(t) for t in (main_tokens, draft_tokens, valid))
    N, D, L = draft_tokens.shape
    valid = valid.bool()
    out: list[tuple[int, int]] = []
    chain = torch.ones(N, L, dtype=torch.bool)  # chain[n, t]: depths 1..k-1 all right at step t
    for k in range(1, D + 1):
        right = torch.zeros(N, L, dtype=torch.bool)
        right[:, : L - k] = draft_tokens[:, k - 1, : L - k] == main_tokens[:, k:]
        keep = torch.zeros(N, L, dtype=torch.bool)
        keep[:, : L - k] = valid[:, k:]
        chain = chain & right
        out.append((int((chain & keep).sum()), int(keep.sum())))
    return out


def mean_accepted_length(chained: list[float]) -> float:
    """Tokens per backbone forward of a self-speculative decoder: 1 (the backbone's own) + sum_k chained_k."""
    return 1.0 + sum(c for c in chained if c == c)
