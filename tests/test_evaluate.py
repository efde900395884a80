"""salm-mtp evaluate end to end: a 2-step fit on a sine-wave corpus, its checkpoint evaluated by the CLI
(in this process, tests/cli_run.py), one cut's audio deleted: counted in num_failed, the run goes on; a `salm-mtp fit` run with a
non-default prompt is evaluated with that prompt (read from its config.yaml), also through its export."""

from __future__ import annotations

import json
import math
import re
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import tiny
from cli_run import run_cli
from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.errors import SalmError
from salm_mtp.evaluation.data import default_metrics_csv
from salm_mtp.evaluation.decode import DecodeSettings, Totals
from salm_mtp.evaluation.report import format_table
from salm_mtp.evaluation.score import summarise
from salm_mtp.io.export import export_hf
from salm_mtp.io.checkpoints import load_lightning_checkpoint
from salm_mtp.evaluation.cli import main as evaluate_main
from salm_mtp.evaluation.run import evaluate as evaluate_run

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"num_utterances", "num_failed", "skipped_cuts", "wer", "cer", "num_empty_refs", "num_empty_hyps",
               "bleu", "mtp_teacher_forced_agreement", "mtp_teacher_forced_chained_acceptance",
               "teacher_forced_mean_accepted_length", "main_acc", "tokens_per_s", "decode_seconds"}
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
    proc = run_cli(["evaluate", "--ckpt", str(ckpt), "--manifest", str(manifest), "--out", str(out),
                    "--batch-size", "3", "--max-new-tokens", "6", "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WER" in proc.stdout and "MTP agreement depth 2 (teacher-forced, marginal)" in proc.stdout
    # a plain Trainer saved no config.yaml: the defaults are used, and said so
    assert "no run config (config.yaml)" in proc.stderr and "data settings: defaults" in proc.stdout

    rows = [json.loads(line) for line in (out / "hyps.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"c{i:03d}" for i in range(7)]  # manifest order, failed one included
    failed = [r for r in rows if r["hyp"] is None]
    assert [r["id"] for r in failed] == ["c003"] and failed[0]["error"].startswith("unreadable_audio: ")
    skipped = [json.loads(line) for line in (out / "skipped_cuts.jsonl").read_text().splitlines()]
    assert [(b["cut_id"], b["reason"]) for b in skipped] == [("c003", "unreadable_audio")]  # the dataset's report
    for r in rows:
        assert {"id", "task", "ref", "hyp"} <= set(r)
        assert r["task"] == ("ast" if r["id"] in ("c002", "c005") else "asr")
    assert rows[2]["ref"] == "0 2" and rows[0]["ref"] == "zero zero"

    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m)
    assert m["num_utterances"] == 7 and m["num_failed"] == 1 and m["num_asr"] == 4 and m["num_ast"] == 2
    assert m["skipped_cuts"] == {"unreadable_audio": 1}
    assert m["wer"] is not None and m["wer"] >= 0 and m["cer"] is not None
    assert m["bleu"] is not None and 0 <= m["bleu"] <= 100
    agreement, chained = m["mtp_teacher_forced_agreement"], m["mtp_teacher_forced_chained_acceptance"]
    assert len(agreement) == 2 and all(0 <= a <= 1 for a in agreement)
    assert len(chained) == 2 and chained[0] == agreement[0] and chained[1] <= agreement[1]  # depth 2 needs depth 1
    assert m["teacher_forced_mean_accepted_length"] == 1 + sum(chained)
    assert 0 <= m["main_acc"] <= 1
    assert m["generated_tokens"] > 0 and m["tokens_per_s"] > 0 and m["decode_seconds"] > 0
    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC

    # The same model through an export directory (--model) decodes the same hypotheses.
    export_hf(load_lightning_checkpoint(str(ckpt)), str(tmp_path / "export"))
    out2 = tmp_path / "eval_export"
    assert evaluate_main(["--model", str(tmp_path / "export"), "--manifest", str(manifest), "--out", str(out2),
                          "--batch-size", "3", "--max-new-tokens", "6", "--no-progress"]) == 0
    assert (out2 / "hyps.jsonl").read_text() == (out / "hyps.jsonl").read_text()
    assert json.loads((out2 / "metrics.json").read_text())["mtp_teacher_forced_agreement"] == agreement


def test_summarise_without_ast_or_head():
    t = Totals(rows=[{"id": "a", "task": "asr", "ref": "one two", "hyp": "one"},
                      {"id": "b", "task": "asr", "ref": "x", "hyp": None, "error": "unreadable audio"}],
                num_failed=1, tokens=3, seconds=0.5, main_correct=1, main_count=4)
    m = summarise(t, num_depths=0, settings=DecodeSettings(max_new_tokens=8), normalizer="basic")
    assert m["bleu"] is None and m["mtp_teacher_forced_agreement"] == []
    # whisper_english (the default) writes "one two" as the number 12: one word, wrong
    assert summarise(t, num_depths=0, settings=DecodeSettings(max_new_tokens=8))["wer"] == 1.0
    assert m["wer"] == 0.5 and m["num_empty_hyps"] == 0 and m["num_utterances"] == 2 and m["num_failed"] == 1
    assert m["main_acc"] == 0.25 and m["tokens_per_s"] == 6.0
    json.dumps(m, allow_nan=False)  # valid JSON: no NaN literals
    assert "n/a" in format_table(m)

    empty = summarise(Totals(), num_depths=2, settings=DecodeSettings(max_new_tokens=8))
    assert empty["wer"] is None and empty["main_acc"] is None and empty["mtp_teacher_forced_agreement"] == [None, None]
    json.dumps(empty, allow_nan=False)
    assert not math.isnan(summarise(t, 0, DecodeSettings(max_new_tokens=8), "basic")["cer"])


CUSTOM_ASR = "Say the words."


def test_evaluate_uses_the_prompt_of_the_runs_config(tmp_path, tok_dir, sine_corpus):
    """A run trained with --data.prompt.* changed is evaluated with that prompt: read from its config.yaml next to
    the checkpoint, from the config.yaml `salm-mtp export` copies, or from --config; flags still override."""
    from transformers import AutoTokenizer

    from salm_mtp.cli import main as salm_mtp
    from salm_mtp.data.prompt import PromptConfig, PromptFormatter
    from salm_mtp.io.export import export_main

    manifest = sine_corpus(n=6)
    run = tmp_path / "run"
    salm_mtp(["fit", "--config", str(REPO / "conf/tiny.yaml"), f"--trainer.default_root_dir={run}",  # the real CLI,
              f"--model.tokenizer_path={tok_dir}", f"--data.train_manifest={manifest}",  # in this process
              "--data.val_manifest=null", "--data.test_manifest=null", "--trainer.max_steps=3",
              "--model.mtp.num_layers=1", "--trainer.enable_progress_bar=false",
              f"--data.prompt.asr_instruction={CUSTOM_ASR}", "--data.prompt.target_lang=numerals",
              "--data.max_cut_duration=0.14"])
    (ckpt,) = run.glob("salm/version_*/checkpoints/last.ckpt")
    log_dir = ckpt.parent.parent

    tok = AutoTokenizer.from_pretrained(tok_dir)
    custom = PromptFormatter(tok, PromptConfig(asr_instruction=CUSTOM_ASR, target_lang="numerals"))
    default = PromptFormatter(tok, PromptConfig())
    assert custom.prompt_ids("asr") != default.prompt_ids("asr")

    def settings(out):
        return json.loads((out / "settings.json").read_text())

    common = ["--manifest", str(manifest), "--max-new-tokens", "2", "--no-progress"]
    assert evaluate_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "e1"), *common]) == 0
    s = settings(tmp_path / "e1")
    assert s["run_config"] == str(log_dir / "config.yaml")
    # what the model was fed, read back from the batches: the run's prompt, not PromptConfig's default
    assert s["prompt_ids"] == {"asr": custom.prompt_ids("asr"), "ast": custom.prompt_ids("ast")}
    assert "say the words." in s["prompts"]["asr"] and "to numerals." in s["prompts"]["ast"]
    # the run's other data settings came along: c005 (0.15 s) is over its data.max_cut_duration
    assert s["data"]["max_cut_duration"] == 0.14 and s["data"]["max_cuts"] == 16
    rows = [json.loads(line) for line in (tmp_path / "e1" / "hyps.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"c{i:03d}" for i in range(6)]
    assert rows[5]["hyp"] is None and rows[5]["error"].startswith("too_long_audio: ") and rows[5]["ref"] == "0 5"

    # an export carries the run's config.yaml: the same prompt through --model
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "config.yaml").read_text() == (log_dir / "config.yaml").read_text()
    assert evaluate_main(["--model", str(tmp_path / "export"), "--out", str(tmp_path / "e2"), *common]) == 0
    assert settings(tmp_path / "e2")["prompt_ids"] == s["prompt_ids"]
    assert (tmp_path / "e2" / "hyps.jsonl").read_text() == (tmp_path / "e1" / "hyps.jsonl").read_text()

    # flags override the run's settings; --config names the file explicitly
    other = tmp_path / "other.yaml"
    other.write_text("data:\n  prompt:\n    asr_instruction: Transcribe the audio.\n")
    assert evaluate_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "e3"), "--config", str(other),
                          "--batch-size", "2", "--limit", "4", *common]) == 0
    s3 = settings(tmp_path / "e3")
    assert s3["run_config"] == str(other) and s3["data"]["max_cuts"] == 2 and s3["data"]["max_cut_duration"] is None
    assert s3["prompt_ids"]["asr"] == default.prompt_ids("asr")
    assert len((tmp_path / "e3" / "hyps.jsonl").read_text().splitlines()) == 4
    with pytest.raises(SalmError, match=r"bad cut 'c005' .*too_long_audio"):  # the run's bound, policy from the flag
        evaluate_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "e4"), "--on-bad-cut", "raise", *common])


