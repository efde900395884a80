"""What the demo corpus says and who says it: the 39-word grammar (number sequences and short sentences), the
seeded plan of each split's utterances (held-out splits drawn first, train redrawing their texts; the held-out
voices only in test_unseen_voice), and each cut's evaluation groups. Pure Python: no audio (salm_mtp/demo/corpus.py
speaks the plan)."""

from __future__ import annotations

import random
from dataclasses import dataclass



FORMAT_VERSION = 2
"""Bump when the generated content changes, so old corpora are regenerated, not reused."""
SAMPLE_RATE = 16_000
MIN_SECONDS, MAX_SECONDS = 0.5, 4.0
AST_FRACTION = 0.15
"""Share of ``ast`` utterances; the rest are ``asr``."""
NUMBER_FRACTION_OF_ASR = 0.4
"""Share of number sequences among ``asr`` utterances; the rest are sentences."""
SPLITS = ("train", "dev", "test", "test_unseen_voice")
HELD_OUT_SPLITS = ("dev", "test", "test_unseen_voice")
"""Drawn before train; train never repeats one of their texts."""
KINDS = ("numbers", "svo", "sv", "copula")
"""Utterance kinds: number words, subject-verb-object, subject-verb, "X is (very) Y" sentences."""

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DETERMINERS = ("the", "a")
_ADJECTIVES = ("red", "big", "small", "old", "green", "happy")
_NOUNS = ("cat", "dog", "bird", "man", "girl", "boy", "car", "tree", "fish", "house")
_TRANSITIVE = ("sees", "likes", "finds", "wants", "has")
_INTRANSITIVE = ("runs", "sleeps", "sings", "jumps")
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(NUMBER_WORDS + _DETERMINERS + _ADJECTIVES + _NOUNS + _TRANSITIVE + _INTRANSITIVE)
        | {"is", "very"}
    )
)

VOICES = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
    "en-029", "en-us-nyc",
)  # fmt: skip
VARIANTS = ("", "+m1", "+m3", "+m7", "+f1", "+f2", "+f3", "+f4")
"""espeak-ng voice variants ("" = the voice's default)."""
HELD_OUT_BASE_VOICE = "en-us-nyc"
HELD_OUT_VARIANT = "+f4"
SEEN_VOICES: tuple[str, ...] = tuple(
    b + v for b in VOICES for v in VARIANTS if b != HELD_OUT_BASE_VOICE and v != HELD_OUT_VARIANT
)
"""The 49 voices of train, dev and test."""
UNSEEN_VOICES: tuple[str, ...] = tuple(
    b + v for b in VOICES for v in VARIANTS if b == HELD_OUT_BASE_VOICE or v == HELD_OUT_VARIANT
)
"""The 15 voices heard only in test_unseen_voice (every variant of the held-out base, the held-out variant of every
other base)."""
RATES = (140, 190)
"""espeak-ng speaking rate range, words per minute (keeps 6-word clips under 4 s)."""
PITCHES = (30, 70)
"""espeak-ng pitch range (0-99)."""


def words_to_digits(text: str) -> str:
    """The demo "translation": number words to digits, ``"three seven nine" -> "3 7 9"``."""
    return " ".join(str(NUMBER_WORDS.index(w)) for w in text.split())


@dataclass(frozen=True)
class Utterance:
    """What to synthesise for one clip (fully determined by the seed, split and index)."""

    id: str
    task: str
    text: str
    voice: str
    rate: int
    pitch: int
    kind: str = "numbers"

    @property
    def target_text(self) -> str | None:
        return words_to_digits(self.text) if self.task == "ast" else None


def _numbers(rng: random.Random) -> str:
    return " ".join(rng.choice(NUMBER_WORDS) for _ in range(rng.randint(2, 6)))


def _noun_phrase(rng: random.Random) -> list[str]:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES))
    return words + [rng.choice(_NOUNS)]


def _sentence(rng: random.Random) -> tuple[str, str]:
    """(kind, text) of one grammar sentence."""
    kind = rng.randrange(3)
    if kind == 0:  # the red cat sees a big dog
        words = _noun_phrase(rng) + [rng.choice(_TRANSITIVE)] + _noun_phrase(rng)
    elif kind == 1:  # a dog runs
        words = _noun_phrase(rng) + [rng.choice(_INTRANSITIVE)]
    else:  # the old man is very happy
        adj = ["very"] if rng.random() < 0.3 else []
        words = _noun_phrase(rng) + ["is"] + adj + [rng.choice(_ADJECTIVES)]
    return ("svo", "sv", "copula")[kind], " ".join(words)


_MAX_REDRAWS = 10_000


def plan_split(
    split: str, num: int, seed: int, exclude: frozenset[str] = frozenset(), voices: tuple[str, ...] = SEEN_VOICES
) -> list[Utterance]:
    """The utterances of one split: tasks, texts and voices drawn from a seeded RNG.

    Args:
        split: split name (part of the RNG seed and of the ids).
        num: utterances.
        seed: corpus seed.
        exclude: texts this split must not use (train excludes the held-out splits' texts); a drawn text in
            it is redrawn (same task and kind of draw), so the split stays a prefix-stable function of its seed.
        voices: the voices to draw from.
    """
    rng = random.Random(f"salm-mtp-demo/{seed}/{split}")
    utts = []
    for i in range(num):
        task = "ast" if rng.random() < AST_FRACTION else "asr"
        numbers = task == "ast" or rng.random() < NUMBER_FRACTION_OF_ASR
        for _ in range(_MAX_REDRAWS):
            kind, text = ("numbers", _numbers(rng)) if numbers else _sentence(rng)
            if text not in exclude:
                break
        else:
            raise RuntimeError(f"plan_split({split!r}): {_MAX_REDRAWS} draws all in the excluded texts")
        voice = rng.choice(voices)
        utts.append(
            Utterance(
                id=f"{split}-{i:06d}",
                task=task,
                text=text,
                voice=voice,
                rate=rng.randint(*RATES),
                pitch=rng.randint(*PITCHES),
                kind=kind,
            )
        )
    return utts


def plan_corpus(sizes: dict[str, int], seed: int) -> dict[str, list[Utterance]]:
    """Every split of the corpus, held-out splits first (``HELD_OUT_SPLITS``), then train without their texts."""
    plans = {}
    for split in HELD_OUT_SPLITS:
        voices = UNSEEN_VOICES if split == "test_unseen_voice" else SEEN_VOICES
        plans[split] = plan_split(split, sizes[split], seed, voices=voices)
    held_out = frozenset(u.text for s in HELD_OUT_SPLITS for u in plans[s])
    plans["train"] = plan_split("train", sizes["train"], seed, exclude=held_out)
    return {s: plans[s] for s in SPLITS}


def groups_of(utt: Utterance, train_texts: set[str], train_voices: set[str]) -> dict[str, str]:
    """The evaluation groups of one utterance, against what train holds."""
    return {
        "text": "seen" if utt.text in train_texts else "unseen",
        "voice": "seen" if utt.voice in train_voices else "unseen",
        "kind": utt.kind,
    }
