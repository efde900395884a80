#!/usr/bin/env python
"""Make the spoken demo corpus (espeak-ng + sox) and its tokenizer under --out.

    python scripts/make_demo_data.py                       # data/demo/, 4000/200/200 clips
    python scripts/make_demo_data.py --out /tmp/demo --num-train 300 --seed 1

Writes audio/*.flac, {train,dev,test}_cuts.jsonl.gz (lhotse), tokenizer/ and meta.json.
Re-running with the same arguments reuses the corpus (--force regenerates). See
salm_mtp/data/demo_corpus.py for the tasks, voices and layout.
"""

from __future__ import annotations

import argparse

from salm_mtp.data.demo_corpus import make_demo_data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    parser.add_argument("--num-train", type=int, default=4000, help="train utterances (default: 4000)")
    parser.add_argument("--num-dev", type=int, default=200, help="dev utterances (default: 200)")
    parser.add_argument("--num-test", type=int, default=200, help="test utterances (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed; same seed, same corpus (default: 0)")
    parser.add_argument("--workers", type=int, default=2, help="parallel espeak-ng calls (default: 2)")
    parser.add_argument("--force", action="store_true", help="regenerate even if meta.json matches")
    parser.add_argument(
        "--synthetic", action="store_true", help="use synthetic tones instead of espeak-ng (for tests)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    make_demo_data(
        out=args.out,
        num_train=args.num_train,
        num_dev=args.num_dev,
        num_test=args.num_test,
        seed=args.seed,
        workers=args.workers,
        force=args.force,
        synthetic=True if args.synthetic else None,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    main()
