"""Loading a tokenizer (``load_tokenizer``), demo tokenizer training and the audio placeholder token.

The demo LLM is trained from scratch, so it gets a tiny BPE tokenizer trained on the demo
corpus (``salm-mtp make-demo-data`` saves one to ``data/demo/tokenizer/``). Real LLMs bring
their own tokenizer; for both, ``ensure_audio_placeholder`` makes sure the single token that
marks "the audio goes here" exists.

Demo tokenizer layout (``train_tokenizer``):
    id 0 ``<pad>``, 1 ``<s>`` (bos), 2 ``</s>`` (eos), 3 ``<unk>``, 4 ``<|audio|>``, then the
    alphabet and the learned merges. Text is NFKC-normalised and lowercased; words are split on
    spaces with a SentencePiece-style ``▁`` marker so ``decode`` restores the spaces. No chat
    template, no automatic bos/eos (the prompt formatter adds them explicitly).

    from salm_mtp.data.tokenizer import train_tokenizer
    tok = train_tokenizer(["three seven nine", "3 7 9"], "data/demo/tokenizer")
    AutoTokenizer.from_pretrained("data/demo/tokenizer")  # loads the same tokenizer
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from salm_mtp.errors import MissingInputError

AUDIO_PLACEHOLDER = "<|audio|>"
"""Marks where a clip's audio embeddings go in the prompt (exactly one per clip)."""

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, AUDIO_PLACEHOLDER)
"""Special tokens of the demo tokenizer; their ids are their positions here (0..4)."""

# Every character the demo prompts and answers may use is in the base vocabulary, so nothing
# maps to <unk> even if the training texts never contained it (e.g. the instruction's "T", "\n").
_ALPHABET: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/\n") + ("▁",)


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 256
) -> PreTrainedTokenizerFast:
    """Train the demo BPE tokenizer on ``texts`` and save it as a HF tokenizer directory.

    Args:
        texts: training texts (e.g. transcripts and translation targets of the train split).
        out_dir: directory to save to (``AutoTokenizer.from_pretrained(out_dir)`` loads it);
            None trains without saving.
        vocab_size: upper bound on the vocabulary (special tokens + alphabet + merges); a
            small corpus may run out of merges first.

    Returns:
        The trained tokenizer (``pad/bos/eos/unk`` set, ``<|audio|>`` registered as special).
    """
    min_size = len(SPECIAL_TOKENS) + len(_ALPHABET)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be >= {min_size} (special tokens + alphabet), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # "first": only the start of the text gets a "▁", not every segment after a special token,
    # so "<|audio|>" + "\n" encodes as two tokens, not three.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(_ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=[AUDIO_PLACEHOLDER],
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def ensure_audio_placeholder(tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the id of ``<|audio|>`` in ``tokenizer``, adding it as a special token if missing.

    Real LLM tokenizers (e.g. Nemotron's) lack the placeholder; adding it appends one id at the
    end of the tokenizer's vocabulary, which may be >= the LLM's embedding rows. That is fine:
    the model replaces every placeholder position by audio embeddings *before* the embedding
    lookup, so the id is never embedded (mask it out / clamp it when calling ``embed_tokens``).
    The tokenizer object is modified in place: share that one object between data and model.
    """
    vocab = tokenizer.get_vocab()
    if AUDIO_PLACEHOLDER not in vocab:
        tokenizer.add_tokens(
            [AddedToken(AUDIO_PLACEHOLDER, special=True, normalized=False)], special_tokens=True
        )
    token_id = tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER)
    ids = tokenizer.encode(AUDIO_PLACEHOLDER, add_special_tokens=False)
    if ids != [token_id]:
        raise RuntimeError(
            f"{AUDIO_PLACEHOLDER!r} encodes to {ids}, expected the single id {token_id}; "
            "the tokenizer splits it, so the prompt would carry no placeholder"
        )
    return token_id


def load_tokenizer(path: str | None, key: str = "model.tokenizer_path"):
    """The HF tokenizer of a local directory, with the audio placeholder added if missing."""
    if path is None:
        raise ValueError(
            f"{key} is null and model.llm.path is null: no tokenizer to read. Set --{key}=data/demo/tokenizer "
            "(made by `salm-mtp make-demo-data`) or point --model.llm.path at a HF directory with a tokenizer"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MissingInputError(
            f"{key}={path!r}: no loadable tokenizer there ({str(e)[:200]}); set --{key} to a HF tokenizer directory "
            "(the demo one is made by `salm-mtp make-demo-data`)") from None
