"""pyproject.toml declares compatible ranges around what requirements.txt pins, the [gpu] extra names the Mamba
kernels, and a fresh venv installs a working ``salm-mtp``."""

import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_dependencies_match_requirements():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    pins = [ln.strip() for ln in open(os.path.join(ROOT, "requirements.txt")) if ln.strip() and not ln.startswith("#")]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    reqs = {r.name: r for r in map(Requirement, declared)}
    pinned = {r.name: r for r in map(Requirement, pins)}
    assert sorted(reqs) == sorted(pinned)  # the same packages
    for name, pin in pinned.items():  # each pin (==X) lies in pyproject's range (a pin or a compatible range)
        (spec,) = pin.specifier
        assert spec.operator == "==" and reqs[name].specifier.contains(spec.version), (name, str(reqs[name]), str(pin))
        assert reqs[name].extras == pin.extras, name
    # torch: the tested minor release, any build (a cluster's own CUDA 2.13.x installs the package); the CPU pin
    # that keeps pip from resolving a CUDA torch here lives in constraints.txt, which every script installs with
    torch = reqs["torch"].specifier
    assert torch.contains("2.13.0") and torch.contains("2.13.1") and not torch.contains("2.14.0")
    assert not torch.contains("2.12.0")
    constraints = [ln.strip() for ln in open(os.path.join(ROOT, "constraints.txt")) if ln.strip() and not ln.startswith("#")]
    assert "torch==2.13.0" in constraints
    for name, req in reqs.items():  # every dependency is a compatible range, not a pin
        assert not any(s.operator in ("==", "===") for s in req.specifier), (name, str(req.specifier))
        assert any(s.operator in ("<", "~=") for s in req.specifier), f"{name}: no upper bound"
    assert project["optional-dependencies"]["dev"] == ["salm_mtp[test]"]
    gpu = {d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["gpu"]}
    assert gpu == {"mamba-ssm", "causal-conv1d"}


@pytest.mark.slow  # ~2 min: a plain venv and every dependency (pip's cache and the local wheels make it offline)
def test_fresh_venv_pip_install_gives_a_working_cli(tmp_path):
    """``pip install . -c constraints.txt`` into a new plain venv (no system site-packages) gives ``salm-mtp``."""
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "salm_mtp"), src / "salm_mtp", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    out = subprocess.run(pip + ["install", "-q", str(src), "-c", str(src / "constraints.txt")],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    check = subprocess.run(pip + ["check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cli = subprocess.run([str(venv / "bin" / "salm-mtp"), "--help"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "fit" in cli.stdout and "make-demo-data" in cli.stdout
    version = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, salm_mtp.data.mix as m; "
                              "print(torch.__version__, m.__file__)"], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env=env)
    torch_version, where = version.stdout.split()
    assert torch_version == "2.13.0+cpu" and where.startswith(str(venv))  # the installed copy, the CPU torch
