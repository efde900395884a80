"""Lhotse-style dataset: a sampler hands over a CutSet, ``SALMDataset`` turns it into tensors.

The dataset holds no list of examples: ``DataLoader(dataset, sampler=lhotse_sampler,
batch_size=None)`` calls ``dataset[cuts]`` with each mini-batch CutSet. Each cut needs one
supervision whose ``text`` is the transcript and whose ``custom`` holds ``task`` ("asr" when
absent) and, for ``ast``, ``target_text``. Conversation and text examples (salm_mtp.data.conversation:
recording-less cuts) become rows with one audio clip per audio turn (possibly none) and the loss on their
assistant turns; a batch may mix both kinds.

Batch layout (all tensors right-padded)::

    B  examples kept in the batch (cuts whose audio cannot be read are dropped)
    N  audio clips of the batch, in reading order (row by row, turn by turn): one per ASR/AST cut,
       one per audio turn of a conversation, none for a text example (N = B for cut-only batches)
    S  longest clip in samples (16 kHz)
    T  longest prompt + answer in tokens
    U  longest transcript in tokens (CTC targets)

    audios       float32 (N, S)  waveform per clip, mono, 16 kHz, zero padded
    audio_lens   int64   (N,)    valid samples per clip
    clip_rows    int64   (N,)    the row each clip belongs to
    input_ids    int64   (B, T)  prompt (one <|audio|> token) + answer + eos, padded with pad_id
    input_lens   int64   (B,)    valid tokens per row
    loss_mask    bool    (B, T)  True on answer tokens and the final eos
    prompt_lens  int64   (B,)    prompt tokens per row (answer starts there)
    ctc_ids      int64   (N, U)  transcript tokens of each clip (no special tokens), padded with -100
    ctc_lens     int64   (N,)    valid CTC targets per clip (0 for conversation clips: no transcript)
    source_ids   int64   (B,)    training source of each row (index into data.inputs), -1 when untagged
    ids          list[str]       cut ids
    tasks        list[str]       task per row ("asr" / "ast" / "conversation" / "text")
    answers      list[str]       reference answer: transcript (asr), target_text (ast), last assistant turn
    num_dropped  int             cuts dropped from this batch (unreadable audio, no supervision, ...)
    skipped      list[dict]      one ``BadCut.to_json()`` per dropped cut: cut_id, reason, detail, file

Bad cuts follow ``policy`` (salm_mtp.data.policy): "skip" drops them (listed in ``skipped``; the
training process counts them: workers cannot), "raise" raises BadCutError naming cut, file and reason.
If every cut is dropped the batch has B = 0 (shapes (0, 0) / (0,)): callers skip it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from lhotse import CutSet
from lhotse.cut import Cut
from transformers import PreTrainedTokenizerBase

from salm_mtp.data.conversation import conversation_of, is_conversation
from salm_mtp.data.checks import CutChecker, located, reference_answer  # noqa: F401  (reference_answer: re-exported)
from salm_mtp.data.policy import BadCut, SkipLines, source_of
from salm_mtp.data.prompt import PromptFormatter

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
"""Waveform rate the model expects; other rates are resampled."""
CTC_PAD_ID = -100
"""Padding value of ``ctc_ids`` (never a real token id)."""




def hyp_rows(batch: dict, hyps: list[str]) -> list[dict]:
    """One hypotheses row per example of a collated batch: {"id", "task", "ref", "hyp"} (predict and evaluate)."""
    return [{"id": i, "task": t, "ref": r, "hyp": h} for i, t, r, h in zip(batch["ids"], batch["tasks"],
                                                                           batch["answers"], hyps)]


def failed_row(cut_id: str, reason: str, detail: str) -> dict:
    """The row of a cut the data code left out: no hypothesis, the reason instead (predict and evaluate)."""
    return {"id": cut_id, "task": None, "ref": None, "hyp": None, "error": f"{reason}: {detail}"}


class SALMDataset(torch.utils.data.Dataset):
    """Collates a CutSet into the batch documented in the module docstring.

    Args:
        tokenizer: the LLM tokenizer (pads ``input_ids`` with its ``pad_token_id``, or with
            ``eos_token_id`` when it has no pad token: padding is masked by ``input_lens``).
        formatter: builds prompt + answer ids; default ``PromptFormatter(tokenizer)``.
        ctc_tokenizer: tokenizes ``ctc_ids``; default ``tokenizer``.
        checker: the text / duration checks (``CutChecker``); default: the formatter's with no length
            bounds (only missing supervisions, bad tasks and empty answers are bad).
        policy: "skip" or "raise" (``data.on_bad_cut``).
        check_text: apply the text checks (False for prediction: the reference is not needed).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        formatter: PromptFormatter | None = None,
        ctc_tokenizer: PreTrainedTokenizerBase | None = None,
        checker: CutChecker | None = None,
        policy: str = "skip",
        check_text: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.formatter = formatter if formatter is not None else PromptFormatter(tokenizer)
        self.ctc_tokenizer = ctc_tokenizer if ctc_tokenizer is not None else tokenizer
        self.checker = checker if checker is not None else CutChecker(self.formatter)
        self.skip_lines = SkipLines()  # the cuts this dataset (in this loader worker) skips: at most 20 printed
        self.policy = policy
        self.check_text = check_text
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else tokenizer.eos_token_id

    @staticmethod
    def _task_of(cut: Cut) -> BadCut | None:
        """Without text checks (prediction) only the task must be usable; the reference may be empty."""
        if not cut.supervisions:
            return None
        try:
            task, _ = reference_answer(cut)
        except ValueError as e:
            return BadCut(cut.id, "bad_task", str(e), source_of(cut))
        if task not in ("asr", "ast"):
            return BadCut(cut.id, "bad_task", f"unknown task {task!r} (valid: asr, ast)", source_of(cut))
        return None

    def load_audio(self, cut: Cut) -> np.ndarray | BadCut:
        """Mono float32 waveform (S,) at 16 kHz, or the BadCut saying why it cannot be used."""
        from lhotse.audio.utils import DurationMismatchError

        src = source_of(cut)
        if getattr(cut, "recording", None) is None:
            return BadCut(cut.id, "unreadable_audio", "the cut has no recording", src)
        try:
            audio = cut.load_audio()  # (C, S) at the recording's rate
        except DurationMismatchError as err:
            return BadCut(cut.id, "duration_mismatch", f"{err} (the manifest declares {cut.duration:.3f} s)", src)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a bad cut, never a crash
            return BadCut(cut.id, "unreadable_audio", f"cannot read audio: {type(err).__name__}: {err}", src)
        if audio is None or audio.size == 0:
            return BadCut(cut.id, "empty_audio", f"0 samples, the manifest declares {cut.duration:.3f} s", src)
        bad = self.checker.check_loaded(cut, audio.shape[-1], cut.sampling_rate)
        if bad is not None:
            return bad
        if cut.sampling_rate != SAMPLE_RATE:
            try:
                audio = cut.resample(SAMPLE_RATE).load_audio()
            except Exception as err:  # noqa: BLE001
                return BadCut(cut.id, "unreadable_audio", f"cannot resample: {type(err).__name__}: {err}", src)
        return np.asarray(audio, dtype=np.float32).mean(axis=0)  # (S,) mixdown of channels

    def load_clip(self, cut_id: str, clip) -> np.ndarray | BadCut:
        """Mono float32 waveform (S,) at 16 kHz of one conversation audio turn, or the BadCut."""
        from lhotse import Recording

        bad = self.checker.check_clip_header(cut_id, clip)
        if bad is not None:
            return bad
        try:
            rec = Recording.from_file(clip.path)
            seg = rec.to_cut().truncate(offset=clip.offset, duration=min(clip.duration, rec.duration - clip.offset))
            if rec.sampling_rate != SAMPLE_RATE:
                seg = seg.resample(SAMPLE_RATE)
            audio = seg.load_audio()  # (C, S)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a bad cut, never a crash
            return BadCut(cut_id, "unreadable_audio", f"cannot read audio: {type(err).__name__}: {err}", clip.path)
        if audio is None or audio.size == 0:
            return BadCut(cut_id, "empty_audio", f"0 samples, the turn declares {clip.duration:.3f} s", clip.path)
        return np.asarray(audio, dtype=np.float32).mean(axis=0)

    def _conversation(self, cut: Cut) -> tuple[Any, list[np.ndarray], str, str] | BadCut:
        """(encoding, clip waveforms, task, answer) of a conversation / text example, or the BadCut."""
        conv = conversation_of(cut)
        bad = self.checker.check_text(cut) if self.check_text else None
        if bad is not None:
            return bad
        try:
            enc = self.formatter.encode_messages(conv.messages, conv.loss_turns)
        except ValueError as e:
            return BadCut(cut.id, "bad_conversation", str(e), conv.file, conv.line)
        waves = []
        for clip in conv.clips:
            wave = self.load_clip(cut.id, clip)
            if isinstance(wave, BadCut):
                return wave
            waves.append(wave)
        return enc, waves, conv.kind, conv.answer

    def _cut(self, cut: Cut) -> tuple[Any, list[np.ndarray], str, str] | BadCut:
        """(encoding, [waveform], task, answer) of an ASR / AST cut, or the BadCut."""
        bad = self.checker.check_text(cut) if self.check_text else self._task_of(cut)
        audio = self.load_audio(cut) if bad is None else bad
        if isinstance(audio, BadCut):
            return audio
        task, answer = reference_answer(cut) if cut.supervisions else ("asr", "")
        return self.formatter.encode(task, answer), [audio], task, answer

    def read(self, cut: Cut) -> tuple[Any, list[np.ndarray], str, str] | BadCut:
        """(prompt encoding, waveforms, task, answer) of one cut or conversation / text example, every check and
        audio read of collation applied; or the BadCut saying why it cannot be used."""
        return self._conversation(cut) if is_conversation(cut) else self._cut(cut)

    def __getitem__(self, cuts: CutSet) -> dict[str, Any]:
        audios, input_ids, loss_masks, prompt_lens, ctc_ids, clip_rows = [], [], [], [], [], []
        ids, tasks, answers, sources = [], [], [], []
        skipped: list[dict] = []
        for cut in cuts:
            conv = is_conversation(cut)
            item = self.read(cut)
            if isinstance(item, BadCut):
                item = located(item, cut)
                if self.policy == "raise":
                    raise item.error()
                self.skip_lines(item)
                skipped.append(item.to_json())  # counted by the training process (SkipLog)
                continue
            enc, waves, task, answer = item
            row = len(ids)
            for wave in waves:
                audios.append(torch.from_numpy(wave))
                clip_rows.append(row)
                if conv:  # conversation clips carry no transcript: no CTC target
                    ctc_ids.append(torch.zeros(0, dtype=torch.int64))
                else:
                    text = (cut.supervisions[0].text or "") if cut.supervisions else ""
                    ctc = self.ctc_tokenizer.encode(text, add_special_tokens=False)
                    ctc_ids.append(torch.tensor(ctc, dtype=torch.int64))
            input_ids.append(torch.tensor(enc.input_ids, dtype=torch.int64))
            loss_masks.append(torch.tensor(enc.loss_mask, dtype=torch.bool))
            prompt_lens.append(enc.prompt_len)
            ids.append(cut.id)
            tasks.append(task)
            answers.append(answer)
            custom = getattr(cut, "custom", None) or {}
            sources.append(int(custom.get("salm_source", -1)))

        audios_t, audio_lens = _pad(audios, 0.0, torch.float32)  # (B, S), (B,)
        input_ids_t, input_lens = _pad(input_ids, self.pad_id, torch.int64)  # (B, T), (B,)
        loss_mask, _ = _pad(loss_masks, False, torch.bool)  # (B, T)
        ctc_ids_t, ctc_lens = _pad(ctc_ids, CTC_PAD_ID, torch.int64)  # (B, U), (B,)
        return {
            "audios": audios_t,
            "audio_lens": audio_lens,
            "input_ids": input_ids_t,
            "input_lens": input_lens,
            "loss_mask": loss_mask,
            "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int64),
            "ctc_ids": ctc_ids_t,
            "ctc_lens": ctc_lens,
            "clip_rows": torch.tensor(clip_rows, dtype=torch.int64),
            "source_ids": torch.tensor(sources, dtype=torch.int64),
            "ids": ids,
            "tasks": tasks,
            "answers": answers,
            "num_dropped": len(skipped),
            "skipped": skipped,
        }


def _pad(rows: list[torch.Tensor], value: float | int | bool, dtype: torch.dtype):
    """Right-pad 1-D tensors into (B, L_max) filled with ``value``; also return lengths (B,)."""
    lens = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    out = torch.full((len(rows), int(lens.max()) if rows else 0), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out, lens
