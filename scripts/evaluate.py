#!/usr/bin/env python
"""Evaluate a trained SALM model on a lhotse manifest (greedy decoding with the cache).

    python scripts/evaluate.py --ckpt runs/demo/version_0/checkpoints/last.ckpt \
        --manifest data/demo/test_cuts.jsonl.gz --out eval/demo [--batch-size 16] [--max-new-tokens 64]
    python scripts/evaluate.py --model exports/demo --manifest ... --out ... [--metrics-csv PATH] [--limit N]

Writes OUT/hyps.jsonl, OUT/metrics.json (WER/CER/BLEU, MTP acceptance per depth, main_acc,
tokens/s) and OUT/report.png; see salm_mtp/evaluate.py.
"""

from __future__ import annotations

import sys

from salm_mtp.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
