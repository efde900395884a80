"""salm_mtp/pretrain.py: CTC pretraining of the encoder stops on quality (val_wer <= target_wer), records the
result beside the export, and scripts/run_demo.sh refuses to start SALM on an encoder that missed its target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from salm_mtp.pretrain import RESULT_FILE, require_target

REPO = Path(__file__).resolve().parents[1]


def _pretrain(tmp_path: Path, tok_dir: str, manifest: Path, target: float, max_steps: int) -> dict:
    from salm_mtp.pretrain import main

    export = tmp_path / f"enc_{target}"
    main(["fit", "--config", str(REPO / "conf/encoder_ctc.yaml"), f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.max_steps={max_steps}", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          f"--model.tokenizer_path={tok_dir}", f"--model.export_dir={export}", f"--model.target_wer={target}",
          "--model.encoder.hidden_size=32", "--model.encoder.num_hidden_layers=1",
          "--model.encoder.intermediate_size=64", "--model.encoder.subsampling_conv_channels=8",
          f"--data.train_manifest={manifest}", f"--data.val_manifest={manifest}", "--data.max_duration=2.0",
          "--data.num_workers=0"])
    return json.loads((export / RESULT_FILE).read_text()), export


def test_stops_at_the_first_validation_that_meets_the_target(tmp_path, tok_dir, sine_corpus):
    manifest = sine_corpus(n=8)
    result, export = _pretrain(tmp_path, tok_dir, manifest, target=1.0, max_steps=5)
    # val_wer of any hypothesis against a non-empty reference is <= 1 unless it inserts: a random encoder
    # mostly emits blanks, so the first validation (after step 1) meets a target of 100%
    assert result["reached"] is True and result["step"] == 1 and result["val_wer"] <= 1.0
    assert result["target_wer"] == 1.0 and result["max_steps"] == 5
    assert (export / "config.json").is_file()
    assert require_target(str(export)) == 0


def test_an_unreachable_target_trains_to_the_cap_and_is_refused(tmp_path, tok_dir, sine_corpus, capsys):
    manifest = sine_corpus(n=8)
    result, export = _pretrain(tmp_path, tok_dir, manifest, target=0.0, max_steps=3)
    assert result["reached"] is False and result["step"] == 3 and result["val_wer"] > 0
    capsys.readouterr()
    assert require_target(str(export)) == 1
    out = capsys.readouterr().out
    assert f"ended at val WER {100 * result['val_wer']:.1f}% after 3 steps, above its target 0.0%" in out
    assert "ENC_STEPS=6 bash scripts/run_demo.sh" in out
    assert require_target(str(tmp_path / "nowhere")) == 1
    assert "pretrain_result.json is missing" in capsys.readouterr().out


def test_target_outside_0_1_is_refused(tok_dir):
    from salm_mtp.pretrain import CTCPretrainModule

    with pytest.raises(ValueError, match="model.target_wer: must be in \\[0, 1\\]"):
        CTCPretrainModule(tokenizer_path=tok_dir, target_wer=10.0)


def test_run_demo_refuses_the_salm_stage_when_the_encoder_misses_its_target(tmp_path):
    """The main command itself, tiny: 6 train clips, 2 encoder steps, target 0%: it stops before SALM training."""
    env = {**os.environ, "SALM_VENV": sys.prefix, "RUN": str(tmp_path / "run"), "DATA": str(tmp_path / "data"),
           "DEMO_TRAIN": "6", "DEMO_HELDOUT": "2", "ENC_STEPS": "2", "ENC_TARGET_WER": "0",
           "ENC_ARGS": "--trainer.val_check_interval=1 --trainer.limit_val_batches=1 "
                       "--trainer.enable_progress_bar=false --data.num_workers=0"}
    proc = subprocess.run(["bash", "scripts/run_demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: the CTC encoder in" in proc.stdout and "above its target 0.0%" in proc.stdout
    assert "== 3/4" not in proc.stdout and not (tmp_path / "run" / "fit.log").exists()
    assert json.loads((tmp_path / "run" / "encoder_ctc_hf" / RESULT_FILE).read_text())["reached"] is False
