import pytest
import torch

from salm_mtp.modules.merge import IGNORE_INDEX as X
from salm_mtp.modules.merge import merge_audio_into_prompt, shift_left

PH = 9


def _inputs():
    ids = torch.tensor([[1, 5, PH, 6, 7, 2], [1, PH, 7, 2, 0, 0]])
    lens = torch.tensor([6, 4])
    loss_mask = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    text = ids.float()[..., None].expand(2, 6, 2).clone()  # embedding of token i = (i, i)
    audio = -torch.arange(1, 7).float().reshape(2, 3, 1).expand(2, 3, 2).clone()  # clip0 -1,-2,-3; clip1 -4,-5,-6
    audio_lens = torch.tensor([3, 2])
    return text, ids, lens, loss_mask, audio, audio_lens


def test_merge_positions_and_targets_exact():
    m = merge_audio_into_prompt(*_inputs(), placeholder_id=PH)
    assert m.lengths.tolist() == [8, 5]
    assert m.inputs_embeds[..., 0].tolist() == [
        [1, 5, -1, -2, -3, 6, 7, 2],
        [1, -4, -5, 7, 2, 0, 0, 0],
    ]
    assert m.labels.tolist() == [[X, X, X, X, X, X, 7, 2], [X, X, X, 7, 2, X, X, X]]
    assert m.targets.tolist() == [[X, X, X, X, X, 7, 2, X], [X, X, 7, 2, X, X, X, X]]
    assert m.audio_mask.int().tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
    assert m.attention_mask.int().tolist() == [[1] * 8, [1] * 5 + [0] * 3]


def test_merge_is_differentiable_wrt_audio_and_text():
    text, ids, lens, lm, audio, alens = _inputs()
    text.requires_grad_(True)
    audio.requires_grad_(True)
    m = merge_audio_into_prompt(text, ids, lens, lm, audio, alens, PH)
    m.inputs_embeds.sum().backward()
    assert audio.grad[1, 2].abs().sum() == 0  # the padded audio frame of clip 1 is not used
    assert audio.grad[0].abs().sum() == 6 and text.grad[0, 2].abs().sum() == 0  # placeholder embedding dropped


def test_merge_placeholder_count_mismatch_raises():
    text, ids, lens, lm, audio, alens = _inputs()
    ids = ids.clone()
    ids[1, 1] = 3  # row 1 loses its placeholder
    with pytest.raises(ValueError, match=r"placeholder count \(1, per row \[1, 0\]\) does not match .* clips \(2\)"):
        merge_audio_into_prompt(text, ids, lens, lm, audio, alens, PH)


def test_placeholder_in_padding_is_not_counted():
    text, ids, lens, lm, audio, alens = _inputs()
    ids = ids.clone()
    ids[1, 5] = PH  # beyond input_lens: padding
    m = merge_audio_into_prompt(text, ids, lens, lm, audio, alens, PH)
    assert m.lengths.tolist() == [8, 5]


def test_shift_left_no_wraparound():
    x = torch.arange(10).reshape(2, 5)
    assert shift_left(x, 2).tolist() == [[2, 3, 4, X, X], [7, 8, 9, X, X]]
    assert shift_left(x, 7).tolist() == [[X] * 5, [X] * 5]
    e = torch.arange(6.0).reshape(1, 3, 2)
    assert shift_left(e, 1, 0.0).tolist() == [[[2, 3], [4, 5], [0, 0]]]
