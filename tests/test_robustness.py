"""Bad data, non-finite losses, pre-emption and clear errors (issue 13): each fault injected, what the user sees.

Unit cases run the data module in process (both policies); the CLI cases are tiny runs in this process, the
pre-empted runs themselves in subprocesses (they are signalled; their resumes run here)."""

from __future__ import annotations

import csv
import glob
import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.data.policy import BadCutError
from cli_run import run_cli
from tiny import logged_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = "c003"  # the one bad cut among 12 (an asr cut of 0.13 s)


def _lines(manifest) -> list[bytes]:
    with gzip.open(manifest, "rb") as f:
        return [line for line in f.read().split(b"\n") if line]


def _write(root, lines: list[bytes], name="bad.jsonl") -> str:
    path = os.path.join(root, name)
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


def _edit(lines, fn) -> None:
    """Apply ``fn`` to the JSON dict of the bad cut's line."""
    i = next(i for i, line in enumerate(lines) if json.loads(line)["id"] == BAD)
    d = json.loads(lines[i])
    fn(d)
    lines[i] = json.dumps(d).encode()


def _text(value):
    def fn(d):
        d["supervisions"][0]["text"] = value
    return fn


def _duration(seconds):
    def fn(d):
        d["duration"] = d["recording"]["duration"] = d["supervisions"][0]["duration"] = seconds
        d["recording"]["num_samples"] = int(seconds * 16000)
    return fn


def _make_case(case: str, root, lines) -> tuple[dict, str, str]:
    """Inject fault ``case``; returns (data module kwargs, expected reason, text the message must name)."""
    audio = os.path.join(root, "audio", f"{BAD}.flac")
    if case == "missing_audio":
        os.unlink(audio)
        return {}, "unreadable_audio", f"{BAD}.flac"
    if case == "corrupt_audio":
        open(audio, "wb").write(b"not a flac file")
        return {}, "unreadable_audio", f"{BAD}.flac"
    if case == "zero_samples_declaring_1.9s":
        sf.write(audio, np.zeros(0), 16000, format="WAV")  # a FLAC cannot hold 0 samples
        _edit(lines, _duration(1.9))
        return {}, "empty_audio", "declares 1.900 s"
    if case == "duration_mismatch":
        sf.write(audio, np.zeros(800), 16000)  # 0.05 s where 0.13 s are declared
        return {}, "duration_mismatch", "declares 0.130 s"
    if case == "longer_than_max_cut_duration":
        _edit(lines, _duration(5.0))
        return {"max_cut_duration": 4.0}, "too_long_audio", "data.max_cut_duration=4.0"
    if case == "longer_than_max_duration":
        _edit(lines, _duration(120.0))
        return {"max_duration": 1.0}, "too_long_audio", "data.max_duration=1.0"
    if case == "empty_text":
        _edit(lines, _text(""))
        return {}, "empty_text", "empty or whitespace"
    if case == "whitespace_text":
        _edit(lines, _text("  \t "))
        return {}, "empty_text", "empty or whitespace"
    if case == "too_many_target_tokens":
        _edit(lines, _text("one two " * 200))
        return {"max_target_tokens": 100}, "too_many_target_tokens", "data.max_target_tokens=100"
    if case == "too_long_sequence":
        _edit(lines, _text("one two " * 20))
        return {"max_seq_len": 60}, "too_long_sequence", "data.max_seq_len=60"
    i = next(i for i, line in enumerate(lines) if json.loads(line)["id"] == BAD)
    if case == "manifest_not_utf8":
        lines[i] = b"\xff\xfe" + lines[i]
        return {}, "manifest_not_utf8", f"bad.jsonl:{i + 1}"
    if case == "manifest_not_json":
        lines[i] = lines[i][:40]
        return {}, "manifest_not_json", f"bad.jsonl:{i + 1}"
    if case == "manifest_not_a_cut":
        lines[i] = json.dumps({"id": BAD, "type": "MonoCut", "duration": "long"}).encode()
        return {}, "manifest_not_a_cut", f"bad.jsonl:{i + 1}"
    raise AssertionError(case)


