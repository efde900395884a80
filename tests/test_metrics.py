"""salm_mtp.metrics on hand-built references and hypotheses, values worked out by hand."""

import math

import pytest
import torch

from salm_mtp.metrics import bleu, cer, mtp_acceptance, normalize_text, wer


def test_normalize_text():
    assert normalize_text("  Hello,   World!\tDon't  stop. ") == "hello world dont stop"
    assert normalize_text("...") == ""


def test_wer_single_pair():
    # a=a, b->x (substitution), c=c, d deleted: 2 errors over 4 reference words.
    assert wer(["a b c d"], ["a x c"]) == {
        "wer": 0.5, "errors": 2, "ref_words": 4, "num_empty_refs": 0, "num_empty_hyps": 0,
    }


def test_wer_normalises_before_scoring():
    assert wer(["Hello, World!"], ["hello   world"])["errors"] == 0


def test_wer_corpus_with_empty_ref_and_hyp():
    refs = ["a b c d", "", "x y", "p q r"]
    hyps = ["a x c", "u v", "", "P, q r."]
    # 2 (as above) + 2 insertions (empty ref) + 2 deletions (empty hyp) + 0 = 6 over 4+0+2+3 = 9 words.
    assert wer(refs, hyps) == {
        "wer": 6 / 9, "errors": 6, "ref_words": 9, "num_empty_refs": 1, "num_empty_hyps": 1,
    }


def test_wer_only_empty_refs_and_empty_corpus():
    assert wer([""], [""])["wer"] == 0.0
    r = wer(["?!"], ["a b"])  # reference empty after normalisation
    assert r["wer"] == math.inf and r["errors"] == 2 and r["ref_words"] == 0 and r["num_empty_refs"] == 1
    assert math.isnan(wer([], [])["wer"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])


def test_cer():
    assert cer(["abcd"], ["abd"])["cer"] == 0.25  # one deletion over 4 characters
    # "ab cd" -> "ab": the space, c and d are deleted: 3 over 5 characters.
    r = cer(["AB cd"], ["ab"])
    assert (r["cer"], r["errors"], r["ref_chars"]) == (0.6, 3, 5)
    assert cer(["ab", ""], ["", "xyz"])["errors"] == 2 + 3


def test_bleu():
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert bleu(refs, refs) == {"bleu": pytest.approx(100.0), "num": 2}
    # All n-gram precisions are 1, hypothesis 4 words vs reference 5: BLEU = 100 * exp(1 - 5/4).
    assert bleu(["a b c d e"], ["a b c d"])["bleu"] == pytest.approx(100 * math.exp(-0.25))
    # Three words have no 4-grams, so the 4-gram precision is 0 and BLEU is 0 even when identical.
    assert bleu(["a b c"], ["a b c"])["bleu"] == 0.0
    assert math.isnan(bleu([], [])["bleu"])


def test_mtp_acceptance_hand_built():
    main = torch.tensor([[10, 11, 12, 13, 14],
                         [20, 21, 22, 23, 24]])
    valid = torch.tensor([[True] * 5,
                          [True, True, True, False, False]])
    draft = torch.zeros(2, 2, 5, dtype=torch.long)
    # depth 1 predicts main[n, t+1]
    draft[0, 0] = torch.tensor([11, 12, 99, 14, 14])  # t=0..3 scored: right at t=0,1,3 -> 3/4 (t=4 has no target)
    draft[1, 0] = torch.tensor([21, 0, 23, 23, 0])    # only t=0,1 scored (valid[t+1]): right at t=0 -> 1/2
    # depth 2 predicts main[n, t+2]
    draft[0, 1] = torch.tensor([12, 0, 14, 7, 7])     # t=0..2 scored: right at t=0,2 -> 2/3
    draft[1, 1] = torch.tensor([5, 23, 24, 0, 0])     # only t=0 scored: wrong -> 0/1
    acc = mtp_acceptance(main, draft, valid)
    assert acc == [pytest.approx(4 / 6), pytest.approx(2 / 4)]


