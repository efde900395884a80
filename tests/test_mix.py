"""Tests for salm_mtp/data/mix.py and the mixing paths of the data module and the model: shares by weight,
deterministic and resumable streams, the LLM-position budget, batches without audio, per-source metrics."""

from __future__ import annotations

import csv
import glob
import json
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

import tiny
from conftest import write_sine_corpus
from salm_mtp.modules.features import SpecAugmentConfig
from salm_mtp.data.datamodule import DataConfig, SALMDataModule
from salm_mtp.data.mix import POSITIONS_KEY, SOURCE_KEY
from salm_mtp.errors import SalmError
from salm_mtp.modules.merge import IGNORE_INDEX

TEXTS = ["one two", "the cat sat on the mat", "a dog ran home", "three four five six", "seven", "nine zero one"]


@pytest.fixture
def data(tmp_path):
    """{"cuts": sine corpus manifest, "text": chat lines, "talk": spoken two-turn conversations}."""
    cuts = write_sine_corpus(tmp_path, n=12)
    text = tmp_path / "text.jsonl"
    with open(text, "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": TEXTS[i % 6]},
                                             {"role": "assistant", "content": TEXTS[(i + 1) % 6]}]}) + "\n")
    talk = tmp_path / "talk.jsonl"
    with open(talk, "w") as f:
        for i in range(8):
            turns = [{"from": "User", "type": "text", "value": "Transcribe the audio."},
                     {"from": "User", "type": "audio", "value": f"audio/c{i:03d}.flac", "duration": 0.10 + 0.01 * i},
                     {"from": "Assistant", "type": "text", "value": TEXTS[i % 6]},
                     {"from": "User", "type": "audio", "value": f"audio/c{i + 1:03d}.flac", "duration": 0.11 + 0.01 * i},
                     {"from": "Assistant", "type": "text", "value": TEXTS[(i + 2) % 6]}]
            f.write(json.dumps({"id": f"talk{i}", "conversations": turns}) + "\n")
    return {"cuts": str(cuts), "text": str(text), "talk": str(talk)}


def inputs(data, w_cuts=0.7, w_text=0.3, talk=None):
    out = [{"name": "asr", "type": "cuts", "path": data["cuts"], "weight": w_cuts},
           {"name": "chat", "type": "text", "path": data["text"], "weight": w_text}]
    if talk is not None:
        out.append({"name": "talk", "type": "conversations", "path": data["talk"], "weight": talk})
    return out


def make_dm(tok_dir, data, rate=6.25, **kw):
    args = dict(tokenizer_path=tok_dir, max_tokens=200, num_buckets=3, seed=5, inputs=inputs(data))
    dm = SALMDataModule(**(args | kw))
    dm.set_audio_rate(rate)
    return dm


def sampler_batches(dm, n):
    """The first n batches of the train sampler (cut metadata only: no audio is read)."""
    it = iter(dm.train_dataloader().sampler)
    return [list(next(it)) for _ in range(n)]


# ---- config -----------------------------------------------------------------------------------------
def test_config_errors_name_the_key_and_fix(data):
    with pytest.raises(ValueError, match="data.inputs and data.train_manifest are both set"):
        DataConfig(train_manifest=data["cuts"], inputs=inputs(data), max_tokens=100)
    with pytest.raises(ValueError, match=r"\['chat'\] are conversations / text.*--data.max_tokens"):
        DataConfig(inputs=inputs(data))
    with pytest.raises(ValueError, match=r"source names must be unique, repeated: \['asr'\]"):
        DataConfig(inputs=inputs(data)[:1] * 2)
    with pytest.raises(ValueError, match=r"data.inputs\['x'\].type: must be one of cuts, conversations, text"):
        DataConfig(inputs=[{"name": "x", "type": "video", "path": data["cuts"]}])
    for weight in (0, -1.0, float("inf"), float("nan")):  # inf would pass a '> 0' check and fail at the first batch
        with pytest.raises(ValueError, match=r"data.inputs\['x'\].weight: must be a finite number > 0"):
            DataConfig(inputs=[{"name": "x", "path": data["cuts"], "weight": weight}])
    with pytest.raises(ValueError, match=r"read as the boolean False .*quote it, e.g. name: \"off\""):
        DataConfig(inputs=[{"name": False, "path": data["cuts"]}])  # what YAML makes of `name: off`
    with pytest.raises(FileNotFoundError, match=r"data.inputs\['x'\]: no such file '/nope.jsonl'"):
        DataConfig(inputs=[{"name": "x", "path": "/nope.jsonl"}])
    with pytest.raises(ValueError, match="data.max_tokens: must be >= 1"):
        DataConfig(max_tokens=0)


