"""One error path for configuration mistakes (salm_mtp/errors.py ``ConfigError``, salm_mtp/trainer_cli.py): each bad
``salm-mtp fit`` setting ends as one ``error: <key>: <what is wrong>; <what to do>`` line and exit status 2, with no
traceback, whether a dataclass check, jsonargparse's union and instantiation errors, a file check or a value read at
the first step found it. Runs the CLI in this process (tests/cli_run.py)."""

from __future__ import annotations

import os

import pytest
import torch

from cli_run import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fit(tmp_path, corpus, tok_dir, *extra: str):
    return run_cli(["fit", "--config", os.path.join(ROOT, "conf/tiny.yaml"),
                    f"--trainer.default_root_dir={tmp_path / 'run'}", f"--model.tokenizer_path={tok_dir}",
                    f"--data.train_manifest={corpus}", f"--data.val_manifest={corpus}", "--data.test_manifest=null",
                    "--trainer.enable_progress_bar=false", *extra])


def _one_error_line(out) -> str:
    """The run's one ``error:`` line (asserting exit 2, no traceback, nothing else said as an error)."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out.stderr[-4000:]
    return errors[0]


def _inputs_yaml(tmp_path, corpus, entry: str, second: str = "") -> str:
    """A --config overlay whose data.inputs is ``entry`` (YAML flow mapping; ``{path}`` -> the corpus)."""
    path = tmp_path / "inputs.yaml"
    lines = ["data:", "  train_manifest: null", "  inputs:", "    - " + entry.format(path=corpus)]
    if second:
        lines.append("    - " + second.format(path=corpus))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


INPUT_CASES = {
    "weight 0": ("{{name: asr, path: {path}, weight: 0}}", "",
                 "error: data.inputs['asr'].weight: must be a finite number > 0, got 0"),
    "weight negative": ("{{name: asr, path: {path}, weight: -1}}", "",
                        "error: data.inputs['asr'].weight: must be a finite number > 0, got -1"),
    "weight inf": ("{{name: asr, path: {path}, weight: .inf}}", "",
                   "error: data.inputs['asr'].weight: must be a finite number > 0, got inf"),
    "missing file": ("{{name: asr, path: /nope/x.jsonl.gz}}", "",
                     "error: data.inputs['asr']: no such file '/nope/x.jsonl.gz'; fix its path"),
    "unknown type": ("{{name: asr, type: video, path: {path}}}", "",
                     "error: data.inputs['asr'].type: must be one of cuts, conversations, text, got 'video'"),
    "name read as a boolean": ("{{name: off, path: {path}}}", "",
                               "error: data.inputs: name: Expected a <class 'str'>. Got value: False; YAML reads off, no, "
                               "yes, on, true and false as booleans: quote the value"),
    "unknown key": ("{{name: asr, path: {path}, wieght: 2}}", "",
                    "error: data.inputs: Option 'wieght' is not accepted; see `salm-mtp fit --help`"),
    "duplicate names": ("{{name: asr, path: {path}}}", "{{name: asr, path: {path}}}",
                        "error: data.inputs: source names must be unique, repeated: ['asr']; rename them"),
}


@pytest.mark.parametrize("case", INPUT_CASES)
def test_data_inputs_mistakes_are_one_line(case, corpus, tok_dir, tmp_path):
    entry, second, expected = INPUT_CASES[case]
    out = _fit(tmp_path, corpus, tok_dir, "--config", _inputs_yaml(tmp_path, corpus, entry, second))
    assert _one_error_line(out).startswith(expected)
    assert not (tmp_path / "run" / "salm").exists()  # refused before the run wrote anything


FLAG_CASES = {
    "lora r": (["--model.lora.r=-4"], "error: model.lora.r: must be >= 0, got -4; set --model.lora.r"),
    "lora alpha": (["--model.lora.r=4", "--model.lora.alpha=0"],
                   "error: model.lora.alpha: must be > 0, got 0.0; set --model.lora.alpha"),
    "lora targets": (["--model.lora.r=4", "--model.lora.target_modules=[qkv]"],
                     "error: model.lora.target_modules: ['qkv'] matches no Linear layer of the LLM; its Linear "
                     "layers are named"),
    "max_steps 0": (["--trainer.max_steps=0"], "error: trainer.max_steps: 0 trains nothing; set --trainer.max_steps"),
    "max_steps not a number": (["--trainer.max_steps=abc"],
                               "error: trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
    "lm_head_chunk_size 0": (["--model.lm_head_chunk_size=0"],
                             "error: model.lm_head_chunk_size: must be >= 1, got 0; set --model.lm_head_chunk_size"),
    "lm_head_chunk_size negative": (["--model.lm_head_chunk_size=-5"],
                                    "error: model.lm_head_chunk_size: must be >= 1, got -5"),
    "unknown key": (["--model.nonexistent=1"], "error: unrecognized arguments: --model.nonexistent=1"),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_bad_values_are_one_line_and_never_bent(case, corpus, tok_dir, tmp_path):
    flags, expected = FLAG_CASES[case]
    assert _one_error_line(_fit(tmp_path, corpus, tok_dir, *flags)).startswith(expected)


def test_binary_config_file_is_named(corpus, tok_dir, tmp_path):
    binary = tmp_path / "model.ckpt.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    line = _one_error_line(_fit(tmp_path, corpus, tok_dir, "--config", str(binary)))
    assert line.startswith(f"error: --config {str(binary)!r}: not a UTF-8 text file")


def test_resume_with_nothing_left_to_train_is_refused(corpus, tok_dir, tmp_path):
    """A checkpoint at step 6 and --trainer.max_steps=6: the run would train nothing and then print the earlier run's
    checkpoint as its own; it is refused, naming the step."""
    ckpt = tmp_path / "step6.ckpt"
    torch.save({"global_step": 6, "epoch": 0, "state_dict": {}}, ckpt)
    line = _one_error_line(_fit(tmp_path, corpus, tok_dir, "--trainer.max_steps=6", f"--ckpt_path={ckpt}"))
    assert line == (f"error: trainer.max_steps: 6 is not above step 6 of --ckpt_path {str(ckpt)!r}: nothing would be "
                    "trained; raise --trainer.max_steps above 6 to train on")


def test_export_directory_as_ckpt_path_says_what_it_is(tmp_path):
    from salm_mtp.errors import CheckpointReadError, check_ckpt_path

    export = tmp_path / "export"
    (export / "llm").mkdir(parents=True)
    (export / "salm_config.json").write_text("{}")
    with pytest.raises(CheckpointReadError, match=r"is an export \(`salm-mtp export`\), not a training checkpoint: "
                                                  r"to train on from it use --model.llm.path=.*export/llm"):
        check_ckpt_path(str(export))
    (tmp_path / "half").mkdir()  # a sharded directory without .metadata: still the interrupted-save message
    with pytest.raises(CheckpointReadError, match="without .metadata"):
        check_ckpt_path(str(tmp_path / "half"))


def test_a_source_without_usable_example_says_why(corpus, tok_dir, tmp_path):
    """--data.max_tokens below every example: one line from the skip counts (the budget is the cause, the files are
    fine), and at most MAX_SKIP_LINES cuts printed one by one."""
    from salm_mtp.data.policy import MAX_SKIP_LINES

    out = _fit(tmp_path, corpus, tok_dir, "--config", _inputs_yaml(tmp_path, corpus, "{{name: asr, path: {path}}}"),
               "--data.max_tokens=2", "--data.val_manifest=null", "--trainer.limit_val_batches=0")
    line = _one_error_line(out)
    assert line.startswith(f"error: data.inputs['asr'] ['{corpus}']: all 24 examples are too_long_sequence: the "
                           "smallest needs ")
    need = line.split("needs ")[1].split()[0]
    assert "> data.max_tokens=2 (" in line and ".flac)" in line  # the cut that needs the least, named by its audio
    assert line.endswith(f"; raise --data.max_tokens to at least {need}")
    printed = [ln for ln in out.stderr.splitlines() if "skipping cut" in ln]
    assert len(printed) == MAX_SKIP_LINES < 24
    assert "further skipped cuts are not printed" in out.stderr


def test_an_empty_only_source_is_named(corpus, tok_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = _fit(tmp_path, corpus, tok_dir, "--config", _inputs_yaml(tmp_path, str(empty), "{{name: talk, type: text, "
                                                                   "path: {path}}}"), "--data.max_tokens=4096",
               "--data.val_manifest=null", "--trainer.limit_val_batches=0")
    assert _one_error_line(out) == (f"error: data.inputs['talk'] ['{empty}'] holds no example: its file is empty or "
                                    "none of its lines is one; check it with `salm-mtp validate-data FILE`, or remove "
                                    "the source")


def test_why_unusable_names_the_reason_and_the_fix():
    from collections import Counter

    from salm_mtp.data.policy import BadCut, why_unusable

    long = BadCut("c1", "too_long_audio", "7.20 s > data.max_cut_duration=5", "a.wav", amount=7.2,
                  limit="data.max_cut_duration")
    assert why_unusable("data.train_manifest 'm'", 3, Counter(too_long_audio=3), {"too_long_audio": long}) == (
        "data.train_manifest 'm': all 3 examples are too_long_audio: the smallest needs 7.20 s > "
        "data.max_cut_duration=5; raise --data.max_cut_duration to at least 7.2")
    empty = BadCut("c2", "empty_text", "the asr answer is empty or whitespace: ''", "b.wav")
    assert why_unusable("src", 4, Counter(empty_text=3, too_long_audio=1), {"empty_text": empty,
                                                                           "too_long_audio": long}) == (
        "src: its examples are empty_text: 3, too_long_audio: 1 (of 4) (e.g. cut 'c2' (b.wav): empty_text: the asr "
        "answer is empty or whitespace: ''); give each cut a non-empty text")
