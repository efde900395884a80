"""Tests for salm_mtp/data/tokenizer.py: demo tokenizer layout, save/reload, placeholder."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from salm_mtp.data.tokenizer import AUDIO_PLACEHOLDER, SPECIAL_TOKENS, ensure_audio_placeholder, train_tokenizer

TEXTS = ["three seven nine", "3 7 9", "the red cat sees a big dog", "one two"]


def test_demo_tokenizer_special_ids_and_reload(tmp_path):
    tok = train_tokenizer(TEXTS, tmp_path / "tok", vocab_size=128)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for t in (tok, loaded):
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2, 3)
        assert t.convert_tokens_to_ids(AUDIO_PLACEHOLDER) == 4
        assert not t.chat_template
        assert len(t) <= 128  # at most: a tiny corpus runs out of merges
    assert loaded.get_vocab() == tok.get_vocab()
    assert [loaded.convert_ids_to_tokens(i) for i in range(5)] == list(SPECIAL_TOKENS)
    # lowercased, round-trips, the placeholder stays one token, nothing unknown
    ids = loaded.encode(f"Transcribe the audio. {AUDIO_PLACEHOLDER}\nthree 7", add_special_tokens=False)
    assert ids.count(4) == 1 and 3 not in ids
    assert loaded.decode(loaded.encode("three seven nine", add_special_tokens=False)) == "three seven nine"
    assert loaded.decode(loaded.encode("3 7 9", add_special_tokens=False)) == "3 7 9"
    n = len(loaded)
    assert ensure_audio_placeholder(loaded) == 4 and len(loaded) == n  # already there: unchanged


def test_ensure_audio_placeholder_adds_it_to_a_foreign_tokenizer():
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    audio_id = ensure_audio_placeholder(tok)
    assert audio_id == 4  # appended after the base vocabulary: may exceed the LLM's vocab
    assert tok.encode(f"hello {AUDIO_PLACEHOLDER} world", add_special_tokens=False) == [2, 4, 3]
    assert ensure_audio_placeholder(tok) == 4 and len(tok) == 5  # idempotent
