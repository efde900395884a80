"""Self-speculative decoding of a SALM (salm_mtp/salm.py): greedy's exact tokens from fewer backbone forwards, the
drafts from its MTP head, its encoder's CTC transcript, or both (docs/design.md §9).

    from salm_mtp.decoding.modes import mtp_decode, speculative_decode      # the calls (decoding/modes.py)
    tokens, lengths, stats = mtp_decode(module, batch, max_new_tokens=64)   # == greedy_decode(module, batch)
    tokens, lengths, stats = speculative_decode(module, batch, "ctc+mtp")    # the same tokens
    stats.tokens_per_forward, stats.chained_acceptance()                   # measured while decoding

One step, per row (y = the answer so far; its last token y[-1] is known but not yet fed to the backbone):
  draft   depth 1 fuses the backbone's hidden state that produced y[-1] with emb(y[-1]) -> d_1; depth k
          fuses depth k-1's output with emb(d_{k-1}) -> d_k (the head's training inputs, docs/design.md §2)
  verify  one cached backbone forward over [y[-1], d_1 .. d_D] -> the greedy tokens g_0 .. g_D there
  accept  a = the longest prefix with d_j == g_{j-1}; emit g_0 .. g_a (a accepted drafts + the backbone's own)
  commit  the backbone cache keeps the first a+1 fed positions (states.py: attention cropped, Mamba
          states picked from the per-position record); the head then runs over those a+1 positions.
Rejected drafts never reach a kept state, so the output is greedy's token for token.

Answer drafts (modes ctc and ctc+mtp; decoding/ctc.py). An ASR row also carries a draft of its whole answer: the
encoder's CTC transcript in the answer's tokens. The first backbone forward runs over each prompt followed by its
draft, so it gives greedy's first token and greedy's token after every draft token at once: the longest agreeing
prefix plus the backbone's own token is kept, and a row whose draft held to its end token is finished in that one
forward. Rows it does not finish are prefilled again over prompt + their accepted tokens (that forward keeps the
cache) and go on with the head's drafts (ctc+mtp) or plain greedy steps (ctc).

The head's caches. Depth k at position p reads the token at p + k, so only its positions up to
(last fed position + 1 - k) are final; each step depth k reruns its k-1 newest positions (with the
fresh drafts standing in for unknown tokens) together with the a+1 new ones, keeps a+1 of them and
crops the rest. Depth 1 thus never reruns anything. Each depth has its own DynamicCache (a
repeated-layer head reuses layer indices across depths); its Mamba sublayers, if any, are committed
like the backbone's.

Batches. Rows are left-padded at prefill (exact when generate.left_padding_exact, else rows decode in
groups of equal prompt length, as greedy does). Every step appends max_b(a_b) + 1 columns to each
attention cache; row b keeps a_b + 1 of them and the rest become holes, masked through the 2-D
attention mask (Nemotron-H attention has no positions, so a hole changes nothing). Rows that finish
(eos or max_new_tokens) ride along until all have, with acceptance 0 so they add no columns (their
caches advance on whatever they are fed; nothing reads them again).

Figures (SpecStats, summed over rows while they decode; the prefill's first token is not counted):
  tokens_per_forward   emitted tokens / verification forwards = the mean accepted length, measured
  chained_acceptance   per depth k: steps where depths 1..k were all accepted / steps whose depth-k draft
                       predicted a real token (1 + their sum ~= tokens_per_forward)
  ctc_acceptance       accepted / proposed answer-draft tokens (steps with an answer draft are left out of
                       chained_acceptance)
Teacher-forced agreement (generate.mtp_drafts along the finished greedy answer) is a different,
offline figure: it scores every position, not the ones a decoder drafts from.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

from salm_mtp.decoding.states import MambaRecorder, commit, crop_attention
from salm_mtp.decoding.stats import SpecStats, step_counts
from salm_mtp.generate import _lengths_after_eos, left_pad, next_token_logits


# ------------------------------------------------------------------------------------------ decoder
class SpeculativeDecoder:
    """Speculative decoding state of the rows decoded together: ``prefill`` once, then ``step`` until
    ``finished``, inside ``with``. Tests inspect ``cache`` (backbone), ``mask`` (its (b, S) key columns),
    ``tokens``/``lens``.

        with SpeculativeDecoder(module, num_drafts, max_new_tokens, eos_id, pad_id, answers) as dec:
            dec.prefill(embeds, lens)
            while not dec.finished:
                dec.step()
            tokens, stats = dec.result()

    ``num_drafts`` = D MTP depths drafting each step (0: no head); ``answers`` (one per row, or None): whole-answer
    drafts (decoding/ctc.py). A row whose answer so far is a prefix of its answer draft proposes the rest of it;
    the others propose the head's D drafts (none with D = 0: a plain greedy step).
    """

    def __init__(self, module, num_drafts: int, max_new_tokens: int, eos_id: int | None, pad_id: int,
                 answers: list[list[int] | None] | None = None):
        self.llm, self.D = module.llm, num_drafts
        self.head = module.llm.mtp if num_drafts > 0 else None
        self.answers = answers if answers is not None and any(a for a in answers) else None
        self.embed = self.llm.get_input_embeddings()
        self.banned = module.placeholder_id
        self.max_new, self.eos_id, self.pad_id = max_new_tokens, eos_id, pad_id
        self.recorder = MambaRecorder(*(m for m in (self.llm.model, self.head) if m is not None))
        self._installed = None
        # the cache layer that sizes depth k's attention masks: its first attention sublayer (None: no attention)
        self.attn_idx = [None] + [next((blk.layer_idx for blk in self.head.depth_blocks(k)
                                        if blk.block_type == "full_attention"), None) for k in range(1, num_drafts + 1)]
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (accepted, lens before, active)

    def __enter__(self) -> SpeculativeDecoder:
        """Install the Mamba state recording (states.py) for the decode; ``with`` is required."""
        self._installed = self.recorder.installed()
        self._installed.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._installed.__exit__(*exc)
        self._installed = None

    # -------------------------------------------------------------- helpers
    def argmax(self, h: torch.Tensor) -> torch.Tensor:
        """Greedy tokens (...) of hidden states (..., H) (fp32 logits, audio placeholder banned, as greedy)."""
        return next_token_logits(self.llm.lm_head, h, self.banned).argmax(-1)

    def draft_token(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Depth k's draft (b,) from its output (b, H) at the drafting position (tests replace it by an oracle:
        row b's draft then predicts answer token ``lens[b] + k - 1``)."""
        return self.argmax(h)

    def _depth(self, k: int, h: torch.Tensor, e: torch.Tensor, cache, mask2d: torch.Tensor) -> torch.Tensor:
        """MTP depth k over a chunk (b, n, H) continuing ``cache``; ``mask2d`` (b, past + n) key columns."""
        m = mask2d if self.need_mask else None
        cfg = self.head.block_config
        masks = {"linear_attention": create_recurrent_attention_mask(config=cfg, inputs_embeds=h, attention_mask=m)}
        if self.attn_idx[k] is not None:
            masks["full_attention"] = create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=m,
                                                         past_key_values=cache, layer_idx=self.attn_idx[k])
        return self.head.forward_depth(k, h, e, past_key_values=cache, use_cache=True, attention_mask=masks)

    # -------------------------------------------------------------- prefill
    def prefill(self, embeds: torch.Tensor, lens: torch.Tensor) -> None:
        """Backbone and head over the prompts (right-padded (b, T, H), lengths (b,)); first token, first drafts.
        With answer drafts, one forward over prompt + draft verifies them first (``_verify_answers``) and only the
        rows it does not finish decode on: from its cache when each kept every position it was fed, else prefilled
        again over prompt + their accepted tokens."""
        b, dev = embeds.shape[0], embeds.device
        widest = max(self.D, self.max_new if self.answers is not None else 0)  # a forward writes <= widest + 1 tokens
        self.tokens = torch.full((b, self.max_new + widest + 1), self.pad_id, dtype=torch.long, device=dev)
        self.lens = torch.zeros(b, dtype=torch.long, device=dev)
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)
        self.batch_forwards = self.prefills = 0
        self.whole = self.verified = None
        if self.answers is not None:
            x, mask, h, cache, whole_draft = self._verify_answers(embeds, lens)
            if self.finished:
                return
            live = (~self.done).nonzero()[:, 0]
            if live.numel() < b:  # decode on with the unfinished rows only
                self.whole = (self.tokens, live)
                embeds, lens, self.tokens, self.lens, self.done = (t[live] for t in (embeds, lens, self.tokens,
                                                                                    self.lens, self.done))
                x, mask, h, whole_draft = x[live], mask[live], h[live], whole_draft[live]
                cache.reorder_cache(live)
            if bool(whole_draft.all()):  # no row rejected a draft token: the cache holds exactly what they kept
                return self._start(x, mask, h, cache)
            embeds, lens = self._extended(embeds, lens, self.tokens, self.lens)
        x, mask = left_pad(embeds, lens)  # (b, P, H), (b, P)
        padded = bool((mask == 0).any())
        out = self.llm.model(inputs_embeds=x, attention_mask=mask if padded else None, use_cache=True)
        self.batch_forwards += 1
        self.prefills += x.shape[0]
        self._start(x, mask, out.last_hidden_state, out.past_key_values)

    def _start(self, x: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor, cache) -> None:
        """Decoding state after a forward over ``x`` (b, P, H) (left-padded, ``mask`` (b, P)) whose hidden states
        are ``h0`` and cache ``cache``: each row's next token, and the head's first drafts."""
        self.need_mask = bool((mask == 0).any())  # padding or holes: masks must be passed
        self.cache, self.mask = cache, mask.bool()
        y = self.argmax(h0[:, -1])  # (b,): each row's next token
        self.tokens.scatter_(1, self.lens[:, None], y[:, None])
        self.lens = self.lens + 1
        self.done = self.lens >= self.max_new
        if self.eos_id is not None:
            self.done |= y == self.eos_id
        self.last = y
        self.drafts = self._prefill_head(x, self.mask, h0, y) if self.D else y.new_zeros(y.shape[0], 0)

    def _extended(self, embeds: torch.Tensor, lens: torch.Tensor, tokens: torch.Tensor,
                  n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompts (b, T, H) with each row's first ``n[b]`` ``tokens`` embedded after it."""
        b, _, H = embeds.shape
        K = int(n.max()) if n.numel() else 0
        out = torch.cat([embeds, embeds.new_zeros(b, K, H)], 1)
        if K:
            pos = lens[:, None] + torch.arange(K, device=embeds.device)[None, :]  # (b, K); past n[b]: padding
            out.scatter_(1, pos[..., None].expand(-1, -1, H), self.embed(tokens[:, :K]).to(out.dtype))
        return out, lens + n

    def _verify_answers(self, embeds: torch.Tensor, lens: torch.Tensor):
        """One backbone forward over each prompt followed by its answer draft: greedy's first token and its token
        after every draft token; a row keeps the longest agreeing prefix plus the backbone's own token. A row whose
        draft held to its end token (or to max_new_tokens) is done here, in one forward; the others keep their
        accepted drafts in ``tokens`` / ``lens``. Returns the forward's left-padded inputs (b, S, H), mask (b, S),
        hidden states, cache, and which rows kept every position they were fed (no draft, or all of it)."""
        b, dev = embeds.shape[0], embeds.device
        drafts = [(self.answers[r] or [])[: self.max_new] for r in range(b)]
        L = torch.tensor([len(d) for d in drafts], device=dev)
        K = int(L.max())
        for r, d in enumerate(drafts):
            self.tokens[r, : len(d)] = torch.tensor(d, dtype=torch.long, device=dev)
        d = self.tokens[:, :K].clone()  # (b, K), pad after each row's draft
        x, mask = left_pad(*self._extended(embeds, lens, d, L))
        padded = bool((mask == 0).any())
        out = self.llm.model(inputs_embeds=x, attention_mask=mask if padded else None, use_cache=True)
        h = out.last_hidden_state
        S, H = h.shape[1], h.shape[2]
        at = (S - 1 - L)[:, None] + torch.arange(K + 1, device=dev)[None, :]  # the prompt's last position, each draft's
        g = self.argmax(h.gather(1, at.clamp(max=S - 1)[..., None].expand(-1, -1, H)))  # (b, K+1)
        cols = torch.arange(K + 1, device=dev)[None, :]
        acc = ((d == g[:, :K]) & (cols[:, :K] < L[:, None])).long().cumprod(1).sum(1)  # (b,) accepted drafts
        emitted = cols < (acc + 1)[:, None]  # g_0 .. g_acc
        self.tokens[:, : K + 1] = torch.where(emitted, g, self.pad_id)
        done = acc + 1 >= self.max_new
        if self.eos_id is not None:
            done |= ((g == self.eos_id) & emitted).any(1)
        self.done = done
        self.lens = torch.where(done, acc + 1, acc)  # the others: their accepted drafts, fed at the prefill
        has = L > 0
        self.verified = (acc, L)  # a verification of each row's answer draft (none where L is 0): not the head's
        self.batch_forwards += 1
        self.prefills += int((~has).sum())  # for a row without a draft this forward was its prefill
        return x, mask, h, out.past_key_values, acc == L

    def _prefill_head(self, x: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """Each depth over the prompt positions; (b, D) drafts at the last one."""
        b, P, _ = x.shape
        keep = mask[..., None].to(x.dtype)  # zero the padding: its hidden states are never read
        h_prev = h0 * keep
        tail = [self.embed(y0)[:, None]]  # embeddings past the prompt: y0, d_1, d_2, ...
        self.head_caches, self.head_masks, self.carry, drafts = [], [], [None], []
        for k in range(1, self.D + 1):
            e = torch.cat([x[:, k:], *tail], 1) * keep  # (b, P, H): depth k at p reads position p + k
            cache = DynamicCache(config=self.head.block_config)
            c = P - k + 1  # positions 0..P-k read known inputs: kept; the last k-1 read drafts
            h_k = self._depth(k, h_prev[:, :c], e[:, :c], cache, mask[:, :c])
            self.carry.append(h_k[:, -1:])  # depth k at its last kept position (depth k+1's first input next step)
            if k > 1:  # Mamba sublayers record instead of advancing: nothing of the tail is committed
                h_tail = self._depth(k, h_prev[:, c:], e[:, c:], cache, mask)
                self.recorder.take()
                crop_attention(cache, k - 1)
                h_k = torch.cat([h_k, h_tail], 1)
            d = self.draft_token(k, h_k[:, -1])
            drafts.append(d)
            tail.append(self.embed(d)[:, None])
            self.head_caches.append(cache)
            self.head_masks.append(mask[:, :c])
            h_prev = h_k * keep
        return torch.stack(drafts, 1)

    # -------------------------------------------------------------- one step
    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def step(self) -> None:
        """Verify the drafts, keep the accepted prefix, draft again."""
        b = self.last.shape[0]
        dev = self.last.device
        drafts = self.drafts  # (b, W): the head's D drafts (none without a head: a plain greedy step)
        W = drafts.shape[1]
        fed = torch.cat([self.last[:, None], drafts], 1)  # (b, W+1)
        m = torch.cat([self.mask, self.mask.new_ones(b, W + 1)], 1) if self.need_mask else None
        out = self.llm.model(input_ids=fed, past_key_values=self.cache, attention_mask=m, use_cache=True)
        rec = self.recorder.take()
        h = out.last_hidden_state  # (b, W+1, H)
        g = self.argmax(h)  # (b, W+1): g_j = greedy token after fed[:, : j+1]
        active = ~self.done
        acc = (drafts == g[:, :W]).long().cumprod(1).sum(1) * active  # (b,) accepted drafts
        keep = acc + 1
        n0 = int(keep.max())
        commit(self.cache, rec, keep)
        crop_attention(self.cache, W + 1 - n0)
        new_cols = torch.arange(n0, device=dev)[None, :] < keep[:, None]  # (b, n0)
        self.need_mask |= not bool(new_cols.all())
        self.mask = torch.cat([self.mask, new_cols], 1)

        self.steps.append((acc, self.lens.clone(), active))
        cols = self.lens[:, None] + torch.arange(W + 1, device=dev)[None, :]  # rows that are done write past their end
        self.tokens.scatter_(1, cols.clamp(max=self.tokens.shape[1] - 1), g)
        stopped = torch.zeros_like(self.done)
        if self.eos_id is not None:
            stopped = ((g == self.eos_id) & (torch.arange(W + 1, device=dev)[None, :] < keep[:, None])).any(1)
        self.lens = self.lens + keep * active
        self.done = self.done | (active & stopped) | (self.lens >= self.max_new)
        self.last = g.gather(1, acc[:, None])[:, 0]
        self.batch_forwards += 1
        if not self.finished and self.D:
            self.drafts = self._draft(h[:, :n0], g[:, :n0], acc, new_cols)

    def _draft(self, h0: torch.Tensor, g: torch.Tensor, acc: torch.Tensor, new_cols: torch.Tensor) -> torch.Tensor:
        """Run each depth over its chunk after a step that kept ``acc + 1`` positions; (b, D) new drafts.

        Depth k's chunk (n0 + k - 1 columns; row b's first acc_b + k are real): its position before the new
        ones (k > 1; input: depth k-1's output kept there last step, ``carry``), then the new positions.
        Its token inputs: g_0 .. g_acc, then the drafts d_1 .. d_{k-1} of this round.
        """
        b, n0, _ = h0.shape
        rows = torch.arange(b, device=h0.device)
        tok, h_prev, drafts, carry = g, h0, [], [None]
        for k in range(1, self.D + 1):
            if k > 1:
                h_prev = torch.cat([self.carry[k - 1], h_prev], 1)
                tok = torch.cat([tok, tok.new_zeros(b, 1)], 1)
                tok.scatter_(1, (acc + k - 1)[:, None], drafts[-1][:, None])
            cache = self.head_caches[k - 1]
            m = torch.cat([self.head_masks[k - 1], new_cols.new_ones(b, n0 + k - 1)], 1)
            h_k = self._depth(k, h_prev, self.embed(tok), cache, m)  # (b, n0 + k - 1, H)
            rec = self.recorder.take()
            drafts.append(self.draft_token(k, h_k[rows, acc + k - 1]))
            carry.append(h_k[rows, acc][:, None])  # the last position kept
            commit(cache, rec, acc + 1)
            crop_attention(cache, k - 1)
            self.head_masks[k - 1] = torch.cat([self.head_masks[k - 1], new_cols], 1)
            h_prev = h_k
        self.carry = carry
        return torch.stack(drafts, 1)

    # -------------------------------------------------------------- results
    def result(self) -> tuple[torch.Tensor, SpecStats]:
        """(tokens (b, <= max_new) with the same values as greedy's up to each row's length, stats)."""
        tokens = self.tokens
        if self.whole is not None:  # the rows the answer drafts finished, and those decoded on
            tokens, rows = self.whole[0].clone(), self.whole[1]
            tokens[rows] = self.tokens
        tokens = tokens[:, : self.max_new]
        lengths = _lengths_after_eos(tokens, self.eos_id)
        stats = SpecStats(self.D, batch_forwards=self.batch_forwards, prefills=self.prefills)
        if self.verified is not None:
            acc, L = self.verified
            has = L > 0
            stats.add(step_counts(acc[None], torch.zeros_like(acc)[None], has[None], lengths, self.D,
                                  torch.zeros_like(has)[None]))  # no head drafts in it: no per-depth figures
            stats.add(SpecStats(self.D, ctc_steps=int(has.sum()), ctc_drafted=int(L.sum()),
                                ctc_accepted=int(acc.sum())))
        if self.steps:
            acc, before, active = (torch.stack(t) for t in zip(*self.steps))  # (S, b) each
            live_lengths = lengths if self.whole is None else lengths[self.whole[1]]
            stats.add(step_counts(acc, before, active, live_lengths, self.D))
        return tokens, stats
