"""Greedy decoding of a SALM (salm_mtp/salm.py) with the backbone's cache, and the MTP head's drafts along it.

    from salm_mtp.generate import greedy_generate, greedy_decode, mtp_drafts
    hyps = greedy_generate(module, batch)                          # list[str], one per row
    tokens, lengths = greedy_decode(module, batch, max_new_tokens=64)
    drafts = mtp_drafts(module, batch, tokens, lengths)            # (B, D, L)
    metrics.mtp_acceptance(tokens, drafts, valid)                  # per-depth acceptance

MTP self-speculative decoding (the same tokens from fewer backbone forwards) is
salm_mtp.decoding.modes.mtp_decode.

The batch layout is salm_mtp.data.dataset's; only the prompt part of each row is used
(``input_ids[b, :prompt_lens[b]]``, with its one audio placeholder), so a batch that also holds
reference answers decodes exactly like a prompt-only one.

How the cached decode works (transformers 5.23, docs/design.md §7):
  1. ``module.prepare_inputs`` on the prompt-only batch: audio merged into the prompt, right-padded
     (B, P, H) with per-row merged lengths P_b.
  2. Prefill ``llm.model(inputs_embeds=..., attention_mask=..., use_cache=True)`` over the prompts
     LEFT-padded to P (so every row's last prompt position is the last column), then one token id
     per step with ``past_key_values`` and the grown 2-D attention mask.
  Left padding is exact for every Nemotron-H block when the Mamba ``in_proj`` has no bias (all
  released checkpoints, ``use_bias=False``): the Mamba mixer multiplies its input and its conv
  output by the 2-D mask, so padding contributes zeros to the conv window and leaves the zero
  initial SSM state at zero (the decay of a zero state is zero); attention masks padded keys;
  MLP/MoE are per token; Nemotron-H attention has no positional encoding, so the shifted
  position ids change nothing. Checked: left-padded prefill and cached steps match an unpadded
  per-row recompute to ~1e-6 (patterns M*EM-* and *ME-*, sdpa and eager, 147 padding positions).
  With an ``in_proj`` bias, padding positions would feed ``bias`` into the conv and SSM (measured
  error 0.6), so rows are then decoded in groups of equal prompt length (no padding at all).

``use_cache=False`` recomputes the whole right-padded sequence at every step (no mask needed: every
block is causal): slow, but independent of the cache and of left padding, hence the reference in
tests.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from salm_mtp.modules.merge import MergedInputs


# ---------------------------------------------------------------------------------------- helpers
def prompt_batch(batch: dict) -> dict:
    """The prompt-only batch: each row's ``input_ids`` cut at ``prompt_lens``, no loss tokens.

    Audio tensors are shared, not copied. The result is what ``SALM.prepare_inputs`` needs.
    """
    plens = batch["prompt_lens"].to(batch["input_ids"].device)
    P = int(plens.max()) if plens.numel() else 0
    ids = batch["input_ids"][:, :P].clone()
    keep = torch.arange(P, device=ids.device)[None, :] < plens[:, None]  # (B, P)
    ids = ids.masked_fill(~keep, 0)  # any in-vocab id: positions past input_lens are never read
    return {
        "audios": batch["audios"],
        "audio_lens": batch["audio_lens"],
        "input_ids": ids,
        "input_lens": plens,
        "loss_mask": torch.zeros_like(ids, dtype=torch.bool),
    }


def device_of(module: torch.nn.Module) -> torch.device:
    """Where the module's weights are (a plain ``nn.Module`` has no ``.device``)."""
    return next(module.parameters()).device


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@contextmanager
def inference(module) -> Iterator[None]:
    """``torch.no_grad()`` and eval mode (no dropout, no SpecAugment) for the block; the module's
    mode is restored after."""
    was_training = module.training
    if was_training:  # eval() walks every submodule: only when the mode changes
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            module.train(True)


def encode_prompts(module, batch: dict, with_audio: bool = False):
    """Audio merged into each row's prompt: ``MergedInputs`` with right-padded (B, P, H) embeddings
    and per-row merged lengths (eval mode, no grad). Pass it as ``prompt=`` to share one encoder
    pass between :func:`greedy_decode` and :func:`mtp_drafts`. ``with_audio``: (merged, encoder output
    (N, F', He), its lengths (N,)) instead, for the CTC drafts (decoding/ctc.py).
    """
    with inference(module):
        merged, enc, enc_lens = module.prepare_inputs(_to_device(prompt_batch(batch), device_of(module)))
    return (merged, enc, enc_lens) if with_audio else merged


_MIXERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mamba_mixers(module: torch.nn.Module) -> list:
    """The Mamba mixers inside ``module``, found once per module object: walking every submodule is a measurable
    part of decoding one short utterance on CPU, and decoding never adds or removes mixers."""
    found = _MIXERS.get(module)
    if found is None:
        found = _MIXERS[module] = [m for m in module.modules() if type(m).__name__ == "NemotronHMamba2Mixer"]
    return found


def left_padding_exact(llm) -> bool:
    """Whether a left-padded batched prefill is exact for this Nemotron-H (module docstring):
    true unless some Mamba mixer's ``in_proj`` has a bias."""
    return all(m.in_proj.bias is None for m in mamba_mixers(llm))


def _row_groups(lengths: torch.Tensor, batched: bool) -> list[torch.Tensor]:
    """Row indices decoded together: all rows, or rows of equal merged prompt length."""
    if batched:
        return [torch.arange(lengths.numel(), device=lengths.device)]
    return [(lengths == L).nonzero().flatten() for L in torch.unique(lengths).tolist()]


def _eos_id(module) -> int:
    eos = module.tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: greedy decoding cannot stop; set model.tokenizer_path")
    return int(eos)


def _pad_id(module) -> int:
    """The id decoded rows are padded with: the tokenizer's pad token, else eos."""
    pad = module.tokenizer.pad_token_id
    return int(pad) if pad is not None else _eos_id(module)


def _lengths_after_eos(tokens: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """(B,) tokens up to and including the first eos of each row (all of them if none)."""
    B, L = tokens.shape
    if eos_id is None or L == 0:
        return torch.full((B,), L, dtype=torch.long, device=tokens.device)
    is_eos = tokens == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((B,), L - 1, device=tokens.device))
    return (first + 1).long()


