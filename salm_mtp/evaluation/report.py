"""The evaluation's table for a terminal (``format_table``)."""

from __future__ import annotations


def format_table(m: dict) -> str:
    """A small two-column text table of the headline metrics."""

    def fmt(v, pct=False):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{100 * v:.2f}%" if pct else f"{v:.2f}"
        return str(v)

    rows = [
        ("utterances", fmt(m["num_utterances"])),
        ("failed", fmt(m["num_failed"])),
        ("skipped (data policy)", ", ".join(f"{r}={n}" for r, n in sorted((m.get("skipped_cuts") or {}).items()))
         or "0"),
        ("asr / ast", f"{m['num_asr']} / {m['num_ast']}"),
        (f"WER ({m.get('normalizer', 'basic')} normaliser)", fmt(m["wer"], pct=True)),
    ]
    if m.get("wer_raw") is not None and m.get("wer_raw") != m["wer"]:
        rows.append(("WER (raw text)", fmt(m["wer_raw"], pct=True)))
    for key, g in (m.get("wer_by_group") or {}).items():
        raw = f", raw {fmt(g['wer_raw'], pct=True)}" if g["wer_raw"] != g["wer"] else ""
        rows.append((f"  WER {key} ({g['num']} utts)", f"{fmt(g['wer'], pct=True)}{raw}"))
    rows += [
        ("CER", fmt(m["cer"], pct=True)),
        ("BLEU", fmt(m["bleu"])),
        ("main_acc (teacher-forced)", fmt(m["main_acc"], pct=True)),
        ("main_loss (teacher-forced, nats/token)", fmt(m.get("main_loss"))),
    ]
    if m.get("num_turns"):
        rows += [("assistant turns (reference history)", fmt(m["num_turns"])),
                 ("turn WER", fmt(m["turn_wer"], pct=True)),
                 ("turn exact match", fmt(m["turn_exact_match"], pct=True))]
    for k, a in enumerate(m["mtp_teacher_forced_agreement"], start=1):
        rows.append((f"MTP agreement depth {k} (teacher-forced, marginal)", fmt(a, pct=True)))
    for k, a in enumerate(m.get("mtp_teacher_forced_chained_acceptance") or [], start=1):
        rows.append((f"MTP chained acceptance depth {k} (teacher-forced)", fmt(a, pct=True)))
    if m.get("teacher_forced_mean_accepted_length") is not None:
        rows.append(("mean accepted length (teacher-forced, tokens/forward)",
                     fmt(m["teacher_forced_mean_accepted_length"])))
    rows += [("tokens/s", fmt(m["tokens_per_s"])), ("decode seconds", fmt(m["decode_seconds"]))]
    if m.get("rtfx") is not None:
        rows.append(("RTFx (audio seconds per decode second)", fmt(m["rtfx"])))
    mode = m.get("decode", "greedy")
    if mode != "greedy":
        rows += [(f"{mode} decoding: MTP drafts per step", fmt(m["spec_num_drafts"])),
                 ("  tokens per verification forward", fmt(m["spec_tokens_per_forward"]))]
        for k, a in enumerate(m["spec_chained_acceptance"], start=1):
            rows.append((f"  chained acceptance depth {k} (live)", fmt(a, pct=True)))
        if m.get("spec_ctc_drafted"):
            rows.append(("  CTC draft acceptance (live)", fmt(m["spec_ctc_acceptance"], pct=True)))
        rows += [("  mean accepted length (live)", fmt(m["spec_mean_accepted_length"])),
                 (f"  backbone forwards greedy / {mode}", f"{m['greedy_row_forwards']} / {m['spec_row_forwards']}"),
                 (f"  decode seconds greedy / {mode}",
                  f"{fmt(m['greedy_decode_seconds'])} / {fmt(m['spec_decode_seconds'])}"),
                 (f"  RTFx greedy / {mode}", f"{fmt(m['greedy_rtfx'])} / {fmt(m['spec_rtfx'])}"),
                 (f"  speedup (greedy / {mode} wall)", fmt(m["spec_speedup"])),
                 ("  identical to greedy", "yes" if m["spec_identical_to_greedy"] else
                  f"NO ({m['spec_mismatched_rows']} rows differ)")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"
