"""Tests of salm_mtp/materialize.py: meta construction, materialisation, deterministic initialisation.

The multi-process side (N ranks start from the single-process weights, each reads only its slices)
is in tests/test_parallel.py; here one process checks the same code path piece by piece.
"""

import math

import pytest
import torch
import torch.nn as nn

import tiny
from salm_mtp.io.checkpoints import build_module
from salm_mtp.materialize import init_parameters, materialize, meta_parameters, seed_for
from salm_mtp.model import SALMModule
from salm_mtp.modules.features import LogMelFeatures


def test_constructor_allocates_no_parameter_memory(tok_dir):
    m = SALMModule(**tiny.tiny_kwargs(tok_dir))
    params = list(m.named_parameters())
    assert params and all(p.is_meta for _, p in params)
    buffers = dict(m.named_buffers())
    assert not any(b.is_meta for b in buffers.values())  # derived buffers are built for real
    assert torch.equal(buffers["features.mel_filters"], LogMelFeatures(m.features.config).mel_filters)


def test_meta_parameters_context_keeps_requires_grad_and_restores_torch():
    with meta_parameters():
        lin = nn.Linear(3, 4)
        lin.bias.requires_grad_(False)
        norm = nn.BatchNorm1d(4)
    assert lin.weight.is_meta and lin.weight.requires_grad and not lin.bias.requires_grad
    assert not norm.running_mean.is_meta and torch.equal(norm.running_var, torch.ones(4))
    assert not nn.Linear(2, 2).weight.is_meta  # the patch is gone outside the context


def test_materialize_restores_construction_buffers(tok_dir):
    m = SALMModule(**tiny.tiny_kwargs(tok_dir))
    before = {n: b.clone() for n, b in m.named_buffers()}
    materialize(m, "cpu")
    assert not any(p.is_meta for p in m.parameters())
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), n


def test_same_init_seed_same_weights_whatever_the_global_rng(tok_dir):
    torch.manual_seed(1)
    a = tiny.build(tok_dir, init_seed=5)
    torch.manual_seed(2)
    torch.rand(100)
    b = tiny.build(tok_dir, init_seed=5)
    c = tiny.build(tok_dir, init_seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    differs = [k for k in sa if sa[k].numel() > 4 and not torch.equal(sa[k], sc[k])]
    assert len(differs) > 20


def test_init_follows_transformers_post_order(tok_dir):
    """Nemotron-H's init rescales Mamba out_proj in the mixer's init (after the Linear's own): the parent wins."""
    m = tiny.build(tok_dir, pattern="M*E-", init_seed=0)
    cfg = m.llm.config
    mixer = m.llm.model.layers[0].mixer
    fan_in = mixer.out_proj.weight.shape[1]
    bound = 1 / math.sqrt(fan_in) / math.sqrt(cfg.num_hidden_layers)  # kaiming_uniform(a=sqrt 5) / sqrt(L)
    w = mixer.out_proj.weight
    assert float(w.abs().max()) <= bound + 1e-7 and float(w.abs().max()) > 0.8 * bound
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, cfg.mamba_num_heads + 1, dtype=torch.float32)))
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    emb = m.llm.model.embeddings.weight
    assert float(emb.std()) == pytest.approx(cfg.initializer_range, rel=0.1)  # normal(0, 0.02), not kaiming
    assert torch.equal(m.llm.model.layers[2].mixer.gate.e_score_correction_bias, torch.zeros(4))


def test_init_parameters_touches_only_the_named_ones():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = {n: p.clone() for n, p in lin.named_parameters()}
    done = init_parameters(lin, {"1.weight"}, base_seed=3)
    assert done == {"1.weight"}
    assert torch.equal(lin[0].weight, before["0.weight"]) and torch.equal(lin[1].bias, before["1.bias"])
    assert not torch.equal(lin[1].weight, before["1.weight"])
    with torch.random.fork_rng():
        torch.manual_seed(seed_for(3, "1"))
        ref = nn.Linear(4, 2)  # reset_parameters under the module's own seed
    torch.manual_seed(seed_for(3, "1"))
    ref.reset_parameters()
    assert torch.equal(lin[1].weight, ref.weight)


def test_build_module_loads_nothing_without_paths(tok_dir):
    m = SALMModule(**tiny.tiny_kwargs(tok_dir, init_seed=0))
    out = m.materialize_weights("cpu")
    assert out["loaded"] == set() and out["initialised"] == {n for n, _ in m.named_parameters()}
    with pytest.raises(RuntimeError, match="already materialised"):
        m.materialize_weights("cpu")
    assert build_module(**tiny.tiny_kwargs(tok_dir, init_seed=0)).state_dict().keys() == m.state_dict().keys()
