"""pyproject.toml declares what requirements.txt pins, and the [gpu] extra names the Mamba kernels."""

import os
import tomllib

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
    assert "torch==2.13.0" in project["dependencies"]  # never let pip resolve a CUDA torch
    gpu = {d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["gpu"]}
    assert gpu == {"mamba-ssm", "causal-conv1d"}
