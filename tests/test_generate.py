"""salm_mtp.generate: cached greedy decoding (left-padded batch) against a full recompute, eos stopping,
the equal-length fallback, and the MTP drafts' index convention against the training targets."""

from __future__ import annotations

import pytest
import torch

import tiny
from salm_mtp.generate import (
    encode_prompts,
    greedy_decode,
    greedy_generate,
    left_padding_exact,
    mtp_drafts,
)
from salm_mtp.metrics import mtp_acceptance
from salm_mtp.modules.merge import IGNORE_INDEX, shift_left

N_NEW = 12


def _module(tok_dir, mtp_layers=2, seed=0, sharpen=3.0):
    """Tiny model with every block type. At the default init (std 0.02) the random backbone all but
    ignores the audio, so rows with the same prompt decode alike; larger backbone weights make each
    row's audio and prompt change its answer (and keep it exact: the test checks that)."""
    torch.manual_seed(seed)
    module = tiny.build(tok_dir, pattern="M*E-", mtp_layers=mtp_layers)
    with torch.no_grad():
        for p in module.llm.model.layers.parameters():
            if p.ndim >= 2:
                p.mul_(sharpen)
    return module


def _batch(module):
    # asr/asr/ast prompts (different instruction lengths) and three audio lengths: three merged prompt lengths
    return tiny.make_batch(module.tokenizer, ["one two three", "the cat", "1 2 3"], [16000, 9000, 4000],
                           tasks=["asr", "asr", "ast"])


@pytest.fixture(scope="module")
def model_and_batch(tok_dir):
    module = _module(tok_dir)
    return module, _batch(module)


def test_cached_matches_recompute(model_and_batch):
    module, batch = model_and_batch
    module.train()
    prompt = encode_prompts(module, batch)
    assert module.training and not prompt.inputs_embeds.requires_grad
    assert len(set(prompt.lengths.tolist())) == 3  # left padding really happens
    assert left_padding_exact(module.llm)

    ref, ref_len, ref_logits = greedy_decode(module, batch, N_NEW, use_cache=False, stop_at_eos=False,
                                             return_logits=True)
    assert module.training  # mode restored
    assert ref_logits.shape == (3, N_NEW, module.llm.config.vocab_size)
    for kw in ({}, {"batched": False}):
        tokens, lengths, logits = greedy_decode(module, batch, N_NEW, use_cache=True, stop_at_eos=False,
                                                return_logits=True, **kw)
        assert torch.equal(tokens, ref), kw
        assert lengths.tolist() == ref_len.tolist() == [N_NEW] * 3
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)  # seen: 3e-7; logits span ~0.8
    rows = ref.tolist()
    assert all(len(set(row)) > 3 for row in rows)  # non-trivial sequences, a different one per row
    assert rows[0] != rows[1] and rows[1] != rows[2] and rows[0] != rows[2]


@pytest.fixture
def fake_eos(model_and_batch):
    """Make the token the first row generates at step 3 the tokenizer's eos (restored after)."""
    module, batch = model_and_batch
    free, _ = greedy_decode(module, batch, N_NEW, stop_at_eos=False)
    eos, old = int(free[0, 3]), module.tokenizer.eos_token
    module.tokenizer.eos_token = module.tokenizer.convert_ids_to_tokens(eos)
    assert module.tokenizer.eos_token_id == eos
    yield free, eos
    module.tokenizer.eos_token = old


def test_stop_at_eos_per_row(model_and_batch, fake_eos):
    module, batch = model_and_batch
    free, eos = fake_eos  # rows stop at the first occurrence of eos, if any
    pad = module.tokenizer.pad_token_id
    expected_len = [row.index(eos) + 1 if eos in row else N_NEW for row in free.tolist()]
    assert expected_len[0] <= 4 and len(set(expected_len)) > 1  # rows stop at different steps

    for use_cache in (True, False):
        tokens, lengths = greedy_decode(module, batch, N_NEW, use_cache=use_cache)
        assert lengths.tolist() == expected_len
        assert tokens.shape == (3, max(expected_len))
        for b, n in enumerate(expected_len):
            assert tokens[b, :n].tolist() == free[b, :n].tolist()
            assert (tokens[b, n:] == pad).all()
            assert tokens[b, n - 1] == eos or n == N_NEW

    texts = greedy_generate(module, batch, N_NEW)
    assert texts[0] == module.tokenizer.decode(free[0, : expected_len[0]].tolist(), skip_special_tokens=True).strip()


