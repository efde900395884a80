"""Named data sources (``data.inputs`` / ``data.val_inputs``), their weighted mix, and the LLM-position budget.

    inputs:
      - {name: asr,  type: cuts,          path: data/demo/train_cuts.jsonl.gz, weight: 0.6}
      - {name: chat, type: text,          path: data/demo/text_train.jsonl,     weight: 0.2}
      - {name: talk, type: conversations, paths: [a.jsonl, b.jsonl],           weight: 0.2, loss_turns: last}

Types: ``cuts`` (lhotse CutSet manifests, as ``data.train_manifest``), ``conversations`` (NeMo multimodal
conversation JSONL) and ``text`` (the same JSONL without audio, or ``{"messages": [...]}`` chat lines); formats
in data/README.md, reader in salm_mtp.data.conversation.

Mixing (two or more training sources): each source is an endless stream of shuffled passes (pass p of source i
shuffled from ``(seed, i, p)`` in a ``SHUFFLE_BUFFER`` window), and ``CutSet.mux`` draws the source of every next
example with probability weight / sum(weights) from its own ``Random(seed)``; the stream has no end, so training
is bounded by ``trainer.max_steps`` and validation by an integer ``trainer.val_check_interval``. Everything is a
function of ``data.seed``, so the resumable loader's skip of ``batches_done`` batches (salm_mtp.data.datamodule)
lands exactly where the interrupted run was. The mixed stream is batched in its own order: length buckets (lhotse's
``DynamicBucketingSampler``) hold a backlog that skews the shares for hundreds of steps (measured: 0.80 instead of
0.70 over 120 batches). One source is read in finite epochs, as ``train_manifest`` is.

Token budget (``data.max_tokens``, ``BudgetSampler``): every example measures its LLM positions (text tokens,
placeholders excluded, plus ``ceil(seconds * positions_per_second) + 1`` per audio clip, an upper bound of what the
encoder and adapter produce) and a batch of b examples whose longest measures L satisfies ``b * L <= max_tokens``:
the padded (B, T') the LLM runs on, so text-only, spoken and conversation rows share one budget. Examples longer
than the budget are bad cuts (too_long_sequence). Batches are formed in stream order (no length buckets).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from lhotse import CutSet
from lhotse.dataset.sampling.base import CutSampler

from salm_mtp.data.conversation import (
    LOSS_TURNS, ConversationCuts, conversation_of, is_conversation, turn_examples,
)
from salm_mtp.data.manifest import json_line, load_cuts, open_maybe_gzipped
from salm_mtp.data.policy import BadCut
from salm_mtp.errors import MissingInputError, SalmError, config_error

SOURCE_TYPES = ("cuts", "conversations", "text")
SHUFFLE_BUFFER = 2000
"""Examples held by each source's shuffling window (memory: metadata only)."""
POSITIONS_KEY = "salm_positions"
"""Cut custom field holding the example's LLM positions (set before sampling)."""
SOURCE_KEY = "salm_source"
"""Cut custom field holding the index of the training source in data.inputs."""


