"""Lhotse-style dataset: a sampler hands over a CutSet, ``SALMDataset`` turns it into tensors.

The dataset holds no list of examples: ``DataLoader(dataset, sampler=lhotse_sampler,
batch_size=None)`` calls ``dataset[cuts]`` with each mini-batch CutSet. Each cut needs one
supervision whose ``text`` is the transcript and whose ``custom`` holds ``task`` ("asr" when
absent) and, for ``ast``, ``target_text``.

Batch layout (all tensors right-padded)::

    B  cuts kept in the batch (cuts whose audio cannot be read are dropped)
    S  longest waveform in samples (16 kHz)
    T  longest prompt + answer in tokens
    U  longest transcript in tokens (CTC targets)

    audios       float32 (B, S)  waveform, mono, 16 kHz, zero padded
    audio_lens   int64   (B,)    valid samples per row
    input_ids    int64   (B, T)  prompt (one <|audio|> token) + answer + eos, padded with pad_id
    input_lens   int64   (B,)    valid tokens per row
    loss_mask    bool    (B, T)  True on answer tokens and the final eos
    prompt_lens  int64   (B,)    prompt tokens per row (answer starts there)
    ctc_ids      int64   (B, U)  transcript tokens (no special tokens), padded with -100
    ctc_lens     int64   (B,)    valid CTC targets per row
    ids          list[str]       cut ids
    tasks        list[str]       task per row ("asr" / "ast")
    answers      list[str]       reference answer: transcript (asr) or target_text (ast)
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

from salm_mtp.data.policy import BadCut, CutChecker, source_of
from salm_mtp.data.prompt import PromptFormatter

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
"""Waveform rate the model expects; other rates are resampled."""
CTC_PAD_ID = -100
"""Padding value of ``ctc_ids`` (never a real token id)."""


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

    def __getitem__(self, cuts: CutSet) -> dict[str, Any]:
        audios, input_ids, loss_masks, prompt_lens, ctc_ids = [], [], [], [], []
        ids, tasks, answers = [], [], []
        skipped: list[dict] = []
        for cut in cuts:
            bad = self.checker.check_text(cut) if self.check_text else self._task_of(cut)
            audio = self.load_audio(cut) if bad is None else bad
            if isinstance(audio, BadCut):
                if self.policy == "raise":
                    raise audio.error()
                log.warning("skipping %s", audio.message())
                skipped.append(audio.to_json())  # counted by the training process (SkipLog)
                continue
            task, answer = reference_answer(cut) if cut.supervisions else ("asr", "")
            enc = self.formatter.encode(task, answer)
            audios.append(torch.from_numpy(audio))
            input_ids.append(torch.tensor(enc.input_ids, dtype=torch.int64))
            loss_masks.append(torch.tensor(enc.loss_mask, dtype=torch.bool))
            prompt_lens.append(enc.prompt_len)
            text = (cut.supervisions[0].text or "") if cut.supervisions else ""
            ctc = self.ctc_tokenizer.encode(text, add_special_tokens=False)
            ctc_ids.append(torch.tensor(ctc, dtype=torch.int64))
            ids.append(cut.id)
            tasks.append(task)
            answers.append(answer)

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
