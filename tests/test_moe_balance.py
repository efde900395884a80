"""Tests of salm_mtp/modules/moe_balance.py: aux-loss-free bias updates, the sequence aux loss, frozen routers."""

import pytest
import torch

import tiny
from salm_mtp.config import FreezeConfig
from salm_mtp.modules.moe_balance import MoEBalanceConfig, sequence_aux_loss


def _routers(m):
    return {n: r for n, r in m.named_modules() if n.endswith("mixer.gate")}


def test_bias_update_follows_the_sign_rule_and_skips_frozen_routers(tok_dir):
    m = tiny.build(tok_dir, pattern="M*E", mtp_layers=1, mtp_pattern="*E", init_seed=0,
                   freeze=FreezeConfig(patterns=[r"^llm\.model\."]), moe_balance=MoEBalanceConfig(bias_update_rate=0.01))
    m.apply_freeze()
    routers = _routers(m)
    assert set(routers) == {"llm.model.layers.2.mixer.gate", "llm.mtp.layers.1.mixer.gate"}
    batch = tiny.make_batch(m.tokenizer, ["one two three", "the cat sat on the mat"], [8000, 12000])
    m.train()
    m.compute_losses(batch)
    loads = dict(m.balancer.loads)
    assert set(loads) == {"llm.mtp.layers.1.mixer.gate"}  # the frozen backbone router is not even counted
    load = loads["llm.mtp.layers.1.mixer.gate"]
    before = {n: r.e_score_correction_bias.clone() for n, r in routers.items()}
    metrics = m.balancer.step()
    head = routers["llm.mtp.layers.1.mixer.gate"].e_score_correction_bias
    expected = before["llm.mtp.layers.1.mixer.gate"] + 0.01 * torch.sign(load.mean() - load)
    assert torch.equal(head, expected)
    assert torch.equal(routers["llm.model.layers.2.mixer.gate"].e_score_correction_bias,
                       before["llm.model.layers.2.mixer.gate"])
    assert metrics["moe_imbalance/llm.mtp.layers.1.mixer.gate"] == pytest.approx(float(load.max() / load.mean()))
    assert m.balancer.loads == {}
    # tokens x top-k assignments were counted: every valid and padded position of the head's input
    assert float(load.sum()) == batch["input_ids"].shape[0] * m.prepare_inputs(batch)[0].inputs_embeds.shape[1] * 2


def test_no_counting_outside_training_forwards(tok_dir):
    m = tiny.build(tok_dir, pattern="M*E", init_seed=0)
    batch = tiny.make_batch(m.tokenizer, ["one two"], [8000])
    m.eval()
    m.compute_losses(batch)
    assert m.balancer.loads == {}


def test_sequence_aux_loss_matches_hand_computation():
    torch.manual_seed(0)
    B, T, E, K = 2, 3, 4, 2
    logits = torch.randn(B * T, E)
    idx = logits.topk(K, -1).indices
    got = sequence_aux_loss(logits, idx, B, K)
    ref = 0.0
    for b in range(B):
        rows = logits[b * T:(b + 1) * T].sigmoid()
        rows = rows / rows.sum(-1, keepdim=True)
        for e in range(E):
            f = E / (K * T) * sum(int(e in idx[b * T + t].tolist()) for t in range(T))
            ref += f * rows[:, e].mean()
    assert got.item() == pytest.approx(ref.item() / B, rel=1e-6)


def test_aux_loss_reaches_the_router_weights(tok_dir):
    grads = {}
    for alpha in (0.0, 0.1):
        m = tiny.build(tok_dir, pattern="M*E", init_seed=0, moe_balance=MoEBalanceConfig(aux_loss_weight=alpha))
        batch = tiny.make_batch(m.tokenizer, ["one two three"], [8000])
        m.train()
        loss, _, _ = m.compute_losses(batch)
        loss.backward()
        grads[alpha] = m.llm.model.layers[2].mixer.gate.weight.grad.clone()
        assert m.balancer.aux_loss() == 0.0  # consumed by the step
    assert not torch.allclose(grads[0.0], grads[0.1])


def test_negative_rate_names_the_key():
    with pytest.raises(ValueError, match=r"model\.moe_balance\.bias_update_rate: must be >= 0"):
        MoEBalanceConfig(bias_update_rate=-1)
