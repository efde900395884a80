"""Merge audio embeddings into the prompt embeddings at the audio placeholder tokens (pure function).

Dimension legend: B batch, T text length, H LLM width, N audio clips, A audio positions per clip,
T' merged length = max over rows of (text length - placeholders + audio lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class MergedInputs:
    """Output of :func:`merge_audio_into_prompt`; every tensor is right-padded to T'."""

    inputs_embeds: torch.Tensor
    """(B, T', H) text embeddings with each placeholder replaced by its clip's audio embeddings."""
    labels: torch.Tensor
    """(B, T') the token at each position where it is a loss token (answer), else -100 (prompt, audio, padding)."""
    targets: torch.Tensor
    """(B, T') labels shifted left by one: what the main head must predict at each position."""
    attention_mask: torch.Tensor
    """(B, T') bool, True on real positions."""
    audio_mask: torch.Tensor
    """(B, T') bool, True on audio positions."""
    lengths: torch.Tensor
    """(B,) merged length of each row."""


def merge_audio_into_prompt(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    input_lens: torch.Tensor,
    loss_mask: torch.Tensor,
    audio_embeds: torch.Tensor,
    audio_lens: torch.Tensor,
    placeholder_id: int,
) -> MergedInputs:
    """Replace each audio placeholder by the embeddings of one clip and build the shifted targets.

    Placeholders are matched to clips in reading order (row by row, left to right), so a row
    may hold several clips. Only the first ``input_lens[b]`` tokens of row b are real.

    Args:
        text_embeds: (B, T, H) embeddings of ``input_ids`` (placeholder rows are ignored).
        input_ids: (B, T) token ids containing the placeholder id once per clip.
        input_lens: (B,) number of real tokens per row.
        loss_mask: (B, T) bool, True on tokens the model must learn to produce.
        audio_embeds: (N, A, H) adapter output per clip.
        audio_lens: (N,) valid audio positions per clip.
        placeholder_id: id of the audio placeholder token.

    Returns:
        MergedInputs with (B, T', ...) tensors.

    Raises:
        ValueError: when the number of placeholders differs from the number of clips.
    """
    B, T, H = text_embeds.shape
    N = audio_embeds.shape[0]
    real = torch.arange(T, device=input_ids.device)[None, :] < input_lens[:, None]  # (B, T)
    is_ph = (input_ids == placeholder_id) & real  # (B, T)
    per_row = is_ph.sum(1).tolist()
    if sum(per_row) != N:
        raise ValueError(
            f"audio placeholder count ({sum(per_row)}, per row {per_row}) does not match the number of audio "
            f"clips ({N}): each clip needs exactly one placeholder token (id {placeholder_id}) in the prompt"
        )
    token_labels = torch.where(loss_mask & real, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    rows_embeds, rows_labels, rows_audio = [], [], []
    clip = 0
    for b in range(B):
        n = int(input_lens[b])
        ph_pos = is_ph[b, :n].nonzero().flatten().tolist()
        pieces_e, pieces_l, pieces_a = [], [], []
        start = 0
        for p in ph_pos:
            a = int(audio_lens[clip])
            pieces_e += [text_embeds[b, start:p], audio_embeds[clip, :a]]
            pieces_l += [token_labels[b, start:p], token_labels.new_full((a,), IGNORE_INDEX)]
            pieces_a += [torch.zeros(p - start, dtype=torch.bool), torch.ones(a, dtype=torch.bool)]
            start = p + 1
            clip += 1
        pieces_e.append(text_embeds[b, start:n])
        pieces_l.append(token_labels[b, start:n])
        pieces_a.append(torch.zeros(n - start, dtype=torch.bool))
        rows_embeds.append(torch.cat(pieces_e))
        rows_labels.append(torch.cat(pieces_l))
        rows_audio.append(torch.cat(pieces_a))

    lengths = torch.tensor([r.shape[0] for r in rows_embeds], device=input_ids.device)
    Tm = int(lengths.max()) if B else 0
    embeds = text_embeds.new_zeros(B, Tm, H)
    labels = input_ids.new_full((B, Tm), IGNORE_INDEX)
    audio_mask = torch.zeros(B, Tm, dtype=torch.bool, device=input_ids.device)
    for b in range(B):
        L = int(lengths[b])
        embeds[b, :L] = rows_embeds[b]
        labels[b, :L] = rows_labels[b]
        audio_mask[b, :L] = rows_audio[b].to(input_ids.device)
    attention_mask = torch.arange(Tm, device=input_ids.device)[None, :] < lengths[:, None]
    return MergedInputs(
        inputs_embeds=embeds,
        labels=labels,
        targets=shift_left(labels, 1),
        attention_mask=attention_mask,
        audio_mask=audio_mask,
        lengths=lengths,
    )


def shift_left(x: torch.Tensor, k: int, fill: float | int = IGNORE_INDEX) -> torch.Tensor:
    """Roll ``x`` left by ``k`` along dim 1 without wrap-around; the last ``k`` positions get ``fill``.

    Works for (B, T) targets and (B, T, H) embeddings alike: ``out[:, t] = x[:, t + k]``.
    """
    if k == 0:
        return x
    out = torch.full_like(x, fill)
    if k < x.shape[1]:
        out[:, : x.shape[1] - k] = x[:, k:]
    return out
