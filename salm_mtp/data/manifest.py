"""Reading CutSet manifests line by line: a line that is not a cut is a bad cut naming file and line.

    cuts = load_cuts("data/demo/train_cuts.jsonl.gz")                      # bad lines raise BadCutError
    cuts = load_cuts(path, on_bad_line=lambda bad: handle(bad, "skip", skip_log))   # ... or are skipped

``parse_line(raw, path, lineno)`` turns one raw line (bytes) into a Cut or a ``BadCut``
(manifest_not_utf8 / manifest_not_json / manifest_not_a_cut); it never raises. The CutSet is lazy and
re-iterable (each epoch reads the file again), so memory does not grow with the manifest. Relative
audio paths resolve from the manifest's directory (the demo corpus stores them so).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from lhotse import CutSet
from lhotse.cut import Cut

from salm_mtp.data.policy import BadCut, BadCutError


def json_line(raw: bytes, path: str, lineno: int):
    """One JSON Lines line -> its value, a BadCut (not UTF-8, not JSON), or None for a blank line. A UTF-8 byte
    order mark on line 1 is dropped; a first line that opens a JSON array raises BadCutError for the whole file (it
    is not JSON Lines: every other line would be a bad line)."""
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        return BadCut(None, "manifest_not_utf8", f"not UTF-8 text ({e.reason} at byte {e.start})", path, lineno)
    if not text.strip():
        return None
    if lineno == 1 and text.lstrip().startswith("["):
        raise BadCutError(f"manifest {path!r} is a JSON array, not JSON Lines (one object per line); convert it, e.g. "
                          f"`jq -c '.[]' {path} > {Path(path).stem}.jsonl`")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        return BadCut(None, "manifest_not_json", f"not JSON ({str(e)[:120]})", path, lineno)


LINE_KEY = "salm_line"
"""``cut.custom`` key of [manifest path, 1-based line] of every cut read by ``load_cuts``: a bad cut found later (its
audio, its text) is reported at its line (salm_mtp.data.checks.located)."""


def parse_line(raw: bytes, path: str, lineno: int) -> Cut | BadCut | None:
    """One manifest line -> a Cut, a BadCut, or None for a blank line. Raises only for a file that is a JSON
    array (``json_line``)."""
    data = json_line(raw, path, lineno)
    if data is None or isinstance(data, BadCut):
        return data
    if not isinstance(data, dict):
        return BadCut(None, "manifest_not_a_cut", f"a JSON {type(data).__name__}, not an object", path, lineno)
    try:
        from lhotse.serialization import deserialize_item

        item = deserialize_item(data)
        if not isinstance(item, Cut):
            raise TypeError(f"a {type(item).__name__}, not a cut")
        _ = (item.id, item.duration, item.supervisions)  # fields every consumer reads
        if not isinstance(item.id, str) or not isinstance(item.duration, (int, float)):
            raise TypeError("id must be a string and duration a number")
    except Exception as e:  # noqa: BLE001 - any malformed object is a bad line, never a crash
        cid = data.get("id") if isinstance(data.get("id"), str) else None
        return BadCut(cid, "manifest_not_a_cut", f"not a lhotse cut ({type(e).__name__}: {str(e)[:160]})", path,
                      lineno)
    return item


def open_maybe_gzipped(path: str):
    """The file opened for binary reading, through gzip when it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _raise(bad: BadCut) -> None:
    raise bad.error()


class ManifestCuts:
    """Lazy, re-iterable cuts of one manifest; bad lines go to ``on_bad_line`` (default: raise)."""

    def __init__(self, path: str | Path, on_bad_line: Callable[[BadCut], None] | None = None) -> None:
        self.path = str(path)
        self.on_bad_line = on_bad_line or _raise

    def __iter__(self) -> Iterator[Cut]:
        try:
            f = open_maybe_gzipped(self.path)
        except OSError as e:
            raise BadCutError(f"cannot open the manifest {self.path!r}: {e.strerror or e}") from None
        with f:
            lineno = 0
            while True:
                try:
                    raw = f.readline()
                except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or corrupt .gz
                    raise BadCutError(
                        f"manifest {self.path}:{lineno + 1} is corrupt: nothing readable after line {lineno} "
                        f"({type(e).__name__}: {e}); re-create or re-download it") from None
                if not raw:
                    return
                lineno += 1
                item = parse_line(raw, self.path, lineno)
                if isinstance(item, BadCut):
                    self.on_bad_line(item)
                elif item is not None:
                    yield item.with_custom(LINE_KEY, [self.path, lineno])


def load_cuts(path: str | Path, on_bad_line: Callable[[BadCut], None] | None = None) -> CutSet:
    """Open a CutSet manifest lazily; relative audio paths resolve from the manifest's directory.

    Absolute paths are kept as they are (``Path(root) / "/abs"`` is ``"/abs"``).
    """
    root = Path(path).resolve().parent
    return CutSet(ManifestCuts(path, on_bad_line)).with_recording_path_prefix(root)
