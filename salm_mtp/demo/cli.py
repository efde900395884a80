"""``salm-mtp make-demo-data``: the demo corpus (salm_mtp/demo/corpus.py) and, with ``--mix``, its conversations and
text chats (salm_mtp/demo/mix.py)."""

from __future__ import annotations

from dataclasses import dataclass

from salm_mtp.demo.corpus import make_demo_data
from salm_mtp.demo.mix import make_mix_data
from salm_mtp.options import parse_options


@dataclass
class DemoDataOptions:
    """The options of ``salm-mtp make-demo-data`` (salm_mtp/options.py makes the parser and its help from them)."""

    out: str = "data/demo"
    """output directory"""
    num_train: int = 4000
    """train utterances"""
    num_dev: int = 200
    """dev utterances"""
    num_test: int = 200
    """test utterances"""
    num_unseen_voice: int | None = None
    """test_unseen_voice utterances: voices never heard in train (default: --num-test)"""
    seed: int = 0
    """RNG seed; same seed, same corpus"""
    workers: int = 2
    """parallel espeak-ng calls"""
    force: bool = False
    """regenerate even if meta.json matches the request; write into a non-empty --out that make-demo-data did not
    write (refused without it)"""
    synthetic: bool = False
    """use synthetic tones instead of espeak-ng speech (for tests)"""
    no_progress: bool = False
    """hide the progress bars"""
    mix: bool = False
    """also write the mixing sets conf/demo_mix.yaml trains on: talk_{split}.jsonl (spoken three-turn conversations
    over the corpus's clips) and text_{split}.jsonl (text chats)"""


DESCRIPTION = ("Make the spoken demo corpus (espeak-ng + sox; synthetic tones without them) and its tokenizer under "
               "--out: audio/*.flac, {train,dev,test,test_unseen_voice}_cuts.jsonl.gz (lhotse), tokenizer/, meta.json. "
               "Dev and test texts never occur in train; test_unseen_voice holds voices train never heard; every cut "
               "carries custom.groups (text/voice seen or unseen, kind). Re-running with the same options reuses the "
               "corpus.")


def main(argv: list[str] | None = None) -> int:
    """``salm-mtp make-demo-data``: the command line of ``make_demo_data``."""
    args = parse_options(DemoDataOptions, argv, prog="salm-mtp make-demo-data", description=DESCRIPTION)
    make_demo_data(out=args.out, num_train=args.num_train, num_dev=args.num_dev, num_test=args.num_test,
                   seed=args.seed, workers=args.workers, force=args.force, num_unseen_voice=args.num_unseen_voice,
                   synthetic=True if args.synthetic else None, progress=not args.no_progress)
    if args.mix:
        for name, path in make_mix_data(args.out, seed=args.seed).items():
            print(f"{name}: {sum(1 for _ in open(path))} lines -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