CASES = ["missing_audio", "corrupt_audio", "zero_samples_declaring_1.9s", "duration_mismatch",
         "longer_than_max_cut_duration", "longer_than_max_duration", "empty_text", "whitespace_text",
         "too_many_target_tokens", "too_long_sequence", "manifest_not_utf8", "manifest_not_json",
         "manifest_not_a_cut"]


def _module(path, tok_dir, policy, **kw) -> SALMDataModule:
    kw = {"max_duration": 60.0, **kw}
    return SALMDataModule(train_manifest=path, tokenizer_path=tok_dir, num_buckets=2, on_bad_cut=policy,
                          shuffle=False, **kw)


@pytest.mark.parametrize("case", CASES)
def test_bad_cut_is_skipped_counted_and_listed(case, sine_corpus, tok_dir, tmp_path):
    lines = _lines(sine_corpus(n=12))
    kw, reason, where = _make_case(case, str(tmp_path), lines)
    dm = _module(_write(str(tmp_path), lines), tok_dir, "skip", **kw)
    dm.skip_log.set_path(str(tmp_path / "run" / "skipped_cuts.jsonl"))
    ids = []
    for batch in dm.train_dataloader():
        dm.report_skipped(batch)
        ids += batch["ids"]
        assert sum(c for c in batch["audio_lens"].tolist()) / 16000 <= dm.cfg.max_duration  # never over the bound
    assert sorted(ids) == [f"c{i:03d}" for i in range(12) if i != 3]
    assert dict(dm.skip_log.counts) == {reason: 1}
    (row,) = [json.loads(line) for line in open(tmp_path / "run" / "skipped_cuts.jsonl")]
    assert row["reason"] == reason
    assert row["cut_id"] == (None if case in ("manifest_not_utf8", "manifest_not_json") else BAD)
    assert f"skipped cuts: 1 [{reason}=1]" in dm.skip_log.summary()


@pytest.mark.parametrize("case", CASES)
def test_bad_cut_raises_before_training_naming_cut_file_and_reason(case, sine_corpus, tok_dir, tmp_path):
    lines = _lines(sine_corpus(n=12))
    kw, reason, where = _make_case(case, str(tmp_path), lines)
    dm = _module(_write(str(tmp_path), lines), tok_dir, "raise", **kw)
    with pytest.raises(BadCutError) as e:
        dm.train_dataloader()  # the precheck runs here, before any batch is drawn
    msg = str(e.value)
    assert f"{reason}:" in msg and where in msg and "data.on_bad_cut" in msg
    if case not in ("manifest_not_utf8", "manifest_not_json"):
        assert f"cut {BAD!r}" in msg


def test_audio_errors_without_precheck_follow_the_policy_when_loaded(sine_corpus, tok_dir, tmp_path):
    manifest = sine_corpus(n=12)
    os.unlink(tmp_path / "audio" / f"{BAD}.flac")
    dm = _module(str(manifest), tok_dir, "raise", precheck=False)
    with pytest.raises(BadCutError, match=f"cut '{BAD}'.*unreadable_audio"):
        for _ in dm.train_dataloader():
            pass


# ------------------------------------------------------------------------------------ fuzzing
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                      max_size=4), max_leaves=12)
_cut_like = st.fixed_dictionaries({"id": st.text(max_size=5) | st.integers(), "type": st.sampled_from(
    ["MonoCut", "MultiCut", "MixedCut", "Cut", "x"]), "start": st.floats() | st.text(max_size=3),
    "duration": st.floats() | st.none(), "channel": st.integers(-1, 2),
    "supervisions": st.lists(_json_values, max_size=2), "recording": _json_values})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | _json_values.map(lambda v: json.dumps(v).encode())
       | _cut_like.map(lambda v: json.dumps(v).encode()))
def test_fuzz_manifest_reader_only_documented_errors(raw):
    from lhotse.cut import Cut

    from salm_mtp.data.manifest import parse_line
    from salm_mtp.data.policy import BadCut

    out = parse_line(raw, "m.jsonl", 7)  # never raises
    assert out is None or isinstance(out, (Cut, BadCut))
    if isinstance(out, BadCut):
        assert out.file == "m.jsonl" and out.line == 7 and out.reason.startswith("manifest_")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=60) | _cut_like.map(lambda v: json.dumps(v).encode()), max_size=5))
