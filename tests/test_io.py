import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
from salm_mtp.io.checkpoints import build_module, load_export
from salm_mtp.io.export import export_hf
from salm_mtp.io.weights import CheckpointError
from salm_mtp.config import AdapterConfig, EncoderConfig, LLMConfig, MTPConfig
from salm_mtp.model import SALMModule

E = 4  # experts of the tiny config


def _super_like(tok_dir, seed=0, **kw):
    """Super-like tiny model: backbone M/E/* with moe_latent_size, MTP D=1 pattern '*E'."""
    torch.manual_seed(seed)
    kwargs = tiny.tiny_kwargs(tok_dir, pattern="MEM*E", mtp_layers=1, mtp_pattern="*E", **kw)
    kwargs["llm"].moe_latent_size = 8
    return build_module(**kwargs)


def _keys(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def test_export_writes_design_key_list(tok_dir, tmp_path):
    m = _super_like(tok_dir)
    export_hf(m, str(tmp_path / "exp"))
    keys = _keys(tmp_path / "exp/llm/model.safetensors")
    mtp = {k for k in keys if k.startswith("mtp.")}
    expected = {
        "mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
        "mtp.layers.0.norm.weight",
        *(f"mtp.layers.0.mixer.{p}_proj.weight" for p in "qkvo"),
        "mtp.layers.1.norm.weight", "mtp.layers.1.mixer.gate.weight", "mtp.layers.1.mixer.gate.e_score_correction_bias",
        "mtp.layers.1.mixer.fc1_latent_proj.weight", "mtp.layers.1.mixer.fc2_latent_proj.weight",
        *(f"mtp.layers.1.mixer.experts.{e}.{p}_proj.weight" for e in range(E) for p in ("up", "down")),
        "mtp.layers.1.mixer.shared_experts.up_proj.weight", "mtp.layers.1.mixer.shared_experts.down_proj.weight",
        "mtp.layers.1.final_layernorm.weight",
    }
    assert mtp == expected
    assert keys["mtp.layers.0.eh_proj.weight"] == [32, 64]  # [H, 2H]
    assert keys["mtp.layers.1.mixer.experts.0.up_proj.weight"] == [16, 8]  # per expert, latent input
    assert any(k.startswith("backbone.layers.1.mixer.experts.3.") for k in keys)
    cfg = json.load(open(tmp_path / "exp/llm/config.json"))
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["mtp_layers_block_type"] == ["full_attention", "moe"]
    assert os.path.isfile(tmp_path / "exp/llm/tokenizer.json")


def test_export_reload_round_trip(tok_dir, tmp_path):
    m = _super_like(tok_dir, ctc_weight=0.3)
    export_hf(m, str(tmp_path / "exp"))
    back = load_export(str(tmp_path / "exp"))
    assert back.mtp_shipped and back.num_mtp_depths == 1
    ref, got = m.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # the LLM dir alone, through model.llm.path, loads the head back 1:1
    kw = tiny.tiny_kwargs(tok_dir, mtp=MTPConfig(num_layers=None))
    kw["llm"] = LLMConfig(path=str(tmp_path / "exp/llm"))
    kw["tokenizer_path"] = None
    torch.manual_seed(123)  # a different init: everything must come from the files
    via_path = build_module(**kw)
    for k, v in m.llm.state_dict().items():
        assert torch.equal(v, via_path.llm.state_dict()[k]), k


def test_a_truncated_llm_file_is_named_where_it_is_read(tok_dir, tmp_path):
    """model.llm.path whose model.safetensors was cut in half: a one-line SalmError naming the file (the CLI prints
    it as `error: ...`, exit 2), not safetensors' traceback."""
    from salm_mtp.errors import SalmError

    export_hf(_super_like(tok_dir), str(tmp_path / "exp"))
    file = tmp_path / "exp/llm/model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    kw = tiny.tiny_kwargs(tok_dir, mtp=MTPConfig(num_layers=None))
    kw["llm"], kw["tokenizer_path"] = LLMConfig(path=str(tmp_path / "exp/llm")), None
    with pytest.raises(SalmError, match=rf"'{file}' is truncated: it holds {len(data) // 2} bytes, its tensors need "
                                        rf"{len(data)}; re-download or re-export it"):
        build_module(**kw)


def test_a_tokenizer_larger_than_the_llm_is_refused_at_build(tok_dir, tmp_path):
    """Found when the model is built (it used to surface at the first batch), naming the key and both sizes."""
    from salm_mtp.data.tokenizer import load_tokenizer
    from salm_mtp.errors import ConfigError
    from salm_mtp.salm import check_vocabulary

    export_hf(_super_like(tok_dir), str(tmp_path / "exp"))
    big = load_tokenizer(tok_dir)
    big.add_tokens([f"extra{i}" for i in range(5)])
    big.save_pretrained(str(tmp_path / "big_tok"))
    kw = tiny.tiny_kwargs(str(tmp_path / "big_tok"), mtp=MTPConfig(num_layers=None))
    kw["llm"] = LLMConfig(path=str(tmp_path / "exp/llm"))
    with pytest.raises(ConfigError, match=rf"model.tokenizer_path: '.*big_tok' has {len(big)} tokens .* but "
                                          r"model.llm.path='.*exp/llm''s config.json embeds \d+; use the LLM's own"):
        build_module(**kw)
    check_vocabulary(11, 10, 10, "t", None)  # the placeholder alone past the vocabulary: fine (audio replaces it)
    with pytest.raises(ConfigError, match=r"has 12 tokens \(ids up to 11 besides the audio placeholder\)"):
        check_vocabulary(12, 10, 10, "t", None)


def _drop_tensor(file, name):
    t = load_file(file)
    del t[name]
    save_file(t, file, metadata={"format": "pt"})


@pytest.mark.parametrize("victim", ["mtp.layers.1.mixer.experts.2.up_proj.weight", "mtp.layers.1.mixer.experts.3.down_proj.weight",
                                    "mtp.layers.0.eh_proj.weight"])
def test_missing_mtp_tensor_fails_by_name(tok_dir, tmp_path, victim):
    export_hf(_super_like(tok_dir), str(tmp_path / "exp"))
    _drop_tensor(str(tmp_path / "exp/llm/model.safetensors"), victim)
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        load_export(str(tmp_path / "exp"))


def test_unexpected_mtp_tensor_fails_by_name(tok_dir, tmp_path):
    export_hf(_super_like(tok_dir), str(tmp_path / "exp"))
    f = str(tmp_path / "exp/llm/model.safetensors")
    t = load_file(f)
    t["mtp.layers.1.bogus.weight"] = torch.zeros(2)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['mtp\.layers\.1\.bogus\.weight'\]"):
        load_export(str(tmp_path / "exp"))


def test_declared_head_without_tensors_is_refused(tok_dir, tmp_path):
    export_hf(_super_like(tok_dir), str(tmp_path / "exp"))
    f = str(tmp_path / "exp/llm/model.safetensors")
    save_file({k: v for k, v in load_file(f).items() if not k.startswith("mtp.")}, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="declares an MTP head .* no mtp.* tensors; refusing to re-initialise"):
        load_export(str(tmp_path / "exp"))


def test_base_checkpoint_without_head_gets_a_new_head(tok_dir, tmp_path):
    base = _super_like(tok_dir, mtp=MTPConfig(num_layers=0))
    export_hf(base, str(tmp_path / "base"))
    assert json.load(open(tmp_path / "base/llm/config.json"))["num_nextn_predict_layers"] == 0
    kw = tiny.tiny_kwargs(tok_dir, mtp=MTPConfig(num_layers=2))
    kw["llm"], kw["tokenizer_path"] = LLMConfig(path=str(tmp_path / "base/llm")), None
    m = build_module(**kw)
    assert not m.mtp_shipped and m.num_mtp_depths == 2 and m.mtp_head.pattern == "*E"
    assert m.llm.config.num_nextn_predict_layers == 2  # recorded so exports carry it
    for k, v in base.llm.state_dict().items():
        assert torch.equal(v, m.llm.state_dict()[k]), k


def test_loads_dirs_written_by_transformers_itself(tok_dir, tmp_path):
    """An LLM and a Parakeet CTC encoder saved with HF save_pretrained load through model.*.path."""
    from transformers import ParakeetCTCConfig, ParakeetForCTC

    torch.manual_seed(1)
    src = _super_like(tok_dir, mtp=MTPConfig(num_layers=0))
    src.llm.save_pretrained(tmp_path / "llm")
    src.tokenizer.save_pretrained(tmp_path / "llm")
    enc_cfg = src.audio.encoder.config
    ctc = ParakeetForCTC(ParakeetCTCConfig(encoder_config=enc_cfg.to_dict(), vocab_size=len(src.tokenizer) + 1,
                                           pad_token_id=len(src.tokenizer)))
    ctc.save_pretrained(tmp_path / "enc")
    kw = tiny.tiny_kwargs(tok_dir, mtp=MTPConfig(num_layers=0), ctc_weight=0.5)
    kw["llm"], kw["tokenizer_path"] = LLMConfig(path=str(tmp_path / "llm")), None
    kw["encoder"] = EncoderConfig(path=str(tmp_path / "enc"), dropout=0.0)
    m = build_module(**kw)
    for k, v in src.llm.state_dict().items():
        assert torch.equal(v, m.llm.state_dict()[k]), k
    for k, v in ctc.state_dict().items():
        assert torch.equal(v, m.audio.state_dict()[k]), k


def test_bad_paths_name_the_key(tok_dir, tmp_path):
    kw = tiny.tiny_kwargs(tok_dir)
    kw["encoder"] = EncoderConfig(path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="model.encoder.path=.*nope.* has no config.json"):
        SALMModule(**kw)
    kw = tiny.tiny_kwargs(tok_dir)
    kw["llm"] = LLMConfig(path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="model.llm.path=.*nope.* has no config.json"):
        SALMModule(**kw)


def test_init_from_backbone_copies_the_loaded_backbone(tok_dir, tmp_path):
    """mtp.init_from_backbone copies the pretrained blocks (after loading), not the random init."""
    base = _super_like(tok_dir, mtp=MTPConfig(num_layers=0))
    export_hf(base, str(tmp_path / "base"))
    kw = tiny.tiny_kwargs(tok_dir, mtp=MTPConfig(num_layers=1, pattern="*E", init_from_backbone=True), init_seed=9)
    kw["llm"], kw["tokenizer_path"] = LLMConfig(path=str(tmp_path / "base/llm")), None
    m = build_module(**kw)
    src_attn, src_moe = base.llm.model.layers[3], base.llm.model.layers[4]  # last '*' and last 'E' of "MEM*E"
    head = m.mtp_head.layers
    for dst, src in ((head[0], src_attn), (head[1], src_moe)):
        for part in ("norm", "mixer"):
            ref = getattr(src, part).state_dict()
            for k, v in getattr(dst, part).state_dict().items():
                assert torch.equal(v, ref[k]), f"{part}.{k}"
    assert not torch.equal(head[0].eh_proj.weight, torch.zeros_like(head[0].eh_proj.weight))  # fusion stays new


def test_new_deeper_head_on_an_export(tok_dir, tmp_path):
    """replace_existing_head + the export's llm/encoder/adapter: everything loaded but a new 2-depth head."""
    src = _super_like(tok_dir, ctc_weight=0.3)
    export_hf(src, str(tmp_path / "exp"))
    kw = tiny.tiny_kwargs(tok_dir, mtp=MTPConfig(num_layers=2, pattern="*E", replace_existing_head=True),
                          ctc_weight=0.3, init_seed=4)
    kw["llm"], kw["tokenizer_path"] = LLMConfig(path=str(tmp_path / "exp/llm")), None
    kw["encoder"] = EncoderConfig(path=str(tmp_path / "exp/encoder"), dropout=0.0)
    kw["adapter"] = AdapterConfig(path=str(tmp_path / "exp/adapter.safetensors"), stack_frames=2, hidden_size=32)
    m = build_module(**kw)
    assert m.num_mtp_depths == 2 and not m.mtp_shipped
    ref = src.state_dict()
    for k, v in m.state_dict().items():
        if not k.startswith("llm.mtp."):
            assert torch.equal(v, ref[k]), k
    assert m.mtp_head.layers[2].eh_proj.weight.shape == (32, 64)  # the second depth exists: new
    with pytest.raises(CheckpointError, match=r"model\.adapter\.path=.*does not exist|does not exist"):
        kw["adapter"] = AdapterConfig(path=str(tmp_path / "nope.safetensors"))
        build_module(**kw)


def test_checkpoint_loads_from_another_working_directory(tok_dir, tmp_path, sine_corpus, monkeypatch):
    """A model built from relative paths (encoder dir, tokenizer) records them absolutely: its .ckpt loads from
    any working directory."""
    import shutil

    import lightning as L

    from salm_mtp.data.datamodule import SALMDataModule
    from salm_mtp.io.checkpoints import load_model

    export_hf(_super_like(tok_dir), str(tmp_path / "exp"))
    shutil.copytree(tok_dir, tmp_path / "tok")
    manifest = sine_corpus(n=4)
    monkeypatch.chdir(tmp_path)
    kw = tiny.tiny_kwargs("tok", pattern="MEM*E")
    kw["encoder"] = EncoderConfig(path="exp/encoder")
    module = build_module(**kw)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=SALMDataModule(train_manifest=str(manifest), max_duration=1.0))
    trainer.save_checkpoint(str(tmp_path / "m.ckpt"))
    assert module.hparams["encoder"].path == str(tmp_path / "exp" / "encoder")
    assert module.hparams["tokenizer_path"] == str(tmp_path / "tok")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    back = load_model(str(tmp_path / "m.ckpt"))
    ref = module.state_dict()
    assert set(back.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())


def test_relative_model_paths_are_found_from_the_checkpoint(tmp_path, monkeypatch):
    """A run started in RUN with model.encoder.path=enc (relative) loads from any working directory: a relative path
    missing from here is looked up from the checkpoint's directory upwards; absolute, existing and unknown paths stay."""
    from salm_mtp.config import EncoderConfig
    from salm_mtp.io.checkpoints import located_paths

    run = tmp_path / "run"
    (run / "enc").mkdir(parents=True)
    (run / "tok").mkdir()
    ckpt = run / "salm/version_0/checkpoints/last.ckpt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = located_paths({"tokenizer_path": "tok", "encoder": EncoderConfig(path="enc"),
                         "llm": {"path": "missing/llm"}, "ctc_weight": 0.5}, str(ckpt))
    assert got["tokenizer_path"] == str(run / "tok") and got["encoder"].path == str(run / "enc")
    assert got["llm"] == {"path": "missing/llm"} and got["ctc_weight"] == 0.5  # not found anywhere: left as it was
    (elsewhere / "enc").mkdir()  # one that exists from here wins (the run's own cwd)
    assert located_paths({"encoder": {"path": "enc"}}, str(ckpt))["encoder"]["path"] == "enc"