def test_cli_parses_inputs_as_a_list_of_sources(data):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SALMDataModule, "data")
    arg = json.dumps([{"name": "asr", "path": data["cuts"], "weight": 2},
                      {"name": "chat", "type": "text", "path": data["text"], "loss_turns": "last"}])
    cfg = parser.parse_args([f"--data.inputs={arg}", "--data.max_tokens=300"])
    dm = parser.instantiate_classes(cfg).data
    assert [(s.name, s.type, s.weight, s.loss_turns) for s in dm.cfg.inputs] == [
        ("asr", "cuts", 2.0, "all"), ("chat", "text", 1.0, "last")]
    assert dm.source_names() == ["asr", "chat"] and dm.cfg.max_tokens == 300


# ---- mixing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("w_cuts", "w_text"), [(0.7, 0.3), (0.3, 0.7)])
def test_share_of_each_source_matches_its_weight(tok_dir, data, w_cuts, w_text):
    batches = sampler_batches(make_dm(tok_dir, data, inputs=inputs(data, w_cuts, w_text)), 120)
    sources = [c.custom[SOURCE_KEY] for b in batches for c in b]
    assert len(sources) > 450
    share = sources.count(0) / len(sources)
    assert abs(share - w_cuts) <= 0.05, share
    # bucketed batches carry both sources (mix_in_batch, the default), and so do batches in stream order
    plain = sampler_batches(make_dm(tok_dir, data, inputs=inputs(data, w_cuts, w_text), bucket_window=0), 120)
    sources = [c.custom[SOURCE_KEY] for b in plain for c in b]
    assert abs(sources.count(0) / len(sources) - w_cuts) <= 0.05
    assert sum(len({c.custom[SOURCE_KEY] for c in b}) == 2 for b in plain) > 60


def test_stream_is_deterministic_by_seed(tok_dir, data):
    ids = [[c.id for c in b] for b in sampler_batches(make_dm(tok_dir, data), 15)]
    assert ids == [[c.id for c in b] for b in sampler_batches(make_dm(tok_dir, data), 15)]
    assert ids != [[c.id for c in b] for b in sampler_batches(make_dm(tok_dir, data, seed=6), 15)]


def test_resume_mid_stream_yields_the_same_following_batches(tok_dir, data):
    kw = dict(inputs=inputs(data, talk=0.2))

    def ids(loader, n):
        it = iter(loader)
        return [tuple(next(it)["ids"]) for _ in range(n)]

    full = ids(make_dm(tok_dir, data, **kw).train_dataloader(), 9)
    loader = make_dm(tok_dir, data, **kw).train_dataloader()
    assert ids(loader, 4) == full[:4]
    state = loader.state_dict()
    assert {k: state[k] for k in ("epoch", "batches_done")} == {"epoch": 0, "batches_done": 4}
    fresh = make_dm(tok_dir, data, **kw).train_dataloader()
    fresh.load_state_dict(state)
    assert ids(fresh, 5) == full[4:]
    assert fresh.state_dict()["batches_done"] == 9


# ---- the token budget -------------------------------------------------------------------------------
def test_no_batch_exceeds_max_tokens(tok_dir, data):
    dm = make_dm(tok_dir, data, max_tokens=150, inputs=inputs(data, talk=0.3))
    checker = dm.checker()
    for batch in sampler_batches(dm, 60):
        sizes = [c.custom[POSITIONS_KEY] for c in batch]
        assert sizes == [checker.positions(c) for c in batch]
        assert len(batch) * max(sizes) <= 150


