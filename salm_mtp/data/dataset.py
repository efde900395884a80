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
    num_dropped  int             cuts dropped from this batch (unreadable audio, no supervision)

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


def _source_of(cut: Cut) -> str:
    """Where the cut's audio lives, for error messages."""
    try:
        return ", ".join(str(s.source) for s in cut.recording.sources)
    except AttributeError:
        return "<no recording>"


class SALMDataset(torch.utils.data.Dataset):
    """Collates a CutSet into the batch documented in the module docstring.

    Args:
        tokenizer: the LLM tokenizer (pads ``input_ids`` with its ``pad_token_id``, or with
            ``eos_token_id`` when it has no pad token: padding is masked by ``input_lens``).
        formatter: builds prompt + answer ids; default ``PromptFormatter(tokenizer)``.
        ctc_tokenizer: tokenizes ``ctc_ids``; default ``tokenizer``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        formatter: PromptFormatter | None = None,
        ctc_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.formatter = formatter if formatter is not None else PromptFormatter(tokenizer)
        self.ctc_tokenizer = ctc_tokenizer if ctc_tokenizer is not None else tokenizer
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else tokenizer.eos_token_id

    def _load_audio(self, cut: Cut) -> np.ndarray | None:
        """Mono float32 waveform (S,) at 16 kHz, or None (logged) if it cannot be read."""
        try:
            if cut.sampling_rate != SAMPLE_RATE:
                cut = cut.resample(SAMPLE_RATE)
            audio = cut.load_audio()  # (C, S)
        except Exception as err:  # noqa: BLE001 - any unreadable file is dropped, never fatal
            log.warning("dropping cut %s: cannot read audio %s: %s", cut.id, _source_of(cut), err)
            return None
        if audio is None or audio.size == 0:
            log.warning("dropping cut %s: empty audio in %s", cut.id, _source_of(cut))
            return None
        return np.asarray(audio, dtype=np.float32).mean(axis=0)  # (S,) mixdown of channels

    def __getitem__(self, cuts: CutSet) -> dict[str, Any]:
        audios, input_ids, loss_masks, prompt_lens, ctc_ids = [], [], [], [], []
        ids, tasks, answers = [], [], []
        num_dropped = 0
        for cut in cuts:
            if not cut.supervisions:
                log.warning("dropping cut %s: it has no supervision (no transcript)", cut.id)
                num_dropped += 1
                continue
            audio = self._load_audio(cut)
            if audio is None:
                num_dropped += 1
                continue
            task, answer = reference_answer(cut)
            enc = self.formatter.encode(task, answer)
            audios.append(torch.from_numpy(audio))
            input_ids.append(torch.tensor(enc.input_ids, dtype=torch.int64))
            loss_masks.append(torch.tensor(enc.loss_mask, dtype=torch.bool))
            prompt_lens.append(enc.prompt_len)
            text = cut.supervisions[0].text or ""
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
            "num_dropped": num_dropped,
        }


def _pad(rows: list[torch.Tensor], value: float | int | bool, dtype: torch.dtype):
    """Right-pad 1-D tensors into (B, L_max) filled with ``value``; also return lengths (B,)."""
    lens = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    out = torch.full((len(rows), int(lens.max()) if rows else 0), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out, lens
