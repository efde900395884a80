"""data/README.md and data/examples/: every example file is read by the project's own readers without a bad line,
the README's YAML block configures a working data module, and its JSON snippets are lines of the example files."""

from __future__ import annotations

import json
import os
import re

import pytest
import soundfile as sf
import yaml

from salm_mtp.data.conversation import ConversationCuts, parse_conversation
from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.data.manifest import load_cuts
from salm_mtp.data.checks import CutChecker
from salm_mtp.data.prompt import PromptFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
EX = os.path.join(DATA, "examples")
README = open(os.path.join(DATA, "README.md")).read()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def json_objects(text: str) -> list[dict]:
    """The JSON objects of a snippet, one after the other (each may span lines)."""
    dec, out, i = json.JSONDecoder(), [], 0
    while (i := _skip_ws(text, i)) < len(text):
        obj, i = dec.raw_decode(text, i)
        out.append(obj)
    return out


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def lines(name: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(EX, name)) if line.strip()]


def test_example_audio_is_small_16khz_flac_from_the_demo_generator():
    names = sorted(os.listdir(os.path.join(EX, "audio")))
    assert names == ["a_house_sings.flac", "five_two.flac", "one_three.flac"]
    for name in names:
        path = os.path.join(EX, "audio", name)
        info = sf.info(path)
        assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
        assert os.path.getsize(path) < 25_000


def test_every_example_file_reads_without_a_bad_line(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    checker = CutChecker(PromptFormatter(tok), max_target_tokens=64)
    cuts = list(load_cuts(os.path.join(EX, "cuts.jsonl")))  # raises on any bad line
    assert [c.id for c in cuts] == ["five_two", "a_house_sings", "one_three"]
    talk = list(ConversationCuts(os.path.join(EX, "conversations.jsonl")))
    text = list(ConversationCuts(os.path.join(EX, "text.jsonl"), kind="text"))
    chat = list(ConversationCuts(os.path.join(EX, "chat.jsonl"), kind="text"))
    assert [c.id for c in talk + text + chat] == ["talk-1", "talk-2", "text-1", "text-2", "chat-1", "chat.jsonl:2"]
    for cut in cuts + talk + text + chat:
        assert checker.check_metadata(cut, with_header=True) is None, cut.id
    assert [len(c.custom["salm"]["clips"]) for c in talk] == [2, 1]


def test_the_readme_yaml_configures_a_data_module_that_batches_every_example(tok_dir, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository
    (block,) = blocks("yaml")
    cfg = yaml.safe_load(block)["data"]
    dm = SALMDataModule(tokenizer_path=tok_dir, num_buckets=2, **cfg)
    dm.set_audio_rate(12.5)
    assert dm.source_names() == ["asr", "talk", "chat"] and dm.val_names() == ["asr"]
    it = iter(dm.train_dataloader())
    seen = set()
    for _ in range(12):
        batch = next(it)
        seen |= set(batch["ids"])
        assert batch["num_dropped"] == 0
    assert {"five_two", "a_house_sings", "one_three", "talk-1", "talk-2", "text-1", "chat-1"} <= {
        i.split("_repeat")[0] for i in seen}
    (val,) = dm.val_dataloader()
    assert [i for b in val for i in b["ids"]] == ["five_two", "a_house_sings", "one_three"]
    assert dm.skip_log.total == 0


def test_readme_json_snippets_are_lines_of_the_example_files():
    files = {name: lines(name) for name in ("cuts.jsonl", "conversations.jsonl", "text.jsonl", "chat.jsonl")}
    snippets = [obj for block in blocks("json") for obj in json_objects(block)]
    assert len(snippets) == 4
    for obj in snippets:
        assert any(obj == line for rows in files.values() for line in rows), obj


@pytest.mark.parametrize("name", ["conversations.jsonl", "text.jsonl", "chat.jsonl"])
def test_each_example_line_parses_as_documented(name):
    kind = "conversation" if name == "conversations.jsonl" else "text"
    for i, row in enumerate(lines(name), start=1):
        conv = parse_conversation(row, os.path.join(EX, name), i, kind)
        assert conv.messages[-1]["role"] == "assistant", (name, i)
        assert all(os.path.isfile(c.path) for c in conv.clips)


# ---- the demo's mix (salm_mtp/demo/mix.py, conf/demo_mix.yaml) -----------------------------------
@pytest.fixture
def demo_like(tmp_path):
    """A sine corpus laid out like the demo's: {train,dev,test}_cuts.jsonl.gz and audio/ under one directory."""
    from conftest import write_sine_corpus

    for split in ("train", "dev", "test"):
        write_sine_corpus(tmp_path, n=12, name=f"{split}_cuts")
    return tmp_path


def test_demo_mix_files_are_deterministic_and_read_without_a_bad_line(demo_like, tmp_path_factory):
    from salm_mtp.demo.mix import make_mix_data

    counts = {"train": 30, "dev": 5, "test": 5}
    written = make_mix_data(demo_like, talk_counts=counts, text_counts=counts)
    assert sorted(written) == sorted(f"{k}_{s}.jsonl" for k in ("talk", "text") for s in ("train", "dev", "test"))
    first = {n: open(p, "rb").read() for n, p in written.items()}
    make_mix_data(demo_like, talk_counts=counts, text_counts=counts)
    assert {n: open(p, "rb").read() for n, p in written.items()} == first  # same seed, same bytes
    other = tmp_path_factory.mktemp("elsewhere")  # written elsewhere: audio paths relative to the output
    make_mix_data(other, corpus=demo_like, talk_counts=counts, text_counts=counts)
    talk = list(ConversationCuts(written["talk_train.jsonl"]))
    talk_other = list(ConversationCuts(other / "talk_train.jsonl"))
    assert [c.custom["salm"]["clips"] for c in talk] == [c.custom["salm"]["clips"] for c in talk_other]
    assert len(talk) == 30 and all(len(c.custom["salm"]["clips"]) == 2 for c in talk)
    assert all(len(c.custom["salm"]["messages"]) == 6 for c in talk)  # three user and three assistant turns
    text = list(ConversationCuts(written["text_dev.jsonl"], kind="text"))
    assert len(text) == 5 and all(c.duration == 0 for c in text)


def test_conf_demo_mix_trains_on_all_three_sources(demo_like, tok_dir, monkeypatch):
    from salm_mtp.demo.mix import make_mix_data

    make_mix_data(demo_like, talk_counts={"train": 20}, text_counts={"train": 20})
    raw = open(os.path.join(ROOT, "conf", "demo_mix.yaml")).read().replace("data/demo/", f"{demo_like}/")
    cfg = yaml.safe_load(raw)["data"]
    assert cfg["train_manifest"] is None and cfg["val_manifest"] is None
    dm = SALMDataModule(tokenizer_path=tok_dir, **cfg)
    dm.set_audio_rate(12.5)
    it = iter(dm.train_dataloader())
    sources = [s for _ in range(6) for s in next(it)["source_ids"].tolist()]
    assert set(sources) == {0, 1, 2} and dm.source_names() == ["asr", "text", "talk"]
    assert dm.val_names() == ["asr", "text", "talk"] and len(dm.val_dataloader()) == 3
