"""salm_mtp.decoding: self-speculative decoding (MTP drafts, CTC answer drafts, both) equals greedy token for token (random head: drafts
mostly rejected; oracle drafts: all accepted; corrupted oracle: mixed), the backbone cache after a step
equals greedy's at the same position, the head's live drafts equal its teacher-forced ones wherever the
earlier drafts were right, the recorded Mamba states, and the figures on hand-built steps."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch

import tiny
from salm_mtp.decoding.modes import mtp_decode, speculative_decode
from salm_mtp.decoding.speculative import SpeculativeDecoder
from salm_mtp.decoding.stats import SpecStats, step_counts
from salm_mtp.decoding.states import MambaRecorder, commit, crop_attention
from salm_mtp.generate import _append_answers, encode_prompts, greedy_decode, inference, left_pad, mtp_drafts

N_NEW = 10
BACKBONE = "M*E-"  # every block type


def _module(tok_dir, head_pattern=None, mtp_layers=2, sharpen=3.0, **kw):
    """Tiny model; larger backbone and head weights make each row's answer depend on its audio (as in
    test_generate) and the head's outputs on its caches."""
    torch.manual_seed(0)
    module = tiny.build(tok_dir, pattern=BACKBONE, mtp_layers=mtp_layers, mtp_pattern=head_pattern, **kw)
    with torch.no_grad():
        blocks = [module.llm.model.layers] + ([module.llm.mtp] if mtp_layers else [])
        for p in (p for part in blocks for p in part.parameters()):
            if p.ndim >= 2:
                p.mul_(sharpen)
    module.eval()
    return module


def _batch(module, rows):
    batch = tiny.make_batch(module.tokenizer, ["one two three", "the cat", "1 2 3"], [16000, 9000, 4000],
                            tasks=["asr", "asr", "ast"])
    out = {k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows] if isinstance(v, list) else v)
           for k, v in batch.items()}
    out["clip_rows"] = torch.arange(len(rows))  # one clip per row
    return out


@pytest.fixture(scope="module", params=["*E", "M*"], ids=["head*E", "headM*"])
def module(request, tok_dir):
    """A head of attention + MoE (the default for MoE backbones), and one with a Mamba sublayer."""
    return _module(tok_dir, head_pattern=request.param)


ROWS = {"batch1": [1], "batch3": [0, 1, 2]}


def _decode(module, batch, D, drafts="head", stop_at_eos=False, corrupt=(), on_step=None):
    """SpeculativeDecoder over the whole batch (left padding is exact here). drafts: "head" (its own),
    "oracle" (greedy's tokens, so all accepted), with ``corrupt`` = {(row, answer index)} drafted wrong.
    Also returns the head's own drafts at each drafting point: [(k, row, lens, token, hidden (H,))]."""
    truth, _ = greedy_decode(module, batch, N_NEW + D + 2, stop_at_eos=False)
    eos = module.tokenizer.eos_token_id if stop_at_eos else None
    own = []
    with inference(module):
        prompt = encode_prompts(module, batch)
        with SpeculativeDecoder(module, D, N_NEW, eos, module.tokenizer.pad_token_id) as dec:
            def draft(k, h):
                mine = dec.argmax(h)
                own.extend((k, b, int(dec.lens[b]), int(mine[b]), h[b].clone()) for b in range(h.shape[0])
                           if not dec.done[b])
                if drafts == "head":
                    return mine
                pos = (dec.lens + k - 1).clamp(max=truth.shape[1] - 1)
                tok = truth.gather(1, pos[:, None])[:, 0].clone()
                for b in range(tok.numel()):
                    if (b, int(pos[b])) in corrupt:
                        tok[b] = (tok[b] + 1) % module.llm.config.vocab_size
                return tok

            dec.draft_token = draft
            dec.prefill(prompt.inputs_embeds, prompt.lengths)
            while not dec.finished:
                dec.step()
                if on_step is not None:
                    on_step(dec)
            tokens, stats = dec.result()
    return tokens, stats, own, dec


