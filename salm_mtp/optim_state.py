"""Optimizer state matched to parameters by name, never by position.

A torch optimizer's ``state_dict()`` keys its state by the position of each parameter in its groups. Positions
change whenever the set of trainable parameters or the group rule changes, and they mean nothing across the
forms a checkpoint can take:

- one process (Lightning ``.ckpt``): positions, with each group's ``param_names`` (the optimizer is built from
  named parameters: salm_mtp/optim.py);
- FSDP2 (sharded DCP directory, or ``get_optimizer_state_dict``): state keyed by parameter name (FQN), each
  group's ``params`` a list of names.

``by_name`` reads either form as {name: state}; ``for_optimizer`` rewrites either for one optimizer's current
groups (``register_by_name_loading`` makes every ``optimizer.load_state_dict`` do so); ``fqn_form`` gives the
name-keyed form FSDP2's ``set_optimizer_state_dict`` takes.
"""

from __future__ import annotations

from typing import Any

from salm_mtp.errors import SalmError


class OptimizerStateError(SalmError):
    """An optimizer state that cannot be matched to the parameters by name."""


def _group_names(group: dict) -> list[str]:
    """The parameter names of one saved group (FQN form: ``params``; position form: ``param_names``)."""
    params = list(group.get("params", []))
    if params and all(isinstance(p, str) for p in params):
        return params
    names = group.get("param_names")
    if names is None or len(names) != len(params):
        raise OptimizerStateError(
            "the checkpoint's optimizer state has no parameter names (written by an older salm_mtp, whose "
            "optimizer was built from unnamed parameters): it can only be resumed by the same number of processes "
            "with the same trainable parameters; to change those, start a new run from salm-mtp export")
    return list(names)


def by_name(state_dict: dict) -> tuple[dict[str, dict], list[dict]]:
    """({parameter name: its state}, the groups with ``params`` as names) of either saved form."""
    state = state_dict.get("state", {})
    named: dict[str, dict] = {}
    groups = []
    for group in state_dict.get("param_groups", []):
        names = _group_names(group)
        for key, name in zip(group["params"], names):
            if key in state:
                named[name] = state[key]
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        groups.append({**hyper, "params": names})
    return named, groups


def has_names(state_dict: dict) -> bool:
    """Whether every group of a saved optimizer state names its parameters."""
    try:
        by_name(state_dict)
    except OptimizerStateError:
        return False
    return True


def fqn_form(state_dict: dict) -> dict:
    """The name-keyed form (state by name, groups listing names) that FSDP2's ``set_optimizer_state_dict`` reads."""
    named, groups = by_name(state_dict)
    return {"state": named, "param_groups": groups}


def for_optimizer(saved: dict, current: dict, shapes: dict[str, tuple] | None = None) -> tuple[dict, list, list]:
    """(``saved`` rewritten for the optimizer whose ``state_dict()`` is ``current``, names whose saved state is
    dropped (no longer trained), names that start from fresh state (newly trained)).

    Each current group takes the hyperparameters (lr, initial_lr, ...) of the saved group that shares most of its
    parameters (its own when none does). ``shapes`` ({name: parameter shape}, optional) checks every saved moment
    against the parameter it now belongs to.
    """
    named, saved_groups = by_name(saved)
    groups, state = [], {}
    taken: set[str] = set()
    for group in current["param_groups"]:
        names = _group_names(group)
        overlap = [len(set(names) & set(g["params"])) for g in saved_groups]
        best = max(range(len(saved_groups)), key=lambda i: overlap[i]) if saved_groups else None
        source = saved_groups[best] if best is not None and overlap[best] else group
        hyper = {k: v for k, v in source.items() if k not in ("params", "param_names")}
        groups.append({**hyper, "params": list(group["params"]), "param_names": names})
        for key, name in zip(group["params"], names):
            if name in named:
                _check_shapes(name, named[name], shapes)
                state[key] = named[name]
                taken.add(name)
    current_names = {n for g in current["param_groups"] for n in _group_names(g)}
    dropped = sorted(set(named) - current_names)
    fresh = sorted(current_names - taken)
    return {"state": state, "param_groups": groups}, dropped, fresh


def _check_shapes(name: str, state: dict, shapes: dict[str, tuple] | None) -> None:
    if not shapes or name not in shapes:
        return
    for key, value in state.items():
        shape = tuple(getattr(value, "shape", ()))
        if shape and shape != tuple(shapes[name]):
            raise OptimizerStateError(
                f"the checkpoint's optimizer state {key!r} of parameter {name!r} has shape {list(shape)}, the "
                f"parameter has {list(shapes[name])}: the checkpoint was trained with another model build")


def same_layout(saved: dict, current: dict) -> bool:
    """Whether ``saved`` lists the same parameter names in the same groups and order as ``current``."""
    try:
        return [_group_names(g) for g in saved["param_groups"]] == [_group_names(g) for g in current["param_groups"]]
    except (OptimizerStateError, KeyError):
        return False


def register_by_name_loading(optimizer, shapes_of=None, report=print) -> None:
    """Make ``optimizer.load_state_dict`` match the saved state to the parameters by name (either form). A state
    without names loads by position, as torch does, only when its groups have the current sizes. ``report``
    gets one line when state is dropped or started fresh; ``shapes_of()`` gives {name: shape} for the check."""

    def hook(opt, state_dict: dict) -> dict[str, Any]:
        current = opt.state_dict()
        if not has_names(state_dict):
            sizes = [len(g["params"]) for g in state_dict.get("param_groups", [])]
            if sizes != [len(g["params"]) for g in current["param_groups"]]:
                _group_names(state_dict["param_groups"][0])  # raises the error that names the way out
            return state_dict
        if same_layout(state_dict, current) and all(isinstance(k, int) for k in state_dict.get("state", {})):
            return state_dict
        out, dropped, fresh = for_optimizer(state_dict, current, shapes_of() if shapes_of else None)
        if dropped or fresh:
            report(change_line(dropped, fresh))
        return out

    optimizer.register_load_state_dict_pre_hook(hook)


def change_line(dropped: list[str], fresh: list[str]) -> str:
    """One line: which parameters' optimizer state was dropped or starts fresh on resume."""

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = ([f"{len(dropped)} no longer trained, their state dropped ({names(dropped)})"] if dropped else []) + \
            ([f"{len(fresh)} newly trained, starting from fresh state ({names(fresh)})"] if fresh else [])
    return "optimizer state matched by parameter name: " + "; ".join(parts)
