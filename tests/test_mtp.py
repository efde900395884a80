import pytest
import torch

import tiny
from salm_mtp.config import MTPConfig
from salm_mtp.model import SALMModule
from salm_mtp.modules.mtp import MTPHead, resolve_mtp


def _module(tok_dir, seed=0, **kw):
    torch.manual_seed(seed)
    return tiny.build(tok_dir, **kw)


def test_default_patterns_and_property(tok_dir):
    moe = _module(tok_dir, pattern="M*E")
    dense = _module(tok_dir, pattern="M*-")
    off = _module(tok_dir, mtp_layers=0)
    assert moe.mtp_head.pattern == "*E" and dense.mtp_head.pattern == "*-"
    assert moe.mtp_enabled and not off.mtp_enabled and off.mtp_head is None
    assert moe.llm.config.num_nextn_predict_layers == 1
    assert moe.llm.config.mtp_layers_block_type == ["full_attention", "moe"]
    assert off.llm.config.num_nextn_predict_layers == 0


def test_layer_indices_and_names(tok_dir):
    m = _module(tok_dir, pattern="M*E-", mtp_layers=2, mtp_pattern="*E")
    head = m.mtp_head
    assert [b.layer_idx for b in head.layers] == [4, 5, 6, 7]  # global: after the 4 backbone layers
    assert [b.block_type for b in head.layers] == ["full_attention", "moe"] * 2
    names = {n for n, _ in head.named_parameters()}
    assert {"layers.0.enorm.weight", "layers.0.hnorm.weight", "layers.0.eh_proj.weight",
            "layers.2.eh_proj.weight", "layers.1.final_layernorm.weight", "layers.3.final_layernorm.weight",
            "layers.1.mixer.experts.up_proj"} <= names
    assert "layers.1.eh_proj.weight" not in names and "layers.0.final_layernorm.weight" not in names
    assert head.layers[0].eh_proj.weight.shape == (32, 64)
    for p in head.parameters():  # experts are allocated with torch.empty: the init must reach them
        assert torch.isfinite(p).all()
    assert head.layers[1].mixer.experts.up_proj.std().item() == pytest.approx(0.02, rel=0.3)


def test_embeddings_rolled_and_audio_positions_carry_audio(tok_dir):
    m = _module(tok_dir, mtp_layers=2)
    batch = tiny.make_batch(m.tokenizer, ["one two", "three"], [8000, 12000])
    merged, _, _ = m.prepare_inputs(batch)
    seen = {}
    orig = m.mtp_head.forward_depth

    def spy(k, h_prev, e_k, **kw):
        seen[k] = e_k
        return orig(k, h_prev, e_k, **kw)

    m.mtp_head.forward_depth = spy
    h0 = m(merged.inputs_embeds)
    m.mtp_hiddens(h0, merged.inputs_embeds)
    E = merged.inputs_embeds
    T = E.shape[1]
    for k in (1, 2):
        torch.testing.assert_close(seen[k][:, : T - k], E[:, k:], rtol=0, atol=0)
        assert seen[k][:, T - k :].abs().sum() == 0  # zero tail, no wrap-around
        b, t = merged.audio_mask.nonzero()[0].tolist()  # first audio position of row b
        torch.testing.assert_close(seen[k][b, t - k], E[b, t], rtol=0, atol=0)  # carried k steps earlier


def test_mtp_does_not_change_main_logits(tok_dir):
    on = _module(tok_dir, mtp_layers=2)
    off = _module(tok_dir, mtp_layers=0)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if ".mtp." not in k})
    on.eval(), off.eval()
    batch = tiny.make_batch(on.tokenizer, ["one two three", "cat"], [9000, 16000])
    with torch.no_grad():
        h_on = on(on.prepare_inputs(batch)[0].inputs_embeds)
        h_off = off(off.prepare_inputs(batch)[0].inputs_embeds)
        on.mtp_hiddens(h_on, on.prepare_inputs(batch)[0].inputs_embeds)
    assert torch.equal(on.llm.lm_head(h_on), off.llm.lm_head(h_off))


def test_detach_backbone_stops_mtp_gradient(tok_dir):
    m = _module(tok_dir, mtp=MTPConfig(num_layers=1, detach_backbone=True, loss_scaling_factor=1.0))
    batch = tiny.make_batch(m.tokenizer, ["one two three"], [8000])
    merged, _, _ = m.prepare_inputs(batch)
    h0 = m(merged.inputs_embeds)
    hk = m.mtp_hiddens(h0, merged.inputs_embeds)
    from salm_mtp.loss import head_stats

    W = m.llm.lm_head.weight
    stats = head_stats(h0, hk, W, merged.targets, mtp_weight=W.detach())
    stats[1].ce_sum.backward()
    assert all(p.grad is None for n, p in m.named_parameters() if ".mtp." not in n)
    assert m.mtp_head.layers[0].eh_proj.weight.grad.abs().sum() > 0


def test_repeated_layer_has_one_physical_depth(tok_dir):
    m = _module(tok_dir, mtp=MTPConfig(num_layers=3, use_repeated_layer=True))
    assert len(m.mtp_head.layers) == 2 and m.num_mtp_depths == 3
    assert m.llm.config.num_nextn_predict_layers == 1
    h = torch.randn(1, 5, 32)
    assert len(m.mtp_head(h, torch.randn(1, 5, 32))) == 3


def test_init_from_backbone_copies_last_block_of_type(tok_dir):
    m = _module(tok_dir, pattern="*E*E", mtp=MTPConfig(num_layers=1, init_from_backbone=True))
    torch.testing.assert_close(m.mtp_head.layers[0].mixer.q_proj.weight, m.llm.model.layers[2].mixer.q_proj.weight)
    torch.testing.assert_close(m.mtp_head.layers[1].mixer.experts.up_proj, m.llm.model.layers[3].mixer.experts.up_proj)


