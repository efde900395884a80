"""What each rank holds under the real FSDP2 plan (over a fake process group) and its bytes per rank."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass

import torch
from salm_mtp.plan.build import ROOT_UNIT


@contextlib.contextmanager
def fake_data_parallel(world_size: int):
    """A ``data_parallel`` device mesh over a fake process group of ``world_size`` ranks (this process is rank 0).

    No process is started and collectives are no-ops: enough for ``fully_shard`` on meta parameters. The group
    is destroyed on exit, so the planner leaves no distributed state behind.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}; set --world_size")
    if dist.is_initialized():
        raise RuntimeError("salm-mtp plan needs its own fake process group: run it outside torch.distributed")
    hook = sys.excepthook  # init_process_group installs a rank-prefixing one that destroy_process_group keeps
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


@dataclass
class ParamRecord:
    """One parameter as FSDP2 sharded it."""

    name: str
    shape: tuple[int, ...]
    """Global (unsharded) shape."""
    dtype: torch.dtype
    """Storage dtype."""
    trainable: bool
    group: str
    """FSDP group (module name; ``<root>`` for the SALMModule)."""
    compute_dtype: torch.dtype
    """Dtype the group all-gathers it in (its MixedPrecisionPolicy.param_dtype, else the storage dtype)."""

    def local_numel(self, n: int) -> int:
        """Elements of rank 0's shard (= every rank's padded shard) over ``n`` ranks: ceil(d0 / n) rows."""
        if not self.shape:
            return 1
        return math.ceil(self.shape[0] / n) * math.prod(self.shape[1:])

    def gathered_numel(self, n: int) -> int:
        """Elements of the unsharded all-gather output over ``n`` ranks (padded to n equal shards)."""
        return self.local_numel(n) * n


def group_policy_dtype(fsdp_module, default: torch.dtype | None) -> torch.dtype | None:
    state = fsdp_module._get_fsdp_state()  # FSDP2 internals; falls back to the config's param_dtype
    group = getattr(state, "_fsdp_param_group", None)
    policy = getattr(group, "mp_policy", None) or getattr(state, "_mp_policy", None)
    return policy.param_dtype if policy is not None else default


def shard_records(module, world_size: int) -> tuple[list[ParamRecord], list[str]]:
    """Shard ``module`` (on meta) with the real plan over a fake group; returns its parameters and group names.

    Checks that rank 0's local shapes match ``ParamRecord.local_numel`` (dim-0 chunks), which the planner then
    uses for any other world size.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from salm_mtp.parallel import _dtype, check_parallel_config, shard_module

    check_parallel_config(module)
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # shard_module logs one line per group
    try:
        with fake_data_parallel(world_size) as mesh:
            shard_module(module, mesh["data_parallel"])
            default = _dtype(module.cfg_parallel.param_dtype)
            groups = {name: group_policy_dtype(m, default) for name, m in module.named_modules()
                      if isinstance(m, FSDPModule)}
            records = []
            for name, p in module.named_parameters():
                owner = max((g for g in groups if g == "" or name.startswith(g + ".")), key=len)
                cdt = groups[owner] if groups[owner] is not None and p.dtype.is_floating_point else p.dtype
                rec = ParamRecord(name, tuple(p.shape), p.dtype, p.requires_grad, owner or ROOT_UNIT, cdt)
                local = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                if local != rec.local_numel(world_size):
                    raise RuntimeError(f"{name}: FSDP2 gave rank 0 {local} elements, the planner expected "
                                       f"{rec.local_numel(world_size)} (dim-0 chunks); salm_mtp.plan needs updating")
                records.append(rec)
    finally:
        quiet.setLevel(level)
    return records, [g or ROOT_UNIT for g in groups]


def group_sizes(records: list[ParamRecord], n: int, reduce_dtype: torch.dtype | None) -> dict[str, dict]:
    """Per FSDP group: parameters, unsharded all-gather bytes and the backward gradient-buffer peak over n ranks."""
    out: dict[str, dict] = {}
    for r in records:
        g = out.setdefault(r.group, {"params": 0, "gathered_bytes": 0, "grad_buffer_bytes": 0, "trainable": False})
        g["params"] += math.prod(r.shape)
        g["gathered_bytes"] += r.gathered_numel(n) * r.compute_dtype.itemsize
        if r.trainable:  # autograd's unsharded gradient + the reduce-scatter input
            g["trainable"] = True
            reduce_size = (reduce_dtype or r.compute_dtype).itemsize
            g["grad_buffer_bytes"] += r.gathered_numel(n) * (r.compute_dtype.itemsize + reduce_size)
    return out


def per_rank(records: list[ParamRecord], n: int, reduce_dtype: torch.dtype | None, activation_bytes: int,
             overhead_bytes: int, prefetch_units: int) -> dict:
    """Rank 0's bytes over ``n`` ranks (module docstring: the memory model)."""
    by_kind: dict[str, int] = {}
    params = grads = optim = 0
    for r in records:
        local = r.local_numel(n)
        b = local * r.dtype.itemsize
        key = f"{'trainable' if r.trainable else 'frozen'}/{str(r.dtype).removeprefix('torch.')}"
        by_kind[key] = by_kind.get(key, 0) + b
        params += b
        if r.trainable:
            grads += b  # sharded gradient in the parameter's dtype (fp32 masters)
            optim += 2 * b  # AdamW exp_avg, exp_avg_sq
    groups = group_sizes(records, n, reduce_dtype)
    root = groups.get(ROOT_UNIT, {"gathered_bytes": 0})["gathered_bytes"]
    others = [(k, g) for k, g in groups.items() if k != ROOT_UNIT]
    largest_name, largest = max(others, key=lambda kv: kv[1]["gathered_bytes"], default=(None, {"gathered_bytes": 0}))
    trainable = [(k, g) for k, g in groups.items() if g["trainable"]]
    grad_name, grad_group = max(trainable, key=lambda kv: kv[1]["grad_buffer_bytes"],
                                default=(None, {"grad_buffer_bytes": 0}))
    gathered = root + prefetch_units * largest["gathered_bytes"]
    total = params + grads + optim + gathered + grad_group["grad_buffer_bytes"] + activation_bytes + overhead_bytes
    return {
        "params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optim,
        "params_by_kind": dict(sorted(by_kind.items())),
        "gathered_bytes": gathered, "root_gathered_bytes": root,
        "largest_unit": {"name": largest_name, "params": largest.get("params", 0),
                         "gathered_bytes": largest["gathered_bytes"]},
        "grad_buffer_bytes": grad_group["grad_buffer_bytes"], "grad_buffer_unit": grad_name,
        "activation_bytes": activation_bytes, "overhead_bytes": overhead_bytes, "total_bytes": total,
    }


def candidate_world_sizes(limit: int) -> list[int]:
    """Powers of two and multiples of 8 up to ``limit``, ascending."""
    powers = {2**i for i in range(int(math.log2(max(limit, 1))) + 1)}
    return sorted(powers | set(range(8, limit + 1, 8)))
