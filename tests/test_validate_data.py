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


def test_validate_data_fails_on_an_empty_file(tmp_path, tok_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main([str(empty), "--tokenizer", tok_dir]) == 1
    assert f"error: no example in {empty}: the files are empty" in capsys.readouterr().err


def test_validate_data_lists_duplicate_ids(tmp_path, tok_dir, capsys):
    line = (EXAMPLES / "cuts.jsonl").read_text().splitlines()[0]
    first = json.loads(line)
    for source in first["recording"]["sources"]:  # the copy lives elsewhere: absolute audio paths
        source["source"] = str(EXAMPLES / source["source"])
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(first) + "\n")
    assert main([str(path), "--tokenizer", tok_dir]) == 1
    out = capsys.readouterr().out
    assert f"DUPLICATE id {first['id']!r}: 2 examples ({path})" in out
    assert "1 ids are used by more than one example" in out
    assert "2 examples read from 1 manifest(s) (1 cuts): 2 good, 0 bad" in out


def test_a_byte_order_mark_is_read_and_a_json_array_is_named(tmp_path, tok_dir, capsys):
    """A UTF-8 BOM (Windows editors) no longer drops line 1; a JSON array is one error naming the file, not a
    "not JSON" line per line."""
    lines = (EXAMPLES / "chat.jsonl").read_text().splitlines()
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    assert main([str(bom), "--tokenizer", tok_dir]) == 0
    n = sum(1 for ln in lines if ln.strip())
    assert f"{n} examples read from 1 manifest(s) (1 text): {n} good, 0 bad" in capsys.readouterr().out
    array = tmp_path / "chat.json"
    array.write_text("[\n" + ",\n".join(ln for ln in lines if ln.strip()) + "\n]\n")
    assert main([str(array), "--tokenizer", tok_dir]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: manifest {str(array)!r} is a JSON array, not JSON Lines (one object per line); "
                           f"convert it, e.g. `jq -c '.[]' {array} > chat.jsonl`")