@dataclass
class InputConfig:
    """One named data source of ``data.inputs`` (training) or ``data.val_inputs`` (validation)."""

    name: str
    """Source name: metrics are logged as loss/<name>, mtp_loss/<name> (training) and val_loss/<name>."""
    type: str = "cuts"
    """cuts (lhotse CutSet manifest), conversations (NeMo multimodal conversation JSONL) or text (text-only
    conversations: NeMo JSONL without audio, or {"messages": [{role, content}]} lines)."""
    path: str | None = None
    """The manifest (or set ``paths``)."""
    paths: list[str] | None = None
    """Several manifests of this source, read one after the other."""
    weight: float = 1.0
    """Mixing weight: the share of training examples drawn from this source is weight / sum(weights)."""
    system_prompt: str | None = None
    """conversations / text: a system message put first in every conversation (a line's own one wins)."""
    loss_turns: str = "all"
    """conversations / text: loss on every assistant turn (all) or only on the last one (last)."""

    def __post_init__(self) -> None:
        key = f"data.inputs[{self.name!r}]"
        if isinstance(self.name, bool):
            raise config_error("data.inputs", f"a source name was read as the boolean {self.name} (YAML reads off, "
                               "no, yes, on, true, false as booleans)", 'quote it, e.g. name: "off"')
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise config_error("data.inputs", f"each source needs a name without '/', got {self.name!r}",
                               "give every entry a name, e.g. {name: asr, type: cuts, path: ...}")
        for field_name, ok, want in (("type", isinstance(self.type, str), "a string"),
                                     ("path", self.path is None or isinstance(self.path, str), "a file path"),
                                     ("paths", self.paths is None or (isinstance(self.paths, (list, tuple)) and all(
                                         isinstance(p, str) for p in self.paths)), "a list of file paths"),
                                     ("weight", isinstance(self.weight, (int, float)) and not isinstance(
                                         self.weight, bool), "a number"),
                                     ("system_prompt", self.system_prompt is None or isinstance(self.system_prompt, str),
                                      "a string"),
                                     ("loss_turns", isinstance(self.loss_turns, str), "a string")):
            if not ok:
                raise config_error(f"{key}.{field_name}", f"must be {want}, got {getattr(self, field_name)!r}",
                                   f"fix {field_name} in this data.inputs entry")
        if self.type not in SOURCE_TYPES:
            raise config_error(f"{key}.type", f"must be one of {', '.join(SOURCE_TYPES)}, got {self.type!r}",
                               "see data/README.md for what each type reads")
        if (self.path is None) == (not self.paths):
            raise config_error(key, "set exactly one of path and paths", "give one file as path or a list as paths")
        if not (self.weight > 0 and math.isfinite(self.weight)):  # (a number: checked above)
            raise config_error(f"{key}.weight", f"must be a finite number > 0, got {self.weight}",
                               "give each source a positive share, e.g. weight: 0.5")
        if self.loss_turns not in LOSS_TURNS:
            raise config_error(f"{key}.loss_turns", f"must be one of {', '.join(LOSS_TURNS)}, got {self.loss_turns!r}")
        if self.type == "cuts" and (self.system_prompt is not None or self.loss_turns != "all"):
            raise config_error(key, "system_prompt and loss_turns apply to conversations / text sources only",
                               "remove them from this cuts source")
        for p in self.files():
            if not Path(p).is_file():
                raise MissingInputError(f"{key}: no such file {p!r}; fix its path (formats: data/README.md; the "
                                        "demo's talk_*/text_* sets: `salm-mtp make-demo-data --out data/demo --mix`)")

    def files(self) -> list[str]:
        return [self.path] if self.path is not None else list(self.paths or [])


def detect_source_type(path: str) -> str:
    """The ``data.inputs`` type of a manifest from its first non-empty line: an object with ``conversations``
    (NeMo multimodal conversations) -> "conversations", with ``messages`` -> "text", anything else -> "cuts" (a
    lhotse CutSet manifest; its reader reports what is wrong with it). Gzipped files are read too."""
    with open_maybe_gzipped(path) as f:
        for lineno, raw in enumerate(f, start=1):
            first = json_line(raw, path, lineno)  # a JSON array raises here, naming the file
            if first is None:
                continue
            if isinstance(first, dict) and "conversations" in first:
                return "conversations"
            if isinstance(first, dict) and "messages" in first:
                return "text"
            return "cuts"
    return "cuts"


def _input_config(item, key: str) -> InputConfig:
    """An InputConfig from one YAML entry; ConfigError for an entry that is not a mapping or has unknown keys."""
    known = [f.name for f in fields(InputConfig)]
    if not isinstance(item, dict):
        raise config_error(key, f"each entry must be a mapping such as {{name: asr, type: cuts, path: FILE}}, got "
                           f"{item!r}", f"the keys are {', '.join(known)}")
    unknown = sorted(map(str, set(item) - set(known)))
    if unknown or "name" not in item:
        name = item.get("name", "?")
        problem = f"unknown keys {unknown}" if unknown else "no name"
        raise config_error(f"{key}[{name!r}]", problem, f"the keys are {', '.join(known)}")
    return InputConfig(**item)


