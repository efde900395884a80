"""salm-mtp validate-data: every example of cut, conversation and text manifests read with the training checks;
bad ones named with their reason, counted, exit code 1."""

from __future__ import annotations

import json
from pathlib import Path

from salm_mtp.data.validate import main

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def test_validate_data_reads_every_format_of_data_examples(tok_dir, capsys):
    files = [EXAMPLES / n for n in ("cuts.jsonl", "conversations.jsonl", "text.jsonl", "chat.jsonl")]
    assert main([*map(str, files), "--tokenizer", tok_dir]) == 0
    out = capsys.readouterr().out
    n = sum(map(_lines, files))
    # text.jsonl is NeMo's conversation format without audio: detected as conversations; chat.jsonl as text
    assert f"{n} examples read from 4 manifest(s) (2 conversations, 1 cuts, 1 text): {n} good, 0 bad" in out
    assert "BAD" not in out


def test_validate_data_names_each_bad_conversation(tmp_path, tok_dir, capsys):
    conv = json.loads((EXAMPLES / "conversations.jsonl").read_text().splitlines()[1])  # talk-2: one audio turn
    for turn in conv["conversations"]:
        if turn["type"] == "audio":
            turn["value"] = str(EXAMPLES / turn["value"])
    missing = json.loads(json.dumps(conv))
    missing["id"] = "no-audio"
    next(t for t in missing["conversations"] if t["type"] == "audio")["value"] = str(tmp_path / "gone.flac")
    robot = {"id": "robot", "conversations": [{"from": "Robot", "type": "text", "value": "hi"}]}
    path = tmp_path / "talk.jsonl"
    path.write_text("\n".join([json.dumps(conv), json.dumps(missing), "{not json", json.dumps(robot)]) + "\n")
    assert main([str(path), "--tokenizer", tok_dir]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 3
    assert "'no-audio'" in bad[0] and "unreadable_audio" in bad[0] and "gone.flac" in bad[0]
    assert "manifest_not_json" in out and "talk.jsonl:3" in out
    assert "unknown 'from' 'Robot'" in out
    assert "4 examples read from 1 manifest(s) (1 conversations): 1 good, 3 bad" in out
    assert "[bad_conversation=1, manifest_not_json=1, unreadable_audio=1]" in out


def test_validate_data_missing_manifest_is_an_error(tmp_path, tok_dir, capsys):
    assert main([str(tmp_path / "nope.jsonl"), "--tokenizer", tok_dir]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
