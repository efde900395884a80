"""salm_mtp/optim_state.py: optimizer state matched to parameters by name, in both saved forms."""

import pytest
import torch

from salm_mtp.optim_state import (OptimizerStateError, by_name, fqn_form, for_optimizer, register_by_name_loading)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))


def _adamw(model, trainable=None):
    """Our group rule (salm_mtp/optim.py): matrices decay, vectors do not; named parameters."""
    named = [(n, p) for n, p in model.named_parameters() if trainable is None or n in trainable]
    groups = [{"params": [(n, p) for n, p in named if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [(n, p) for n, p in named if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    register_by_name_loading(opt, lambda: {n: tuple(p.shape) for n, p in model.named_parameters()},
                             report=lambda line: lines.append(line))
    return opt


lines: list[str] = []


def _step(model, opt, seed=1):
    torch.manual_seed(seed)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    opt.zero_grad()


def test_by_name_reads_the_position_form_and_the_fqn_form_alike():
    model = _model()
    opt = _adamw(model)
    _step(model, opt)
    pos = opt.state_dict()
    named, groups = by_name(pos)
    assert [g["params"] for g in groups] == [["0.weight", "2.weight"], ["0.bias", "1.weight", "1.bias", "2.bias"]]
    params = dict(model.named_parameters())
    for name, state in named.items():  # each moment belongs to the parameter it names
        assert state["exp_avg"].shape == params[name].shape
        assert torch.equal(state["exp_avg"], opt.state[params[name]]["exp_avg"])
    named2, groups2 = by_name(fqn_form(pos))
    assert groups2 == groups and set(named2) == set(named)


def test_load_matches_by_name_when_the_group_order_differs():
    """A saved state whose groups list the parameters in another order (another group rule, another code
    version, FSDP2's name-keyed form) lands on the right parameters; torch alone would load it by position."""
    model = _model()
    opt = _adamw(model)
    _step(model, opt)
    saved = opt.state_dict()
    reversed_groups = {"state": {}, "param_groups": []}  # same content, groups and names in reverse order
    for g in reversed(saved["param_groups"]):
        ids = list(reversed(g["params"]))
        reversed_groups["param_groups"].append({**g, "params": ids, "param_names": list(reversed(g["param_names"]))})
    reversed_groups["state"] = saved["state"]
    fresh_model = _model()
    fresh = _adamw(fresh_model)
    fresh.load_state_dict(reversed_groups)
    params, ref = dict(fresh_model.named_parameters()), dict(model.named_parameters())
    for name in params:
        assert torch.equal(fresh.state[params[name]]["exp_avg"], opt.state[ref[name]]["exp_avg"]), name
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.1, 0.0]


def test_a_changed_freeze_list_drops_and_starts_state_by_name():
    model = _model()
    opt = _adamw(model, trainable={"0.weight", "0.bias", "1.weight"})
    _step(model, opt)
    saved = opt.state_dict()
    lines.clear()
    model2 = _model()
    opt2 = _adamw(model2, trainable={"0.weight", "2.weight", "2.bias"})  # 0.bias, 1.weight frozen; 2.* new
    opt2.load_state_dict(saved)
    p2, p1 = dict(model2.named_parameters()), dict(model.named_parameters())
    assert torch.equal(opt2.state[p2["0.weight"]]["exp_avg"], opt.state[p1["0.weight"]]["exp_avg"])
    assert p2["2.weight"] not in opt2.state and p2["2.bias"] not in opt2.state  # fresh: created at the first step
    assert lines == ["optimizer state matched by parameter name: 2 no longer trained, their state dropped "
                     "(0.bias, 1.weight); 2 newly trained, starting from fresh state (2.bias, 2.weight)"]
    _step(model2, opt2)  # trains on
    assert int(opt2.state[p2["0.weight"]]["step"]) == 2 and int(opt2.state[p2["2.weight"]]["step"]) == 1


def test_shape_mismatch_and_unnamed_state_name_the_problem():
    model = _model()
    opt = _adamw(model)
    _step(model, opt)
    saved = opt.state_dict()
    wrong = for_optimizer
    bad = {"state": {0: {"exp_avg": torch.zeros(7, 7)}}, "param_groups": [
        {**saved["param_groups"][0], "params": [0], "param_names": ["0.weight"]}]}
    with pytest.raises(OptimizerStateError, match=r"'exp_avg' of parameter '0.weight' has shape \[7, 7\]"):
        wrong(bad, opt.state_dict(), {"0.weight": (4, 3)})
    unnamed = {"state": saved["state"], "param_groups": [
        {k: v for k, v in g.items() if k != "param_names"} for g in saved["param_groups"]][:1]}
    with pytest.raises(OptimizerStateError, match="no parameter names"):
        _adamw(_model()).load_state_dict(unnamed)
    same_sizes = {"state": saved["state"], "param_groups": [
        {k: v for k, v in g.items() if k != "param_names"} for g in saved["param_groups"]]}
    fresh = _adamw(_model())
    fresh.load_state_dict(same_sizes)  # an older checkpoint of the same layout still loads by position
    assert len(fresh.state) == 6
