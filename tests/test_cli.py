"""End-to-end CLI runs (in this process: tests/cli_run.py): fit writes checkpoints and metrics; resume continues
exactly; every subcommand's --help. The top-level --help runs as a subprocess: the console entry point's smoke test."""

import csv
import glob
import os
import subprocess
import sys

import pytest
import yaml

from cli_run import run_cli
from tiny import logged_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fit(run_dir, manifest, tok_dir, *extra):
    out = run_cli(["fit", "--config", os.path.join(ROOT, "conf/tiny.yaml"),
                   f"--trainer.default_root_dir={run_dir}", f"--model.tokenizer_path={tok_dir}",
                   f"--data.train_manifest={manifest}", f"--data.val_manifest={manifest}", "--data.test_manifest=null",
                   "--trainer.enable_progress_bar=false", *extra])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _metrics(run_dir):
    (path,) = glob.glob(os.path.join(run_dir, "salm/version_*/metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_run(corpus, tok_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("full"))
    out = _fit(run, corpus, tok_dir)
    return run, out


def test_fit_writes_checkpoints_metrics_and_config(full_run):
    run, out = full_run
    version = glob.glob(os.path.join(run, "salm/version_*"))[0]
    ckpts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(version, "checkpoints/*.ckpt")))
    assert ckpts == ["last.ckpt", "step3.ckpt", "step6.ckpt"]
    rows = _metrics(run)
    cols = set(rows[0])
    for c in ["loss", "main_loss", "mtp_loss", "mtp_loss/depth_1", "mtp_loss/depth_2", "mtp_acc/depth_1",
              "mtp_acc/depth_2", "ctc_loss", "val_loss", "val_mtp_loss", "val_mtp_acc/depth_1", "lr"]:
        assert c in cols, c
    losses = logged_losses(run)
    assert sorted(losses) == [0, 1, 2, 3, 4, 5]
    for r in rows:  # loss = main_loss + mtp_loss + ctc_weight * ctc_loss (conf/tiny.yaml: 0.3), as logged
        if r.get("loss"):
            parts = float(r["main_loss"]) + float(r["mtp_loss"]) + 0.3 * float(r["ctc_loss"])
            assert float(r["loss"]) == pytest.approx(parts, rel=1e-6)
    cfg = yaml.safe_load(open(os.path.join(version, "config.yaml")))
    assert cfg["trainer"]["logger"][0]["init_args"]["save_dir"] == run  # interpolation saw the override
    assert cfg["data"]["tokenizer_path"] == cfg["model"]["tokenizer_path"]
    assert os.path.isfile(os.path.join(version, "tokenizer/tokenizer.json"))
    assert "checkpoint:" in out.stdout + out.stderr and "last.ckpt" in out.stdout + out.stderr


