"""scripts/evaluate.py end to end: a 2-step fit on a sine-wave corpus, its checkpoint evaluated by the
CLI (subprocess), one cut's audio deleted: counted in num_failed, the run goes on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

import tiny
from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.evaluate import _Totals, default_metrics_csv, format_table, summarise
from salm_mtp.io import export_hf, load_lightning_checkpoint
from salm_mtp.evaluate import main as evaluate_main
from salm_mtp.model import SALMModule

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"num_utterances", "num_failed", "wer", "cer", "num_empty_refs", "num_empty_hyps", "bleu",
               "mtp_acceptance", "main_acc", "tokens_per_s", "decode_seconds"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fit_tiny(tmp_path: Path, tok_dir: str, manifest: Path) -> Path:
    """Two optimizer steps with a CSVLogger; returns <log_dir>/checkpoints/last.ckpt."""
    torch.manual_seed(0)
    module = tiny.build(tok_dir, pattern="M*E-", mtp_layers=2)
    dm = SALMDataModule(train_manifest=str(manifest), tokenizer_path=tok_dir, max_duration=1.0, num_buckets=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path / "runs")),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    ckpt = Path(trainer.log_dir) / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(str(ckpt))
    return ckpt


def test_evaluate_cli_on_trained_checkpoint(tmp_path, tok_dir, sine_corpus):
    manifest = sine_corpus(n=7)  # c000..c006; c002 and c005 are ast cuts
    ckpt = _fit_tiny(tmp_path, tok_dir, manifest)
    assert default_metrics_csv(str(ckpt)) == str(ckpt.parent.parent / "metrics.csv")
    os.remove(manifest.parent / "audio" / "c003.flac")  # unreadable at evaluation time

    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--ckpt", str(ckpt), "--manifest", str(manifest),
           "--out", str(out), "--batch-size", "3", "--max-new-tokens", "6", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WER" in proc.stdout and "MTP acceptance depth 2" in proc.stdout

    rows = [json.loads(line) for line in (out / "hyps.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"c{i:03d}" for i in range(7)]  # manifest order, failed one included
    failed = [r for r in rows if r["hyp"] is None]
    assert [r["id"] for r in failed] == ["c003"] and failed[0]["error"] == "unreadable audio"
    for r in rows:
        assert {"id", "task", "ref", "hyp"} <= set(r)
        assert r["task"] == ("ast" if r["id"] in ("c002", "c005") else "asr")
    assert rows[2]["ref"] == "0 2" and rows[0]["ref"] == "zero zero"

    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m)
    assert m["num_utterances"] == 7 and m["num_failed"] == 1 and m["num_asr"] == 4 and m["num_ast"] == 2
    assert m["wer"] is not None and m["wer"] >= 0 and m["cer"] is not None
    assert m["bleu"] is not None and 0 <= m["bleu"] <= 100
    assert len(m["mtp_acceptance"]) == 2 and all(a is None or 0 <= a <= 1 for a in m["mtp_acceptance"])
    assert 0 <= m["main_acc"] <= 1
    assert m["generated_tokens"] > 0 and m["tokens_per_s"] > 0 and m["decode_seconds"] > 0
    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC

    # The same model through an export directory (--model) decodes the same hypotheses.
    export_hf(load_lightning_checkpoint(str(ckpt)), str(tmp_path / "export"))
    out2 = tmp_path / "eval_export"
    assert evaluate_main(["--model", str(tmp_path / "export"), "--manifest", str(manifest), "--out", str(out2),
                          "--batch-size", "3", "--max-new-tokens", "6", "--no-progress"]) == 0
    assert (out2 / "hyps.jsonl").read_text() == (out / "hyps.jsonl").read_text()
    assert json.loads((out2 / "metrics.json").read_text())["mtp_acceptance"] == m["mtp_acceptance"]


def test_summarise_without_ast_or_head():
    t = _Totals(rows=[{"id": "a", "task": "asr", "ref": "one two", "hyp": "one"},
                      {"id": "b", "task": "asr", "ref": "x", "hyp": None, "error": "unreadable audio"}],
                num_failed=1, tokens=3, seconds=0.5, main_correct=1, main_count=4)
    m = summarise(t, num_depths=0, max_new_tokens=8)
    assert m["bleu"] is None and m["mtp_acceptance"] == []
    assert m["wer"] == 0.5 and m["num_empty_hyps"] == 0 and m["num_utterances"] == 2 and m["num_failed"] == 1
    assert m["main_acc"] == 0.25 and m["tokens_per_s"] == 6.0
    json.dumps(m, allow_nan=False)  # valid JSON: no NaN literals
    assert "n/a" in format_table(m)

    empty = summarise(_Totals(), num_depths=2, max_new_tokens=8)
    assert empty["wer"] is None and empty["main_acc"] is None and empty["mtp_acceptance"] == [None, None]
    json.dumps(empty, allow_nan=False)
    assert not math.isnan(summarise(t, 0, 8)["cer"])
