"""Tests for salm_mtp/data/datamodule.py: config checks, loaders, mid-epoch resume (also in Lightning)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tiny import BatchRecorder
from salm_mtp.data.datamodule import DataConfig, SALMDataModule, load_cuts
from salm_mtp.data.prompt import PromptConfig
from salm_mtp.data.tokenizer import train_tokenizer


@pytest.fixture
def corpus(sine_corpus, tmp_path):
    """12 clips of 0.10-0.21 s and a tokenizer: (manifest, tokenizer dir)."""
    manifest = sine_corpus(n=12)
    texts = ["zero one two three four five six seven eight nine", "0 1 2 3 4 5 6 7 8 9"]
    train_tokenizer(texts, tmp_path / "tok", vocab_size=80)
    return str(manifest), str(tmp_path / "tok")


def make_dm(corpus, **kw) -> SALMDataModule:
    manifest, tok = corpus
    args = dict(
        train_manifest=manifest, val_manifest=manifest, tokenizer_path=tok, max_duration=0.35, num_buckets=2, seed=7
    )
    return SALMDataModule(**(args | kw))


def ids_of(loader, n=None):
    out = []
    for batch in loader:
        out.append(tuple(batch["ids"]))
        if n is not None and len(out) == n:
            break
    return out


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [("max_duration", -1), ("max_duration", 0), ("num_buckets", 0), ("num_workers", -1), ("max_cuts", 0)],
)
def test_bad_values_name_the_key_and_flag(key, value):
    with pytest.raises(ValueError, match=rf"data\.{key}: must be .*got {value}; set --data\.{key}"):
        DataConfig(**{key: value})


def test_missing_files_name_the_key_path_and_fix(tmp_path):
    missing = str(tmp_path / "nope_cuts.jsonl.gz")
    for key in ("train_manifest", "val_manifest", "test_manifest"):
        with pytest.raises(FileNotFoundError, match=rf"data\.{key}.*nope_cuts.*make-demo-data"):
            DataConfig(**{key: missing})
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer_path.*make-demo-data"):
        SALMDataModule(tokenizer_path=str(tmp_path / "no_tok"))


def test_module_args_are_the_config_fields():
    """SALMDataModule's and data_config's signatures and Args: help are generated from DataConfig (one source)."""
    import docstring_parser

    from salm_mtp.data.config import data_config

    docs = {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse_from_object(DataConfig).params}
    for fn in (SALMDataModule.__init__, data_config):
        params = {n: p for n, p in inspect.signature(fn).parameters.items() if n != "self"}
        assert list(params) == [f.name for f in dataclasses.fields(DataConfig)]
        assert params["max_duration"].default == 60.0 and params["prompt"].default is None  # factory: None, filled
        args = {p.arg_name: p.description for p in docstring_parser.parse(fn.__doc__).params}
        assert args == docs
    assert data_config(max_duration=5.0) == DataConfig(max_duration=5.0)
    dm = SALMDataModule.from_config(DataConfig(max_duration=5.0, prompt=PromptConfig(target_lang="x")))
    assert dm.cfg.max_duration == 5.0 and dm.cfg.prompt.target_lang == "x"


def test_cli_parses_flat_keys():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SALMDataModule, "data")
    cfg = parser.parse_args(["--data.max_duration=5", "--data.prompt.target_lang=french", "--data.seed=3"])
    dm = parser.instantiate_classes(cfg).data
    assert (dm.cfg.max_duration, dm.cfg.seed, dm.cfg.prompt.target_lang) == (5.0, 3, "french")


def test_no_tokenizer_is_a_clear_error(corpus):
    dm = make_dm(corpus, tokenizer_path=None)
    with pytest.raises(ValueError, match="--data.tokenizer_path or call SALMDataModule.set_tokenizer"):
        dm.train_dataloader()
    dm.set_tokenizer(train_tokenizer(["zero one"], None, 80))
    assert len(ids_of(dm.train_dataloader())) > 0


# ---- loaders -----------------------------------------------------------------------------------
def test_loaders_cover_every_cut_from_any_cwd(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "audio")  # relative audio paths resolve from the manifest dir
    dm = make_dm(corpus)
    train = [i for b in ids_of(dm.train_dataloader()) for i in b]
    assert sorted(train) == [f"c{i:03d}" for i in range(12)]
    val = [i for b in ids_of(dm.val_dataloader()) for i in b]
    assert val == [f"c{i:03d}" for i in range(12)]  # manifest order, nothing dropped
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_dropped"] == 0 and batch["audios"].shape[0] == len(batch["ids"])
    assert all(c.recording.sources[0].source.startswith(str(tmp_path)) for c in load_cuts(corpus[0]))
    assert make_dm(corpus, val_manifest=None).val_dataloader() == []


def pos(state: dict) -> dict:
    return {k: state[k] for k in ("epoch", "batches_done")}


def test_resume_mid_epoch_continues_with_the_next_batch(corpus):
    full = ids_of(make_dm(corpus).train_dataloader())
    assert len(full) >= 5

    loader = make_dm(corpus).train_dataloader()
    it = iter(loader)
    first3 = [tuple(next(it)["ids"]) for _ in range(3)]
    state = loader.state_dict()
    assert pos(state) == {"epoch": 0, "batches_done": 3} and first3 == full[:3]

    fresh = make_dm(corpus).train_dataloader()
    fresh.load_state_dict(state)
    assert ids_of(fresh, 1) == [full[3]]
    # the rest of the epoch, and the count keeps growing from 3 (a second resume stays aligned)
    fresh = make_dm(corpus).train_dataloader()
    fresh.load_state_dict(state)
    assert ids_of(fresh) == full[3:]
    assert pos(fresh.state_dict()) == {"epoch": 0, "batches_done": len(full)}


def test_epochs_reshuffle_deterministically_and_resume(corpus):
    loader = make_dm(corpus).train_dataloader()
    epoch0 = ids_of(loader)
    loader.sampler.set_epoch(1)
    epoch1 = ids_of(loader)
    assert epoch1 != epoch0 and sorted(sum(epoch1, ())) == sorted(sum(epoch0, ()))

    other = make_dm(corpus).train_dataloader()
    other.sampler.set_epoch(1)
    assert ids_of(other) == epoch1  # same seed + epoch -> same order
    assert ids_of(make_dm(corpus, seed=8).train_dataloader()) != epoch0

    fresh = make_dm(corpus).train_dataloader()
    fresh.load_state_dict({"epoch": 1, "batches_done": 2})
    assert ids_of(fresh) == epoch1[2:]

    # a state taken after the last batch of epoch 0 continues with epoch 1
    done = make_dm(corpus).train_dataloader()
    done.load_state_dict({"epoch": 0, "batches_done": len(epoch0)})
    assert ids_of(done) == epoch1
    assert pos(done.state_dict()) == {"epoch": 1, "batches_done": len(epoch1)}


def test_resume_with_other_data_restarts_the_stream_and_says_so(corpus):
    loader = make_dm(corpus).train_dataloader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state["stream"]["seed"] == make_dm(corpus).cfg.seed and state["dp_size"] == 1
    other = make_dm(corpus, seed=8).train_dataloader()  # another stream: its own order
    with pytest.warns(UserWarning, match=r"training data differ from the checkpoint's \(data.seed\).*epoch 0, "
                                         r"batch 3.*starts from its beginning"):
        other.load_state_dict(state)
    assert ids_of(other) == ids_of(make_dm(corpus, seed=8).train_dataloader())


def test_resume_on_another_data_parallel_size_keeps_the_global_position(corpus):
    full = ids_of(make_dm(corpus).train_dataloader())
    assert len(full) >= 5
    fresh = make_dm(corpus).train_dataloader()  # one process
    state = {"epoch": 0, "batches_done": 2, "stream": fresh.stream, "dp_size": 2}  # 2 ranks took 2 batches each
    with pytest.warns(UserWarning, match="resuming on 1 data-parallel ranks from a checkpoint of 2: the 4 batches"):
        fresh.load_state_dict(state)
    assert ids_of(fresh) == full[4:]
    fresh = make_dm(corpus).train_dataloader()
    fresh.dp_size = 3  # 4 batches over 3 ranks: 1 each, 1 read again
    with pytest.warns(UserWarning, match=r"skipped as 1 per rank \(1 more are read again\)"):
        fresh.load_state_dict(state)
    assert fresh.sampler.skip == 1


def test_resume_with_a_worker_process(corpus):
    full = ids_of(make_dm(corpus).train_dataloader())
    loader = make_dm(corpus, num_workers=1).train_dataloader()
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()  # the worker has read ahead; only yielded batches count
    assert state["batches_done"] == 2
    fresh = make_dm(corpus, num_workers=1).train_dataloader()
    fresh.load_state_dict(state)
    assert ids_of(fresh) == full[2:]


# ---- resume inside a Lightning Trainer -----------------------------------------------------------
def _fit(corpus, root, ckpt_path=None, callbacks=(), **trainer_kw):
    model = BatchRecorder()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), default_root_dir=str(root), **trainer_kw,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, make_dm(corpus), ckpt_path=ckpt_path)
    assert not [w for w in caught if "before the checkpoint was restored" in str(w.message)]
    return model.seen


def _step(path) -> int:
    return int(re.search(r"step=(\d+)", path.name).group(1))


def test_lightning_resume_from_step_checkpoints(corpus, tmp_path):
    """Lightning saves loader.state_dict() in checkpoints and restores it: the resumed run sees
    exactly the batches the interrupted run had not trained on (mid-epoch, last batch of an
    epoch, next epoch), even though Lightning's fetcher reads one batch ahead."""
    every_step = ModelCheckpoint(tmp_path / "ck", filename="{epoch}-{step}", every_n_train_steps=1, save_top_k=-1)
    full = _fit(corpus, tmp_path, callbacks=[every_step])
    ckpts = {_step(p): p for p in (tmp_path / "ck").glob("*.ckpt")}
    per_epoch = max(_step(p) for p in (tmp_path / "ck").glob("epoch=0-*.ckpt"))  # last step of epoch 0
    assert 3 < per_epoch < len(full) - 2
    saved = torch.load(ckpts[3], weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert [pos(s) for s in saved] == [{"epoch": 0, "batches_done": 3}]  # not 4: the prefetched batch is not done
    for step in (3, per_epoch, per_epoch + 2):
        assert full[:step] + _fit(corpus, tmp_path, ckpt_path=ckpts[step]) == full, f"resume at step {step}"

    # resume twice: checkpoint of a resumed run
    again = ModelCheckpoint(tmp_path / "ck2", filename="{epoch}-{step}", every_n_train_steps=1, save_top_k=-1)
    _fit(corpus, tmp_path, ckpt_path=ckpts[2], callbacks=[again])
    second = {_step(p): p for p in (tmp_path / "ck2").glob("*.ckpt")}
    assert full[: per_epoch + 1] + _fit(corpus, tmp_path, ckpt_path=second[per_epoch + 1]) == full


def test_lightning_resume_from_epoch_end_and_validation_checkpoints(corpus, tmp_path):
    epoch_end = ModelCheckpoint(tmp_path / "ep", filename="{epoch}-{step}", save_top_k=-1, save_on_train_epoch_end=True)
    full = _fit(corpus, tmp_path, callbacks=[epoch_end])
    (first_epoch,) = [p for p in (tmp_path / "ep").glob("epoch=0-*.ckpt")]
    assert full[: _step(first_epoch)] + _fit(corpus, tmp_path, ckpt_path=first_epoch) == full

    # saved at the end of a mid-epoch validation run
    val_every_3 = dict(val_check_interval=3, check_val_every_n_epoch=None)
    on_val = ModelCheckpoint(tmp_path / "val", filename="{epoch}-{step}", save_top_k=-1, save_on_train_epoch_end=False)
    full = _fit(corpus, tmp_path, callbacks=[on_val], **val_every_3)
    ckpt = tmp_path / "val" / "epoch=0-step=3.ckpt"
    assert full[:3] + _fit(corpus, tmp_path, ckpt_path=ckpt, **val_every_3) == full


class _StepsFromLoader(BatchRecorder):
    def configure_optimizers(self):
        self.trainer.estimated_stepping_batches  # builds the train loader before the restore
        return super().configure_optimizers()


def test_loader_built_before_the_restore_is_flagged(corpus, tmp_path):
    ck = ModelCheckpoint(tmp_path / "ck", filename="{epoch}-{step}", every_n_train_steps=3, save_top_k=-1)
    _fit(corpus, tmp_path, callbacks=[ck], max_steps=3)
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.warns(UserWarning, match="before the checkpoint was restored"):
        trainer.fit(_StepsFromLoader(), make_dm(corpus), ckpt_path=tmp_path / "ck" / "epoch=0-step=3.ckpt")


def test_reorder_serves_the_cuts_sorted_stably(sine_corpus):
    """evaluate --decode ctc* batches ASR cuts first (a batch whose rows all carry a CTC draft can finish in one
    forward): reorder sorts a split's cuts by a key, manifest order kept among equal keys."""
    manifest = str(sine_corpus(n=7))  # c002 and c005 are ast cuts
    dm = SALMDataModule(test_manifest=manifest)
    dm.reorder("test", key=lambda cut: cut.supervisions[0].custom["task"] != "asr")
    assert [c.id for c in dm._cutset("test")] == ["c000", "c001", "c003", "c004", "c006", "c002", "c005"]