def _teacher_forced(module, batch, answer, lengths):
    """(the depths' outputs D x (B, T, H) over prompt + answer, merged prompt lengths (B,)): what
    generate.mtp_drafts takes its argmax of; depth k at P_b - 1 + t predicts answer token t + k."""
    with inference(module):
        prompt = encode_prompts(module, batch)
        embeds = _append_answers(prompt, module.llm.get_input_embeddings(), answer, lengths)
        return module.mtp_hiddens(module(embeds), embeds), prompt.lengths


def _check_own_drafts(module, batch, ref, ref_len, own, chain_ok) -> int:
    """The head's live drafts and their hidden states equal teacher forcing at every drafting point whose
    earlier drafts were right (``chain_ok(row, lens, k)``); returns how many were checked."""
    tf = mtp_drafts(module, batch, ref, ref_len)  # tf[b, k-1, t] predicts answer token t + k
    hiddens, plens = _teacher_forced(module, batch, ref, ref_len)
    checked = 0
    for k, b, lens, tok, h in own:  # drafted with lens tokens known: depth k predicts answer token lens + k - 1
        if lens + k - 1 < N_NEW and chain_ok(b, lens, k):
            torch.testing.assert_close(h, hiddens[k - 1][b, int(plens[b]) - 1 + lens - 1], rtol=0, atol=1e-5)
            assert tok == int(tf[b, k - 1, lens - 1]), (k, b, lens)
            checked += 1
    return checked


@pytest.mark.parametrize("rows", ROWS, ids=list(ROWS))
@pytest.mark.parametrize("D", [1, 2])
def test_identical_to_greedy_random_head(module, rows, D):
    batch = _batch(module, ROWS[rows])
    ref, ref_len = greedy_decode(module, batch, N_NEW, stop_at_eos=False)
    tokens, lengths, stats = mtp_decode(module, batch, N_NEW, num_drafts=D, stop_at_eos=False)
    assert torch.equal(tokens, ref) and torch.equal(lengths, ref_len)
    assert stats.chained_acceptance()[0] < 0.5  # an untrained head: drafts mostly rejected
    assert stats.forwards > 0 and stats.emitted == int(ref_len.sum()) - len(ROWS[rows])


@pytest.mark.parametrize("rows", ROWS, ids=list(ROWS))
@pytest.mark.parametrize("D", [1, 2])
def test_identical_to_greedy_forced_agreement(module, rows, D):
    """Oracle drafts: every draft accepted; the head's own drafts at each point equal its teacher-forced
    drafts (mtp_drafts) along the greedy answer, so its caches hold exactly the teacher-forced states."""
    batch = _batch(module, ROWS[rows])
    ref, ref_len = greedy_decode(module, batch, N_NEW, stop_at_eos=False)
    tokens, stats, own, _ = _decode(module, batch, D, drafts="oracle")
    assert torch.equal(tokens, ref)
    steps = math.ceil((N_NEW - 1) / (D + 1))  # the prefill gives token 0, each step D + 1 more
    assert stats.forwards == steps * len(ROWS[rows])
    assert stats.tokens_per_forward == pytest.approx((N_NEW - 1) / steps)
    assert stats.chained_acceptance() == [1.0] * D
    checked = _check_own_drafts(module, batch, ref, ref_len, own, lambda b, lens, k: True)
    assert checked >= steps * len(ROWS[rows])


@pytest.mark.parametrize("rows", ROWS, ids=list(ROWS))
def test_mixed_acceptance(module, rows):
    """D=2 with some drafts wrong: rows accept 0, 1 or 2 per step (holes in the batch's cache columns);
    the output is still greedy's, and the head's own drafts match teacher forcing while the chain holds."""
    batch = _batch(module, ROWS[rows])
    ref, ref_len = greedy_decode(module, batch, N_NEW, stop_at_eos=False)
    corrupt = {(0, 2), (0, 6), (1, 1), (1, 5), (1, 7), (2, 3)}
    corrupt = {(ROWS[rows].index(b), t) for b, t in corrupt if b in ROWS[rows]}
    accepted = []
    tokens, stats, own, dec = _decode(module, batch, 2, drafts="oracle", corrupt=corrupt,
                                      on_step=lambda d: accepted.append(d.steps[-1][0].tolist()))
    assert torch.equal(tokens, ref)
    seen = {a for step in accepted for a in step}
    assert {0, 1, 2} <= seen or len(ROWS[rows]) == 1 and {0, 1} <= seen
    if len(ROWS[rows]) > 1:
        assert not bool(dec.mask.all())  # rows kept different numbers of columns
    checked = _check_own_drafts(module, batch, ref, ref_len, own,
                                lambda b, lens, k: not any((b, lens + j) in corrupt for j in range(k - 1)))
    assert checked >= 8