@pytest.mark.parametrize(
    "mtp, pattern, match",
    [
        (dict(num_layers=1, pattern="*X"), "M*E", r"model.mtp.pattern: '\*X' is not a block pattern"),
        (dict(num_layers=-1), "M*E", r"model.mtp.num_layers: must be >= 0, got -1"),
        (dict(num_layers=1, pattern="*E"), "M*-", r"uses block types \['E'\] that the backbone \('M\*-'\)"),
    ],
)
def test_invalid_mtp_configs_raise(tok_dir, mtp, pattern, match):
    with pytest.raises(ValueError, match=match):
        SALMModule(**tiny.tiny_kwargs(tok_dir, pattern=pattern, mtp=MTPConfig(**mtp)))


def test_shipped_head_cannot_be_rebuilt_differently(tok_dir):
    m = _module(tok_dir, pattern="M*E")
    cfg = m.llm.config  # now declares D=1, "*E"
    with pytest.raises(ValueError, match=r"ships an MTP head .* pattern '\*E'"):
        resolve_mtp(cfg, MTPConfig(num_layers=2))
    assert resolve_mtp(cfg, MTPConfig(num_layers=None)) == (1, "*E")
    assert resolve_mtp(cfg, MTPConfig(num_layers=0))[0] == 0
    with pytest.raises(ValueError, match="must be >= 1"):
        MTPHead(cfg, 0, "*E")



@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_head_is_causal_under_every_attention_implementation(tok_dir, attn):
    """Changing only the last position must leave every earlier depth output unchanged."""
    from salm_mtp.config import LLMConfig

    kw = tiny.tiny_kwargs(tok_dir, pattern="M*E", mtp_layers=2, mtp_pattern="*E")
    kw["llm"] = LLMConfig(**{**kw["llm"].__dict__, "attn_implementation": attn})
    torch.manual_seed(0)
    from salm_mtp.io.checkpoints import build_module

    m = build_module(**kw).eval()
    g = torch.Generator().manual_seed(0)
    h0, e = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    h0b, eb = h0.clone(), e.clone()
    h0b[:, -1] += 3.0
    eb[:, -1] -= 3.0
    with torch.no_grad():
        a, b = m.mtp_head(h0, e), m.mtp_head(h0b, eb)
    for k, (x, y) in enumerate(zip(a, b), 1):
        # depth k's input at t includes e rolled by k: position T-1-k sees the changed embedding
        keep = 7 - 1 - k
        torch.testing.assert_close(x[:, :keep], y[:, :keep], rtol=0, atol=1e-6, msg=f"depth {k}")
        assert not torch.allclose(x[:, -1], y[:, -1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mtp_pattern", ["*E", "M*"])
def test_cached_depth_chunks_equal_the_full_forward(tok_dir, attn, mtp_pattern):
    """A depth run in chunks over its own cache, with the masks it builds itself, equals one full forward:
    the mask's past length comes from the depth's attention layer, not the cache's (empty) layer 0."""
    from transformers import DynamicCache

    from salm_mtp.config import LLMConfig
    from salm_mtp.io.checkpoints import build_module

    kw = tiny.tiny_kwargs(tok_dir, pattern="M*E", mtp_layers=2, mtp_pattern=mtp_pattern)
    kw["llm"] = LLMConfig(**{**kw["llm"].__dict__, "attn_implementation": attn})
    torch.manual_seed(0)
    m = build_module(**kw).eval()
    head = m.llm.mtp
    g = torch.Generator().manual_seed(1)
    h, e = torch.randn(2, 9, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    with torch.no_grad():
        for k in (1, 2):
            full = head.forward_depth(k, h, e)
            cache = DynamicCache(config=head.block_config)
            parts = [head.forward_depth(k, h[:, a:b], e[:, a:b], past_key_values=cache, use_cache=True)
                     for a, b in ((0, 5), (5, 7), (7, 8), (8, 9))]
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5, msg=f"depth {k}")


def test_head_only_training_changes_the_head_and_nothing_else(tok_dir, tmp_path):
    """model.mtp.training_mode=head_only: after 3 optimizer steps every non-head parameter and buffer is
    bit-identical (BatchNorm statistics, router biases included), the head has changed."""
    import lightning as L

    kw = tiny.tiny_kwargs(tok_dir, pattern="M*E", mtp=MTPConfig(num_layers=2, training_mode="head_only", loss="kl"),
                          init_seed=0, ctc_weight=0.3)
    module = SALMModule(**kw)
    batch = tiny.make_batch(module.tokenizer, ["one two three", "a dog ran home"], [8000, 12000])
    snaps = {}

    class Snap(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snaps["before"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snaps["modes"] = {n: m.training for n, m in pl_module.named_modules()}

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Snap()])
    loader = torch.utils.data.DataLoader([batch] * 3, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    after = module.state_dict()
    changed = {k for k in after if not torch.equal(after[k], snaps["before"][k])}
    assert changed and all(k.startswith("llm.mtp.") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("llm.mtp.layers.0.") for k in changed)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("llm.mtp.") for n in trainable)
    in_train = [n for n, on in snaps["modes"].items() if on and n and not n.startswith("llm.mtp")]
    assert not in_train, f"non-head modules must train in eval mode: {in_train[:5]}"
    assert snaps["modes"]["llm.mtp"]


def test_head_only_without_a_head_names_the_key(tok_dir):
    with pytest.raises(ValueError, match=r"training_mode=head_only but no MTP head.*--model\.mtp\.num_layers"):
        SALMModule(**tiny.tiny_kwargs(tok_dir, mtp=MTPConfig(num_layers=0, training_mode="head_only")))
