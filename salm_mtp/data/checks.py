"""The checks of one run's settings on a cut (``CutChecker``): text and token lengths, durations, audio headers, and a
decoded waveform against its manifest. Each returns a ``BadCut`` (salm_mtp.data.policy) or None; what happens to a
bad cut is the policy's business. ``reference_answer`` gives a cut's task and reference answer.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

from lhotse.cut import Cut

from salm_mtp.data.conversation import conversation_of, is_conversation
from salm_mtp.data.manifest import LINE_KEY
from salm_mtp.data.policy import BadCut, source_of


def located(bad: BadCut | None, cut) -> BadCut | None:
    """``bad`` with the manifest and line of its example (a conversation / text line, or a cut's line recorded by
    load_cuts) when the check that found it (the audio, a duration, the text) did not know them; the audio file goes
    into the detail. Every skipped row then names its manifest line."""
    if not isinstance(bad, BadCut) or bad.line is not None:
        return bad  # (None, what SALMDataset.read gives for a usable example, or a manifest line's own)
    if is_conversation(cut):
        conv = conversation_of(cut)
        manifest, line = conv.file, conv.line
    else:
        manifest, line = ((cut.custom or {}).get(LINE_KEY) or (None, None))
    if manifest is None:
        return bad
    if bad.file and bad.file != manifest:  # an audio file of the example: named in the detail
        return replace(bad, detail=f"{bad.detail} ({bad.file})", file=manifest, line=line)
    return replace(bad, file=manifest, line=line)


def reference_answer(cut: Cut) -> tuple[str, str]:
    """(task, reference answer) of a cut: the transcript for asr, ``target_text`` for ast."""
    sup = cut.supervisions[0]
    custom = sup.custom or {}
    task = custom.get("task", "asr")
    if task == "ast":
        if "target_text" not in custom:
            raise ValueError(f"cut {cut.id!r} has task 'ast' but no supervision.custom['target_text']")
        return task, custom["target_text"]
    return task, sup.text or ""


DURATION_TOLERANCE_S = 0.025
"""Largest accepted gap between the declared and the actual duration of a file (lhotse's own bound, 0.5 s,
lets a clip lose a third of its length silently)."""


class CutChecker:
    """The checks of one run's settings on cut metadata and audio (no policy: each returns a BadCut or None).

    Args:
        formatter: the run's PromptFormatter (tokenizes the answer as training does).
        max_target_tokens: most answer tokens (eos excluded); None: no bound.
        max_seq_len: most LLM positions: prompt + answer tokens + audio embeddings; None: no bound.
        max_cut_duration: longest cut in seconds; None: no bound besides ``max_duration``.
        max_duration: seconds per batch: a longer cut can never be batched; None: no bound.
        audio_positions_per_second: LLM positions per second of audio (set by the model); None: the audio
            part is not counted in ``max_seq_len``.
        max_tokens: the batch budget in LLM positions (data.max_tokens): a longer example can never be batched.
            When set, ``max_duration`` does not bound examples (the token budget replaces it).

    Conversation and text examples (salm_mtp.data.conversation) get the same checks on their messages and on
    each audio turn; ``positions`` is what one example occupies in the LLM (text tokens + audio positions).
    """

    def __init__(self, formatter, max_target_tokens: int | None = None, max_seq_len: int | None = None,
                 max_cut_duration: float | None = None, max_duration: float | None = None,
                 audio_positions_per_second: float | None = None, max_tokens: int | None = None) -> None:
        self.formatter = formatter
        self.max_tokens = max_tokens
        self.max_target_tokens = max_target_tokens
        self.max_seq_len = max_seq_len
        self.max_cut_duration = max_cut_duration
        self.max_duration = max_duration
        self.audio_positions_per_second = audio_positions_per_second

    def audio_positions(self, seconds: float) -> int:
        """LLM positions of one clip of ``seconds`` (an upper bound: features, subsampling, stacking round up);
        0 when the rate is unknown."""
        pps = self.audio_positions_per_second
        return math.ceil(seconds * pps) + 1 if pps else 0

    def encode(self, cut):
        """(EncodedPrompt, number of audio clips) of a cut as training collates it (answer included)."""

        if is_conversation(cut):
            conv = conversation_of(cut)
            return self.formatter.encode_messages(conv.messages, conv.loss_turns), len(conv.clips)
        task, answer = reference_answer(cut)
        return self.formatter.encode(task, answer), 1

    def positions(self, cut) -> int:
        """LLM positions of the example: text tokens (placeholders excluded) + audio positions of each clip."""

        enc, n_clips = self.encode(cut)
        clips = [c.duration for c in conversation_of(cut).clips] if is_conversation(cut) else [cut.duration]
        return len(enc.input_ids) - n_clips + sum(self.audio_positions(d) for d in clips)

    def _check_conversation(self, cut) -> BadCut | None:

        conv = conversation_of(cut)
        src = source_of(cut)
        for m in conv.messages:
            if m["role"] == "assistant" and not m["content"].strip():
                return BadCut(cut.id, "empty_text", "an assistant turn is empty or whitespace", src, conv.line)
        try:
            enc, n_clips = self.encode(cut)
        except ValueError as e:
            return BadCut(cut.id, "bad_conversation", str(e), src, conv.line)
        found = enc.input_ids.count(self.formatter.audio_token_id)
        if found != n_clips:
            return BadCut(cut.id, "bad_conversation", f"{found} audio placeholders in the encoded prompt for "
                          f"{n_clips} audio turns", src, conv.line)
        if self.max_target_tokens is not None:
            longest = max(len(self.formatter._encode_text(m["content"])) for m in conv.messages
                          if m["role"] == "assistant")
            if longest > self.max_target_tokens:
                return BadCut(cut.id, "too_many_target_tokens", f"an assistant turn of {longest} tokens > "
                              f"data.max_target_tokens={self.max_target_tokens}", src, conv.line, longest,
                              "data.max_target_tokens")
        return self._check_positions(cut, src, line=conv.line)

    def _check_positions(self, cut, src: str, with_seq_len: bool = True, line: int | None = None) -> BadCut | None:
        limits = ((self.max_seq_len if with_seq_len else None, "data.max_seq_len"), (self.max_tokens, "data.max_tokens"))
        for limit, key in limits:
            if limit is not None:
                total = self.positions(cut)
                if total > limit:
                    return BadCut(cut.id, "too_long_sequence", f"{total} LLM positions (text tokens + audio "
                                  f"positions) > {key}={limit}", src, line, total, key)
        return None

    def check_text(self, cut) -> BadCut | None:
        """Supervision, task, answer text and token lengths."""

        if is_conversation(cut):
            return self._check_conversation(cut)
        src = source_of(cut)
        if not cut.supervisions:
            return BadCut(cut.id, "no_supervision", "the cut has no supervision (no transcript)", src)
        try:
            task, answer = reference_answer(cut)
            prompt = self.formatter.prompt_ids(task) if task in ("asr", "ast") else None
        except ValueError as e:
            return BadCut(cut.id, "bad_task", str(e), src)
        if prompt is None:
            return BadCut(cut.id, "bad_task", f"unknown task {task!r} (valid: asr, ast)", src)
        if not isinstance(answer, str) or not answer.strip():
            return BadCut(cut.id, "empty_text", f"the {task} answer is empty or whitespace: {answer!r}", src)
        n_answer = len(self.formatter.answer_ids(task, answer))  # includes the final eos
        if self.max_target_tokens is not None and n_answer - 1 > self.max_target_tokens:
            return BadCut(cut.id, "too_many_target_tokens",
                          f"{n_answer - 1} answer tokens > data.max_target_tokens={self.max_target_tokens}", src,
                          amount=n_answer - 1, limit="data.max_target_tokens")
        if self.max_seq_len is not None:
            audio = math.ceil(cut.duration * self.audio_positions_per_second) if self.audio_positions_per_second else 0
            total = len(prompt) - 1 + audio + n_answer
            if total > self.max_seq_len:
                return BadCut(cut.id, "too_long_sequence",
                              f"{total} positions (prompt {len(prompt) - 1} + audio {audio} + answer {n_answer}) > "
                              f"data.max_seq_len={self.max_seq_len}", src, amount=total, limit="data.max_seq_len")
        if self.max_tokens is not None:
            return self._check_positions(cut, src, with_seq_len=False)
        return None

    def check_duration(self, cut) -> BadCut | None:
        """The cut's declared duration against max_cut_duration and max_duration."""
        max_duration = self.max_duration if self.max_tokens is None else None  # the token budget replaces it
        for limit, key in ((self.max_cut_duration, "data.max_cut_duration"), (max_duration, "data.max_duration")):
            if limit is not None and cut.duration > limit:
                return BadCut(cut.id, "too_long_audio", f"{cut.duration:.2f} s > {key}={limit}", source_of(cut),
                              amount=math.ceil(cut.duration * 100) / 100, limit=key)
        return None

    def check_header(self, cut) -> BadCut | None:
        """File sources exist and hold the declared number of samples (headers only, no decoding)."""
        import soundfile as sf


        if is_conversation(cut):
            for clip in conversation_of(cut).clips:
                bad = self.check_clip_header(cut.id, clip)
                if bad is not None:
                    return bad
            return None
        rec = getattr(cut, "recording", None)
        if rec is None:
            return BadCut(cut.id, "unreadable_audio", "the cut has no recording", "<no recording>")
        for s in rec.sources:
            if s.type != "file":
                continue
            path = str(s.source)
            if not os.path.isfile(path):
                return BadCut(cut.id, "unreadable_audio", "no such file", path)
            try:
                info = sf.info(path)
            except Exception as e:  # noqa: BLE001 - any unreadable header is a bad cut
                return BadCut(cut.id, "unreadable_audio", f"cannot read the header: {e}", path)
            bad = self._compare(cut, info.frames, info.samplerate, path)
            if bad is not None:
                return bad
        return None

    def check_clip_header(self, cut_id: str, clip) -> BadCut | None:
        """One audio turn of a conversation: the file exists and holds offset + duration seconds."""
        import soundfile as sf

        if not os.path.isfile(clip.path):
            return BadCut(cut_id, "unreadable_audio", "no such file", clip.path)
        try:
            info = sf.info(clip.path)
        except Exception as e:  # noqa: BLE001 - any unreadable header is a bad cut
            return BadCut(cut_id, "unreadable_audio", f"cannot read the header: {e}", clip.path)
        return self.check_clip_length(cut_id, clip, info.frames, info.samplerate)

    def check_clip_length(self, cut_id: str, clip, frames: int, rate: int) -> BadCut | None:
        """A file of ``frames`` samples at ``rate`` against the segment an audio turn declares."""
        if frames == 0:
            return BadCut(cut_id, "empty_audio", f"0 samples, the turn declares {clip.duration:.3f} s", clip.path)
        actual = frames / rate
        if clip.offset + clip.duration > actual + max(DURATION_TOLERANCE_S, 1.5 / rate):
            return BadCut(cut_id, "duration_mismatch", f"the file holds {actual:.3f} s, the turn declares offset "
                          f"{clip.offset:.3f} s + duration {clip.duration:.3f} s", clip.path)
        return None

    def check_loaded(self, cut, num_samples: int, sampling_rate: int) -> BadCut | None:
        """A decoded waveform of ``num_samples`` at ``sampling_rate`` against the cut's declared duration."""
        return self._compare(cut, num_samples, sampling_rate, source_of(cut), whole_recording=False)

    def _compare(self, cut, frames: int, rate: int, path: str, whole_recording: bool = True) -> BadCut | None:
        if frames == 0:
            declared = cut.recording.duration if whole_recording else cut.duration
            return BadCut(cut.id, "empty_audio", f"0 samples, the manifest declares {declared:.3f} s", path)
        declared = cut.recording.duration if whole_recording else cut.duration
        actual = frames / rate
        if abs(actual - declared) > max(DURATION_TOLERANCE_S, 1.5 / rate):
            return BadCut(cut.id, "duration_mismatch",
                          f"the file holds {actual:.3f} s ({frames} samples at {rate} Hz), the manifest declares "
                          f"{declared:.3f} s", path)
        return None

    def check_metadata(self, cut, with_header: bool = False) -> BadCut | None:
        """Every check that needs no decoding: duration, text, and (``with_header``) audio headers."""
        return located(self.check_duration(cut) or self.check_text(cut)
                       or (self.check_header(cut) if with_header else None), cut)
