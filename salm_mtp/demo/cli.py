"""``salm-mtp make-demo-data``: the demo corpus (salm_mtp/demo/corpus.py) and, with ``--mix``, its conversations and
text chats (salm_mtp/demo/mix.py)."""

from __future__ import annotations

from salm_mtp.demo.corpus import make_demo_data
from salm_mtp.demo.mix import make_mix_data


def main(argv: list[str] | None = None) -> int:
    """``salm-mtp make-demo-data``: the command line of ``make_demo_data``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="salm-mtp make-demo-data",
        description="Make the spoken demo corpus (espeak-ng + sox; synthetic tones without them) and its tokenizer "
                    "under --out: audio/*.flac, {train,dev,test,test_unseen_voice}_cuts.jsonl.gz (lhotse), tokenizer/, "
                    "meta.json. Dev and test texts never occur in train; test_unseen_voice holds voices train never "
                    "heard; every cut carries custom.groups (text/voice seen or unseen, kind). "
                    "Re-running with the same arguments reuses the corpus.",
    )
    parser.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    parser.add_argument("--num-train", type=int, default=4000, help="train utterances (default: 4000)")
    parser.add_argument("--num-dev", type=int, default=200, help="dev utterances (default: 200)")
    parser.add_argument("--num-test", type=int, default=200, help="test utterances (default: 200)")
    parser.add_argument("--num-unseen-voice", type=int, default=None,
                        help="test_unseen_voice utterances: voices never heard in train (default: --num-test)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed; same seed, same corpus (default: 0)")
    parser.add_argument("--workers", type=int, default=2, help="parallel espeak-ng calls (default: 2)")
    parser.add_argument("--force", action="store_true", help="regenerate even if meta.json matches the request")
    parser.add_argument("--synthetic", action="store_true",
                        help="use synthetic tones instead of espeak-ng speech (for tests)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--mix", action="store_true",
                        help="also write the mixing sets conf/demo_mix.yaml trains on: talk_{split}.jsonl (spoken "
                             "three-turn conversations over the corpus's clips) and text_{split}.jsonl (text chats)")
    args = parser.parse_args(argv)
    make_demo_data(out=args.out, num_train=args.num_train, num_dev=args.num_dev, num_test=args.num_test,
                   seed=args.seed, workers=args.workers, force=args.force, num_unseen_voice=args.num_unseen_voice,
                   synthetic=True if args.synthetic else None, progress=not args.no_progress)
    if args.mix:
        for name, path in make_mix_data(args.out, seed=args.seed).items():
            print(f"{name}: {sum(1 for _ in open(path))} lines -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