def test_missing_inputs_are_one_paragraph_errors(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    out = ["--out", str(tmp_path / "eval")]
    with pytest.raises(SalmError, match=r"--ckpt '.*nope.ckpt' does not exist; pass a \.ckpt file"):
        evaluate_main(["--ckpt", str(tmp_path / "nope.ckpt"), *out])
    ckpt.write_bytes(b"")  # the same check as --ckpt_path: a truncated file is named before anything is built
    with pytest.raises(SalmError, match=r"--ckpt '.*last.ckpt' is not a readable checkpoint"):
        evaluate_main(["--ckpt", str(ckpt), *out])
    torch.save({}, ckpt)  # a readable checkpoint file, never loaded: the settings are checked first
    with pytest.raises(SalmError, match=r"--config '.*other.yaml': no such file"):
        evaluate_main(["--ckpt", str(ckpt), "--config", str(tmp_path / "other.yaml"), *out])
    with pytest.raises(SalmError, match=r"no manifest to evaluate: pass --manifest"):
        evaluate_main(["--ckpt", str(ckpt), *out])  # no config.yaml, so no data.test_manifest either
    (tmp_path / "config.yaml").write_text("data:\n  max_duration: -1\n")
    with pytest.raises(SalmError, match=r"data.max_duration: must be > 0, got -1.0.*Override the key"):
        evaluate_main(["--ckpt", str(ckpt), "--manifest", str(ckpt), *out])


# ------------------------------------------------------------------------------ conversation and text sets
EXAMPLES = REPO / "data" / "examples"


def _assistant_turns(path: Path) -> list[tuple[str, str]]:
    """(turn id, reference) of every assistant turn of a NeMo conversation JSONL, consecutive Assistant pieces
    joined (read here with json alone, independently of the project's reader)."""
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        turns, k = d["conversations"], 0
        for i, t in enumerate(turns):
            if t["from"] != "Assistant" or (i + 1 < len(turns) and turns[i + 1]["from"] == "Assistant"):
                continue
            j = i
            while j > 0 and turns[j - 1]["from"] == "Assistant":
                j -= 1
            k += 1
            out.append((f"{d['id']}#{k}", " ".join(x["value"] for x in turns[j:i + 1])))
    return out


def _whole_conversation_loss(module, path: Path, input_type: str) -> tuple[int, int, float]:
    """Teacher-forced (correct, count, nll) of the main head over every assistant turn of every conversation,
    each conversation one row with loss on all its assistant turns (the training encoding)."""
    from salm_mtp.evaluation.decode import teacher_forced_hits

    dm = SALMDataModule(max_cuts=2)
    dm.set_tokenizer(module.tokenizer)
    totals = [0, 0, 0.0]
    for batch in dm.source_dataloader({"name": "x", "type": input_type, "path": str(path)}):
        for i, v in enumerate(teacher_forced_hits(module, batch)):
            totals[i] += v
    return tuple(totals)


@pytest.mark.parametrize("name, input_type", [("conversations.jsonl", "conversations"), ("text.jsonl", "text")])
def test_evaluate_scores_every_assistant_turn_given_the_reference_history(tmp_path, tok_dir, name, input_type):
    from salm_mtp.data.mix import detect_source_type
    from salm_mtp.evaluation.run import evaluate

    torch.manual_seed(0)
    module = tiny.build(tok_dir, mtp_layers=1)
    path = EXAMPLES / name
    assert detect_source_type(str(path)) == "conversations"  # both are NeMo conversation files
    m = evaluate(module, str(path), str(tmp_path / "eval"), batch_size=2, max_new_tokens=4, progress=False,
                 input_type=input_type)
    rows = [json.loads(x) for x in (tmp_path / "eval" / "hyps.jsonl").read_text().splitlines()]
    expected = _assistant_turns(path)
    assert [(r["id"], r["ref"]) for r in rows] == expected  # one row per assistant turn, in file order
    kind = "text" if input_type == "text" else "conversation"
    assert {r["task"] for r in rows} == {kind} and all(isinstance(r["hyp"], str) for r in rows)
    assert m["num_turns"] == len(expected) and m["num_utterances"] == len(expected) and m["num_failed"] == 0
    assert m["wer"] is None and m["num_asr"] == 0  # no ASR cuts in a conversation set
    assert 0.0 <= m["turn_exact_match"] <= 1.0 and m["turn_wer"] >= 0.0
    # per turn, the reference history as the prompt: the summed teacher-forced loss is that of the whole
    # conversations with loss on all assistant turns (as training encodes them)
    correct, count, nll = _whole_conversation_loss(module, path, input_type)
    assert m["main_acc"] == pytest.approx(correct / count, abs=1e-12)
    assert m["main_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert math.isfinite(m["main_loss"]) and m["main_loss"] > 0


def test_evaluate_conversation_set_bad_line_is_counted_and_named(tmp_path, tok_dir):
    from salm_mtp.data.datamodule import DataConfig
    from salm_mtp.data.mix import detect_source_type
    from salm_mtp.evaluation.run import evaluate

    bad = tmp_path / "chat.jsonl"
    lines = (EXAMPLES / "text.jsonl").read_text().splitlines()
    bad.write_text("\n".join([lines[0], json.dumps({"id": "oops", "conversations": [
        {"from": "Robot", "type": "text", "value": "hi"}]}), *lines[1:]]) + "\n")
    assert detect_source_type(str(EXAMPLES / "chat.jsonl")) == "text"
    module = tiny.build(tok_dir, mtp_layers=0)
    m = evaluate(module, str(bad), str(tmp_path / "eval"), batch_size=2, max_new_tokens=3, progress=False,
                 data=DataConfig(on_bad_cut="skip"))
    rows = [json.loads(x) for x in (tmp_path / "eval" / "hyps.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r["hyp"] is None]
    assert [r["id"] for r in failed] == ["oops"] and "unknown 'from' 'Robot'" in failed[0]["error"]
    assert m["num_failed"] == 1 and m["skipped_cuts"] == {"bad_conversation": 1}
    assert m["num_turns"] == len(_assistant_turns(EXAMPLES / "text.jsonl"))
    with pytest.raises(Exception, match="unknown 'from' 'Robot'"):
        evaluate(module, str(bad), str(tmp_path / "eval2"), batch_size=2, max_new_tokens=3, progress=False,
                 data=DataConfig(on_bad_cut="raise"))


def test_evaluate_reports_wer_per_group_with_the_normaliser_named(tmp_path, tok_dir, sine_corpus, monkeypatch):
    """A hand-built manifest whose cuts carry supervision.custom["groups"]; the decoder is replaced by one whose
    errors are known per cut, so every figure of metrics.json's wer_by_group is worked out by hand."""
    from lhotse import CutSet

    import salm_mtp.evaluation.run as E

    manifest = sine_corpus(n=6)  # c000..c005; c002, c005 are ast; refs "zero zero", "zero one", ...
    groups = {"c000": {"text": "seen", "voice": "seen"}, "c001": {"text": "unseen", "voice": "seen"},
              "c003": {"text": "unseen", "voice": "unseen"}, "c004": {"text": "unseen", "voice": "unseen"}}
    cuts = list(CutSet.from_file(manifest))
    for cut in cuts:
        if cut.id in groups:
            cut.supervisions[0].custom["groups"] = groups[cut.id]
    CutSet.from_cuts(cuts).to_file(manifest)
    # c000 right; c001 casing and punctuation only; c003 one number word wrong; c004 nothing
    hyps = {"c000": "zero zero", "c001": "Zero one.", "c003": "zero four", "c004": ""}

    def fake_batch(module, batch, max_new_tokens, totals):
        for cid, task, ref in zip(batch["ids"], batch["tasks"], batch["answers"]):
            totals.rows.append({"id": cid, "task": task, "ref": ref, "hyp": hyps.get(cid, ref)})

    monkeypatch.setattr(E, "evaluate_batch", fake_batch)
    module = tiny.build(tok_dir, pattern="M*", mtp_layers=0)
    m = E.evaluate(module, str(manifest), str(tmp_path / "eval"), batch_size=2, progress=False)
    assert m["normalizer"] == "whisper_english"
    # whisper_english writes spoken digit strings as one number: "zero one" -> "01"
    assert m["wer_by_group"]["text=seen"] == {"num": 1, "wer": 0.0, "wer_raw": 0.0, "errors": 0, "ref_words": 1}
    unseen = m["wer_by_group"]["text=unseen"]
    assert unseen["num"] == 3 and unseen["errors"] == 2 and unseen["ref_words"] == 3 and unseen["wer"] == 2 / 3
    assert unseen["wer_raw"] == 5 / 6  # raw: "Zero", "one.", "four", "zero three" deleted (2)
    assert m["wer_by_group"]["voice=unseen"]["wer"] == 1.0 and m["wer_by_group"]["voice=seen"]["wer"] == 0.0
    assert m["wer"] == 2 / 4 and m["wer_raw"] == 5 / 8
    rows = [json.loads(line) for line in (tmp_path / "eval" / "hyps.jsonl").read_text().splitlines()]
    assert [r.get("groups") for r in rows] == [groups.get(f"c{i:03d}") for i in range(6)]
    table = format_table(m)
    assert "WER (whisper_english normaliser)" in table and "WER (raw text)" in table
    assert re.search(r"  WER text=unseen \(3 utts\) +66.67%, raw 83.33%", table)

    basic = E.evaluate(module, str(manifest), str(tmp_path / "eval_basic"), batch_size=2, progress=False,
                       normalizer="basic")
    assert basic["normalizer"] == "basic" and basic["wer_by_group"]["text=unseen"]["wer"] == 3 / 6
    with pytest.raises(ValueError, match="unknown normalizer"):
        E.evaluate(module, str(manifest), str(tmp_path / "bad"), normalizer="nemo", progress=False)


def test_a_manifest_without_examples_is_an_error_not_a_result(tmp_path, tok_dir):
    """0 cuts: evaluate used to exit 0 with every metric n/a; now one line naming the file, exit 2, nothing written."""
    from lhotse import CutSet

    empty = tmp_path / "empty_cuts.jsonl.gz"
    CutSet.from_cuts([]).to_file(empty)
    with pytest.raises(SalmError, match=r"--manifest '.*empty_cuts.jsonl.gz' holds no example to evaluate \(0 read\)"):
        evaluate_run(tiny.build(tok_dir), str(empty), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_duplicate_ids_are_refused_not_scored_twice(tmp_path, tok_dir, sine_corpus):
    from lhotse import CutSet

    cuts = list(CutSet.from_file(sine_corpus(n=3)))
    dup = tmp_path / "dup_cuts.jsonl.gz"
    CutSet.from_cuts(cuts + [cuts[1]]).to_file(dup)
    with pytest.raises(SalmError, match=rf"--manifest '.*dup_cuts.jsonl.gz': 1 ids are used by more than one example "
                                        rf"\(e.g. '{cuts[1].id}'\); give every example its own id"):
        evaluate_run(tiny.build(tok_dir), str(dup), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_export_never_writes_beside_old_files(tmp_path, tok_dir, sine_corpus):
    """`salm-mtp export --out` into a non-empty directory is refused (nothing touched); with --force the directory is
    replaced whole (the stale file is gone); a file as --out is named."""
    ckpt = _fit_tiny(tmp_path, tok_dir, sine_corpus(n=4))
    out = tmp_path / "exp"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("stale")
    res = run_cli(["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert res.returncode == 2 and f"error: --out '{out}' is not empty" in res.stderr and "--force" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors"]  # untouched
    res = run_cli(["export", "--ckpt", str(ckpt), "--out", str(out), "--force"])
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert "adapter_model.safetensors" not in names and {"llm", "encoder", "salm_config.json"} <= set(names)
    assert not (tmp_path / "exp.exporting").exists()
    res = run_cli(["export", "--ckpt", str(ckpt), "--out", str(out / "salm_config.json")])
    assert res.returncode == 2 and "is a file; pass a directory" in res.stderr
