"""SALMModule behaviour outside the MTP head (which tests/test_mtp.py covers)."""

import pytest
import torch

import tiny
from salm_mtp.model import SALMModule


def _module(tok_dir, **kw):
    torch.manual_seed(0)
    return SALMModule(**tiny.tiny_kwargs(tok_dir, **kw))


def test_training_step_skips_batch_whose_clips_were_all_dropped(tok_dir):
    m = _module(tok_dir)
    batch = tiny.make_batch(m.tokenizer, ["one"], [4000])
    empty = {k: (v[:0] if torch.is_tensor(v) else v[:0] if isinstance(v, list) else v) for k, v in batch.items()}
    assert m.training_step(empty, 0) is None
    assert m.training_step(batch, 0).item() > 0


def test_dict_parts_are_accepted_like_dataclasses(tok_dir):
    from dataclasses import asdict

    kw = tiny.tiny_kwargs(tok_dir)
    as_dicts = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in kw.items()}
    torch.manual_seed(0)
    a = SALMModule(**kw)
    torch.manual_seed(0)
    b = SALMModule(**as_dicts)  # how LightningCLI checkpoints store them
    assert a.cfg_llm == b.cfg_llm and a.num_mtp_depths == b.num_mtp_depths
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_freeze_patterns(tok_dir):
    from salm_mtp.config import FreezeConfig

    m = _module(tok_dir, freeze=FreezeConfig(patterns=[r"^llm\."], unfreeze=[r"^llm\.mtp\."]))
    frozen = set(m.apply_freeze())
    assert frozen and all(n.startswith("llm.") and ".mtp." not in n for n in frozen)
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith(("llm.mtp.", "adapter.", "audio.")))


def test_negative_ctc_weight_names_the_key(tok_dir):
    with pytest.raises(ValueError, match=r"model.ctc_weight must be >= 0, got -1; set --model.ctc_weight"):
        _module(tok_dir, ctc_weight=-1)
