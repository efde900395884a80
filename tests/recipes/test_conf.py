"""Every YAML in conf/ parses with the real CLI (no model is built: --print_config), run in this process."""

import glob
import os

import pytest
import yaml

from cli_run import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFS = sorted(glob.glob(os.path.join(ROOT, "conf", "*.yaml")))


def test_conf_dir_is_not_empty():
    assert len(CONFS) >= 5


@pytest.mark.parametrize("conf", CONFS, ids=os.path.basename)
def test_yaml_parses_and_resolves(conf):
    sub = ["pretrain-encoder", "fit"] if "encoder_ctc" in conf else ["fit"]
    out = run_cli([*sub, "--config", conf, "--print_config"])
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["data"]["tokenizer_path"] == cfg["model"]["tokenizer_path"]  # interpolation resolved
    assert "${" not in out.stdout
