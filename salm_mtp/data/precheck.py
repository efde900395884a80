"""The check of every train and val set before training (``SALMDataModule.precheck``): manifest lines, durations,
text and audio headers of each cut, once. Bad cuts go to the policy (salm_mtp/data/policy.py), their ids are kept so
the loaders leave them out without checking again, and each set's counts say, in one line, why it holds no usable
example when that is so (the reason, the example that missed its limit by the least, the key to change)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from salm_mtp.data.policy import BadCut, why_unusable

log = logging.getLogger(__name__)


@dataclass
class SetTally:
    """What the check found in one set."""

    checked: int = 0
    """Cuts read."""
    reasons: Counter = field(default_factory=Counter)
    """Bad cuts per reason."""
    least: dict[str, BadCut] = field(default_factory=dict)
    """Per reason, the bad cut whose measure (``BadCut.amount``) is the smallest: the smallest change that fixes it."""

    def add(self, bad: BadCut) -> None:
        self.reasons[bad.reason] += 1
        prev = self.least.get(bad.reason)
        if prev is None or (bad.amount or 0) < (prev.amount or 0):
            self.least[bad.reason] = bad


class Precheck:
    """The check's results for a data module: ``run`` once, then ``skips`` (known bad) and ``why_unusable``."""

    def __init__(self) -> None:
        self.done = False
        self.bad_ids: set[tuple[str, str]] = set()  # (set key, cut id)
        self.tallies: dict[str, SetTally] = {}

    def run(self, check: Callable[[object], BadCut | None], sets: Iterable[tuple[str, str, Iterable]],
            on_bad: Callable[[BadCut], None]) -> None:
        """``check`` every cut of each (set key, config key, cuts) once; bad ones go to ``on_bad``."""
        if self.done:
            return
        self.done = True
        for key, what, cuts in sets:
            tally = self.tallies[key] = SetTally()
            for cut in cuts:
                tally.checked += 1
                found = check(cut)
                if found is not None:
                    on_bad(found)
                    self.bad_ids.add((key, cut.id))
                    tally.add(found)
            log.info("%s: %d cuts checked, %d bad", what, tally.checked, sum(tally.reasons.values()))

    def skips(self, key: str, cut) -> bool:
        """Whether the check found ``cut`` of set ``key`` bad."""
        return (key, cut.id) in self.bad_ids

    def why_unusable(self, key: str, name: str, fallback: str) -> str:
        """One line: why set ``key`` (``name``: its config key and files) holds no usable example; ``fallback`` (the
        run's skip counts) when it was not checked."""
        tally = self.tallies.get(key)
        if tally is None:
            return (f"{name} holds no usable example ({fallback}); `salm-mtp validate-data FILE` says what is wrong "
                    "with each")
        return why_unusable(name, tally.checked, tally.reasons, tally.least)