def test_fuzz_manifest_file_raises_only_bad_cut_error(tmp_path_factory, lines):
    from salm_mtp.data.manifest import load_cuts

    path = _write(str(tmp_path_factory.mktemp("fz")), [line.replace(b"\n", b" ") for line in lines])
    try:
        for _ in load_cuts(path):
            pass
    except BadCutError as e:
        assert "bad.jsonl:" in str(e)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["asr", "ast"]), st.text(max_size=60))
def test_fuzz_prompt_formatter_any_answer_text(tok_dir, task, answer):
    from transformers import AutoTokenizer

    from salm_mtp.data.prompt import PromptFormatter

    global _TOK
    if "_TOK" not in globals():
        _TOK = PromptFormatter(AutoTokenizer.from_pretrained(tok_dir))
    enc = _TOK.encode(task, answer)  # no error for any text
    assert enc.input_ids.count(_TOK.audio_token_id) >= 1
    assert enc.input_ids[: enc.prompt_len].count(_TOK.audio_token_id) == 1
    assert enc.input_ids[-1] == _TOK.tokenizer.eos_token_id and len(enc.loss_mask) == len(enc.input_ids)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=12))
def test_fuzz_prompt_formatter_unknown_task_is_a_value_error(tok_dir, task):
    from transformers import AutoTokenizer

    from salm_mtp.data.prompt import PromptFormatter

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(tok_dir))
    try:
        fmt.encode(task, "one")
    except ValueError as e:
        assert task not in ("asr", "ast") and "unknown task" in str(e)


# ------------------------------------------------------------------------------------ clear errors
def test_truncated_and_missing_checkpoints_are_named(tmp_path):
    from salm_mtp.errors import CheckpointReadError, check_ckpt_path

    good = tmp_path / "good.ckpt"
    torch.save({"a": torch.ones(3)}, good)
    check_ckpt_path(str(good))
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(CheckpointReadError, match=r"--ckpt_path '.*cut.ckpt' is not a readable checkpoint"):
        check_ckpt_path(str(bad))
    with pytest.raises(CheckpointReadError, match="does not exist"):
        check_ckpt_path(str(tmp_path / "nope.ckpt"))


def test_unwritable_output_dir_names_the_key(tmp_path):
    from salm_mtp.errors import OutputDirError, check_writable_dir

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="trainer.default_root_dir=.*set --trainer.default_root_dir"):
        check_writable_dir(str(blocker / "run"), "trainer.default_root_dir")


def test_missing_tokenizer_is_one_clear_error(tmp_path):
    from salm_mtp.errors import SalmError
    from salm_mtp.data.tokenizer import load_tokenizer

    with pytest.raises(SalmError, match="model.tokenizer_path=.*no loadable tokenizer.*set --model.tokenizer_path") as e:
        load_tokenizer(str(tmp_path / "none"))
    assert e.value.__cause__ is None and e.value.__suppress_context__


# ------------------------------------------------------------------------------------ CLI runs
def _cli(sub, run_dir, tok_dir, *extra, env=None, check=None, new_session=False, subprocess_run=False):
    """``salm-mtp SUB`` on conf/tiny.yaml, in this process (tests/cli_run.py) unless ``subprocess_run``: runs that
    are signalled need a process (and, with ``new_session``, a process group) of their own."""
    args = [sub, "--config", os.path.join(ROOT, "conf/tiny.yaml"), f"--trainer.default_root_dir={run_dir}",
            f"--model.tokenizer_path={tok_dir}", "--data.test_manifest=null", "--trainer.enable_progress_bar=false",
            *extra]
    if not subprocess_run:
        out = run_cli(args, env=env)
    else:
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}",
               **(env or {})}
        out = subprocess.run([sys.executable, "-m", "salm_mtp.cli", *args], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=600, start_new_session=new_session)
    if check is not None:
        assert out.returncode == check, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _rows(run_dir):
    (path,) = glob.glob(os.path.join(run_dir, "salm/version_*/metrics.csv"))
    return list(csv.DictReader(open(path)))


