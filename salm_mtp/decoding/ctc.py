"""CTC drafts: the encoder's CTC greedy transcript proposed as a whole ASR answer (docs/design.md §9).

    drafts = answer_drafts(model, batch, enc, enc_lens, answer_ids)   # per row: LLM token ids of the answer, or None
    tokens, lengths, stats = speculative_decode(model, batch, mode="ctc+mtp")   # salm_mtp/decoding/speculative.py

The encoder already runs for the prompt; its CTC head (``model.audio.ctc_head``, trained by ``model.ctc_weight``
or shipped with a Parakeet CTC checkpoint) gives a transcript for free: the greedy path, repeats merged and blanks
dropped (``collapse``), is text in the CTC head's own labels (``label_text``: the LLM tokenizer's ids for a head
trained with it, any vocabulary otherwise), which becomes LLM tokens in the trained answer's format
(``answer_ids``: the run's ``data.prompt.PromptFormatter.answer_ids``, the one place that format is written). The speculative decoder
verifies such a draft in the prompt's own forward and keeps only what greedy would have produced: a wrong draft
costs speed, never a token.

Only ASR rows (task "asr", one clip) get one: for AST and conversations the transcript is not the answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch


def collapse(path: list[int], blank: int) -> list[int]:
    """A greedy CTC path (one label per frame) -> its labels: repeats merged, then blanks dropped."""
    out, prev = [], None
    for t in path:
        if t != prev and t != blank:
            out.append(t)
        prev = t
    return out


def ctc_labels(logits: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Greedy CTC labels of each clip: logits (N, F, C), valid frames (N,)."""
    best = logits.argmax(-1).tolist()  # (N, F)
    return [collapse(row[: int(n)], blank) for row, n in zip(best, lengths.tolist())]


def answer_drafts(model, batch: dict, enc: torch.Tensor, enc_lens: torch.Tensor,
                  answer_ids: Callable[[str], list[int]],
                  label_text: Callable[[list[int]], str] | None = None) -> list[list[int] | None]:
    """Per batch row, the CTC draft of its whole answer (LLM token ids, end token included), or None (not an ASR
    row, or a model without a CTC head).

    Args:
        model: a SALM (its ``audio.ctc_head``, ``tokenizer``).
        batch: the collated batch (``clip_rows``, ``tasks``).
        enc: (N, F', He) encoder output of the batch's clips; ``enc_lens`` (N,) valid frames.
        answer_ids: text -> the ASR answer's token ids as training formatted them (the data module's
            ``PromptFormatter.answer_ids`` for task "asr").
        label_text: CTC labels -> text (default: the model tokenizer's ``decode``: the head's classes are its
            ids plus a last blank).
    """
    B = len(batch["tasks"])
    head = getattr(model.audio, "ctc_head", None)
    if head is None or enc.shape[0] == 0:
        return [None] * B
    labels = ctc_labels(head(enc), enc_lens, model.audio.blank_id)
    if label_text is None:
        def label_text(ids: list[int]) -> str:
            return model.tokenizer.decode(ids, skip_special_tokens=True)
    rows = batch["clip_rows"].tolist()
    clips_of = Counter(rows)
    out: list[list[int] | None] = [None] * B
    for clip, row in enumerate(rows):
        if batch["tasks"][row] == "asr" and clips_of[row] == 1:
            out[row] = answer_ids(label_text(labels[clip]))
    return out