def test_mtp_acceptance_no_positions_is_nan():
    acc = mtp_acceptance(torch.tensor([[1, 2]]), torch.tensor([[[2, 0], [0, 0]]]), torch.tensor([[True, True]]))
    assert acc[0] == 1.0 and math.isnan(acc[1])  # depth 2 has no t with t + 2 < 2


def test_chained_acceptance_counts_only_unbroken_chains():
    from salm_mtp.metrics import chained_acceptance_counts, mean_accepted_length

    main = torch.tensor([[10, 11, 12, 13, 14]])
    drafts = torch.full((1, 2, 5), -1)
    # step t: depth 1 predicts main[t+1], depth 2 predicts main[t+2]
    drafts[0, 0] = torch.tensor([11, 99, 13, 14, -1])  # right at t = 0, 2, 3
    drafts[0, 1] = torch.tensor([12, 13, 99, -1, -1])  # right at t = 0, 1 (t = 1 breaks at depth 1)
    valid = torch.ones(1, 5, dtype=torch.bool)
    (h1, n1), (h2, n2) = chained_acceptance_counts(main, drafts, valid)
    assert (h1, n1) == (3, 4) and (h2, n2) == (1, 3)  # depth 2 at t = 1 is right but unchained
    assert mean_accepted_length([h1 / n1, h2 / n2]) == pytest.approx(1 + 0.75 + 1 / 3)


def test_normalizers_by_name():
    from salm_mtp.metrics import NORMALIZERS, get_normalizer

    assert set(NORMALIZERS) == {"whisper_english", "basic", "none"}
    whisper = get_normalizer("whisper_english")
    assert whisper("Don't stop, Mr. Smith!") == "do not stop mister smith"
    assert whisper("three seven nine") == "379" and whisper("colour") == "color"
    assert get_normalizer("basic")("Don't stop.") == "dont stop"
    assert get_normalizer("none")("  Don't  stop. ") == "Don't stop."
    with pytest.raises(ValueError, match="unknown normalizer 'nemo'.*--normalizer"):
        get_normalizer("nemo")


def test_wer_under_each_normalizer():
    refs, hyps = ["zero one", "the red cat"], ["Zero one.", "the red hat"]
    assert wer(refs, hyps, "none")["wer"] == 3 / 5  # "Zero", "one.", "hat"
    assert wer(refs, hyps, "basic")["wer"] == 1 / 5
    w = wer(refs, hyps, "whisper_english")  # "zero one" -> "01": one word
    assert w["wer"] == 1 / 4 and w["ref_words"] == 4


def test_wer_by_group_hand_built():
    from salm_mtp.metrics import wer_by_group

    rows = [
        {"ref": "a b c d", "hyp": "a b c d", "groups": {"text": "seen", "voice": "seen"}},
        {"ref": "a b c d", "hyp": "a x c d", "groups": {"text": "unseen", "voice": "seen"}},
        {"ref": "a b", "hyp": "A b", "groups": {"text": "unseen", "voice": "unseen"}},
        {"ref": "a b", "hyp": "z", "groups": {}},  # in no group
    ]
    g = wer_by_group(rows, "basic")
    assert list(g) == ["text=seen", "text=unseen", "voice=seen", "voice=unseen"]
    assert g["text=seen"] == {"num": 1, "wer": 0.0, "wer_raw": 0.0, "errors": 0, "ref_words": 4}
    assert g["text=unseen"]["num"] == 2 and g["text=unseen"]["wer"] == 1 / 6 and g["text=unseen"]["wer_raw"] == 2 / 6
    assert g["voice=seen"]["wer"] == 1 / 8 and g["voice=unseen"]["wer"] == 0.0 and g["voice=unseen"]["wer_raw"] == 0.5