def test_equal_length_groups_when_in_proj_has_bias(tok_dir):
    """A Mamba in_proj bias makes left padding inexact: rows are then decoded in equal-length groups."""
    module = _module(tok_dir, mtp_layers=0, seed=1)
    g = torch.Generator().manual_seed(0)
    for m in module.llm.modules():
        if type(m).__name__ == "NemotronHMamba2Mixer":
            m.in_proj.bias = torch.nn.Parameter(torch.randn(m.in_proj.out_features, generator=g) * 0.5)
    assert not left_padding_exact(module.llm)
    batch = _batch(module)
    ref, _ = greedy_decode(module, batch, 8, use_cache=False, stop_at_eos=False)
    tokens, _ = greedy_decode(module, batch, 8, use_cache=True, stop_at_eos=False)
    assert torch.equal(tokens, ref)


def test_mtp_drafts_index_convention(model_and_batch):
    module, batch = model_and_batch
    tokens, lengths = greedy_decode(module, batch, N_NEW, stop_at_eos=False)
    module.train()
    drafts = mtp_drafts(module, batch, tokens, lengths)
    assert module.training
    assert drafts.shape == (3, 2, N_NEW) and drafts.dtype == torch.long
    valid = torch.arange(N_NEW)[None, :] < lengths[:, None]
    acc = mtp_acceptance(tokens, drafts, valid)
    assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)

    # Row 1 alone, prompt + its own greedy answer as the reference answer, through the training path:
    # at every position where depth k has a training target, that target must be main token t + k
    # and the depth-k argmax there must be drafts[1, k-1, t].
    b, n = 1, int(lengths[1])
    assert module.placeholder_id not in tokens[b].tolist()
    plen = int(batch["prompt_lens"][b])
    ids = torch.cat([batch["input_ids"][b, :plen], tokens[b, :n]])[None]
    row = {"audios": batch["audios"][b : b + 1, : int(batch["audio_lens"][b])],
           "audio_lens": batch["audio_lens"][b : b + 1], "input_ids": ids, "input_lens": torch.tensor([ids.shape[1]]),
           "loss_mask": torch.arange(ids.shape[1])[None] >= plen}
    module.eval()
    with torch.no_grad():
        merged, _, _ = module.prepare_inputs(row)
        h0 = module(merged.inputs_embeds)
        hiddens = module.mtp_hiddens(h0, merged.inputs_embeds)
        main = module.llm.lm_head(h0[0]).argmax(-1)
    first = int(merged.lengths[0]) - n - 1  # the position whose output predicts answer token 0
    assert main[first : first + n].tolist() == tokens[b, :n].tolist()  # teacher forcing reproduces greedy
    checked = 0
    for k in (1, 2):
        target_k = shift_left(merged.targets, k)[0]  # depth-k training targets
        with torch.no_grad():
            pred_k = module.llm.lm_head(hiddens[k - 1][0]).argmax(-1)
        for p in (target_k != IGNORE_INDEX).nonzero().flatten().tolist():
            t = p - first  # t < 0: prompt positions whose depth-k target is an early answer token (no draft)
            if t < 0:
                continue
            assert t + k < n
            assert int(target_k[p]) == int(tokens[b, t + k])
            assert int(pred_k[p]) == int(drafts[b, k - 1, t])
            checked += 1
    assert checked == (n - 1) + (n - 2)


def test_mtp_drafts_without_head(tok_dir):
    module = _module(tok_dir, mtp_layers=0)
    batch = _batch(module)
    tokens, lengths = greedy_decode(module, batch, 3, stop_at_eos=False)
    assert mtp_drafts(module, batch, tokens, lengths).shape == (3, 0, 3)


@pytest.mark.parametrize("use_cache", [True, False])
def test_audio_placeholder_is_never_generated(tok_dir, use_cache):
    module = _module(tok_dir, mtp_layers=0)
    with torch.no_grad():
        module.llm.lm_head.weight[module.placeholder_id] = module.llm.lm_head.weight.abs().max() * 1e3
    tokens, lengths = greedy_decode(module, _batch(module), 4, use_cache=use_cache, stop_at_eos=False)
    assert tokens.shape == (3, 4) and not (tokens == module.placeholder_id).any()