def test_counted_positions_bound_the_model_inputs(tok_dir, data):
    model = tiny.build(tok_dir).eval()
    dm = make_dm(tok_dir, data, rate=model.audio_positions_per_second(), max_tokens=150,
                 inputs=inputs(data, talk=0.3))
    dm.set_tokenizer(model.tokenizer)
    it = iter(dm.train_dataloader())
    with torch.no_grad():
        for _ in range(6):
            batch = next(it)
            merged, _, _ = model.prepare_inputs(batch)
            assert merged.inputs_embeds.shape[0] * merged.inputs_embeds.shape[1] <= 150


def test_bucketing_cuts_padding_and_keeps_the_examples(tok_dir, data):
    """data.bucket_window: the examples of each window, sorted by length, are cut into budgeted batches served in a
    shuffled order: the same examples as stream-order batching, far less padding, still within the budget."""
    kw = dict(max_tokens=150, inputs=inputs(data, talk=0.3), mix_in_batch=False)
    window = 40

    def padding(batches):
        sizes = [[c.custom[POSITIONS_KEY] for c in b] for b in batches]
        return 1 - sum(map(sum, sizes)) / sum(len(s) * max(s) for s in sizes)

    plain = sampler_batches(make_dm(tok_dir, data, bucket_window=0, **kw), 60)
    stream = [c.id for b in plain for c in b]  # the mixed stream, in order
    whole = len(stream) - len(stream) % window
    it = iter(make_dm(tok_dir, data, bucket_window=window, **kw).train_dataloader().sampler)
    bucketed = []
    while sum(map(len, bucketed)) < whole:  # a window's batches come out together: this stops at exactly `whole`
        bucketed.append(list(next(it)))
    assert sum(map(len, bucketed)) == whole
    assert sorted(c.id for b in bucketed for c in b) == sorted(stream[:whole])
    assert all(len(b) * max(c.custom[POSITIONS_KEY] for c in b) <= 150 for b in bucketed)
    assert padding(bucketed) < 0.5 * padding(plain), (padding(bucketed), padding(plain))
    assert [[c.id for c in b] for b in bucketed[:10]] == [[c.id for c in b] for b in sampler_batches(
        make_dm(tok_dir, data, bucket_window=window, **kw), 10)]  # deterministic: resumable by counting batches


