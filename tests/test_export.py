"""salm_mtp.io.export_hf for serving stacks: the released Nemotron-3 config fields, a tokenizer transformers
4.57 reads (checked in a separate venv with transformers 4.57.6), bit-equal reloads with the current
transformers, the D > 1 warning and the first-depth-only export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, NemotronHForCausalLM

import tiny
from salm_mtp.io.export import export_hf
from salm_mtp.io.checkpoints import load_export

REPO = Path(__file__).resolve().parents[1]
TF4 = "4.57.6"
TEXT = "one two <|audio|> the cat"

READ_WITH_TF4 = r"""
import json, sys
import transformers
from transformers import AutoTokenizer, PretrainedConfig
d, text = sys.argv[1], sys.argv[2]
cfg = PretrainedConfig.from_pretrained(d).to_dict()
tok = AutoTokenizer.from_pretrained(d)
print(json.dumps({"version": transformers.__version__, "tokenizer_class": type(tok).__name__,
                  "ids": tok(text, add_special_tokens=False)["input_ids"],
                  "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id], "len": len(tok),
                  "config": {k: cfg.get(k) for k in ("hybrid_override_pattern", "mtp_hybrid_override_pattern",
                                                    "num_hidden_layers", "num_nextn_predict_layers")}}))
"""


@pytest.fixture(scope="session")
def tf4_python() -> str:
    """Python of a venv with transformers 4.57.6 (no torch: config and tokenizer need none), made once under
    .venv-tf457 (or $SALM_TF4_PYTHON). A machine that cannot install it fails the test (naming pip's error): the
    check of what older serving stacks read must never pass by not running."""
    if os.environ.get("SALM_TF4_PYTHON"):
        return os.environ["SALM_TF4_PYTHON"]
    venv = REPO / ".venv-tf457"
    py = venv / "bin" / "python"
    probe = [str(py), "-c", f"import transformers as t; assert t.__version__ == {TF4!r}"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(py)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"transformers=={TF4}",
              "-c", str(REPO / "constraints.txt")]]
    for cmd in steps:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            pytest.fail(f"cannot install transformers {TF4} into {venv} (set SALM_TF4_PYTHON to a Python that has "
                        f"it): {out.stderr[-500:]}")
    return str(py)


@pytest.fixture(scope="module")
def model_and_export(tok_dir, tmp_path_factory):
    torch.manual_seed(0)
    module = tiny.build(tok_dir, pattern="M*E-", mtp_layers=2).eval()
    out = tmp_path_factory.mktemp("export")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_hf(module, str(out / "full"))
    return module, out, [str(w.message) for w in caught]


def test_config_has_released_nemotron3_fields(model_and_export):
    module, out, _ = model_and_export
    cfg = json.loads((out / "full/llm/config.json").read_text())
    assert cfg["hybrid_override_pattern"] == "M*E-" and cfg["num_hidden_layers"] == 4
    assert cfg["mtp_hybrid_override_pattern"] == "*E" and cfg["num_nextn_predict_layers"] == 2
    assert cfg["layers_block_type"] == ["linear_attention", "full_attention", "moe", "mlp"]  # transformers 5
    tok = json.loads((out / "full/llm/tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|audio|>" in tok["additional_special_tokens"]


def test_transformers_4_57_reads_config_and_tokenizer(model_and_export, tf4_python):
    module, out, _ = model_and_export
    llm = str(out / "full/llm")
    proc = subprocess.run([tf4_python, "-c", READ_WITH_TF4, llm, TEXT], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"] == TF4 and got["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert got["config"] == {"hybrid_override_pattern": "M*E-", "mtp_hybrid_override_pattern": "*E",
                             "num_hidden_layers": 4, "num_nextn_predict_layers": 2}
    tok = module.tokenizer  # what training used: the same ids, special tokens and vocabulary size
    assert got["ids"] == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|audio|>") in got["ids"]
    assert got["special"] == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] and got["len"] == len(tok)


def test_current_transformers_reload_is_bit_equal(model_and_export):
    module, out, _ = model_and_export
    ids = torch.randint(0, len(module.tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    llm = NemotronHForCausalLM.from_pretrained(str(out / "full/llm")).eval()
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids).logits, module.llm(input_ids=ids).logits)
    tok = AutoTokenizer.from_pretrained(str(out / "full/llm"))
    assert tok(TEXT)["input_ids"] == module.tokenizer(TEXT)["input_ids"]

    again = load_export(str(out / "full")).eval()  # the whole SALM model, head included
    embeds = module.llm.get_input_embeddings()(ids)
    with torch.no_grad():
        h0, h0_again = module(embeds), again(embeds)
        assert torch.equal(h0, h0_again)
        for a, b in zip(module.mtp_hiddens(h0, embeds), again.mtp_hiddens(h0_again, embeds), strict=True):
            assert torch.equal(a, b)


def test_deep_head_warns_and_first_depth_export(model_and_export):
    module, out, caught = model_and_export
    assert any("2 depths" in m and "--mtp-depths 1" in m for m in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning for a depth-1 export
        export_hf(module, str(out / "d1"), mtp_depths=1)
    cfg = json.loads((out / "d1/llm/config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["mtp_hybrid_override_pattern"] == "*E"
    assert json.loads((out / "d1/salm_config.json").read_text())["mtp"]["num_layers"] == 1
    assert module.num_mtp_depths == 2 and module.llm.config.num_nextn_predict_layers == 2  # module untouched
    one = load_export(str(out / "d1")).eval()
    assert one.num_mtp_depths == 1
    ids = torch.randint(0, len(module.tokenizer), (1, 7), generator=torch.Generator().manual_seed(2))
    embeds = module.llm.get_input_embeddings()(ids)
    with torch.no_grad():
        h0 = module(embeds)
        assert torch.equal(one.mtp_hiddens(h0, embeds)[0], module.mtp_hiddens(h0, embeds)[0])
    with pytest.raises(ValueError, match="--mtp-depths must be between 1 and the head's 2 depths, got 3"):
        export_hf(module, str(out / "bad"), mtp_depths=3)
