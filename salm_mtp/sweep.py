"""The demo's seed sweep, summarised: one row per run, then min / median / max of every column.

    bash scripts/demo_seeds.sh 3             # runs the demo for 3 seeds, then prints this table
    python -m salm_mtp.sweep runs/seeds/seed*  # the table of runs already made

A run directory is what ``scripts/run_demo.sh`` writes under ``RUN``: ``encoder_ctc_hf/pretrain_result.json``,
``eval/metrics.json`` (the test split: sentences not in train, voices heard in train) and
``eval_unseen_voice/metrics.json`` (sentences and voices not in train).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

COLUMNS = (
    ("encoder_val_wer", "encoder dev WER", True),
    ("encoder_steps", "encoder steps", False),
    ("test_wer", "test WER (unseen text)", True),
    ("test_wer_numbers", "  numbers", True),
    ("test_wer_sentences", "  sentences", True),
    ("unseen_voice_wer", "unseen-voice WER", True),
    ("bleu", "BLEU (AST)", False),
    ("acceptance_d1", "MTP depth-1 acceptance", True),
    ("mean_accepted_length", "mean accepted length", False),
)
"""(key, header, shown as a percentage)."""


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _sentences_wer(groups: dict) -> float | None:
    """WER over the sentence kinds together (svo, sv, copula), from their error and word counts."""
    parts = [groups[k] for k in ("kind=svo", "kind=sv", "kind=copula") if k in groups]
    words = sum(p["ref_words"] for p in parts)
    return sum(p["errors"] for p in parts) / words if words else None


def run_row(run_dir: str) -> dict:
    """The figures of one run directory (None where a file or value is missing)."""
    enc = _read(os.path.join(run_dir, "encoder_ctc_hf", "pretrain_result.json"))
    test = _read(os.path.join(run_dir, "eval", "metrics.json"))
    unseen = _read(os.path.join(run_dir, "eval_unseen_voice", "metrics.json"))
    groups = test.get("wer_by_group") or {}
    chained = test.get("mtp_teacher_forced_chained_acceptance") or [None]
    return {
        "run": os.path.basename(os.path.normpath(run_dir)),
        "encoder_val_wer": enc.get("val_wer"),
        "encoder_steps": enc.get("step"),
        "test_wer": test.get("wer"),
        "test_wer_numbers": (groups.get("kind=numbers") or {}).get("wer"),
        "test_wer_sentences": _sentences_wer(groups),
        "unseen_voice_wer": unseen.get("wer"),
        "bleu": test.get("bleu"),
        "acceptance_d1": chained[0],
        "mean_accepted_length": test.get("teacher_forced_mean_accepted_length"),
        "normalizer": test.get("normalizer"),
    }


def spread(values: list[float | None]) -> tuple[float, float, float] | None:
    """(min, median, max) of the known values; None when there are none."""
    known = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not known:
        return None
    return min(known), statistics.median(known), max(known)


def _fmt(value, pct: bool) -> str:
    if value is None:
        return "n/a"
    if pct:
        return f"{100 * value:.2f}%"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    """A markdown table: one row per run, then min / median / max (and max - min of the WER columns)."""
    head = "| " + " | ".join(["run"] + [h.strip() for _, h, _ in COLUMNS]) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        lines.append("| " + " | ".join([r["run"]] + [_fmt(r[k], pct) for k, _, pct in COLUMNS]) + " |")
    stats = {k: spread([r[k] for r in rows]) for k, _, _ in COLUMNS}
    for i, name in enumerate(("min", "median", "max")):
        lines.append("| **" + name + "** | " + " | ".join(
            _fmt(stats[k][i] if stats[k] else None, pct) for k, _, pct in COLUMNS) + " |")
    lines.append("| **max - min** | " + " | ".join(
        (_fmt(stats[k][2] - stats[k][0], pct) if stats[k] and pct else "") for k, _, pct in COLUMNS) + " |")
    norms = sorted({r["normalizer"] for r in rows if r.get("normalizer")})
    if norms:
        lines.append(f"\nWER after the {', '.join(norms)} normaliser (salm-mtp evaluate --normalizer).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table of the run directories given; write it (and the rows as JSON) beside them with --out."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m salm_mtp.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories written by scripts/run_demo.sh (RUN=...)")
    p.add_argument("--out", default=None, help="write summary.md and summary.json into this directory")
    args = p.parse_args(argv)
    missing = [d for d in args.runs if not os.path.isdir(d)]
    if missing:
        print(f"error: not a run directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = [run_row(d) for d in args.runs]
    text = table(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