def test_mix_in_batch_gives_every_batch_each_source_in_proportion(tok_dir, data):
    """data.mix_in_batch (the default): each window's batches carry every source of the window, a source's count
    per batch differing by at most one between batches; the same examples as the stream, within the budget."""
    kw = dict(max_tokens=150, inputs=inputs(data, talk=0.3))
    window = 40
    plain = sampler_batches(make_dm(tok_dir, data, bucket_window=0, **kw), 60)
    stream = [c for b in plain for c in b]
    whole = len(stream) - len(stream) % window
    it = iter(make_dm(tok_dir, data, bucket_window=window, **kw).train_dataloader().sampler)
    dealt = []
    while sum(map(len, dealt)) < whole:
        dealt.append(list(next(it)))
    assert sorted(c.id for b in dealt for c in b) == sorted(c.id for c in stream[:whole])
    assert all(len(b) * max(c.custom[POSITIONS_KEY] for c in b) <= 150 for b in dealt)
    seen, start = 0, 0
    for w in range(whole // window):  # the batches of window w hold exactly its examples
        in_window = {c.id for c in stream[w * window:(w + 1) * window]}
        batches = []
        while seen < (w + 1) * window:
            batches.append(dealt[start])
            seen += len(dealt[start])
            start += 1
        assert {c.id for b in batches for c in b} == in_window
        sources = {c.custom[SOURCE_KEY] for c in stream[w * window:(w + 1) * window]}
        for src in sources:
            counts = [sum(c.custom[SOURCE_KEY] == src for c in b) for b in batches]
            assert max(counts) - min(counts) <= 1, (src, counts)
        if len(batches) <= min(sum(c.custom[SOURCE_KEY] == s for c in stream[w * window:(w + 1) * window])
                               for s in sources):
            assert all({c.custom[SOURCE_KEY] for c in b} == sources for b in batches)  # every source in every batch


def test_deal_by_source_grows_the_batch_count_until_each_fits():
    from types import SimpleNamespace

    from salm_mtp.data.mix import deal_by_source

    def cut(src, n):
        return SimpleNamespace(custom={SOURCE_KEY: src, POSITIONS_KEY: n}, id=f"{src}-{n}")

    window = [cut(0, n) for n in (10, 11, 12, 13, 14, 15)] + [cut(1, n) for n in (40, 41, 42)]
    fits = lambda b: len(b) * max(c.custom[POSITIONS_KEY] for c in b) <= 130  # noqa: E731
    batches = deal_by_source(window, 1, fits)
    assert len(batches) == 3 and all(fits(b) for b in batches)
    assert [[c.id for c in b] for b in batches] == [["0-10", "0-11", "1-40"], ["0-12", "0-13", "1-41"],
                                                    ["0-14", "0-15", "1-42"]]


def test_an_example_over_the_budget_is_a_bad_cut(tok_dir, data):
    dm = make_dm(tok_dir, data, max_tokens=32)
    batches = sampler_batches(dm, 30)
    kept = {c.id for b in batches for c in b}
    assert all(c.custom[POSITIONS_KEY] <= 32 for b in batches for c in b)
    long = {c.id for c in dm._source("train", 0) if dm.checker().positions(c) > 32}
    assert long and not long & kept and "c000" in kept
    assert dm.skip_log.counts["too_long_sequence"] == len(long)


def test_a_source_with_no_usable_example_stops_the_run(tok_dir, data):
    dm = make_dm(tok_dir, data, max_tokens=26)  # every cut is longer: only text would be left
    with pytest.raises(SalmError, match=r"data.inputs\['asr'\] \[.*\]: all 12 examples are too_long_sequence: the "
                                        r"smallest needs (\d+) LLM .* raise --data.max_tokens to at least \1$"):
        sampler_batches(dm, 30)


# ---- the model: batches without audio, per-source sums ---------------------------------------------
def _collate(dm, names):
    """One batch holding the first example of each named source (in this order)."""
    cuts = []
    for name in names:
        idx = dm.source_names().index(name)
        cuts.append(next(iter(dm._prepared(dm._source("train", idx), f"train/{name}"))))
    return dm.get_dataset()[cuts]


def _grads(model, prefix):
    return [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]


@pytest.mark.parametrize("rows", [["chat", "chat"], ["asr", "chat", "talk"]])
def test_batches_without_audio_and_mixed_ones_run_forward_backward(tok_dir, data, rows):
    model = tiny.build(tok_dir, ctc_weight=0.5)
    model.train()
    dm = make_dm(tok_dir, data, rate=model.audio_positions_per_second(), inputs=inputs(data, talk=0.2))
    dm.set_tokenizer(model.tokenizer)
    batch = _collate(dm, rows)
    n_clips = {"chat": 0, "asr": 1, "talk": 2}
    assert batch["audios"].shape[0] == sum(n_clips[r] for r in rows)
    running = model.audio.state_dict()
    loss, summed, bsz = model.compute_losses(batch)
    assert bsz == len(rows) and torch.isfinite(loss)
    loss.backward()
    enc = _grads(model, "audio.")
    assert all(g is not None for g in enc)  # every rank runs the same backward, audio or not
    llm = _grads(model, "llm.")
    assert any(float(g.abs().sum()) > 0 for g in llm if g is not None)
    moved = any(float(g.abs().sum()) > 0 for g in enc)
    if rows == ["chat", "chat"]:
        assert not moved  # the silent stand-in clip enters with weight 0 ...
        for k, v in model.audio.state_dict().items():  # ... and leaves BatchNorm statistics alone
            torch.testing.assert_close(v, running[k], rtol=0, atol=0)
    else:
        assert moved
    metrics = model.summarise(summed)
    assert metrics["target_tokens"] == float((batch["loss_mask"]).sum())


def test_per_source_losses_are_each_sources_own_mean(tok_dir, data):
    model = tiny.build(tok_dir, spec_augment=SpecAugmentConfig(enabled=False))
    model.train()
    model.audio.eval()  # batch statistics would tie rows together: compare rows one by one
    dm = make_dm(tok_dir, data, rate=model.audio_positions_per_second(), inputs=inputs(data, talk=0.2))
    dm.set_tokenizer(model.tokenizer)
    batch = _collate(dm, ["talk", "chat", "asr", "chat"])
    assert batch["source_ids"].tolist() == [2, 1, 0, 1]

    model.source_names = ()
    loss_plain, summed_plain, _ = model.compute_losses(batch)
    model.source_names = ("asr", "chat", "talk")
    loss, summed, _ = model.compute_losses(batch)
    torch.testing.assert_close(loss, loss_plain)
    metrics = model.summarise(summed, model.source_names)
    plain = model.summarise(summed_plain)
    assert all(metrics[k] == pytest.approx(v, rel=1e-6) for k, v in plain.items())

    with torch.no_grad():  # reference: CE of each row on its own, summed per source
        merged, _, _ = model.prepare_inputs(batch)
        h0 = model(merged.inputs_embeds)
        hk = model.mtp_hiddens(h0, merged.inputs_embeds)[0]
        w = model.llm.lm_head.weight
        ce, ce1, count = torch.zeros(3), torch.zeros(3), torch.zeros(3)
        for b, s in enumerate(batch["source_ids"].tolist()):
            t = merged.targets[b]
            ce[s] += F.cross_entropy(h0[b] @ w.T, t, ignore_index=IGNORE_INDEX, reduction="sum")
            t1 = torch.cat([t[1:], t.new_full((1,), IGNORE_INDEX)])
            ce1[s] += F.cross_entropy(hk[b] @ w.T, t1, ignore_index=IGNORE_INDEX, reduction="sum")
            count[s] += float((t != IGNORE_INDEX).sum())
    lam = model.cfg_mtp.loss_scaling_factor
    for s, name in enumerate(model.source_names):
        assert metrics[f"source/{name}/main_loss"] == pytest.approx(float(ce[s] / count[s]), rel=1e-5)
        assert metrics[f"source/{name}/mtp_loss"] == pytest.approx(float(lam * ce1[s] / count[s]), rel=1e-5)
        assert metrics[f"source/{name}/target_tokens"] == float(count[s])
    model.eval()
    _, summed_eval, _ = model.compute_losses(batch)  # validation carries no per-source entries
    assert summed_eval.shape == summed_plain.shape


def test_fit_logs_per_source_losses_and_named_val_sets(tok_dir, data, tmp_path):
    model = tiny.build(tok_dir)
    val = [{"name": "asr_dev", "path": data["cuts"]}, {"name": "chat_dev", "type": "text", "path": data["text"]}]
    dm = SALMDataModule(tokenizer_path=tok_dir, max_tokens=200, num_buckets=2, inputs=inputs(data, talk=0.2),
                        val_inputs=val, bucket_window=0)  # stream order: every one of the 4 batches mixes sources
    trainer = pl.Trainer(max_steps=4, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=2,
                         log_every_n_steps=1, logger=CSVLogger(str(tmp_path), name="salm"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, use_distributed_sampler=False, accelerator="cpu")
    model.configure_model = lambda: None  # already materialised by tiny.build
    trainer.fit(model, datamodule=dm)
    (path,) = glob.glob(os.path.join(tmp_path, "salm/version_*/metrics.csv"))
    rows = list(csv.DictReader(open(path)))
    keys = {k for r in rows for k, v in r.items() if v}
    assert {"source/asr/main_loss", "source/chat/main_loss", "source/asr/mtp_loss", "source/chat/target_tokens"} <= keys
    assert not any(k.startswith(("loss/", "mtp_loss/asr", "target_tokens/")) for k in keys)  # the old, shared names
    assert {"val_loss", "val_loss/asr_dev", "val_loss/chat_dev", "val_main_loss/chat_dev"} <= keys
    (last,) = [r for r in rows if r.get("val_loss")]
    assert float(last["val_loss/chat_dev"]) > 0 and float(last["val_loss/asr_dev"]) > 0


def test_per_source_rows_hold_only_the_sources_of_their_steps(tok_dir, data, tmp_path):
    # small, length-bucketed batches: many steps see one source; its row must not repeat the others' old values
    model = tiny.build(tok_dir)
    seen: list[set[int]] = []

    class Sources(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(set(batch["source_ids"].tolist()))

    dm = SALMDataModule(tokenizer_path=tok_dir, max_tokens=80, num_buckets=2, inputs=inputs(data, talk=0.3))
    trainer = pl.Trainer(max_steps=8, log_every_n_steps=1, logger=CSVLogger(str(tmp_path), name="salm"),
                         callbacks=[Sources()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         use_distributed_sampler=False, accelerator="cpu")
    model.configure_model = lambda: None
    trainer.fit(model, datamodule=dm)
    (path,) = glob.glob(os.path.join(tmp_path, "salm/version_*/metrics.csv"))
    by_step: dict[int, dict] = {}
    for r in csv.DictReader(open(path)):
        by_step.setdefault(int(r["step"]), {}).update({k: float(v) for k, v in r.items() if v and k != "step"})
    assert sorted(by_step) == list(range(8))
    assert any(len(s) < len(model.source_names) for s in seen)  # the case that matters happened
    for step, row in by_step.items():
        logged = {n for n in model.source_names if f"source/{n}/target_tokens" in row}
        assert logged == {model.source_names[i] for i in seen[step]}, step
        assert sum(row[f"source/{n}/target_tokens"] for n in logged) == row["target_tokens"]
        assert {n for n in model.source_names if f"source/{n}/main_loss" in row} == logged


def test_lightning_resume_of_a_mixed_stream_sees_the_remaining_batches(tok_dir, data, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(ckpt_path=None, callbacks=()):
        model = tiny.BatchRecorder()
        trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=list(callbacks), default_root_dir=str(tmp_path),
                             use_distributed_sampler=False)
        trainer.fit(model, make_dm(tok_dir, data, inputs=inputs(data, talk=0.2)), ckpt_path=ckpt_path)
        return model.seen

    every = ModelCheckpoint(tmp_path / "ck", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    full = fit(callbacks=[every])
    assert len(full) == 8
    saved = torch.load(tmp_path / "ck" / "step=3.ckpt", weights_only=False)["loops"]["fit_loop"]["state_dict"]
    assert [{k: s[k] for k in ("epoch", "batches_done")} for s in saved["combined_loader"]] == [{"epoch": 0, "batches_done": 3}]
    assert full[:3] + fit(ckpt_path=tmp_path / "ck" / "step=3.ckpt") == full


def test_mixed_cut_sources_without_a_token_budget_keep_their_shares(tok_dir, data, sine_corpus):
    other = sine_corpus(n=12, name="more")
    dm = SALMDataModule(tokenizer_path=tok_dir, max_duration=1.0, seed=3, inputs=[
        {"name": "a", "path": data["cuts"], "weight": 0.7}, {"name": "b", "path": str(other), "weight": 0.3}])
    it = iter(dm.train_dataloader().sampler)
    batches = [list(next(it)) for _ in range(100)]
    sources = [c.custom[SOURCE_KEY] for b in batches for c in b]
    assert abs(sources.count(0) / len(sources) - 0.7) <= 0.05
    assert all(sum(c.duration for c in b) <= 1.0 + max(c.duration for c in b) for b in batches)
