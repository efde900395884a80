"""salm_mtp/sweep.py: the seed-sweep table from hand-built run directories (values worked out by hand)."""

from __future__ import annotations

import json
from pathlib import Path

from salm_mtp.sweep import main, run_row, spread, table


def _run(root: Path, name: str, enc_wer: float, test_wer: float, unseen: float, groups: dict) -> Path:
    run = root / name
    for sub, content in (("encoder_ctc_hf/pretrain_result.json", {"val_wer": enc_wer, "step": 700}),
                         ("eval/metrics.json", {"wer": test_wer, "wer_by_group": groups, "bleu": 80.0,
                                                "normalizer": "whisper_english",
                                                "mtp_teacher_forced_chained_acceptance": [0.9],
                                                "teacher_forced_mean_accepted_length": 1.9}),
                         ("eval_unseen_voice/metrics.json", {"wer": unseen})):
        (run / sub).parent.mkdir(parents=True, exist_ok=True)
        (run / sub).write_text(json.dumps(content))
    return run


def test_rows_ranges_and_table(tmp_path, capsys):
    groups = {"kind=numbers": {"wer": 0.1, "errors": 1, "ref_words": 10},
              "kind=svo": {"wer": 0.2, "errors": 4, "ref_words": 20}, "kind=sv": {"wer": 0.0, "errors": 0,
                                                                                  "ref_words": 10}}
    a = _run(tmp_path, "seed1", 0.08, 0.05, 0.20, groups)
    b = _run(tmp_path, "seed2", 0.09, 0.07, 0.30, {})
    c = tmp_path / "seed3"  # a run that failed before evaluation: its figures are n/a, not zero
    c.mkdir()
    row = run_row(str(a))
    assert row["test_wer_sentences"] == 4 / 30 and row["test_wer_numbers"] == 0.1 and row["encoder_steps"] == 700
    assert run_row(str(c))["test_wer"] is None
    assert spread([0.05, None, 0.07, 0.06]) == (0.05, 0.06, 0.07) and spread([None]) is None
    text = table([run_row(str(d)) for d in (a, b, c)])
    assert "| **min** | 8.00% | 700 | 5.00% |" in text and "| **max** | 9.00% | 700 | 7.00% |" in text
    assert "| **max - min** | 1.00% |  | 2.00% |" in text and "| seed3 | n/a |" in text
    assert "whisper_english" in text
    assert main([str(a), str(b), "--out", str(tmp_path / "sum")]) == 0
    assert json.loads((tmp_path / "sum" / "summary.json").read_text())[1]["unseen_voice_wer"] == 0.30
    assert main([str(tmp_path / "nope")]) == 2