def _greedy_caches(module, batch, n_max):
    """{n: cache after greedy produced n tokens} (prompt + the first n-1 tokens fed), left-padded as the
    speculative decoder is, and the (b, P) prefill mask."""
    llm = module.llm
    ref, _ = greedy_decode(module, batch, n_max, stop_at_eos=False)
    with inference(module):
        prompt = encode_prompts(module, batch)
        x, mask = left_pad(prompt.inputs_embeds, prompt.lengths)
        padded = bool((mask == 0).any())
        cache = llm.model(inputs_embeds=x, attention_mask=mask if padded else None, use_cache=True).past_key_values
        caches = {1: copy.deepcopy(cache)}
        for n in range(2, n_max + 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            llm.model(input_ids=ref[:, n - 2 : n - 1], past_key_values=cache, attention_mask=mask if padded else None,
                      use_cache=True)
            caches[n] = copy.deepcopy(cache)
    return caches, mask.bool()


def _assert_row_cache_equal(spec, spec_mask, ref, ref_mask, b):
    """Row b of two backbone caches: Mamba conv + SSM states equal; attention keys/values equal on the
    columns each mask marks real (holes and padding excluded)."""
    for ls, lr in zip(spec.layers, ref.layers):
        if hasattr(ls, "recurrent_states"):
            torch.testing.assert_close(ls.conv_states[0][b], lr.conv_states[0][b], rtol=0, atol=1e-5)
            torch.testing.assert_close(ls.recurrent_states[0][b], lr.recurrent_states[0][b], rtol=0, atol=1e-5)
        elif getattr(ls, "keys", None) is not None and ls.keys.numel():
            sm, rm = spec_mask[b, : ls.keys.shape[-2]], ref_mask[b, : lr.keys.shape[-2]]
            assert ls.keys.shape[-2] == spec_mask.shape[1]
            torch.testing.assert_close(ls.keys[b][:, sm], lr.keys[b][:, rm], rtol=0, atol=1e-5)
            torch.testing.assert_close(ls.values[b][:, sm], lr.values[b][:, rm], rtol=0, atol=1e-5)


@pytest.mark.parametrize("drafts", ["head", "mixed"])
@pytest.mark.parametrize("rows", ROWS, ids=list(ROWS))
def test_backbone_cache_after_rejection_equals_greedy(module, rows, drafts):
    batch = _batch(module, ROWS[rows])
    caches, _ = _greedy_caches(module, batch, N_NEW + 3)
    P = int(encode_prompts(module, batch).lengths.max())
    rejected = [0]

    def check(dec):
        acc = dec.steps[-1][0]
        rejected[0] += int(((acc < dec.D) & dec.steps[-1][2]).sum())
        for b in range(acc.numel()):
            n = int(dec.lens[b])
            if not dec.steps[-1][2][b] or n > N_NEW + 3:  # a finished row's cache is never read again
                continue
            ref = caches[n]
            ref_mask = torch.cat([dec.mask[:, :P], torch.ones(acc.numel(), n - 1, dtype=torch.bool)], 1)
            _assert_row_cache_equal(dec.cache, dec.mask, ref, ref_mask, b)

    corrupt = {(0, 3), (1, 2), (1, 5), (2, 4)} if drafts == "mixed" else set()
    corrupt = {(ROWS[rows].index(b), t) for b, t in corrupt if b in ROWS[rows]}
    tokens, _, _, _ = _decode(module, batch, 2, drafts="head" if drafts == "head" else "oracle", corrupt=corrupt,
                              on_step=check)
    assert rejected[0] > 0  # some step rejected a draft, and the cache was checked after it


def test_mamba_record_and_commit_match_single_steps(module):
    """states.py alone: 3 tokens recorded at once, then each row keeps a different prefix (1, 3, 2): its
    Mamba states and attention columns equal feeding those tokens one at a time."""
    llm = module.llm
    batch = _batch(module, [0, 1, 2])
    with inference(module):
        prompt = encode_prompts(module, batch)
        x, mask = left_pad(prompt.inputs_embeds, prompt.lengths)
        cache = llm.model(inputs_embeds=x, attention_mask=mask, use_cache=True).past_key_values
        chunk = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
        singles = [copy.deepcopy(cache)]
        m = mask
        for j in range(3):
            c = copy.deepcopy(singles[-1])
            m = torch.cat([m, m.new_ones(3, 1)], 1)
            llm.model(input_ids=chunk[:, j : j + 1], past_key_values=c, attention_mask=m, use_cache=True)
            singles.append(c)
        recorder = MambaRecorder(llm.model)
        with recorder.installed():
            out = llm.model(input_ids=chunk, past_key_values=cache, attention_mask=m, use_cache=True)
            record = recorder.take()
        assert set(record) == {i for i, t in enumerate(llm.config.layers_block_type) if t == "linear_attention"}
        assert all(r.conv.shape[1] == 3 and r.ssm.shape[1] == 3 for r in record.values())
        keep = torch.tensor([1, 3, 2])
        commit(cache, record, keep)
        crop_attention(cache, 0)  # max(keep) == 3: nothing to drop
    spec_mask = torch.cat([mask.bool(), torch.arange(3)[None, :] < keep[:, None]], 1)
    for b in range(3):
        n = int(keep[b])
        ref_mask = torch.cat([mask.bool(), torch.ones(3, n, dtype=torch.bool)], 1)
        _assert_row_cache_equal(cache, spec_mask, singles[n], ref_mask, b)
    assert out.last_hidden_state.shape[1] == 3


@pytest.mark.parametrize("D", [1, 2])
def test_rows_finish_early_at_eos(module, D):
    """Rows stop at eos at different steps (the token row 0 generates at step 3 made the eos), also inside
    an accepted run of drafts; lengths and tokens are greedy's."""
    batch = _batch(module, [0, 1, 2])
    free, _ = greedy_decode(module, batch, N_NEW, stop_at_eos=False)
    tok, old = module.tokenizer, module.tokenizer.eos_token
    tok.eos_token = tok.convert_ids_to_tokens(int(free[0, 3]))
    try:
        ref, ref_len = greedy_decode(module, batch, N_NEW)
        assert len(set(ref_len.tolist())) > 1  # rows finish at different steps
        tokens, lengths, stats = mtp_decode(module, batch, N_NEW, num_drafts=D)
        assert torch.equal(tokens, ref) and torch.equal(lengths, ref_len)
        assert stats.emitted == int(ref_len.sum()) - 3
        oracle, ostats, _, _ = _decode(module, batch, D, drafts="oracle", stop_at_eos=True)
        for b, n in enumerate(ref_len.tolist()):
            assert oracle[b, :n].tolist() == ref[b, :n].tolist()
        assert ostats.chained_acceptance() == [1.0] * D
    finally:
        tok.eos_token = old


def test_step_counts_hand_built():
    """Two rows, D=2. Row 0 (answer of 6 tokens): steps with 1, 4, 5 tokens known accept 2, 0, 1 drafts; its
    last step's backbone token would be the 7th: cut. Row 1 (2 tokens): one step, nothing accepted, then done."""
    accepted = torch.tensor([[2, 0], [0, 0], [1, 0]])
    before = torch.tensor([[1, 1], [4, 2], [5, 2]])
    active = torch.tensor([[True, True], [True, False], [True, False]])
    s = step_counts(accepted, before, active, torch.tensor([6, 2]), 2)
    assert s.forwards == 4
    assert s.emitted == 3 + 1 + 1 + 1  # every token but the prefill's: 5 + 1
    # depth 1 predicted a real token at all 4 steps, right at 2; depth 2 at row 0's first two steps, right once
    assert s.pairs == [4, 2] and s.hits == [2, 1]
    assert s.chained_acceptance() == [0.5, 0.5]
    assert s.tokens_per_forward == 1.5 and s.mean_accepted_length() == 2.0

    total = SpecStats(2)
    total.add(s)
    total.add(step_counts(torch.tensor([[2]]), torch.tensor([[1]]), torch.tensor([[True]]), torch.tensor([4]), 2))
    assert total.pairs == [5, 3] and total.hits == [3, 2] and total.forwards == 5 and total.emitted == 9
    d = total.as_dict()
    assert d["chained_acceptance"] == [0.6, 2 / 3] and d["tokens_per_forward"] == 9 / 5
    assert math.isnan(SpecStats(1).tokens_per_forward) and math.isnan(SpecStats(1).chained_acceptance()[0])


def test_num_drafts_checked(module, tok_dir):
    batch = _batch(module, [0])
    with pytest.raises(ValueError, match="num_drafts must be in 1..2"):
        mtp_decode(module, batch, 4, num_drafts=3)
    with pytest.raises(ValueError, match="no MTP head"):
        mtp_decode(_module(tok_dir, mtp_layers=0), batch, 4)


def test_evaluate_decode_mtp(tok_dir, sine_corpus, tmp_path, caplog):
    """evaluate(decode="mtp") writes the MTP hypotheses (== greedy's) and the live figures."""
    from salm_mtp.evaluation.report import format_table
    from salm_mtp.evaluation.run import evaluate

    module = _module(tok_dir)
    manifest = str(sine_corpus(n=5))
    g = evaluate(module, manifest, str(tmp_path / "g"), batch_size=3, max_new_tokens=6, progress=False)
    m = evaluate(module, manifest, str(tmp_path / "m"), batch_size=3, max_new_tokens=6, progress=False,
                 decode="mtp", num_drafts=2)
    assert g["decode"] == "greedy" and "spec_speedup" not in g
    assert (tmp_path / "g" / "hyps.jsonl").read_text() == (tmp_path / "m" / "hyps.jsonl").read_text()
    assert m["decode"] == "mtp" and m["spec_identical_to_greedy"] is True and m["spec_mismatched_rows"] == 0
    assert m["spec_num_drafts"] == 2 and len(m["spec_chained_acceptance"]) == 2
    assert m["spec_tokens_per_forward"] >= 1.0 and m["spec_speedup"] > 0
    assert m["greedy_row_forwards"] == m["generated_tokens"] and m["spec_row_forwards"] <= m["greedy_row_forwards"] + 5
    assert m["mtp_teacher_forced_agreement"] == g["mtp_teacher_forced_agreement"]  # offline: decoder-independent
    on_disk = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert on_disk["spec_identical_to_greedy"] is True
    assert "tokens per verification forward" in format_table(m)
    with caplog.at_level(logging.WARNING, logger="salm_mtp.decoding.modes"):  # no head: greedy, said so
        plain = evaluate(_module(tok_dir, mtp_layers=0), manifest, str(tmp_path / "x"), decode="mtp", progress=False)
    assert plain["decode"] == "greedy" and "spec_tokens_per_forward" not in plain
    assert "--decode mtp: this model has no MTP head to draft with: decoding with greedy (the same tokens)" in caplog.text


# ------------------------------------------------------------------------------------------ answer (CTC) drafts
@pytest.fixture(scope="module")
def ctc_module(tok_dir):
    """A model with an encoder CTC head (model.ctc_weight > 0) and a 2-depth head."""
    return _module(tok_dir, head_pattern="*E", ctc_weight=0.3)


@pytest.mark.parametrize("rows", ROWS, ids=list(ROWS))
@pytest.mark.parametrize(("mode", "D"), [("ctc", None), ("ctc+mtp", 1), ("ctc+mtp", 2)])
def test_ctc_modes_identical_to_greedy(ctc_module, rows, mode, D):
    """The untrained CTC head's drafts (mostly wrong) with or without the MTP head's: greedy's tokens."""
    batch = _batch(ctc_module, ROWS[rows])
    ref, ref_len = greedy_decode(ctc_module, batch, N_NEW, stop_at_eos=False)
    tokens, lengths, stats = speculative_decode(ctc_module, batch, mode, N_NEW, num_drafts=D, stop_at_eos=False)
    assert torch.equal(tokens, ref) and torch.equal(lengths, ref_len)
    asr = sum(t == "asr" for t in batch["tasks"])
    assert stats.ctc_steps == asr and stats.ctc_accepted <= stats.ctc_drafted  # each ASR row's draft, verified once
    assert stats.emitted <= int(ref_len.sum()) and stats.prefills >= len(ROWS[rows]) - asr


def _answers(ref: torch.Tensor, tasks: list[str], kind: str) -> list[list[int] | None]:
    """Answer drafts of the ASR rows built from greedy's own tokens ``ref`` (B, >= N_NEW): exact, longer, shorter,
    or wrong at answer token 4; None for the other rows."""
    out = []
    for row, task in zip(ref.tolist(), tasks):
        row = row[:N_NEW]
        draft = {"exact": row, "longer": row + [3, 4, 5], "shorter": row[:5],
                 "wrong_at_4": row[:4] + [(row[4] + 1) % 50] + row[5:]}[kind]
        out.append(draft if task == "asr" else None)
    return out


def _decode_answers(module, batch, D, answers, on_prefill=None):
    with inference(module):
        prompt = encode_prompts(module, batch)
        with SpeculativeDecoder(module, D, N_NEW, None, module.tokenizer.pad_token_id, answers) as dec:
            dec.prefill(prompt.inputs_embeds, prompt.lengths)
            if on_prefill is not None:
                on_prefill(dec)
            while not dec.finished:
                dec.step()
            tokens, stats = dec.result()
    return tokens, stats, dec


@pytest.mark.parametrize("rows", ROWS, ids=list(ROWS))
@pytest.mark.parametrize("D", [0, 2])
@pytest.mark.parametrize("kind", ["exact", "longer", "shorter", "wrong_at_4"])
def test_answer_drafts_forced(ctc_module, rows, D, kind):
    """Answer drafts built from greedy's own answer: right (all accepted: the ASR rows finish in the prompt's own
    forward), longer than the answer (cut at max_new_tokens), shorter (accepted, then the head or plain steps),
    wrong at token 4 (4 accepted, then the head); an AST row beside them decodes with the head only. Always
    greedy's tokens."""
    batch = _batch(ctc_module, ROWS[rows])
    ref, _ = greedy_decode(ctc_module, batch, N_NEW, stop_at_eos=False)
    answers = _answers(ref, batch["tasks"], kind)
    tokens, stats, _ = _decode_answers(ctc_module, batch, D, answers)
    assert torch.equal(tokens[:, :N_NEW], ref)
    asr = sum(a is not None for a in answers)
    assert stats.ctc_steps == asr  # one verification per ASR row: the prompt's forward
    drafted = {"exact": N_NEW, "longer": N_NEW, "shorter": 5, "wrong_at_4": N_NEW}[kind]
    assert stats.ctc_drafted == drafted * asr
    assert stats.ctc_accepted == {"exact": N_NEW, "longer": N_NEW, "shorter": 5, "wrong_at_4": 4}[kind] * asr
    if kind in ("exact", "longer") and asr == len(answers):
        assert stats.batch_forwards == 1 and stats.forwards == asr and stats.prefills == 0  # one forward in all


@pytest.mark.parametrize("rows", ROWS, ids=list(ROWS))
@pytest.mark.parametrize("kind", ["wrong_at_4", "shorter"])
def test_cache_after_the_answer_drafts_equals_greedy(ctc_module, rows, kind):
    """Rejected at token 4: the rows are prefilled again over prompt + the 4 accepted tokens; the 5-token draft
    all accepted (not the end: no eos here): the rows go on from the verifying forward's own cache. Either way the
    cache equals greedy's after the same tokens, the AST row's (no draft) after its first, and the decode goes on
    to greedy's answer."""
    batch = _batch(ctc_module, ROWS[rows])
    caches, prefill_mask = _greedy_caches(ctc_module, batch, N_NEW + 3)
    P = prefill_mask.shape[1] - (N_NEW + 2)
    ref, _ = greedy_decode(ctc_module, batch, N_NEW, stop_at_eos=False)
    answers = _answers(ref, batch["tasks"], kind)
    checked = []

    def check(dec):
        for b, a in enumerate(answers):
            n = int(dec.lens[b])
            assert n == ((5 if kind == "wrong_at_4" else 6) if a is not None else 1)
            ref_mask = torch.cat([prefill_mask[:, :P], torch.ones(len(answers), n - 1, dtype=torch.bool)], 1)
            _assert_row_cache_equal(dec.cache, dec.mask, caches[n], ref_mask, b)
            checked.append(b)

    tokens, _, _ = _decode_answers(ctc_module, batch, 2, answers, on_prefill=check)
    assert torch.equal(tokens[:, :N_NEW], ref) and checked == list(range(len(answers)))


def test_modes_need_what_they_draft_with(tok_dir, ctc_module):
    batch = _batch(ctc_module, [0])
    plain = _module(tok_dir, mtp_layers=0)  # no CTC head (ctc_weight 0), no MTP head
    with pytest.raises(ValueError, match="needs the encoder's CTC head"):
        speculative_decode(plain, batch, "ctc", 4)
    with pytest.raises(ValueError, match="no MTP head to draft with; use ctc"):
        speculative_decode(_module(tok_dir, mtp_layers=0, ctc_weight=0.3), batch, "ctc+mtp", 4)
    with pytest.raises(ValueError, match="decode mode 'fast'"):
        speculative_decode(ctc_module, batch, "fast", 4)


@pytest.mark.parametrize("decode", ["ctc", "auto"])
def test_evaluate_decode_ctc_modes(ctc_module, sine_corpus, tmp_path, decode, caplog):
    """evaluate(decode="ctc" | "auto") writes greedy's hypotheses, the CTC draft figures and RTFx; auto picks ctc+mtp
    on a model with both heads."""
    from salm_mtp.evaluation.report import format_table
    from salm_mtp.evaluation.run import evaluate

    manifest = str(sine_corpus(n=5))
    evaluate(ctc_module, manifest, str(tmp_path / "g"), batch_size=3, max_new_tokens=6, progress=False)
    m = evaluate(ctc_module, manifest, str(tmp_path / "m"), batch_size=3, max_new_tokens=6, progress=False,
                 decode=decode)
    assert (tmp_path / "g" / "hyps.jsonl").read_text() == (tmp_path / "m" / "hyps.jsonl").read_text()
    assert m["decode"] == ("ctc" if decode == "ctc" else "ctc+mtp") and m["spec_identical_to_greedy"] is True
    asr = sum(json.loads(line)["task"] == "asr" for line in (tmp_path / "m" / "hyps.jsonl").read_text().splitlines())
    assert m["spec_ctc_drafted"] >= asr > 0 and 0 <= m["spec_ctc_acceptance"] <= 1
    assert m["rtfx"] > 0 and m["spec_rtfx"] > 0 and m["greedy_rtfx"] > 0
    assert "CTC draft acceptance (live)" in format_table(m)
    with caplog.at_level(logging.WARNING, logger="salm_mtp.decoding.modes"):  # no CTC head: the head's drafts
        only_mtp = evaluate(_module(ctc_module.salm_arguments["tokenizer_path"], mtp_layers=1), manifest,
                            str(tmp_path / "x"), decode="ctc+mtp", progress=False)
    assert only_mtp["decode"] == "mtp" and only_mtp["spec_identical_to_greedy"] is True
    assert "--decode ctc+mtp: this model has no CTC head to draft with: decoding with mtp" in caplog.text
    with pytest.raises(ValueError, match="--decode 'fast': use one of auto, greedy, mtp, ctc, ctc\\+mtp"):
        evaluate(ctc_module, manifest, str(tmp_path / "y"), decode="fast", progress=False)
