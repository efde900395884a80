"""pyproject.toml declares compatible ranges around what requirements.txt pins, the [gpu] extra names the Mamba
kernels, and the package installs into a fresh venv as a working ``salm-mtp``."""

import os
import shutil
import subprocess
import sys
import tomllib


from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_package_installs_into_a_fresh_venv_and_gives_a_working_cli(tmp_path):
    """``pip install`` of the package (from a copy of its sources, as pip builds it) into a new venv gives a
    ``salm-mtp`` console script that runs the installed copy with the CPU torch. The venv has no packages of its
    own; it sees this environment's dependencies through a path file (installing them from scratch is
    scripts/setup.sh's job, which CI runs on a fresh machine; test_pyproject_dependencies_match_requirements ties
    pyproject's ranges to those pins), and ``pip check`` confirms they satisfy what pyproject.toml declares."""
    import site
    import sysconfig

    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "salm_mtp"), src / "salm_mtp", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() if p == sysconfig.get_path("purelib")]
    with open(os.path.join(purelib, "zz_dependencies.pth"), "w") as f:  # a plain path: its .pth files stay unread
        f.write("\n".join(deps) + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(venv / "bin" / "python")]
    out = subprocess.run(pip + ["install", "-q", "--no-deps", "--no-build-isolation", str(src)],
                         capture_output=True, text=True, timeout=600)
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
