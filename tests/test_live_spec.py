"""salm_mtp/live_spec.py: LiveAcceptance logs the live speculative figures at each validation of a real `salm-mtp
fit` (in this process), and the training losses are those of the same run without it."""

from __future__ import annotations

import csv
import glob
import math
import os

import pytest

from cli_run import run_cli
from tiny import logged_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIVE = ("--trainer.callbacks+=salm_mtp.live_spec.LiveAcceptance", "--trainer.callbacks.init_args.utterances=5")


def _fit(run_dir, corpus, tok_dir, *extra):
    out = run_cli(["fit", "--config", os.path.join(ROOT, "conf/tiny.yaml"), f"--trainer.default_root_dir={run_dir}",
                   f"--model.tokenizer_path={tok_dir}", f"--data.train_manifest={corpus}",
                   f"--data.val_manifest={corpus}", "--data.test_manifest=null", "--trainer.enable_progress_bar=false",
                   *extra])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def test_live_figures_are_logged_and_training_is_unchanged(corpus, tok_dir, tmp_path):
    _fit(tmp_path / "off", corpus, tok_dir)
    _fit(tmp_path / "on", corpus, tok_dir, *LIVE)
    assert logged_losses(str(tmp_path / "on")) == logged_losses(str(tmp_path / "off"))  # bit for bit
    (path,) = glob.glob(str(tmp_path / "on" / "salm/version_*/metrics.csv"))
    rows = [r for r in csv.DictReader(open(path)) if r.get("val_spec/tokens_per_forward")]
    assert len(rows) == 2  # conf/tiny.yaml: 6 steps, validation every 3
    for r in rows:
        assert float(r["val_spec/tokens_per_forward"]) >= 1.0 and float(r["val_spec/identical"]) == 1.0
        assert 0.0 <= float(r["val_spec/ctc_acceptance"]) <= 1.0  # conf/tiny.yaml trains CTC: ctc+mtp
        for k in (1, 2):
            a = float(r[f"val_spec/chained_acceptance/depth_{k}"])
            assert math.isnan(a) or 0.0 <= a <= 1.0
        assert r.get("val_mtp_acc/depth_1")  # beside the teacher-forced figure


def test_utterances_must_be_positive():
    from salm_mtp.live_spec import LiveAcceptance

    with pytest.raises(ValueError, match="utterances must be >= 1"):
        LiveAcceptance(utterances=0)


def test_ctc_drafts_take_the_runs_answer_format():
    """A chat template that ends the assistant's turn with its own marker: the live decoder's CTC drafts are built
    by the run's data module formatter (marker included), not by the default plain format (text + eos)."""
    from types import SimpleNamespace

    from test_prompt import word_tokenizer

    from salm_mtp.data.prompt import PromptConfig, PromptFormatter
    from salm_mtp.decoding.modes import default_answer_ids
    from salm_mtp.live_spec import answer_ids_of

    tok = word_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} "
                         "{% if m.role == 'assistant' %}<|user|> {% endif %}</s> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    fmt = PromptFormatter(tok, PromptConfig(use_chat_template=True))
    dm = SimpleNamespace(get_dataset=lambda: SimpleNamespace(formatter=fmt))
    assert answer_ids_of(SimpleNamespace(datamodule=dm))("three") == [11, 15, 2]  # three <|user|> </s>
    assert default_answer_ids(word_tokenizer())("three") == [11, 2]
    assert answer_ids_of(SimpleNamespace(datamodule=None)) is None
