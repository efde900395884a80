"""Spoken multi-turn conversations and text-only chats for the demo (``data.inputs`` types conversations / text).

    make_mix_data("data/demo")          # after make_demo_data("data/demo"): reuses its clips, no new audio
    salm-mtp make-demo-data --out data/demo --mix

Writes, next to the demo corpus (formats: data/README.md)::

    talk_{train,dev,test}.jsonl   NeMo multimodal conversations over the split's clips, three turns each:
        User "Transcribe the audio." + clip A          -> Assistant: A's transcript
        User "And this one?" + clip B                  -> Assistant: B's transcript
          (or "Translate the audio to digits." + clip B -> Assistant: B in digits, when B is a number sequence)
        User "How many words were in the first clip?"  -> Assistant: the count as a number word
    text_{train,dev,test}.jsonl   {"messages": [...]} chats with no audio, on the demo vocabulary:
        "Write in digits: three seven" -> "3 7", "Write in words: 3 7" -> "three seven",
        "What comes after five?" -> "six", "Repeat after me: the red cat runs" -> itself,
        and two-turn "Count the words: ..." -> "four" / "And in: ..." -> "three".

Everything is a function of ``seed`` (sorted clip ids, seeded RNGs), so the same corpus and seed give
byte-identical files. Audio paths are relative to ``out`` (the clips of ``corpus``).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from salm_mtp.demo.texts import NUMBER_WORDS, plan_split, words_to_digits
from salm_mtp.data.manifest import load_cuts

TALK_COUNTS = {"train": 800, "dev": 40, "test": 60}
"""Spoken conversations per split."""
TEXT_COUNTS = {"train": 2000, "dev": 100, "test": 100}
"""Text-only chats per split."""


def _is_numbers(text: str) -> bool:
    return all(w in NUMBER_WORDS for w in text.split())


def _count_word(text: str) -> str:
    n = len(text.split())
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def talk_lines(clips: list[tuple[str, float, str]], num: int, rng: random.Random) -> list[dict]:
    """``num`` conversations over ``clips`` = [(audio path, seconds, transcript)] (two distinct clips each)."""
    out = []
    for i in range(num):
        (pa, da, ta), (pb, db, tb) = rng.sample(clips, 2)
        translate = _is_numbers(tb) and rng.random() < 0.5
        turns = [
            {"from": "User", "type": "text", "value": "Transcribe the audio."},
            {"from": "User", "type": "audio", "value": pa, "duration": round(da, 4)},
            {"from": "Assistant", "type": "text", "value": ta},
            {"from": "User", "type": "text", "value": "Translate the audio to digits." if translate else "And this one?"},
            {"from": "User", "type": "audio", "value": pb, "duration": round(db, 4)},
            {"from": "Assistant", "type": "text", "value": words_to_digits(tb) if translate else tb},
            {"from": "User", "type": "text", "value": "How many words were in the first clip?"},
            {"from": "Assistant", "type": "text", "value": _count_word(ta)},
        ]
        out.append({"id": f"talk-{i:06d}", "conversations": turns})
    return out


def text_lines(texts: list[str], num: int, rng: random.Random) -> list[dict]:
    """``num`` text-only chats (``{"messages": ...}``) built from demo sentences and number sequences."""
    numbers = [t for t in texts if _is_numbers(t)]
    sentences = [t for t in texts if not _is_numbers(t)]
    out = []
    for i in range(num):
        kind = rng.randrange(5)
        if kind == 0:
            t = rng.choice(numbers)
            msgs = [("user", f"Write in digits: {t}"), ("assistant", words_to_digits(t))]
        elif kind == 1:
            t = rng.choice(numbers)
            msgs = [("user", f"Write in words: {words_to_digits(t)}"), ("assistant", t)]
        elif kind == 2:
            k = rng.randrange(len(NUMBER_WORDS) - 1)
            msgs = [("user", f"What comes after {NUMBER_WORDS[k]}?"), ("assistant", NUMBER_WORDS[k + 1])]
        elif kind == 3:
            t = rng.choice(sentences)
            msgs = [("user", f"Repeat after me: {t}"), ("assistant", t)]
        else:
            a, b = rng.choice(sentences), rng.choice(texts)
            msgs = [("user", f"Count the words: {a}"), ("assistant", _count_word(a)),
                    ("user", f"And in: {b}"), ("assistant", _count_word(b))]
        out.append({"id": f"text-{i:06d}", "messages": [{"role": r, "content": c} for r, c in msgs]})
    return out


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)


def make_mix_data(out: str | Path = "data/demo", corpus: str | Path | None = None, seed: int = 0,
                  talk_counts: dict[str, int] | None = None, text_counts: dict[str, int] | None = None
                  ) -> dict[str, str]:
    """Write talk_{split}.jsonl and text_{split}.jsonl under ``out`` from the demo corpus in ``corpus``
    (default ``out``: its {split}_cuts.jsonl.gz and audio/); returns {file name: path}."""
    out = Path(out)
    corpus = Path(corpus) if corpus is not None else out
    out.mkdir(parents=True, exist_ok=True)
    talk_counts = {**TALK_COUNTS, **(talk_counts or {})}
    text_counts = {**TEXT_COUNTS, **(text_counts or {})}
    written = {}
    for split in ("train", "dev", "test"):
        manifest = corpus / f"{split}_cuts.jsonl.gz"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: no demo corpus there; make it first (salm-mtp make-demo-data "
                                    f"--out {corpus})")
        clips = []
        for cut in sorted(load_cuts(manifest), key=lambda c: c.id):
            path = os.path.relpath(cut.recording.sources[0].source, out.resolve())
            clips.append((path, float(cut.duration), cut.supervisions[0].text))
        rng = random.Random(f"salm-mtp-demo-mix/{seed}/{split}")
        talk = out / f"talk_{split}.jsonl"
        _write(talk, talk_lines(clips, talk_counts[split], rng))
        texts = [u.text for u in plan_split(f"text-{split}", max(200, text_counts[split]), seed)]
        text = out / f"text_{split}.jsonl"
        _write(text, text_lines(texts, text_counts[split], rng))
        written[talk.name], written[text.name] = str(talk), str(text)
    return written
