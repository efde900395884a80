"""salm_mtp/resume.py: the resume rule. Unit tests of the classification, then `salm-mtp fit --ckpt_path` runs
(in this process, the real CLI) on a 3-step tiny checkpoint: refused keys end in one paragraph naming key and both
values; safe keys are applied, listed, and recorded in the resumed run's config.yaml; unspecified ones follow the
checkpoint."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import yaml

from salm_mtp.resume import flatten, is_refused, resolve, unflatten

REPO = Path(__file__).resolve().parents[1]


def test_classification():
    assert is_refused("mtp.num_layers", 2, 1) and is_refused("llm.pattern", "M*", "M-")
    assert is_refused("tokenizer_path", "a", "b") and is_refused("lora.r", 0, 8)
    assert is_refused("encoder.hidden_size", 32, 64) and not is_refused("encoder.dropout", 0.0, 0.1)
    assert not is_refused("mtp.loss_scaling_factor", 0.1, 0.9) and not is_refused("optim.lr", 1e-3, 3e-4)
    assert not is_refused("llm.path", "/a", "/b")
    assert is_refused("ctc_weight", 0.0, 0.5) and not is_refused("ctc_weight", 0.3, 0.5)


def test_resolve_merges_and_sorts_changes():
    saved = flatten({"mtp": {"num_layers": 2, "loss_scaling_factor": 0.1}, "optim": {"lr": 1e-3}, "ctc_weight": 0.3})
    merged, safe, refused = resolve(saved, {"mtp.loss_scaling_factor": 0.9, "optim.lr": 1e-3, "new_key": 5})
    assert safe == [("mtp.loss_scaling_factor", 0.1, 0.9)] and refused == []
    assert unflatten(merged) == {"mtp": {"num_layers": 2, "loss_scaling_factor": 0.9}, "optim": {"lr": 1e-3},
                                 "ctc_weight": 0.3, "new_key": 5}
    _, _, refused = resolve(saved, {"mtp.num_layers": 1})
    assert refused == [("mtp.num_layers", 2, 1)]


def _fit(run: Path, tok_dir: str, corpus: str, *extra: str) -> None:
    from salm_mtp.cli import main

    args = ["fit", "--config", str(REPO / "conf/tiny.yaml"), f"--trainer.default_root_dir={run}",
            f"--model.tokenizer_path={tok_dir}", f"--data.train_manifest={corpus}", "--data.val_manifest=null",
            "--data.test_manifest=null", "--trainer.enable_progress_bar=false", *extra]
    try:
        main(args)
    except SystemExit as e:
        if e.code not in (0, None):
            raise


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok_dir, corpus):
    run = tmp_path_factory.mktemp("trained")
    _fit(run, tok_dir, corpus, "--trainer.max_steps=3")
    (ckpt,) = glob.glob(str(run / "salm/version_*/checkpoints/last.ckpt"))
    return ckpt


def test_a_setting_that_changes_the_tensors_is_refused(trained, tmp_path, tok_dir, corpus, capsys):
    from salm_mtp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "conf/tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
              f"--model.tokenizer_path={tok_dir}", f"--data.train_manifest={corpus}", "--data.val_manifest=null",
              "--data.test_manifest=null", "--trainer.max_steps=5", f"--ckpt_path={trained}",
              "--model.mtp.num_layers=1", "--model.llm.hidden_size=48"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    print(err)
    assert "model.llm.hidden_size: checkpoint 32, now 48" in err and "model.mtp.num_layers: checkpoint 2, now 1" in err
    assert "salm-mtp export --ckpt CKPT --out EXPORT" in err and "Traceback" not in err
    assert not glob.glob(str(tmp_path / "salm/version_*/checkpoints/*.ckpt"))  # nothing trained


def test_safe_settings_are_applied_listed_and_recorded(trained, tmp_path, tok_dir, corpus, capsys):
    _fit(tmp_path, tok_dir, corpus, "--trainer.max_steps=4", f"--ckpt_path={trained}",
         "--model.mtp.loss_scaling_factor=0.9", "--model.optim.lr=0.001")
    out = capsys.readouterr().out
    assert ("resuming with changed settings: model.mtp.loss_scaling_factor 0.1 -> 0.9; model.optim.lr 0.003 -> "
            "0.001") in out
    (cfg,) = glob.glob(str(tmp_path / "salm/version_*/config.yaml"))
    model = yaml.safe_load(open(cfg))["model"]
    assert model["mtp"]["loss_scaling_factor"] == 0.9 and model["optim"]["lr"] == 0.001
    assert model["mtp"]["num_layers"] == 2


def test_unspecified_settings_follow_the_checkpoint(trained, tmp_path, tok_dir, corpus, capsys):
    """No --config at all: the model settings left at their defaults come from the checkpoint (its tiny model
    loads), so --ckpt_path alone resumes the run as it was."""
    from salm_mtp.cli import main

    main(["fit", f"--trainer.default_root_dir={tmp_path}", f"--model.tokenizer_path={tok_dir}",
          f"--data.train_manifest={corpus}", "--data.val_manifest=null", "--data.max_duration=1.0",
          "--trainer.max_steps=4", "--trainer.accelerator=cpu", "--trainer.use_distributed_sampler=false",
          "--trainer.enable_progress_bar=false", "--trainer.logger=false", f"--ckpt_path={trained}"])
    assert "resuming with changed settings" not in capsys.readouterr().out


def test_cli_checkpoint_records_absolute_paths_and_resumes_from_the_relative_ones(tmp_path, tok_dir, corpus,
                                                                                   monkeypatch):
    """A run started with relative paths (cwd = its project) records them absolutely, so `salm-mtp evaluate` loads it
    from any directory; resuming with the same relative flags is no change."""
    import shutil

    import torch

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tok_dir, tmp_path / "tok")
    run = tmp_path / "run"
    _fit(run, "tok", corpus, "--trainer.max_steps=3")
    (ckpt,) = glob.glob(str(run / "salm/version_*/checkpoints/last.ckpt"))
    hp = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert hp["tokenizer_path"] == str(tmp_path / "tok")
    _fit(tmp_path / "resumed", "tok", corpus, "--trainer.max_steps=4", f"--ckpt_path={ckpt}")  # not refused


def test_the_rule_holds_for_a_sharded_checkpoint_directory(trained, tmp_path, tok_dir, corpus, capsys):
    """A sharded checkpoint records its settings in meta.pt: the same refusal, before anything is loaded."""
    import torch

    from salm_mtp.cli import main

    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")  # what check_ckpt_path looks for; nothing else is read before the rule
    hp = torch.load(trained, weights_only=True, map_location="cpu")["hyper_parameters"]
    torch.save({"hyper_parameters": hp, "global_step": 3}, sharded / "meta.pt")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "conf/tiny.yaml"), f"--trainer.default_root_dir={tmp_path / 'run'}",
              f"--model.tokenizer_path={tok_dir}", f"--data.train_manifest={corpus}", "--data.val_manifest=null",
              "--data.test_manifest=null", f"--ckpt_path={sharded}", "--model.mtp.num_layers=3"])
    assert e.value.code == 2
    assert "model.mtp.num_layers: checkpoint 2, now 3" in capsys.readouterr().err


def test_a_one_file_checkpoint_is_checked_against_the_model_both_ways(trained, tmp_path, tok_dir, corpus, capsys):
    """A .ckpt whose tensors differ from the model's (written by another build or code version) is refused in one
    paragraph naming both sides, before any tensor loads; freezing the head on resume is a safe change."""
    import torch

    from salm_mtp.cli import main

    ckpt = torch.load(trained, map_location="cpu", weights_only=False)
    head = next(k for k in ckpt["state_dict"] if k.startswith("llm.mtp."))
    ckpt["state_dict"]["llm.bogus.weight"] = torch.zeros(1)
    del ckpt["state_dict"][head]
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "conf/tiny.yaml"), f"--trainer.default_root_dir={tmp_path / 'run'}",
              f"--model.tokenizer_path={tok_dir}", f"--data.train_manifest={corpus}", "--data.val_manifest=null",
              "--data.test_manifest=null", "--trainer.max_steps=5", f"--ckpt_path={bad}",
              "--model.freeze.patterns=[^llm\\.mtp\\.]"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"1 tensors the model has are not in it ({head})" in err
    assert "1 tensors in it are not in the model (llm.bogus.weight)" in err and "Traceback" not in err