def _append_answers(prompt: MergedInputs, embed: torch.nn.Embedding, tokens: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """Right-padded (B, max(P_b + n_b), H) embeddings of each row's merged prompt + its first n_b tokens."""
    P = prompt.lengths
    B, _, H = prompt.inputs_embeds.shape
    total = P + lengths
    out = prompt.inputs_embeds.new_zeros(B, int(total.max()) if B else 0, H)
    tok_emb = embed(tokens) if tokens.numel() else None  # (B, L, H)
    for b in range(B):
        p, n = int(P[b]), int(lengths[b])
        out[b, :p] = prompt.inputs_embeds[b, :p]
        if n:
            out[b, p : p + n] = tok_emb[b, :n]
    return out


# ---------------------------------------------------------------------------------------- decoding
def left_pad(embeds: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt embeddings (b, T, H) with lengths (b,) -> left-padded (b, P, H), P = max(lens), so
    every row's last prompt position is column P-1, and the (b, P) long mask of real positions."""
    b, _, H = embeds.shape
    P = int(lens.max())
    x = embeds.new_zeros(b, P, H)
    mask = torch.zeros(b, P, dtype=torch.long, device=embeds.device)
    for i in range(b):
        n = int(lens[i])
        x[i, P - n :] = embeds[i, :n]
        mask[i, P - n :] = 1
    return x, mask


def next_token_logits(lm_head, h: torch.Tensor, banned_id: int | None) -> torch.Tensor:
    """fp32 logits (..., V) of hidden states (..., H), e.g. the last ones (b, H); the audio placeholder can
    never be generated (an answer holding it could not be fed back through the merge)."""
    logits = lm_head(h).float()
    if banned_id is not None and banned_id < logits.shape[-1]:
        logits[..., banned_id] = float("-inf")
    return logits


def _decode_cached(llm, embeds: torch.Tensor, lens: torch.Tensor, max_new_tokens: int, eos_id: int | None,
                   pad_id: int, keep_logits: bool, banned_id: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy tokens (b, n <= max_new_tokens) for right-padded prompt embeddings (b, T, H), and
    their logits (b, n, V) if ``keep_logits`` (else None: B x n x V fp32 can be large)."""
    b = embeds.shape[0]
    P = int(lens.max())
    x, mask = left_pad(embeds, lens)  # every row ends at column P-1
    padded = bool((lens != P).any())
    out = llm.model(inputs_embeds=x, attention_mask=mask if padded else None, use_cache=True)
    cache, h = out.past_key_values, out.last_hidden_state[:, -1]  # (b, H)
    done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
    steps, scores = [], []
    for step in range(max_new_tokens):
        logits = next_token_logits(llm.lm_head, h, banned_id)  # (b, V)
        tok = logits.argmax(-1).masked_fill(done, pad_id)  # (b,)
        steps.append(tok)
        if keep_logits:
            scores.append(logits)
        if eos_id is not None:
            done |= tok == eos_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if padded:
            mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
        out = llm.model(input_ids=tok[:, None], past_key_values=cache,
                        attention_mask=mask if padded else None, use_cache=True)
        cache, h = out.past_key_values, out.last_hidden_state[:, -1]
    return torch.stack(steps, 1), (torch.stack(scores, 1) if keep_logits else None)


def _decode_recompute(module, prompt: MergedInputs, max_new_tokens: int, eos_id: int | None,
                      pad_id: int, keep_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy tokens (B, n) (and logits (B, n, V) if ``keep_logits``) by a full forward of
    prompt + tokens so far at every step (reference)."""
    B = prompt.lengths.numel()
    embed = module.llm.get_input_embeddings()
    rows = torch.arange(B, device=prompt.lengths.device)
    tokens = torch.zeros(B, 0, dtype=torch.long, device=prompt.lengths.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.lengths.device)
    scores = []
    for step in range(max_new_tokens):
        seq = _append_answers(prompt, embed, tokens, torch.full_like(prompt.lengths, step))
        h = module(seq)[rows, prompt.lengths + step - 1]  # (B, H): the last real position of each row
        logits = next_token_logits(module.llm.lm_head, h, module.placeholder_id)  # (B, V)
        tok = logits.argmax(-1).masked_fill(done, pad_id)
        tokens = torch.cat([tokens, tok[:, None]], 1)
        if keep_logits:
            scores.append(logits)
        if eos_id is not None:
            done |= tok == eos_id
        if bool(done.all()):
            break
    return tokens, (torch.stack(scores, 1) if keep_logits else None)


def greedy_decode(module, batch: dict, max_new_tokens: int = 64, use_cache: bool = True,
                  stop_at_eos: bool = True, prompt: MergedInputs | None = None,
                  batched: bool | None = None, return_logits: bool = False):
    """Greedy answer tokens of every row of ``batch`` (prompts only; answers in the batch are ignored).

    Args:
        module: a SALM (put in eval mode for the call, its mode restored after).
        batch: salm_mtp.data.dataset layout (needs audios, audio_lens, input_ids, prompt_lens).
        max_new_tokens: most tokens generated per row (eos included).
        use_cache: True: prefill + one cached step per token; False: full recompute per token.
        stop_at_eos: False keeps generating past eos (tests), lengths are then all the same.
        prompt: the output of :func:`encode_prompts` for this batch, to skip recomputing it.
        batched: decode all rows in one left-padded batch (True), or in groups of equal prompt
            length (False); None = batched when :func:`left_padding_exact`. Cached path only.
        return_logits: also return the main head's fp32 logits (B, L, V) of every step (tests,
            scoring); entries past a row's length are meaningless.

    Returns:
        tokens (B, L) long on the module's device, row b valid up to lengths[b], padded with the
        tokenizer's pad id (eos if none); lengths (B,) long: generated tokens per row including
        the final eos when the row stopped on one. L = max(lengths). With ``return_logits``,
        (tokens, lengths, logits).
    """
    eos_id = _eos_id(module) if stop_at_eos else None
    pad_id = _pad_id(module)
    with inference(module):
        if prompt is None:
            prompt = encode_prompts(module, batch)
        B = prompt.lengths.numel()
        dev = prompt.inputs_embeds.device
        if B == 0 or max_new_tokens <= 0:
            empty = (torch.zeros(B, 0, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.long, device=dev))
            V = module.llm.lm_head.out_features
            return (*empty, torch.zeros(B, 0, V, device=dev)) if return_logits else empty
        if not use_cache:
            tokens, logits = _decode_recompute(module, prompt, max_new_tokens, eos_id, pad_id, return_logits)
        else:
            if batched is None:
                batched = left_padding_exact(module.llm)
            parts = []
            for rows in _row_groups(prompt.lengths, batched):
                parts.append((rows, _decode_cached(module.llm, prompt.inputs_embeds[rows], prompt.lengths[rows],
                                                   max_new_tokens, eos_id, pad_id, return_logits,
                                                   module.placeholder_id)))
            L = max(t.shape[1] for _, (t, _) in parts)
            tokens = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
            logits = torch.zeros(B, L, parts[0][1][1].shape[-1], device=dev) if return_logits else None
            for rows, (t, lg) in parts:
                tokens[rows, : t.shape[1]] = t
                if return_logits:
                    logits[rows, : t.shape[1]] = lg
        lengths = _lengths_after_eos(tokens, eos_id)
        L = int(lengths.max())
        tokens = tokens[:, :L].masked_fill(torch.arange(L, device=dev)[None, :] >= lengths[:, None], pad_id)
        return (tokens, lengths, logits[:, :L]) if return_logits else (tokens, lengths)


def decode_text(tokenizer, tokens: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Text of each row's first ``lengths[b]`` tokens, special tokens (eos) dropped."""
    return [tokenizer.decode(tokens[b, : int(lengths[b])].tolist(), skip_special_tokens=True).strip()
            for b in range(tokens.shape[0])]


def greedy_generate(module, batch: dict, max_new_tokens: int = 64, use_cache: bool = True) -> list[str]:
    """Greedy answer text of every row of ``batch`` (see :func:`greedy_decode`)."""
    tokens, lengths = greedy_decode(module, batch, max_new_tokens=max_new_tokens, use_cache=use_cache)
    return decode_text(module.tokenizer, tokens.cpu(), lengths.cpu())


# ---------------------------------------------------------------------------------------- MTP drafts
def mtp_drafts(module, batch: dict, answer_tokens: torch.Tensor, lengths: torch.Tensor,
               prompt: MergedInputs | None = None) -> torch.Tensor:
    """Each MTP depth's argmax along the main model's own answer, teacher-forced in one forward.

    The sequence of row b is its merged prompt (P_b positions) followed by ``answer_tokens[b, :n_b]``.
    Position p = P_b - 1 + t is where the main head produces answer token t; depth k at that
    position sees the embedding at p + k (answer token t + k - 1, already known at step t + k - 1)
    and predicts the token at p + 1 + k, i.e. answer token t + k. So

        drafts[b, k-1, t] = argmax lm_head(h_k[b, P_b - 1 + t])   predicts answer_tokens[b, t + k]

    (the audio placeholder excluded from the argmax, as in decoding: no answer holds it, and the
    speculative decoder's live drafts equal these wherever its earlier drafts were right),

    which is ``metrics.mtp_acceptance``'s convention: pass ``valid = arange(L) < lengths``.

    Args:
        module: a SALM (eval mode for the call, mode restored after).
        batch: the batch the answers were decoded from (only its prompts are used).
        answer_tokens: (B, L) long, e.g. from :func:`greedy_decode`.
        lengths: (B,) valid tokens per row.
        prompt: the output of :func:`encode_prompts` for this batch, to skip recomputing it.

    Returns:
        (B, D, L) long on the module's device; D = 0 when the module has no MTP head. Entries at
        t >= lengths[b] - k predict nothing real (mtp_acceptance's ``valid`` excludes them).
    """
    with inference(module):
        if prompt is None:
            prompt = encode_prompts(module, batch)
        dev = prompt.inputs_embeds.device
        answer_tokens, lengths = answer_tokens.to(dev), lengths.to(dev)
        B, L = answer_tokens.shape
        D = module.num_mtp_depths
        if D == 0 or B == 0 or L == 0:
            return torch.zeros(B, D, L, dtype=torch.long, device=dev)
        embeds = _append_answers(prompt, module.llm.get_input_embeddings(), answer_tokens, lengths)  # (B, T, H)
        h0 = module(embeds)
        hiddens = module.mtp_hiddens(h0, embeds)  # D x (B, T, H)
        pos = (prompt.lengths - 1)[:, None] + torch.arange(L, device=dev)[None, :]  # (B, L)
        pos = pos.clamp(max=embeds.shape[1] - 1)  # rows shorter than L: positions past the end are padding
        idx = pos[:, :, None].expand(B, L, embeds.shape[-1])
        drafts = [next_token_logits(module.llm.lm_head, h.gather(1, idx), module.placeholder_id).argmax(-1)
                  for h in hiddens]  # D x (B, L); the placeholder is banned as in decoding: it is never an answer token
        return torch.stack(drafts, 1)
