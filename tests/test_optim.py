"""salm_mtp.optim: the AdamW kernel choice and the schedule."""

import pytest
import torch

from salm_mtp.config import OptimConfig
from salm_mtp.optim import adamw_kernel, lr_factor


def test_auto_picks_fused_on_cpu_and_foreach_for_non_float():
    assert adamw_kernel("auto", [torch.zeros(2, requires_grad=True)]) == {"fused": True}
    assert adamw_kernel("auto", [torch.zeros(2, dtype=torch.int64)]) == {"foreach": True}
    assert adamw_kernel("for_loop", [torch.zeros(2)]) == {"foreach": False}


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_kernels_take_the_same_steps_as_the_for_loop(impl):
    torch.manual_seed(0)
    init = [torch.randn(33, 7), torch.randn(5)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(4)]
    out = {}
    for name in ("for_loop", impl):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.98), weight_decay=0.01, **adamw_kernel(name, ps))
        for g in grads:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
        out[name] = [p.detach() for p in ps]
    for a, b in zip(out["for_loop"], out[impl]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out[impl][0], init[0])


def test_unknown_implementation_names_the_key():
    with pytest.raises(ValueError, match="model.optim.implementation"):
        OptimConfig(implementation="apex")


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 10, 100, 0.05) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.05) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.05) == pytest.approx(0.05)