def test_resume_continues_with_same_next_batch_loss(full_run, corpus, tok_dir, tmp_path):
    run, _ = full_run
    step3 = glob.glob(os.path.join(run, "salm/version_*/checkpoints/step3.ckpt"))[0]
    _fit(str(tmp_path), corpus, tok_dir, f"--ckpt_path={step3}")
    full, resumed = logged_losses(run), logged_losses(str(tmp_path))
    assert sorted(resumed) == [3, 4, 5]  # continues at the right step
    for step in (3, 4, 5):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_bad_override_names_the_key(corpus, tok_dir, tmp_path):
    out = run_cli(["fit", "--config", os.path.join(ROOT, "conf/tiny.yaml"), f"--model.tokenizer_path={tok_dir}",
                   f"--data.train_manifest={corpus}", "--model.mtp.num_layers=-1"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: model.mtp.num_layers: must be >= 0, got -1; set --model.mtp.num_layers" in out.stderr


def test_predict_writes_hypotheses(full_run, corpus, tok_dir, tmp_path):
    import json

    run, _ = full_run
    last = glob.glob(os.path.join(run, "salm/version_*/checkpoints/last.ckpt"))[0]
    out = run_cli(["predict", "--config", os.path.join(ROOT, "conf/tiny.yaml"),
                   f"--trainer.default_root_dir={tmp_path}", f"--model.tokenizer_path={tok_dir}",
                   f"--data.train_manifest={corpus}", "--data.val_manifest=null", f"--data.test_manifest={corpus}",
                   f"--ckpt_path={last}", "--trainer.enable_progress_bar=false"])
    assert out.returncode == 0, out.stderr[-4000:]
    (path,) = glob.glob(os.path.join(str(tmp_path), "salm/version_*/predictions.jsonl"))
    rows = [json.loads(line) for line in open(path)]
    assert sorted(r["id"] for r in rows) == [f"c{i:03d}" for i in range(24)]
    assert all(set(r) == {"id", "task", "ref", "hyp"} and isinstance(r["hyp"], str) for r in rows)


def test_fit_help_shows_config_field_docstrings():
    out = run_cli(["fit", "--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert "--model.mtp.num_layers NUM_LAYERS Depths D (num_nextn_predict_layers)" in text
    assert "--model.parallel.frozen_dtype FROZEN_DTYPE Storage dtype of frozen parameters" in text


# ------------------------------------------------------------------------------------------ --help of every subcommand
MTP_LAYERS_HELP = "--model.mtp.num_layers NUM_LAYERS Depths D (num_nextn_predict_layers)"
DATA_HELP = "--data.max_cuts MAX_CUTS {doc}"  # {doc}: the first words of DataConfig.max_cuts's docstring
NESTED_HELP = {  # subcommand argv -> a docstring line of a nested key (LightningCLI / jsonargparse subcommands; fit:
    # test_fit_help_shows_config_field_docstrings)
    ("validate",): (MTP_LAYERS_HELP, DATA_HELP),
    ("test",): (MTP_LAYERS_HELP, DATA_HELP),
    ("predict",): (MTP_LAYERS_HELP, DATA_HELP),
    ("plan",): (MTP_LAYERS_HELP,),
    ("pretrain-encoder", "fit"): ("--model.encoder.hidden_size HIDDEN_SIZE Encoder width (inline build only)",
                                  DATA_HELP),
}
OPTION_HELP = {  # subcommands whose parser salm_mtp/options.py generates -> one option's help
    "evaluate": "--decode {greedy,mtp,ctc,ctc+mtp,auto} greedy, or also self-speculative decoding",
    "export": "--mtp-depths MTP_DEPTHS export only the MTP head's first N depths",
    "validate-data": "MANIFEST lhotse CutSet manifest(s)",
    "make-demo-data": "--num-train NUM_TRAIN train utterances (default: 4000)",
}


def _help(capsys, argv) -> str:
    """``salm-mtp ARGV --help`` in this process: exits 0; its text with whitespace runs collapsed."""
    from salm_mtp.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code in (0, None), exit_.value.code
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv", list(NESTED_HELP), ids=" ".join)
def test_trainer_subcommand_help_shows_nested_docstrings(argv, capsys):
    import docstring_parser

    from salm_mtp.data.datamodule import DataConfig

    (doc,) = [p.description for p in docstring_parser.parse_from_object(DataConfig).params if p.arg_name == "max_cuts"]
    text = _help(capsys, argv)
    for line in NESTED_HELP[argv]:
        assert line.format(doc=" ".join(doc.split()[:6])) in text


@pytest.mark.parametrize("sub", list(OPTION_HELP))
def test_generated_subcommand_parsers_document_every_option(sub, capsys, monkeypatch):
    """evaluate, export, validate-data and make-demo-data parse with a parser generated from their option
    dataclass (salm_mtp/options.py): every option has its help, and the program name is the subcommand's."""
    from salm_mtp import options

    parsers = []
    build = options.build_parser

    def spy(*args, **kwargs):
        parsers.append(build(*args, **kwargs))
        return parsers[-1]

    monkeypatch.setattr(options, "build_parser", spy)
    text = _help(capsys, [sub])
    assert OPTION_HELP[sub] in text
    (parser,) = parsers
    undocumented = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert undocumented == []
    assert parser.prog == f"salm-mtp {sub}"


def test_top_level_help_lists_every_subcommand(capsys):
    from salm_mtp.cli import SUBCOMMANDS, main

    out = subprocess.run([sys.executable, "-m", "salm_mtp.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert set(SUBCOMMANDS) == {"fit", "validate", "test", "predict", "evaluate", "export", "plan", "validate-data",
                                "pretrain-encoder", "transcribe", "make-demo-data"}
    for name, (text, _) in SUBCOMMANDS.items():
        assert sum(line.split()[:1] == [name] for line in lines) == 1, name  # one line each
        assert f"  {name}" in out.stdout and text in out.stdout
    with pytest.raises(SystemExit) as exit_:
        main(["evalute"])
    assert exit_.value.code == 2 and "unknown subcommand 'evalute'" in capsys.readouterr().err
