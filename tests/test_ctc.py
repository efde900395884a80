"""salm_mtp/decoding/ctc.py: the CTC transcript as a whole-answer draft. Hand-built greedy paths (blank collapse,
repeats, lengths), the labels of another vocabulary through their text, which rows get a draft, and how a draft
is built for each row."""

from __future__ import annotations

import pytest
import torch

from salm_mtp.decoding.ctc import answer_drafts, collapse, ctc_labels
from salm_mtp.decoding.modes import default_answer_ids

BLANK = 9


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from salm_mtp.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def test_collapse_merges_repeats_then_drops_blanks():
    assert collapse([], BLANK) == []
    assert collapse([BLANK, BLANK], BLANK) == []
    assert collapse([3, 3, 3], BLANK) == [3]
    assert collapse([3, BLANK, 3], BLANK) == [3, 3]  # a blank between repeats keeps both
    assert collapse([BLANK, 1, 1, BLANK, BLANK, 2, 2, 1, BLANK], BLANK) == [1, 2, 1]


def test_ctc_labels_read_only_the_valid_frames():
    paths = torch.tensor([[1, 1, BLANK, 2, 2, 5], [BLANK, 4, 4, 4, 4, 4]])  # frame 5 of row 0: padding
    logits = torch.nn.functional.one_hot(paths, BLANK + 1).float()  # (2, 6, 10)
    assert ctc_labels(logits, torch.tensor([5, 6]), BLANK) == [[1, 2], [4]]


class _Model:
    """What answer_drafts reads of a SALM: its audio CTC head and blank, and its tokenizer."""

    def __init__(self, tokenizer, paths: torch.Tensor | None):
        class Audio:
            pass

        self.audio, self.tokenizer = Audio(), tokenizer
        if paths is None:
            self.audio.ctc_head = None
        else:
            classes = len(tokenizer) + 1
            self.audio.ctc_head = lambda enc: torch.nn.functional.one_hot(paths, classes).float()
            self.audio.blank_id = classes - 1


def test_asr_rows_get_the_transcript_as_answer_tokens(tokenizer):
    words = tokenizer.encode("one two", add_special_tokens=False)
    blank = len(tokenizer)
    path = [blank] + [w for w in words for _ in range(2)] + [blank]  # each token on two frames
    paths = torch.tensor([path, path, path])
    batch = {"tasks": ["asr", "ast", "asr"], "clip_rows": torch.tensor([0, 1, 2])}
    enc, lens = torch.zeros(3, len(path), 4), torch.tensor([len(path), len(path), 1])
    ids = default_answer_ids(tokenizer)
    drafts = answer_drafts(_Model(tokenizer, paths), batch, enc, lens, ids)
    assert drafts[0] == ids("one two") == words + [tokenizer.eos_token_id]
    assert drafts[1] is None  # AST: the transcript is not the answer
    assert drafts[2] == [tokenizer.eos_token_id]  # one frame, a blank: an empty transcript
    assert answer_drafts(_Model(tokenizer, None), batch, enc, lens, ids) == [None] * 3  # no CTC head


def test_another_vocabulary_goes_through_its_text(tokenizer):
    """A CTC head over letters (its own vocabulary): labels -> text -> the LLM's answer tokens."""
    letters = " abcdefghijklmnopqrstuvwxyz"
    paths = torch.tensor([[letters.index(c) for c in "the cat"]])
    model = _Model(tokenizer, None)
    model.audio.ctc_head = lambda enc: torch.nn.functional.one_hot(paths, len(letters) + 1).float()
    model.audio.blank_id = len(letters)
    batch = {"tasks": ["asr"], "clip_rows": torch.tensor([0])}
    drafts = answer_drafts(model, batch, torch.zeros(1, 7, 4), torch.tensor([7]),
                           answer_ids=lambda text: ["<"] + text.upper().split() + [">"],
                           label_text=lambda ids: "".join(letters[i] for i in ids))
    assert drafts == [["<", "THE", "CAT", ">"]]


def test_rows_with_two_clips_get_no_draft(tokenizer):
    blank = len(tokenizer)
    paths = torch.full((3, 4), blank)
    batch = {"tasks": ["asr", "conversation"], "clip_rows": torch.tensor([0, 1, 1])}
    drafts = answer_drafts(_Model(tokenizer, paths), batch, torch.zeros(3, 4, 4), torch.full((3,), 4),
                           default_answer_ids(tokenizer))
    assert drafts[1] is None
