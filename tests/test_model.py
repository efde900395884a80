"""SALMModule behaviour outside the MTP head (which tests/test_mtp.py covers)."""

import pytest
import torch

import tiny
from salm_mtp.io.checkpoints import build_module


def _module(tok_dir, **kw):
    torch.manual_seed(0)
    return tiny.build(tok_dir, **kw)


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
    a = build_module(**kw)
    torch.manual_seed(0)
    b = build_module(**as_dicts)  # how LightningCLI checkpoints store them
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
    with pytest.raises(ValueError, match=r"model.ctc_weight: must be >= 0, got -1; set --model.ctc_weight"):
        _module(tok_dir, ctc_weight=-1)


def test_kernel_warning_only_for_cuda_runs_without_kernels(tok_dir, monkeypatch):
    import importlib.util
    import warnings

    from salm_mtp.modules.llm import missing_mamba_kernels

    m = _module(tok_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert missing_mamba_kernels(m.llm, "cpu") == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.warns(UserWarning, match=r"\['mamba_ssm', 'causal_conv1d'\] not installed.*\.\[gpu\]"):
        assert missing_mamba_kernels(m.llm, torch.device("cuda", 0)) == ["mamba_ssm", "causal_conv1d"]
    dense = _module(tok_dir, pattern="*-", mtp_layers=0)
    assert missing_mamba_kernels(dense.llm, "cuda:0") == []  # no Mamba block, nothing to warn about


def test_precision_settings_that_would_round_fp32_tensors_are_refused(tok_dir):
    from types import SimpleNamespace

    from salm_mtp.config import ParallelConfig
    from salm_mtp.parallel import check_precision

    m = _module(tok_dir)
    for p in ("bf16-true", "16-true"):
        with pytest.raises(ValueError, match=rf"trainer\.precision={p} casts every tensor"):
            check_precision(m, SimpleNamespace(precision=p, strategy=object()))
    check_precision(m, SimpleNamespace(precision="32-true", strategy=object()))
    m.cfg_parallel = ParallelConfig(frozen_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"frozen_dtype=bfloat16 without FSDP2 needs autocast.*bf16-mixed"):
        check_precision(m, SimpleNamespace(precision="32-true", strategy=object()))
    check_precision(m, SimpleNamespace(precision="bf16-mixed", strategy=object()))


@pytest.mark.parametrize("size", [0, -5])
def test_lm_head_chunk_size_below_one_is_refused_not_clamped(tok_dir, size):
    from salm_mtp.model import SALMModule

    with pytest.raises(ValueError, match=rf"model.lm_head_chunk_size: must be >= 1, got {size}; set "
                                         r"--model.lm_head_chunk_size"):
        SALMModule(**tiny.tiny_kwargs(tok_dir, lm_head_chunk_size=size))


def test_adapter_stacks_frames_zeroes_padding_and_returns_no_view():
    """Rows stack k frames each (padded frames never mix in), positions past a row's length are zero, and the output
    is a tensor of its own: a view from the Linear over 3-D input made FSDP2 warn that an in-place op on it would skip
    the all-gather hook."""
    from salm_mtp.config import AdapterConfig
    from salm_mtp.modules.encoder import Adapter

    torch.manual_seed(0)
    a = Adapter(AdapterConfig(stack_frames=2, hidden_size=8), 3, 5)
    x = torch.randn(2, 5, 3, requires_grad=True)
    y, lens = a(x, torch.tensor([5, 2]))
    assert y.shape == (2, 3, 5) and lens.tolist() == [3, 1]
    assert y._base is None
    assert torch.equal(y[1, 1:], torch.zeros(2, 5))  # past row 1's one stacked position
    stacked = torch.cat([x[0, 4], torch.zeros(3)])  # the last group of row 0: frame 4 and one padded frame
    torch.testing.assert_close(y[0, 2], a.proj(stacked))
    torch.testing.assert_close(y[1, 0], a.proj(x[1, :2].reshape(6)))
    y.sum().backward()
    assert torch.equal(x.grad[1, 2:], torch.zeros(3, 3))  # padded frames get no gradient