def as_inputs(items: Iterable[InputConfig | dict] | None, key: str = "data.inputs") -> list[InputConfig]:
    """Dicts (YAML, tests) become InputConfig; names must be unique."""
    out = [i if isinstance(i, InputConfig) else _input_config(i, key) for i in (items or [])]
    names = [i.name for i in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise config_error(key, f"source names must be unique, repeated: {dup}",
                           "rename them (names key the logged source/<name>/* metrics)")
    return out


def _tag(cut, index: int):
    return cut.with_custom(SOURCE_KEY, index)


def source_cuts(spec: InputConfig, index: int | None, on_bad_line: Callable[[BadCut], None]) -> CutSet:
    """The lazy, re-iterable examples of one source (conversations become recording-less cuts), each tagged
    with ``index`` (None: untagged) in ``custom["salm_source"]``."""
    parts = []
    for path in spec.files():
        if spec.type == "cuts":
            cuts = load_cuts(path, on_bad_line)
            parts.append(cuts.map(functools.partial(_tag, index=index)) if index is not None else cuts)
        else:
            kind = "text" if spec.type == "text" else "conversation"
            parts.append(CutSet(ConversationCuts(path, kind, spec.system_prompt, spec.loss_turns, index,
                                                 on_bad_line)))
    return parts[0] if len(parts) == 1 else CutSet.from_cuts(_Chain(parts))


class _Chain:
    """Re-iterable concatenation of lazy CutSets."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def __iter__(self) -> Iterator:
        for part in self.parts:
            yield from part


class PerTurn:
    """Conversations expanded to one example per assistant turn (``turn_examples``); other cuts as they are."""

    def __init__(self, cuts: Iterable) -> None:
        self.cuts = cuts

    def __iter__(self) -> Iterator:
        for cut in self.cuts:
            if is_conversation(cut):
                yield from (c.to_cut(cut.custom.get(SOURCE_KEY)) for c in turn_examples(conversation_of(cut)))
            else:
                yield cut


class Prepared:
    """The usable examples of ``cuts``: bad ones go to ``on_bad`` (policy) and are left out, the others get
    their LLM positions in ``custom["salm_positions"]`` (what the token budget measures)."""

    def __init__(self, cuts: Iterable, check: Callable, measure: Callable | None, on_bad: Callable,
                 skip: Callable[[object], bool] = lambda cut: False) -> None:
        self.cuts, self.check, self.measure, self.on_bad, self.skip = cuts, check, measure, on_bad, skip

    def __iter__(self) -> Iterator:
        for cut in self.cuts:
            if self.skip(cut):
                continue
            bad = self.check(cut)
            if bad is not None:
                self.on_bad(bad)
                continue
            yield cut.with_custom(POSITIONS_KEY, self.measure(cut)) if self.measure is not None else cut


def _shuffled(items: Iterable, rng: random.Random, size: int) -> Iterator:
    """Buffer shuffle: hold ``size`` items, yield a random one as each new one arrives."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class Endless:
    """Endless shuffled passes over a lazy source: pass p is shuffled from ``(seed, name, p)``, so every
    iteration yields the same sequence. A pass with no usable example stops the run (it would spin forever)."""

    def __init__(self, cuts: Iterable, seed: int, name: str, shuffle: bool = True,
                 buffer_size: int = SHUFFLE_BUFFER, why_empty: Callable[[], str] | None = None) -> None:
        """``why_empty``: the one line that says why the source has no usable example (the data module's
        precheck counts); default a generic one."""
        self.cuts, self.seed, self.name, self.shuffle, self.buffer_size = cuts, seed, name, shuffle, buffer_size
        self.why_empty = why_empty

    def __iter__(self) -> Iterator:
        p = 0
        while True:
            items = iter(self.cuts)
            if self.shuffle:
                items = _shuffled(items, random.Random(f"{self.seed}/{self.name}/{p}"), self.buffer_size)
            n = 0
            for cut in items:
                n += 1
                yield cut
            if n == 0:
                raise SalmError(self.why_empty() if self.why_empty is not None else
                                f"data.inputs[{self.name!r}] holds no usable example (all lines bad or the files "
                                "empty): fix its files or remove it")
            p += 1


def mix(streams: list[Iterable], weights: list[float], seed: int) -> CutSet:
    """One lazy CutSet drawing each next example from stream i with probability weights[i] / sum(weights)
    (lhotse's ``CutSet.mux``, seeded: the same sequence on every iteration)."""
    if len(streams) == 1:
        return CutSet(streams[0])
    total = float(sum(weights))
    return CutSet.mux(*[CutSet(s) for s in streams], weights=[w / total for w in weights], seed=seed)


def deal_by_source(window: list, num_batches: int, fits: Callable[[list], bool]) -> list[list]:
    """Batches of ``window`` that each carry every source in proportion (``custom["salm_source"]``).

    Each source's examples are sorted by length and split into ``k`` consecutive slices of near-equal size; batch
    i is slice i of every source. ``k`` starts at ``num_batches`` (what length bucketing of the whole window gives)
    and grows until every batch ``fits`` the budget. Every example lands in exactly one batch.
    """
    by_source: dict = {}
    for cut in window:
        by_source.setdefault(cut.custom.get(SOURCE_KEY), []).append(cut)
    groups = [sorted(g, key=lambda c: c.custom[POSITIONS_KEY]) for _, g in sorted(by_source.items(), key=str)]
    k = max(1, num_batches)
    while True:
        batches = [[c for g in groups for c in g[i * len(g) // k:(i + 1) * len(g) // k]] for i in range(k)]
        batches = [b for b in batches if b]
        if all(fits(b) for b in batches) or k >= len(window):
            return batches
        k += 1


class BudgetSampler(CutSampler):
    """A lhotse sampler whose batches never exceed ``max_tokens`` LLM positions: b examples whose longest has L
    positions (``custom["salm_positions"]``) fit when ``b * L <= max_tokens`` (the padded (B, T') the LLM runs on).

    lhotse's own token constraint is soft (the batch keeps the example that crossed the limit), so this one looks
    at each example before taking it and holds it over for the next batch. Examples come in the stream's order
    (``shuffle``: a ``SHUFFLE_BUFFER`` window shuffled from ``(seed, epoch)``); data-parallel ranks take turns
    through lhotse's ``CutSampler`` (every rank reads the same stream, rank r keeps batch r of each group).

    ``bucket_window`` > 0: each run of that many consecutive examples is sorted by positions, cut into batches the
    same way, and its batches are served in an order shuffled from ``(seed, epoch, window)``: examples of similar
    length share a batch (little padding), the stream's source mix holds per window, and every iteration yields the
    same batches (resumable by counting batches, as before). ``mix_in_batch`` (with examples of two or more
    sources in a window): each source's examples are sorted by length on their own and dealt across the window's
    batches in slices proportional to the source's share (``deal_by_source``), so every batch carries every source
    in proportion instead of one length class.
    """

    def __init__(self, cuts: Iterable, max_tokens: int, max_cuts: int | None = None, shuffle: bool = False,
                 seed: int = 0, world_size: int | None = None, rank: int | None = None,
                 bucket_window: int = 0, mix_in_batch: bool = False) -> None:
        super().__init__(shuffle=shuffle, drop_last=False, world_size=world_size, rank=rank, seed=seed)
        self.cuts, self.max_tokens, self.max_cuts, self.bucket_window = cuts, max_tokens, max_cuts, bucket_window
        self.mix_in_batch = mix_in_batch
        self._iter: Iterator | None = None
        self._held = None
        self._ready: list[list] = []
        self._window = 0

    def __iter__(self) -> BudgetSampler:
        self.diagnostics.reset_current_epoch()
        items = iter(self.cuts)
        if self.shuffle:
            items = _shuffled(items, random.Random(f"{self.seed}/{self.epoch}"), SHUFFLE_BUFFER)
        self._iter, self._held = (c for c in items if self._filter_fn(c)), None
        self._ready, self._window = [], 0
        return self

    def _pack(self, cuts: Iterator) -> list:
        """The next batch of ``cuts`` in their order: as many as fit (``_held`` keeps the first that did not)."""
        batch, longest = [], 0
        while True:
            cut, self._held = (self._held, None) if self._held is not None else (next(cuts, None), None)
            if cut is None:
                break
            n = cut.custom[POSITIONS_KEY]
            full = self.max_cuts is not None and len(batch) >= self.max_cuts
            if batch and (full or (len(batch) + 1) * max(longest, n) > self.max_tokens):
                self._held = cut
                break
            batch.append(cut)
            longest = max(longest, n)
        return batch

    def _pack_all(self, cuts: list) -> list[list]:
        """``cuts`` cut into consecutive budgeted batches (``_pack``)."""
        out, rest = [], iter(cuts)
        while True:
            b = self._pack(rest)
            if not b:
                return out
            out.append(b)

    def _fits(self, batch: list) -> bool:
        """Whether ``batch`` is within the budget (one example always is)."""
        if len(batch) <= 1:
            return True
        if self.max_cuts is not None and len(batch) > self.max_cuts:
            return False
        return len(batch) * max(c.custom[POSITIONS_KEY] for c in batch) <= self.max_tokens

    def _next_batch(self) -> CutSet:
        if self.bucket_window <= 0:
            batch = self._pack(self._iter)
        else:
            if not self._ready:
                window = list(itertools.islice(self._iter, self.bucket_window))
                window.sort(key=lambda c: c.custom[POSITIONS_KEY])  # stable: ties keep the stream order
                self._ready = self._pack_all(window)
                if self.mix_in_batch and len({c.custom.get(SOURCE_KEY) for c in window}) > 1:
                    self._ready = deal_by_source(window, len(self._ready), self._fits)
                random.Random(f"{self.seed}/{self.epoch}/{self._window}").shuffle(self._ready)
                self._window += 1
            batch = self._ready.pop() if self._ready else []
        if not batch:
            raise StopIteration()
        return CutSet.from_cuts(batch)

    @property
    def remaining_duration(self) -> float | None:
        return None

    @property
    def remaining_cuts(self) -> int | None:
        return None

    @property
    def num_cuts(self) -> int | None:
        return None