def test_cli_skip_run_counts_bad_cuts_in_metrics_and_jsonl(sine_corpus, tok_dir, tmp_path):
    lines = _lines(sine_corpus(n=12))
    os.unlink(tmp_path / "audio" / f"{BAD}.flac")
    i = next(i for i, line in enumerate(lines) if json.loads(line)["id"] == "c004")
    d = json.loads(lines[i])
    d["supervisions"][0]["text"] = " "
    lines[i] = json.dumps(d).encode()
    lines.insert(6, b"{not json")
    train = _write(str(tmp_path), lines)
    run = str(tmp_path / "run")
    out = _cli("fit", run, tok_dir, f"--data.train_manifest={train}", f"--data.val_manifest={train}",
               "--trainer.max_steps=3", "--data.max_duration=1.0", check=0)
    (jl,) = glob.glob(os.path.join(run, "salm/version_*/skipped_cuts.jsonl"))
    rows = [json.loads(line) for line in open(jl)]
    assert sorted(((r["cut_id"] or ""), r["reason"]) for r in rows) == [
        ("", "manifest_not_json"), (BAD, "unreadable_audio"), ("c004", "empty_text")]
    assert all(r["line"] is not None and r["file"] == train for r in rows), rows  # each at its manifest line
    last = [r for r in _rows(run) if r.get("skipped_cuts/unreadable_audio")][-1]
    assert float(last["skipped_cuts/unreadable_audio"]) == 1.0 and float(last["skipped_cuts/empty_text"]) == 1.0
    assert "skipped cuts: 3 [empty_text=1, manifest_not_json=1, unreadable_audio=1]" in out.stderr + out.stdout


def test_cli_raise_run_stops_before_training_with_one_paragraph(sine_corpus, tok_dir, tmp_path):
    manifest = sine_corpus(n=12)
    os.unlink(tmp_path / "audio" / f"{BAD}.flac")
    run = str(tmp_path / "run")
    out = _cli("fit", run, tok_dir, f"--data.train_manifest={manifest}", "--data.val_manifest=null", "--data.on_bad_cut=raise")
    assert out.returncode == 2, out.stderr[-3000:]
    # named at its manifest line, the audio file in the detail
    assert f"error: bad cut '{BAD}' ({manifest}:4): unreadable_audio: no such file (" in out.stderr
    assert "c003.flac). data.on_bad_cut=raise stops here" in out.stderr
    assert "Traceback" not in out.stderr
    assert not glob.glob(os.path.join(run, "salm/version_*/checkpoints/*.ckpt"))


