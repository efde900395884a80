"""Conversations (multi-turn, spoken or text-only) read from JSONL and carried through lhotse as cuts.

Two line formats (one JSON object per line; data/README.md has examples)::

    NeMo multimodal conversation (data.inputs type "conversations", also "text" when no turn is audio)
      {"id": "conv-1", "conversations": [
          {"from": "User", "type": "text", "value": "Transcribe the audio."},
          {"from": "User", "type": "audio", "value": "audio/a.flac", "duration": 1.2, "offset": 0.0},
          {"from": "Assistant", "type": "text", "value": "three seven"}, ...]}
    chat messages (type "text")
      {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

``from`` is User or Assistant (any case); audio turns belong to the user, need ``duration`` (seconds, > 0) and
may give ``offset`` (seconds into the file); relative audio paths resolve from the manifest's directory. The last
turn must be the assistant's. Consecutive turns of one role are joined with a space into one message, an audio
turn becoming one ``<|audio|>`` placeholder there, so ``[User text, User audio, Assistant]`` encodes exactly
like a single-turn ASR cut (salm_mtp.data.prompt).

Each conversation becomes a recording-less ``MonoCut`` (``duration`` = its total audio seconds) whose
``custom["salm"]`` holds everything collation needs (``Conversation.to_custom``), so lhotse's samplers, ``mux``
and the resumable loader treat it like any cut. ``is_conversation(cut)`` tells them apart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lhotse.cut import MonoCut

from salm_mtp.data.manifest import json_line, open_maybe_gzipped
from salm_mtp.data.policy import BadCut, BadCutError
from salm_mtp.data.tokenizer import AUDIO_PLACEHOLDER

ROLES = {"user": "user", "assistant": "assistant"}
"""Accepted ``from`` values (lower-cased) of the NeMo format -> message role."""
LOSS_TURNS = ("all", "last")


@dataclass(frozen=True)
class Clip:
    """One audio turn: a file segment."""

    path: str
    """Audio file (absolute)."""
    duration: float
    """Seconds used."""
    offset: float = 0.0
    """Seconds into the file where the segment starts."""


@dataclass
class Conversation:
    """One parsed line: merged messages with one placeholder per clip, and the clips in reading order."""

    id: str
    messages: list[dict[str, str]]
    """``{"role", "content"}`` dicts (system first when set; then user/assistant alternating, ending with the
    assistant); user contents hold one ``<|audio|>`` per clip, in reading order."""
    clips: list[Clip] = field(default_factory=list)
    loss_turns: str = "all"
    """"all": loss on every assistant message; "last": only on the last one."""
    kind: str = "conversation"
    """"conversation" (may hold audio) or "text" (never does)."""
    file: str = ""
    """Manifest path, for messages."""
    line: int | None = None
    """1-based manifest line."""

    @property
    def duration(self) -> float:
        return float(sum(c.duration for c in self.clips))

    @property
    def answer(self) -> str:
        """The last assistant message (the reference of the last turn)."""
        return self.messages[-1]["content"]

    def to_custom(self) -> dict:
        d = asdict(self)
        d["clips"] = [asdict(c) for c in self.clips]
        return d

    @classmethod
    def from_custom(cls, d: dict) -> Conversation:
        return cls(**{**d, "clips": [Clip(**c) for c in d["clips"]]})

    def to_cut(self, source: int | None = None) -> MonoCut:
        custom = {"salm": self.to_custom()}
        if source is not None:
            custom["salm_source"] = source
        return MonoCut(id=self.id, start=0.0, duration=self.duration, channel=0, recording=None, custom=custom)


def is_conversation(cut) -> bool:
    """True for a cut made by ``Conversation.to_cut`` (conversation or text example)."""
    custom = getattr(cut, "custom", None)
    return isinstance(custom, dict) and "salm" in custom


def conversation_of(cut) -> Conversation:
    return Conversation.from_custom(cut.custom["salm"])


def turn_examples(conv: Conversation) -> list[Conversation]:
    """One example per assistant turn: the reference history up to it, that turn the only target (``prompt_len``
    of its encoding is where the turn starts: what an evaluator generates from). Ids get ``#<k>`` (k = 1, 2, ...);
    each keeps only the clips of its history."""
    out = []
    for end, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        messages = [dict(x) for x in conv.messages[: end + 1]]
        n_clips = sum(x["content"].count(AUDIO_PLACEHOLDER) for x in messages)
        out.append(Conversation(f"{conv.id}#{len(out) + 1}", messages, conv.clips[:n_clips], "last", conv.kind,
                                conv.file, conv.line))
    return out


def _bad(cid, detail: str, path: str, lineno: int) -> BadCut:
    return BadCut(cid, "bad_conversation", detail, path, lineno)


def _merge(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """(role, text) pieces -> messages, consecutive pieces of one role joined with a space."""
    out: list[dict[str, str]] = []
    for role, text in turns:
        if out and out[-1]["role"] == role:
            out[-1]["content"] += " " + text
        else:
            out.append({"role": role, "content": text})
    return out


def parse_conversation(data: object, path: str, lineno: int, kind: str = "conversation",
                       system_prompt: str | None = None, loss_turns: str = "all") -> Conversation | BadCut:
    """One decoded JSON line -> a Conversation, or the BadCut (``bad_conversation``) saying what is wrong."""
    if not isinstance(data, dict):
        return _bad(None, f"a JSON {type(data).__name__}, not an object", path, lineno)
    cid = data.get("id")
    cid = str(cid) if isinstance(cid, (str, int)) else f"{Path(path).name}:{lineno}"
    root = Path(path).resolve().parent
    pieces: list[tuple[str, str]] = []
    clips: list[Clip] = []
    system = system_prompt
    if "conversations" in data:
        turns = data["conversations"]
        if not isinstance(turns, list) or not turns:
            return _bad(cid, "'conversations' must be a non-empty list of turns", path, lineno)
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                return _bad(cid, f"turn {i} is a {type(turn).__name__}, not an object", path, lineno)
            who = turn.get("from")
            role = ROLES.get(who.lower()) if isinstance(who, str) else None
            if role is None:
                return _bad(cid, f"turn {i}: unknown 'from' {who!r} (valid: User, Assistant)", path, lineno)
            ttype, value = turn.get("type", "text"), turn.get("value")
            if not isinstance(value, str):
                return _bad(cid, f"turn {i}: 'value' must be a string, got {type(value).__name__}", path, lineno)
            if ttype == "text":
                if AUDIO_PLACEHOLDER in value:
                    return _bad(cid, f"turn {i}: text holds the audio placeholder {AUDIO_PLACEHOLDER!r}", path,
                                lineno)
                pieces.append((role, value))
            elif ttype == "audio":
                if kind == "text":
                    return _bad(cid, f"turn {i} is audio in a text source (use type: conversations)", path, lineno)
                if role != "user":
                    return _bad(cid, f"turn {i}: audio from {who!r}: only User turns may hold audio", path, lineno)
                dur, off = turn.get("duration"), turn.get("offset", 0.0) or 0.0
                if not isinstance(dur, (int, float)) or isinstance(dur, bool) or not dur > 0:
                    return _bad(cid, f"turn {i}: audio needs a 'duration' in seconds > 0, got {dur!r}", path, lineno)
                if not isinstance(off, (int, float)) or off < 0:
                    return _bad(cid, f"turn {i}: 'offset' must be seconds >= 0, got {off!r}", path, lineno)
                clips.append(Clip(os.path.normpath(root / value), float(dur), float(off)))
                pieces.append((role, AUDIO_PLACEHOLDER))
            else:
                return _bad(cid, f"turn {i}: unknown 'type' {ttype!r} (valid: text, audio)", path, lineno)
    elif "messages" in data:
        msgs = data["messages"]
        if not isinstance(msgs, list) or not msgs:
            return _bad(cid, "'messages' must be a non-empty list", path, lineno)
        for i, m in enumerate(msgs):
            role = m.get("role") if isinstance(m, dict) else None
            content = m.get("content") if isinstance(m, dict) else None
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                return _bad(cid, f"message {i} must be {{'role': system|user|assistant, 'content': str}}, got "
                                 f"{str(m)[:80]}", path, lineno)
            if AUDIO_PLACEHOLDER in content:
                return _bad(cid, f"message {i} holds the audio placeholder {AUDIO_PLACEHOLDER!r}", path, lineno)
            if role == "system":
                if i != 0:
                    return _bad(cid, f"message {i}: a system message may only come first", path, lineno)
                system = content
            else:
                pieces.append((role, content))
    else:
        return _bad(cid, "neither 'conversations' (NeMo format) nor 'messages' in the object", path, lineno)
    messages = _merge(pieces)
    if not messages or messages[-1]["role"] != "assistant":
        return _bad(cid, "the last turn must be the Assistant's (it is the training target)", path, lineno)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Conversation(cid, messages, clips, loss_turns, kind, path, lineno)


class ConversationCuts:
    """Lazy, re-iterable cuts of one conversation JSONL; bad lines go to ``on_bad_line`` (default: raise).

    Args:
        path: the JSONL (optionally gzipped).
        kind: "conversation" or "text" (audio turns are then bad lines).
        system_prompt: system message put first in every conversation (a line's own system message wins).
        loss_turns: "all" or "last" assistant messages carry the loss.
        source: index of the training source, stored on each cut (per-source metrics); None: untagged.
        on_bad_line: receives each BadCut (bad JSON, unknown ``from``, ...).
    """

    def __init__(self, path: str | Path, kind: str = "conversation", system_prompt: str | None = None,
                 loss_turns: str = "all", source: int | None = None,
                 on_bad_line: Callable[[BadCut], None] | None = None) -> None:
        if loss_turns not in LOSS_TURNS:
            raise ValueError(f"loss_turns must be one of {LOSS_TURNS}, got {loss_turns!r}")
        self.path, self.kind, self.system_prompt = str(path), kind, system_prompt
        self.loss_turns, self.source = loss_turns, source
        self.on_bad_line = on_bad_line

    def __iter__(self) -> Iterator[MonoCut]:
        try:
            f = open_maybe_gzipped(self.path)
        except OSError as e:
            raise BadCutError(f"cannot open the conversation manifest {self.path!r}: {e.strerror or e}") from None
        with f:
            for lineno, raw in enumerate(f, start=1):
                item = self._parse(raw, lineno)
                if isinstance(item, BadCut):
                    if self.on_bad_line is None:
                        raise item.error()
                    self.on_bad_line(item)
                elif item is not None:
                    yield item.to_cut(self.source)

    def _parse(self, raw: bytes, lineno: int) -> Conversation | BadCut | None:
        data = json_line(raw, self.path, lineno)
        if data is None or isinstance(data, BadCut):
            return data
        return parse_conversation(data, self.path, lineno, self.kind, self.system_prompt, self.loss_turns)
