"""Tests for salm_mtp/data/conversation.py and the conversation paths of prompt.py, dataset.py and the model:
loss masks over assistant tokens, one embedding block per audio turn at its own place, bad lines under the policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoTokenizer

import tiny
from salm_mtp.data.conversation import ConversationCuts, conversation_of, is_conversation, parse_conversation
from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.data.dataset import SALMDataset
from salm_mtp.data.policy import BadCutError, SkipLog, handle
from salm_mtp.data.prompt import PromptFormatter
from salm_mtp.data.tokenizer import AUDIO_PLACEHOLDER

PH = AUDIO_PLACEHOLDER


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def nemo_line(cid="v0", audio=("a.flac", "b.flac"), durs=(0.1, 0.15), answers=("one two", "three")):
    """User text + audio, Assistant, User audio, Assistant (NeMo multimodal conversation format)."""
    return {"id": cid, "conversations": [
        {"from": "User", "type": "text", "value": "Transcribe the audio."},
        {"from": "User", "type": "audio", "value": audio[0], "duration": durs[0]},
        {"from": "Assistant", "type": "text", "value": answers[0]},
        {"from": "User", "type": "audio", "value": audio[1], "duration": durs[1], "offset": 0.0},
        {"from": "Assistant", "type": "text", "value": answers[1]},
    ]}


def write_audio(root, name, seconds, freq):
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(root / name, 0.5 * np.sin(2 * np.pi * freq * t), 16000)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# ---- parsing ----------------------------------------------------------------------------------------
def test_nemo_line_parses_into_merged_messages_and_clips(tmp_path):
    conv = parse_conversation(nemo_line(), str(tmp_path / "m.jsonl"), 1, system_prompt="Be brief.")
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Transcribe the audio. {PH}"},
        {"role": "assistant", "content": "one two"},
        {"role": "user", "content": PH},
        {"role": "assistant", "content": "three"},
    ]
    assert [(c.path, c.duration, c.offset) for c in conv.clips] == [
        (str(tmp_path / "a.flac"), 0.1, 0.0), (str(tmp_path / "b.flac"), 0.15, 0.0)]  # relative to the manifest
    assert conv.duration == pytest.approx(0.25) and conv.answer == "three"
    cut = conv.to_cut(source=2)
    assert is_conversation(cut) and cut.duration == pytest.approx(0.25) and cut.custom["salm_source"] == 2
    assert conversation_of(cut) == conv


def test_turn_examples_give_each_assistant_turn_with_its_reference_history(tok):
    from salm_mtp.data.conversation import turn_examples

    conv = parse_conversation(nemo_line(), "m.jsonl", 1)
    first, second = turn_examples(conv)
    assert (first.id, second.id) == ("v0#1", "v0#2")
    assert first.messages == conv.messages[:2] and len(first.clips) == 1 and first.answer == "one two"
    assert second.messages == conv.messages and second.clips == conv.clips and second.loss_turns == "last"
    fmt = PromptFormatter(tok)
    enc = fmt.encode_messages(second.messages, second.loss_turns)
    answer = tok.encode("three", add_special_tokens=False) + [tok.eos_token_id]
    assert enc.input_ids[enc.prompt_len:] == answer and sum(enc.loss_mask) == len(answer)


def test_messages_lines_and_their_system_message(tmp_path):
    line = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "one"}]}
    conv = parse_conversation(line, str(tmp_path / "t.jsonl"), 3, kind="text", system_prompt="ignored")
    assert conv.id == "t.jsonl:3" and conv.clips == [] and conv.kind == "text"
    assert conv.messages[0] == {"role": "system", "content": "S"}  # the line's own system message wins


@pytest.mark.parametrize(("line", "detail"), [
    ({"conversations": [{"from": "Robot", "type": "text", "value": "x"}]}, "unknown 'from' 'Robot'"),
    ({"conversations": [{"from": "User", "type": "video", "value": "x"}]}, "unknown 'type' 'video'"),
    ({"conversations": [{"from": "User", "type": "audio", "value": "a.flac"},
                        {"from": "Assistant", "value": "x"}]}, "needs a 'duration'"),
    ({"conversations": [{"from": "User", "value": "x"}]}, "last turn must be the Assistant"),
    ({"conversations": [{"from": "Assistant", "type": "audio", "value": "a.flac", "duration": 1}]},
     "only User turns may hold audio"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"},
                   {"role": "assistant", "content": "y"}]}, "system message may only come first"),
    ({"other": 1}, "neither 'conversations'"),
])
def test_malformed_lines_are_bad_conversations_naming_the_problem(line, detail):
    bad = parse_conversation(line, "m.jsonl", 7)
    assert bad.reason == "bad_conversation" and detail in bad.detail and (bad.file, bad.line) == ("m.jsonl", 7)


def test_audio_in_a_text_source_is_a_bad_line():
    bad = parse_conversation(nemo_line(), "t.jsonl", 1, kind="text")
    assert bad.reason == "bad_conversation" and "audio in a text source" in bad.detail


# ---- prompt: loss masks -----------------------------------------------------------------------------
def _expected(tok, pieces):
    """ids and mask from (text, is_loss) pieces tokenized one by one, as the simple template defines."""
    ids, mask = [tok.bos_token_id], [False]
    for text, loss, eos in pieces:
        part = tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if eos else [])
        ids += part
        mask += [loss] * len(part)
    return ids, mask


def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    fmt = PromptFormatter(tok)
    conv = parse_conversation(nemo_line(), "m.jsonl", 1)
    enc = fmt.encode_messages(conv.messages)
    ids, mask = _expected(tok, [(f"Transcribe the audio. {PH}\n", False, False), ("one two", True, True),
                                (f"{PH}\n", False, False), ("three", True, True)])
    assert enc.input_ids == ids and enc.loss_mask == mask
    assert enc.input_ids.count(fmt.audio_token_id) == 2
    masked = [i for i, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert masked == tok.encode("one two", add_special_tokens=False) + [tok.eos_token_id] + \
        tok.encode("three", add_special_tokens=False) + [tok.eos_token_id]
    # prompt_len: the history before the last assistant turn (what generation gets)
    assert enc.prompt_len == len(ids) - len(tok.encode("three", add_special_tokens=False)) - 1

    last = fmt.encode_messages(conv.messages, loss_turns="last")
    assert last.input_ids == ids
    n_last = len(tok.encode("three", add_special_tokens=False)) + 1
    assert last.loss_mask == [False] * (len(ids) - n_last) + [True] * n_last


def test_single_turn_conversation_encodes_like_an_asr_cut(tok):
    fmt = PromptFormatter(tok)
    line = {"conversations": [{"from": "User", "value": "Transcribe the audio."},
                              {"from": "User", "type": "audio", "value": "a.flac", "duration": 1.0},
                              {"from": "Assistant", "value": "four five"}]}
    conv = parse_conversation(line, "m.jsonl", 1)
    assert fmt.encode_messages(conv.messages) == fmt.encode("asr", "four five")


def test_chat_template_masks_each_assistant_answer_and_its_end_of_turn(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                         "</s>{% endif %} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    fmt = PromptFormatter(tok)
    msgs = [{"role": "system", "content": "sat"}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"},
            {"role": "assistant", "content": "four"}]
    enc = fmt.encode_messages(msgs)
    full = tok.apply_chat_template(msgs, tokenize=False)

    def text(ids):  # the tokenizer's decoding moves spaces around: compare without them
        return "".join(tok.decode(ids).split())

    assert text(enc.input_ids) == "".join(full.split())  # nothing lost or added (the " " after each </s> too)
    assert text([i for i, m in zip(enc.input_ids, enc.loss_mask) if m]) == "two</s>four</s>"
    tail = enc.input_ids[enc.input_ids.index(tok.eos_token_id) + 1]
    assert not enc.loss_mask[enc.input_ids.index(tail)]  # what follows the end of turn is no target
    last = fmt.encode_messages(msgs, loss_turns="last")
    assert text([i for i, m in zip(last.input_ids, last.loss_mask) if m]) == "four</s>"
    assert text(last.input_ids[: last.prompt_len]) == "".join(full.split())[: -len("four</s>")]


# ---- collation and the model: one embedding block per audio turn ------------------------------------
def test_two_audio_turns_get_their_own_embeddings_in_their_places(tok_dir, tmp_path):
    write_audio(tmp_path, "a.flac", 0.30, 300.0)
    write_audio(tmp_path, "b.flac", 0.62, 500.0)  # a different length: the blocks cannot be swapped unnoticed
    manifest = write_jsonl(tmp_path / "conv.jsonl", [nemo_line(durs=(0.30, 0.62))])
    (cut,) = list(ConversationCuts(manifest))
    model = tiny.build(tok_dir).eval()
    batch = SALMDataset(model.tokenizer)[[cut]]
    assert batch["audios"].shape[0] == 2 and batch["audio_lens"].tolist() == [4800, 9920]
    assert batch["clip_rows"].tolist() == [0, 0] and batch["ctc_lens"].tolist() == [0, 0]
    assert batch["tasks"] == ["conversation"] and batch["answers"] == ["three"]
    with torch.no_grad():
        merged, _, _ = model.prepare_inputs(batch)
        feats, fmask = model.features(batch["audios"], batch["audio_lens"])
        emb, lens = model.adapter(*model.audio(feats, fmask))  # (2, A, H): each clip's own embeddings
        text = model.llm.get_input_embeddings()(batch["input_ids"].masked_fill(
            batch["input_ids"] == model.placeholder_id, 0))[0]
    ids = batch["input_ids"][0].tolist()
    p1, p2 = [i for i, t in enumerate(ids) if t == model.placeholder_id]
    a1, a2 = lens.tolist()
    assert a1 < a2
    row = merged.inputs_embeds[0]
    torch.testing.assert_close(row[p1 : p1 + a1], emb[0, :a1])  # first clip at the first placeholder
    s2 = p2 - 1 + a1  # the second placeholder, shifted by the first clip's positions
    torch.testing.assert_close(row[s2 : s2 + a2], emb[1, :a2])
    torch.testing.assert_close(row[:p1], text[:p1])
    torch.testing.assert_close(row[p1 + a1 : s2], text[p1 + 1 : p2])  # the text between the turns
    assert merged.audio_mask[0].nonzero().flatten().tolist() == list(range(p1, p1 + a1)) + list(range(s2, s2 + a2))
    # targets: only the assistant tokens (shifted by one), never audio or user text
    labels = merged.labels[0]
    kept = labels[labels != -100].tolist()
    masked = [t for t, m in zip(ids, batch["loss_mask"][0].tolist()) if m]
    assert kept == masked


# ---- bad lines under the data policy ----------------------------------------------------------------
def _bad_manifest(tmp_path):
    write_audio(tmp_path, "a.flac", 0.2, 300.0)
    write_audio(tmp_path, "b.flac", 0.2, 400.0)
    good = nemo_line("good", durs=(0.2, 0.2))
    missing = nemo_line("missing", audio=("a.flac", "nowhere.flac"), durs=(0.2, 0.2))
    robot = {"id": "robot", "conversations": [{"from": "Robot", "value": "x"}, {"from": "Assistant", "value": "y"}]}
    return write_jsonl(tmp_path / "conv.jsonl", [good, missing, robot, "{not json"])


def _dm(tmp_path, tok_dir, manifest, policy):
    return SALMDataModule(tokenizer_path=tok_dir, max_tokens=400, on_bad_cut=policy, num_buckets=2,
                          inputs=[{"name": "talk", "type": "conversations", "path": str(manifest)}])


def test_bad_lines_are_skipped_named_and_counted(tmp_path, tok_dir):
    dm = _dm(tmp_path, tok_dir, _bad_manifest(tmp_path), "skip")
    dm.set_audio_rate(6.25)
    dm.skip_log.set_path(str(tmp_path / "skipped_cuts.jsonl"))
    ids = [i for batch in dm.train_dataloader() for i in batch["ids"]]
    assert ids == ["good"]
    assert dict(dm.skip_log.counts) == {"bad_conversation": 1, "manifest_not_json": 1, "unreadable_audio": 1}
    rows = [json.loads(line) for line in open(tmp_path / "skipped_cuts.jsonl")]
    found = {(r["cut_id"], r["reason"], r["line"]) for r in rows}
    assert found == {(None, "manifest_not_json", 4), ("robot", "bad_conversation", 3),
                     ("missing", "unreadable_audio", 2)}  # every row names its manifest line
    (missing,) = [r for r in rows if r["cut_id"] == "missing"]
    assert missing["file"].endswith("conv.jsonl")  # the manifest; the audio file is in the detail
    assert missing["detail"].startswith("no such file (") and missing["detail"].endswith("nowhere.flac)")


def test_bad_lines_raise_naming_line_and_reason(tmp_path, tok_dir):
    manifest = _bad_manifest(tmp_path)
    dm = _dm(tmp_path, tok_dir, manifest, "raise")
    dm.set_audio_rate(6.25)
    with pytest.raises(BadCutError, match=r"cut 'missing' \(.*conv\.jsonl:2\): unreadable_audio: no such file \(.*nowhere\.flac\)"):
        dm.train_dataloader()  # the precheck reads the audio headers of every turn
    with pytest.raises(BadCutError, match=r"cut 'robot' \(.*conv\.jsonl:3\): bad_conversation: turn 0: unknown"):
        list(ConversationCuts(manifest, on_bad_line=lambda bad: handle(bad, "raise")))
    log = SkipLog()
    cuts = list(ConversationCuts(manifest, on_bad_line=lambda bad: handle(bad, "skip", log)))
    assert [c.id for c in cuts] == ["good", "missing"]  # a missing file shows at the header check or when loaded
    assert dict(log.counts) == {"bad_conversation": 1, "manifest_not_json": 1}


def test_missing_audio_at_load_time_drops_only_that_row(tmp_path, tok_dir):
    manifest = _bad_manifest(tmp_path)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cuts = list(ConversationCuts(manifest, on_bad_line=lambda bad: None))
    batch = SALMDataset(tok)[cuts]
    assert batch["ids"] == ["good"] and batch["num_dropped"] == 1
    assert batch["skipped"][0]["reason"] == "unreadable_audio" and batch["skipped"][0]["cut_id"] == "missing"
    with pytest.raises(BadCutError, match="unreadable_audio"):
        SALMDataset(tok, policy="raise")[cuts]


def test_source_dataloader_scores_each_assistant_turn_given_the_reference_history(tmp_path, tok_dir):
    write_audio(tmp_path, "a.flac", 0.2, 300.0)
    write_audio(tmp_path, "b.flac", 0.3, 400.0)
    manifest = write_jsonl(tmp_path / "conv.jsonl", [nemo_line("v0", durs=(0.2, 0.3)), nemo_line("v1", durs=(0.2, 0.3))])
    dm = SALMDataModule(tokenizer_path=tok_dir, max_tokens=400)
    dm.set_audio_rate(6.25)
    spec = {"name": "talk", "type": "conversations", "path": str(manifest)}
    rows = [(i, a, n) for b in dm.source_dataloader(spec, per_turn=True)
            for i, a, n in zip(b["ids"], b["answers"], b["clip_rows"].bincount(minlength=len(b["ids"])).tolist())]
    assert rows == [("v0#1", "one two", 1), ("v0#2", "three", 2), ("v1#1", "one two", 1), ("v1#2", "three", 2)]
    whole = [i for b in dm.source_dataloader(spec) for i in b["ids"]]
    assert whole == ["v0", "v1"]
