"""Bad-cut policy: what makes a cut unusable, and what happens to it (``data.on_bad_cut: skip | raise``).

A cut is bad for one of these reasons (the names are the metric suffixes ``skipped_cuts/<reason>``)::

    manifest_not_utf8 / manifest_not_json / manifest_not_a_cut   a manifest line that is not a cut
    no_supervision            the cut has no supervision (no transcript)
    bad_task                  unknown supervision.custom["task"], or ast without target_text
    empty_text                the answer (transcript / target_text) is empty or only whitespace
    too_many_target_tokens    the answer is longer than data.max_target_tokens tokens
    too_long_sequence         prompt + audio positions + answer exceed data.max_seq_len (or data.max_tokens: one
                              batch could not hold it)
    too_long_audio            the cut is longer than data.max_cut_duration, or than data.max_duration
                              (one batch could not hold it)
    unreadable_audio          the audio file is missing or cannot be decoded
    empty_audio               the audio holds no samples
    duration_mismatch         the file holds fewer/more samples than the manifest declares
    bad_conversation          a conversation / text line that is not usable: unknown ``from`` or ``type``, audio
                              without a duration, no final assistant turn, ... (salm_mtp.data.conversation)

skip: the cut is left out; its id, file and reason are logged once (a warning), counted per reason and
appended to ``skipped_cuts.jsonl`` in the run directory (``SkipLog``). raise: ``BadCutError`` (a
``SalmError``) names the cut, the file and the reason. The checks themselves are salm_mtp.data.checks.CutChecker's; text, duration and audio-header checks run
before training over the train and val manifests (``SALMDataModule.precheck``); decoding errors can
only show when a cut is loaded (``SALMDataset``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from salm_mtp.errors import SalmError

log = logging.getLogger(__name__)

POLICIES = ("skip", "raise")
REASONS = (
    "manifest_not_utf8", "manifest_not_json", "manifest_not_a_cut", "no_supervision", "bad_task", "empty_text",
    "too_many_target_tokens", "too_long_sequence", "too_long_audio", "unreadable_audio", "empty_audio",
    "duration_mismatch", "bad_conversation",
)


class BadCutError(SalmError):
    """A bad cut under ``data.on_bad_cut=raise`` (or a manifest that cannot be read at all)."""


@dataclass(frozen=True)
class BadCut:
    """One bad cut (or manifest line): who, where, why."""

    cut_id: str | None
    """The cut's id; None for a manifest line that is not a cut."""
    reason: str
    """One of REASONS."""
    detail: str
    """What exactly is wrong (values included)."""
    file: str
    """The audio source of the cut, or the manifest of a bad line."""
    line: int | None = None
    """1-based manifest line of a bad line (or of the conversation / text line the example came from)."""
    amount: float | None = None
    """too_long_* / too_many_*: the measured value over the limit (LLM positions, tokens or seconds)."""
    limit: str | None = None
    """too_long_* / too_many_*: the key of the limit it exceeded (e.g. data.max_tokens)."""

    def __post_init__(self) -> None:
        assert self.reason in REASONS, self.reason

    @property
    def key(self) -> tuple:
        return (self.cut_id, self.reason, self.file, self.line)

    def message(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        who = f"cut {self.cut_id!r}" if self.cut_id is not None else "manifest line"
        return f"{who} ({where}): {self.reason}: {self.detail}"

    def error(self) -> BadCutError:
        return BadCutError(
            f"bad {self.message()}. data.on_bad_cut=raise stops here: fix or remove it (`salm-mtp validate-data "
            "MANIFEST` lists every bad cut), or set --data.on_bad_cut=skip to leave such cuts out (counted)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MAX_SKIP_LINES = 20
"""Skipped cuts printed one by one per run and process; the others are only counted (``skipped_cuts/<reason>``, the
run summary) and listed in ``skipped_cuts.jsonl``."""


class SkipLines:
    """``skipping <cut>`` log lines for the first MAX_SKIP_LINES skipped cuts, then one line saying the rest are
    counted and listed, not printed. One per SkipLog and per dataset (each loader worker counts its own)."""

    def __init__(self) -> None:
        self.printed = 0

    def __call__(self, bad: BadCut) -> None:
        self.printed += 1
        if self.printed <= MAX_SKIP_LINES:
            log.warning("skipping %s", bad.message())
        if self.printed == MAX_SKIP_LINES:
            log.warning("further skipped cuts are not printed: they are counted (skipped_cuts/<reason>, the summary "
                        "at the end) and listed in skipped_cuts.jsonl in the run directory")


FIXES = {
    "manifest_not_utf8": "fix the file (`salm-mtp validate-data FILE` lists every bad line)",
    "manifest_not_json": "fix the file (`salm-mtp validate-data FILE` lists every bad line)",
    "manifest_not_a_cut": "fix the file (`salm-mtp validate-data FILE` lists every bad line)",
    "no_supervision": "give each cut a supervision with its text",
    "bad_task": "set supervision.custom.task to asr or ast (ast needs target_text)",
    "empty_text": "give each cut a non-empty text",
    "unreadable_audio": "check the audio paths (relative paths are read from the manifest's directory)",
    "empty_audio": "replace the empty audio files",
    "duration_mismatch": "fix the durations (`salm-mtp validate-data FILE`)",
    "bad_conversation": "fix the lines (formats: data/README.md)",
}
"""What to do when every example of a source is bad for one reason (the limits' fixes are built from the key)."""


def why_unusable(name: str, checked: int, reasons: Counter, least: dict[str, BadCut]) -> str:
    """One line saying why ``name`` (a file or ``data.inputs`` source) holds no usable example, from what the
    checks found: ``checked`` examples read, ``reasons`` counted per reason, ``least`` the bad cut of each reason
    that missed its limit by the least (the one whose fix is the smallest change)."""
    if checked == 0:
        return (f"{name} holds no example: its file is empty or none of its lines is one; check it with "
                "`salm-mtp validate-data FILE`, or remove the source")
    if not reasons:
        return f"{name}: none of its {checked} examples could be loaded; see the skipped cuts above"
    (top, n), *rest = reasons.most_common()
    what = (f"all {checked} examples are {top}" if n == checked and not rest else
            "its examples are " + ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) + f" (of {checked})")
    bad = least.get(top)
    if bad is not None and bad.limit is not None:
        return (f"{name}: {what}: the smallest needs {bad.detail}; raise --{bad.limit} to at least "
                f"{bad.amount:g}")
    example = f" (e.g. {bad.message()})" if bad is not None else ""
    return f"{name}: {what}{example}; {FIXES.get(top, 'fix them')}"


def handle(bad: BadCut, policy: str, sink: SkipLog | None = None) -> None:
    """Apply ``policy`` to ``bad``: raise its BadCutError, or record it in ``sink`` (logged once)."""
    if policy == "raise":
        raise bad.error()
    if sink is not None:
        sink.record(bad)
    else:
        log.warning("skipping %s", bad.message())


class SkipLog:
    """The skipped cuts of a run: each logged once, counted per reason, appended to a jsonl file.

    Records made before ``set_path`` are written when it is called. ``counts`` is a Counter by reason.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lines = SkipLines()
        self.path: str | None = None
        self._seen: set[tuple] = set()
        self._pending: list[BadCut] = []

    def record(self, bad: BadCut, warn: bool = True) -> bool:
        """Count ``bad`` unless already seen (a cut is skipped again every epoch); True when new.
        ``warn=False``: the finder already logged it (SALMDataset, possibly in a worker)."""
        if bad.key in self._seen:
            return False
        self._seen.add(bad.key)
        self.counts[bad.reason] += 1
        if warn:
            self.lines(bad)
        self._pending.append(bad)
        self._flush()
        return True

    def set_path(self, path: str) -> None:
        """Write to ``path`` (created empty) from now on, pending records first."""
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "w").close()
        self._flush()

    def _flush(self) -> None:
        if self.path is None or not self._pending:
            return
        with open(self.path, "a") as f:
            for bad in self._pending:
                f.write(json.dumps(bad.to_json(), ensure_ascii=False) + "\n")
        self._pending.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: total and count per reason."""
        parts = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        where = f" (listed in {self.path})" if self.path else ""
        return f"skipped cuts: {self.total}" + (f" [{parts}]{where}" if self.total else "")


# ------------------------------------------------------------------------------------------ checks
def source_of(cut) -> str:
    """Where the cut's audio lives (a conversation's: its manifest), for messages."""
    custom = getattr(cut, "custom", None)
    if isinstance(custom, dict) and "salm" in custom:
        return str(custom["salm"].get("file", ""))
    try:
        return ", ".join(str(s.source) for s in cut.recording.sources)
    except AttributeError:
        return "<no recording>"
