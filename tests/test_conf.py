"""Every YAML in conf/ parses with the real CLI (no model is built: --print_config)."""

import glob
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFS = sorted(glob.glob(os.path.join(ROOT, "conf", "*.yaml")))


def test_conf_dir_is_not_empty():
    assert len(CONFS) >= 5


@pytest.mark.parametrize("conf", CONFS, ids=os.path.basename)
def test_yaml_parses_and_resolves(conf):
    sub = ["pretrain-encoder", "fit"] if "encoder_ctc" in conf else ["fit"]
    cmd = [sys.executable, "-m", "salm_mtp.cli", *sub, "--config", conf, "--print_config"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["data"]["tokenizer_path"] == cfg["model"]["tokenizer_path"]  # interpolation resolved
    assert "${" not in out.stdout
