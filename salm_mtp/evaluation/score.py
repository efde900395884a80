"""metrics.json from the evaluation's sums (``summarise``): WER/CER/BLEU, per-group WER, MTP agreement, speed."""

from __future__ import annotations

import math


from salm_mtp import metrics
from salm_mtp.decoding.stats import SpecStats
from salm_mtp.evaluation.data import TURN_TASKS
from salm_mtp.evaluation.decode import DecodeSettings, Totals


def finite(x):
    """JSON-safe number: nan/inf become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def summarise(totals: Totals, num_depths: int, settings: DecodeSettings = DecodeSettings(),
              normalizer: str = "whisper_english") -> dict:
    """metrics.json content (keys in the module docstring)."""
    ok = [r for r in totals.rows if r["hyp"] is not None]
    asr = [r for r in ok if r["task"] == "asr"]
    ast = [r for r in ok if r["task"] == "ast"]
    w = metrics.wer([r["ref"] for r in asr], [r["hyp"] for r in asr], normalizer)
    w_raw = metrics.wer([r["ref"] for r in asr], [r["hyp"] for r in asr], "none")
    c = metrics.cer([r["ref"] for r in asr], [r["hyp"] for r in asr], normalizer)
    b = metrics.bleu([r["ref"] for r in ast], [r["hyp"] for r in ast]) if ast else None
    turns = [r for r in ok if r["task"] in TURN_TASKS]
    tw = metrics.wer([r["ref"] for r in turns], [r["hyp"] for r in turns], normalizer) if turns else None
    if num_depths:
        acceptance = [h / n if n else math.nan for h, n in zip(totals.acc_hits, totals.acc_count)]
        acceptance += [math.nan] * (num_depths - len(acceptance))  # no tokens decoded at all
        chained = [h / n if n else math.nan for h, n in zip(totals.chain_hits, totals.chain_count)]
        chained += [math.nan] * (num_depths - len(chained))
    else:
        acceptance, chained = [], []
    out = {
        "num_utterances": len(totals.rows),
        "num_failed": totals.num_failed,
        "skipped_cuts": dict(sorted(totals.skipped.items())),
        "num_asr": len(asr),
        "num_ast": len(ast),
        "normalizer": normalizer,
        "wer": w["wer"],
        "wer_raw": w_raw["wer"],
        "wer_by_group": {k: {kk: finite(vv) for kk, vv in g.items()} for k, g in metrics.wer_by_group(asr, normalizer).items()},
        "cer": c["cer"],
        "wer_errors": w["errors"],
        "ref_words": w["ref_words"],
        "cer_errors": c["errors"],
        "ref_chars": c["ref_chars"],
        "num_empty_refs": w["num_empty_refs"],
        "num_empty_hyps": w["num_empty_hyps"],
        "bleu": b["bleu"] if b is not None else None,
        "mtp_teacher_forced_agreement": [finite(a) for a in acceptance],
        "mtp_teacher_forced_chained_acceptance": [finite(a) for a in chained],
        "teacher_forced_mean_accepted_length": metrics.mean_accepted_length(chained) if num_depths else None,
        "main_acc": totals.main_correct / totals.main_count if totals.main_count else math.nan,
        "main_loss": totals.main_nll / totals.main_count if totals.main_count else math.nan,
        "num_turns": len(turns),
        "turn_wer": tw["wer"] if tw is not None else None,
        "turn_exact_match": (sum(metrics.normalize_text(r["ref"]) == metrics.normalize_text(r["hyp"]) for r in turns) / len(turns)
                             if turns else None),
        "generated_tokens": totals.tokens,
        "decode_seconds": totals.seconds,
        "tokens_per_s": totals.tokens / totals.seconds if totals.seconds > 0 else math.nan,
        "rtfx": totals.audio_seconds / totals.seconds if totals.seconds > 0 else math.nan,
        "max_new_tokens": settings.max_new_tokens,
        "decode": settings.decode,
    }
    if settings.decode != "greedy":
        spec = totals.spec or SpecStats(settings.num_drafts or num_depths)
        out.update({
            "spec_num_drafts": spec.num_drafts,
            "spec_tokens_per_forward": spec.tokens_per_forward,
            "spec_chained_acceptance": [finite(a) for a in spec.chained_acceptance()],
            "spec_mean_accepted_length": spec.mean_accepted_length(),
            "spec_row_forwards": spec.prefills + spec.forwards,
            "greedy_row_forwards": totals.greedy_row_forwards,
            "greedy_decode_seconds": totals.greedy_seconds,
            "spec_decode_seconds": totals.spec_seconds,
            "spec_speedup": totals.greedy_seconds / totals.spec_seconds if totals.spec_seconds > 0 else math.nan,
            "spec_identical_to_greedy": totals.spec_mismatched_rows == 0,
            "spec_ctc_drafted": spec.ctc_drafted, "spec_ctc_acceptance": finite(spec.ctc_acceptance),
            "greedy_rtfx": totals.audio_seconds / totals.greedy_seconds if totals.greedy_seconds > 0 else math.nan,
            "spec_rtfx": totals.audio_seconds / totals.spec_seconds if totals.spec_seconds > 0 else math.nan,
            "spec_mismatched_rows": totals.spec_mismatched_rows,
        })
    return {k: finite(v) for k, v in out.items()}
