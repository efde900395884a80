"""salm_mtp/data/precheck.py: the check before training keeps each set's bad ids and counts, and says why a set
has no usable example."""

from __future__ import annotations

from types import SimpleNamespace

from salm_mtp.data.policy import BadCut
from salm_mtp.data.precheck import Precheck


def _too_long(cid: str, n: int) -> BadCut:
    return BadCut(cid, "too_long_sequence", f"{n} LLM positions (text tokens + audio positions) > data.max_tokens=8",
                  "m.jsonl", 1, n, "data.max_tokens")


def test_precheck_counts_each_set_once_and_names_the_smallest_fix():
    cuts = [SimpleNamespace(id=f"c{i}", n=n) for i, n in enumerate([30, 12, 50])]
    seen = []
    pre = Precheck()
    pre.run(lambda c: _too_long(c.id, c.n) if c.n > 8 else None, [("train", "data.train_manifest", cuts)], seen.append)
    pre.run(lambda c: None, [("train", "data.train_manifest", cuts)], seen.append)  # once only
    assert [b.cut_id for b in seen] == ["c0", "c1", "c2"]
    assert pre.skips("train", cuts[1]) and not pre.skips("val", cuts[1])
    assert pre.why_unusable("train", "data.train_manifest 'm.jsonl'", "unused") == (
        "data.train_manifest 'm.jsonl': all 3 examples are too_long_sequence: the smallest needs 12 LLM positions "
        "(text tokens + audio positions) > data.max_tokens=8; raise --data.max_tokens to at least 12")
    assert pre.why_unusable("val", "data.val_manifest 'v'", "skipped cuts: 0") == (
        "data.val_manifest 'v' holds no usable example (skipped cuts: 0); `salm-mtp validate-data FILE` says what is "
        "wrong with each")