def test_cli_truncated_ckpt_path_is_one_paragraph(corpus, tok_dir, tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    out = _cli("fit", str(tmp_path / "run"), tok_dir, f"--data.train_manifest={corpus}", "--data.val_manifest=null",
               f"--ckpt_path={bad}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"error: --ckpt_path '{bad}' is not a readable checkpoint" in out.stderr


def test_cli_unwritable_root_dir_names_the_key(corpus, tok_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the run directory's parent should be
    out = _cli("fit", str(blocker / "run"), tok_dir, f"--data.train_manifest={corpus}", "--data.val_manifest=null")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"error: trainer.default_root_dir='{blocker / 'run'}' is not a writable directory" in out.stderr
    assert "set --trainer.default_root_dir" in out.stderr


def test_cli_nonfinite_loss_steps_are_skipped_then_the_run_stops(corpus, tok_dir, tmp_path):
    run = str(tmp_path / "run")
    out = _cli("fit", run, tok_dir, f"--data.train_manifest={corpus}", "--data.val_manifest=null",
               "--model.optim.lr=1e6", "--trainer.max_steps=12", "--model.max_nonfinite_steps=3")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "non-finite loss (nan): step skipped, weights untouched (1 consecutive, stop at 3)" in out.stderr
    assert "error: 3 consecutive training steps had a non-finite loss" in out.stderr
    for path in glob.glob(os.path.join(run, "salm/version_*/checkpoints/*.ckpt")):
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
    rows = [r for r in _rows(run) if r.get("nonfinite_steps")]
    assert [float(r["nonfinite_steps"]) for r in rows][-1] >= 2


PREEMPT_ARGS = ["--data.val_manifest=null", "--trainer.max_steps=7", "--data.num_workers=2",
                "--model.spec_augment.enabled=true", "--model.spec_augment.freq_width=4",
                "--model.spec_augment.time_masks=2", "--model.spec_augment.time_width=0.2"]
"""Pre-emption runs: DataLoader workers, and SpecAugment masks drawn from the global generator (salm_mtp.callbacks
.ResumeRNG restores every rank's generators, so the resumed losses equal the uninterrupted run's bit for bit)."""


@pytest.fixture(scope="module")
def uninterrupted(corpus, tok_dir, tmp_path_factory):
    full = str(tmp_path_factory.mktemp("full"))
    _cli("fit", full, tok_dir, f"--data.train_manifest={corpus}", *PREEMPT_ARGS, check=0)
    return logged_losses(full)


@pytest.mark.parametrize(("target", "step"), [("main process", 4), ("process group", 3)])
def test_cli_sigterm_saves_at_the_signal_step_exits_143_and_resumes_exactly(corpus, tok_dir, tmp_path,
                                                                           uninterrupted, target, step):
    """SIGTERM to the main process only, or (as SLURM, `timeout` and Ctrl-C deliver it) to the whole process group
    from another process, DataLoader workers included: the workers ignore it (without that: "DataLoader worker ...
    is killed by signal: Terminated"), the run saves at the signal step, exits 143, and resumes exactly."""
    common = [f"--data.train_manifest={corpus}", *PREEMPT_ARGS]
    cut = str(tmp_path / "cut")
    env = {"SALM_TEST_KILL_AT_STEP": str(step), "SALM_TEST_KILL_GROUP": "1" if target == "process group" else "0"}
    out = _cli("fit", cut, tok_dir, *common, "--trainer.callbacks+=robustness_helpers.KillAtStep", env=env,
               new_session=True, subprocess_run=True)  # its own process group: a group signal stays there
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    assert "is killed by signal" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    (ckpt,) = glob.glob(os.path.join(cut, f"salm/version_*/checkpoints/preempted-step{step + 1}.ckpt"))
    assert f"pre-empted by signal 15 after step {step + 1}" in out.stderr + out.stdout
    resumed = str(tmp_path / "resumed")
    _cli("fit", resumed, tok_dir, *common, f"--ckpt_path={ckpt}", check=0)
    b = logged_losses(resumed)
    assert sorted(b) == list(range(step + 1, 7))
    assert [b[s] for s in sorted(b)] == [uninterrupted[s] for s in sorted(b)]  # exactly


def test_cli_predict_all_unreadable_batch_reports_instead_of_crashing(sine_corpus, tok_dir, tmp_path):
    manifest = sine_corpus(n=4)
    for f in (tmp_path / "audio").glob("*.flac"):
        f.unlink()
    run = str(tmp_path / "run")
    out = _cli("predict", run, tok_dir, f"--data.test_manifest={manifest}", "--data.train_manifest=null",
               "--data.val_manifest=null", check=0)
    (path,) = glob.glob(os.path.join(run, "salm/version_*/predictions.jsonl"))
    rows = [json.loads(line) for line in open(path)]
    assert sorted(r["id"] for r in rows) == ["c000", "c001", "c002", "c003"]
    assert all(r["hyp"] is None and r["error"].startswith("unreadable_audio") for r in rows)
    assert "skipped cuts: 4 [unreadable_audio=4]" in out.stderr + out.stdout


def test_evaluate_all_unreadable_batch_counts_failures(sine_corpus, tok_dir, tmp_path):
    import tiny
    from salm_mtp.evaluation.run import evaluate

    manifest = sine_corpus(n=3)
    for f in (tmp_path / "audio").glob("*.flac"):
        f.unlink()
    module = tiny.build(tok_dir)
    result = evaluate(module, str(manifest), str(tmp_path / "eval"), batch_size=2, max_new_tokens=2, progress=False)
    assert result["num_failed"] == 3 and result["num_utterances"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "hyps.jsonl")]
    assert [r["hyp"] for r in rows] == [None] * 3
