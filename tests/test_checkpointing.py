"""salm_mtp/checkpointing.py and io/sharded.py: in-progress names, atomic publish, `last` links, retention,
failed writes (one process; the sharded and asynchronous kind: tests/recipes/test_fsdp2_fit.py)."""

import errno
import os

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.demos.boring_classes import BoringModel

from salm_mtp.io.sharded import SALMCheckpointIO
from salm_mtp.checkpointing import (SALMCheckpoint, SaveTracker, done_future, failed_future, inprogress_path, point)
from salm_mtp.errors import SalmError


def test_tracker_publishes_finished_saves_and_runs_what_waits_on_them(tmp_path):
    from concurrent.futures import Future

    final, tmp = str(tmp_path / "step2.ckpt"), inprogress_path(str(tmp_path / "step2.ckpt"))
    assert os.path.basename(tmp) == ".step2.ckpt.inprogress"
    os.makedirs(tmp)
    warned, ran = [], []
    saves = SaveTracker(warn=warned.append)
    future: Future = Future()
    saves.start(final, tmp, future)
    saves.when_published(final, lambda: ran.append("link"))
    saves.poll()
    assert ran == [] and not os.path.exists(final)  # still being written
    future.set_result(None)
    saves.poll()
    assert ran == ["link"] and os.path.isdir(final) and not os.path.exists(tmp)
    saves.when_published(final, lambda: ran.append("later"))  # already published: at once
    assert ran == ["link", "later"] and warned == []


def test_tracker_reports_a_failed_write_in_one_line_and_keeps_the_previous(tmp_path):
    warned, ran = [], []
    saves = SaveTracker(warn=warned.append)
    good = str(tmp_path / "step2.ckpt")
    os.makedirs(inprogress_path(good))
    saves.start(good, inprogress_path(good), done_future())
    bad = str(tmp_path / "step4.ckpt")
    os.makedirs(inprogress_path(bad))
    saves.start(bad, inprogress_path(bad), failed_future(OSError(errno.ENOSPC, "No space left on device")))
    saves.when_published(bad, lambda: ran.append("link"))
    assert ran == [] and not os.path.exists(bad) and not os.path.exists(inprogress_path(bad))
    assert warned == [f"checkpoint {bad} was not saved (OSError: [Errno 28] No space left on device); the previous "
                      f"checkpoint {good} stays the one to resume; training goes on"]


def test_point_moves_a_link_atomically(tmp_path):
    (tmp_path / "a.ckpt").write_text("a")
    (tmp_path / "b.ckpt").write_text("b")
    link = str(tmp_path / "last.ckpt")
    point(link, str(tmp_path / "a.ckpt"))
    point(link, str(tmp_path / "b.ckpt"))
    assert os.readlink(link) == "b.ckpt" and open(link).read() == "b"
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "b.ckpt", "last.ckpt"]


def _fit(tmp_path, steps, callback, monkeypatch=None, fail_at=None):
    if fail_at is not None:
        original = TorchCheckpointIO.save_checkpoint

        def save(self, checkpoint, path, storage_options=None):
            if f"s{fail_at}.ckpt" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return original(self, checkpoint, path, storage_options)

        monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", save)
    trainer = L.Trainer(max_steps=steps, callbacks=[callback], plugins=[SALMCheckpointIO()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(BoringModel())
    return trainer


def test_last_is_a_link_to_the_newest_and_keep_last_n_prunes(tmp_path):
    cb = SALMCheckpoint(dirpath=str(tmp_path / "ck"), filename="s{step}", auto_insert_metric_name=False,
                        every_n_train_steps=1, save_top_k=-1, keep_last_n=2, save_last=True)
    _fit(tmp_path, 5, cb)
    assert sorted(os.listdir(tmp_path / "ck")) == ["last.ckpt", "s4.ckpt", "s5.ckpt"]
    assert os.readlink(tmp_path / "ck" / "last.ckpt") == "s5.ckpt"
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["global_step"] == 5


def test_last_follows_the_step_when_top_k_keeps_an_older_checkpoint(tmp_path):
    """save_top_k=1 by a metric that only gets worse: the periodic checkpoint stays at step 1, and `last` names a
    latest-step checkpoint of each newer step (the previous one removed once `last` moved on)."""

    class Worse(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("worse", float(self.global_step))
            return out

    cb = SALMCheckpoint(dirpath=str(tmp_path / "ck"), filename="s{step}", auto_insert_metric_name=False,
                        every_n_train_steps=1, save_top_k=1, monitor="worse", mode="min", save_last=True)
    trainer = L.Trainer(max_steps=3, callbacks=[cb], plugins=[SALMCheckpointIO()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(Worse())
    assert sorted(os.listdir(tmp_path / "ck")) == ["last.ckpt", "latest-step3.ckpt", "s1.ckpt"]
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_failed_write_warns_once_and_keeps_last_on_the_previous(tmp_path, monkeypatch):
    cb = SALMCheckpoint(dirpath=str(tmp_path / "ck"), filename="s{step}", auto_insert_metric_name=False,
                        every_n_train_steps=1, save_top_k=-1, save_last=True)
    with pytest.warns(UserWarning, match=r"s3\.ckpt was not saved \(OSError: \[Errno 28\] No space left on device"
                                         r".*s2\.ckpt stays the one to resume; training goes on"):
        _fit(tmp_path, 3, cb, monkeypatch, fail_at=3)
    assert sorted(os.listdir(tmp_path / "ck")) == ["last.ckpt", "s1.ckpt", "s2.ckpt"]  # no partial file either
    assert os.readlink(tmp_path / "ck" / "last.ckpt") == "s2.ckpt"


def test_keep_last_n_needs_save_top_k_minus_one():
    with pytest.raises(SalmError, match="set its save_top_k to -1"):
        SALMCheckpoint(every_n_train_steps=1, keep_last_n=2)
    with pytest.raises(SalmError, match="keep_last_n must be an integer >= 1"):
        SALMCheckpoint(every_n_train_steps=1, keep_last_n=0, save_top_k=-1)


def test_a_write_over_the_file_size_limit_names_the_file(tmp_path):
    """torch.save past a file size limit (ulimit -f; a full disk fails the same way) raises a RuntimeError from its
    zip writer that names nothing; the save becomes the tracker's one line naming the checkpoint, with the disk's free
    space, and the half-written file is removed. In a subprocess: the limit is per process."""
    import subprocess
    import sys

    script = f"""
import resource, signal, torch
from salm_mtp.checkpointing import SaveTracker, write_file_atomically
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
saves = SaveTracker(warn=print)
saves.published.append("{tmp_path}/step3.ckpt")
write_file_atomically(lambda tmp: torch.save({{"w": torch.ones(100_000)}}, tmp), "{tmp_path}/step6.ckpt", saves)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = out.stdout.strip().splitlines()
    assert line.startswith(f"checkpoint {tmp_path}/step6.ckpt was not saved (OSError: writing ")
    assert "MiB free on that disk; is it full, or a file size limit (ulimit -f) reached?)" in line
    assert line.endswith(f"the previous checkpoint {tmp_path}/step3.ckpt stays the one to resume; training goes on")
    assert sorted(os.listdir(tmp_path)) == []  # no half-written file left
