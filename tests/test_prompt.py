"""Tests for salm_mtp/data/prompt.py: templates, loss mask, errors."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from salm_mtp.data.prompt import PromptConfig, PromptFormatter
from salm_mtp.data.tokenizer import AUDIO_PLACEHOLDER, train_tokenizer

# hand-built word-level vocabulary: every id below is known
VOCAB = {
    "<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "transcribe": 4, "the": 5, "audio.": 6,
    "translate": 7, "audio": 8, "to": 9, "digits.": 10, "three": 11, "seven": 12, "3": 13, "7": 14,
    "<|user|>": 15, "<|assistant|>": 16,
}  # fmt: skip
AUDIO = len(VOCAB)  # the placeholder is added by the formatter, after the vocabulary


def word_tokenizer() -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "\n" is whitespace: it encodes to []
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_tokens(["<|user|>", "<|assistant|>"], special_tokens=True)
    return tok


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def test_simple_template_exact_ids_and_mask():
    fmt = PromptFormatter(word_tokenizer())
    assert fmt.audio_token_id == AUDIO and not fmt.use_chat_template
    enc = fmt.encode("asr", "three seven")
    #                  <s> transcribe the audio. <|audio|> | three seven </s>
    assert enc.input_ids == [1, 4, 5, 6, AUDIO, 11, 12, 2]
    assert enc.loss_mask == [False] * 5 + [True] * 3
    assert enc.prompt_len == 5

    enc = fmt.encode("ast", "3 7")
    #                  <s> translate the audio to digits. <|audio|> | 3 7 </s>
    assert enc.input_ids == [1, 7, 5, 8, 9, 10, AUDIO, 13, 14, 2]
    assert enc.loss_mask == [False] * 7 + [True] * 3
    assert enc.prompt_len == 7


def test_prompt_only_for_generation():
    enc = PromptFormatter(word_tokenizer()).encode("asr", None)
    assert enc.input_ids == [1, 4, 5, 6, AUDIO]
    assert enc.loss_mask == [False] * 5 and enc.prompt_len == 5


def test_chat_template_exact_ids_and_mask():
    tok = word_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    fmt = PromptFormatter(tok)
    assert fmt.use_chat_template
    enc = fmt.encode("asr", "three seven")
    # <|user|> transcribe the audio. <|audio|> </s> <|assistant|> | three seven </s>
    assert enc.input_ids == [15, 4, 5, 6, AUDIO, 2, 16, 11, 12, 2]
    assert enc.loss_mask == [False] * 7 + [True] * 3
    assert enc.prompt_len == 7
    assert fmt.encode("asr", None).input_ids == enc.input_ids[:7]


def test_chat_template_forced_off_uses_simple_template():
    tok = word_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    enc = PromptFormatter(tok, PromptConfig(use_chat_template=False)).encode("asr", "three")
    assert enc.input_ids == [1, 4, 5, 6, AUDIO, 11, 2]


def test_chat_template_without_eos_gets_one_appended():
    tok = word_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m.content }} {% endfor %}"
    enc = PromptFormatter(tok).encode("asr", "seven")
    assert enc.input_ids == [4, 5, 6, AUDIO, 12, 2]
    assert enc.loss_mask == [False] * 4 + [True] * 2


def test_chat_template_that_breaks_the_prefix_is_refused():
    tok = word_tokenizer()
    # the generation prompt differs from what the template writes before an assistant turn
    tok.chat_template = (
        "{% for m in messages %}{{ m.content }} {% endfor %}{% if add_generation_prompt %}"
        "<|assistant|> {% endif %}"
    )
    with pytest.raises(ValueError, match="prefix"):
        PromptFormatter(tok).encode("asr", "three")


def test_demo_tokenizer_answer_decodes_back():
    tok = train_tokenizer(["three seven nine", "3 7 9", "a red cat"], None, vocab_size=100)
    fmt = PromptFormatter(tok, PromptConfig(target_lang="numbers"))
    enc = fmt.encode("ast", "3 7 9")
    answer = [i for i, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]) == "3 7 9"
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.input_ids.count(fmt.audio_token_id) == 1
    assert enc.input_ids.index(fmt.audio_token_id) < enc.prompt_len
    assert tok.decode(enc.input_ids[1 : enc.prompt_len]) == f"translate the audio to numbers. {AUDIO_PLACEHOLDER}\n"


def test_unknown_task_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'qa'.*asr, ast"):
        PromptFormatter(word_tokenizer()).encode("qa", "x")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data\.prompt\.asr_instruction.*--data\.prompt\.asr_instruction"):
        PromptConfig(asr_instruction=f"Listen {AUDIO_PLACEHOLDER}")
    with pytest.raises(ValueError, match=r"--data\.prompt\.ast_instruction"):
        PromptConfig(ast_instruction="Translate to {language}.")
    with pytest.raises(ValueError, match=r"--data\.prompt\.use_chat_template"):
        PromptFormatter(word_tokenizer(), PromptConfig(use_chat_template=True))
