"""Build on the meta device, shard, then materialise only the local shards and fill them (docs/design.md §5).

The one path every run takes (1 process or N, CPU or GPU)::

    with meta_parameters():  module = SALMModule(...)    # parameters on meta: no memory, seconds even at 120B;
                                                          # buffers (filterbank, rel-pos tables, router biases)
                                                          # are built for real: they are small and derived
    fully_shard(...)                                      # optional: FSDP2 plan on meta (parallel.shard_module)
    materialize(module, device)                           # to_empty: each rank allocates its own shards only,
                                                          # then the construction-time buffers are put back
    fill_from_checkpoint(part, reader, sources)           # pretrained tensors: each rank reads its slice only
    init_parameters(module, names, seed)                  # new tensors: same values for any world size

Deterministic initialisation: each module's init runs on full-size CPU stand-ins of its parameters,
under a seed derived from the run's seed and the module's name, and each rank copies out the slice it
owns. The values therefore depend on neither the world size nor the device, and a module is never
materialised in full beyond one module at a time (the largest is a fused expert tensor).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from salm_mtp.io.weights import Source, TensorReader, check_sources


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside, every ``nn.Parameter`` registered on a module moves to the meta device at once.

    Buffers stay real (CPU): they are derived in ``__init__`` (mel filterbank, positional tables) or
    small state (BatchNorm statistics, MoE router biases) that must survive materialisation. Large
    parameters are never written: a parameter's CPU storage is released as soon as it is registered
    (``torch.empty`` pages are never touched), and init code then runs on meta tensors (no-ops).
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def is_materialized(module: nn.Module) -> bool:
    """True when no parameter of ``module`` is on the meta device."""
    return not any(_local(p).is_meta for p in module.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_block(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(the tensor this rank stores, its offset in the global tensor); a plain tensor is all of it."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = t.to_local()
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return local, tuple(offset)
    return t, (0,) * t.dim()


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Allocate every meta parameter on ``device`` (local shards only for FSDP2 DTensors), keep buffers.

    ``to_empty`` replaces buffers too; the construction-time buffers are put back afterwards, so
    derived ones (log-mel filterbank and window, relative-position tables) equal a fresh build.
    Parameter values are undefined until filled (``fill_from_checkpoint`` / ``init_parameters``).
    """
    device = torch.device(device)
    saved = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    module.to_empty(device=device)
    for m, name, b in saved:
        m._buffers[name] = b.to(device)


# ------------------------------------------------------------------------------ loading
def tensor_targets(part: nn.Module, skip: Callable[[str], bool] = lambda k: False) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``part`` by state-dict name (the tensors themselves)."""
    return {k: v for k, v in part.state_dict(keep_vars=True).items() if not skip(k)}


@torch.no_grad()
def fill_from_checkpoint(part: nn.Module, reader: TensorReader, sources: dict[str, Source], what: str,
                         prefix: str = "", skip: Callable[[str], bool] = lambda k: False) -> set[str]:
    """Copy each tensor of ``part`` from its checkpoint source, reading only this rank's block.

    Every tensor of ``part`` (minus ``skip``) must have a source and every source a tensor, with equal
    global shapes; otherwise CheckpointError names them (``prefix`` + name). Values are cast to the
    module tensor's dtype (e.g. bf16 on disk -> fp32 trainable). Returns the names filled.
    """
    targets = tensor_targets(part, skip)
    check_sources({k: tuple(v.shape) for k, v in targets.items()}, sources, reader, what, prefix)
    for name, t in targets.items():
        local, offset = local_block(t)
        local.copy_(reader.read(sources[name], offset, tuple(local.shape)))
    return set(targets)


# ------------------------------------------------------------------------ initialisation
def seed_for(base_seed: int, name: str) -> int:
    """A 63-bit seed from the run's seed and a module name (stable across processes and versions)."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _owner_init(root: nn.Module) -> dict[str, Callable[[nn.Module], None]]:
    """Module name -> the init function that applies to it: its nearest transformers model's
    ``_init_weights`` (as ``PreTrainedModel.initialize_weights`` dispatches), else ``reset_parameters``."""
    from transformers import PreTrainedModel

    def default(m: nn.Module) -> None:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()

    out: dict[str, Callable[[nn.Module], None]] = {}

    def walk(m: nn.Module, name: str, fn: Callable[[nn.Module], None]) -> None:
        if isinstance(m, PreTrainedModel):
            fn = m._init_weights
        out[name] = fn
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name, fn)

    walk(root, "", default)
    return out


@torch.no_grad()
def init_parameters(root: nn.Module, names: set[str], base_seed: int,
                    init_fns: dict[str, Callable[[nn.Module], None]] | None = None) -> set[str]:
    """Initialise the parameters of ``root`` named in ``names`` with their modules' own init code.

    ``init_fns`` (module name -> init function) overrides the owner's init for those modules (LoRA
    adapters: ``salm_mtp.modules.lora.adapter_inits``).

    For each module owning such a parameter (children before parents), every parameter of its
    subtree is swapped for a full-size fp32 CPU stand-in, the init functions of the subtree run in
    post-order, each under ``seed_for(base_seed, module name)``, and each rank copies out its own
    slice of the named parameters. Re-running a child inside its parent gives the child's values
    again, so a parent's init that rewrites a child (Nemotron-H rescales Mamba ``out_proj``) wins
    exactly as in transformers' own post-order ``initialize_weights``. Returns the names initialised.
    """
    init_fn = {**_owner_init(root), **(init_fns or {})}
    modules = list(root.named_modules())
    done: set[str] = set()
    for mod_name, mod in reversed(modules):  # reversed pre-order: descendants before ancestors
        pre = f"{mod_name}." if mod_name else ""
        if not any(f"{pre}{n}" in names for n, _ in mod.named_parameters(recurse=False)):
            continue
        sub = [(f"{pre}{n}" if n else mod_name, m) for n, m in mod.named_modules()]
        swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter, str]] = []
        for sub_name, m in sub:
            for pname, p in list(m._parameters.items()):
                if p is None:
                    continue
                full = nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=p.requires_grad)
                swapped.append((m, pname, p, full, f"{sub_name}.{pname}" if sub_name else pname))
                m._parameters[pname] = full
        try:
            for sub_name, m in reversed(sub):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed_for(base_seed, sub_name))
                    init_fn[sub_name](m)
        finally:
            for m, pname, p, full, full_name in swapped:
                m._parameters[pname] = p
                if full_name in names:
                    local, offset = local_block(p)
                    index = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
                    local.copy_(full.data[index] if index else full.data)
                    done.add(full_name)
    return done


@torch.no_grad()
def copy_parameters(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dst <- src for (dst, src) pairs of equal global shape and equal sharding (local blocks copied)."""
    for dst, src in pairs:
        d, d_off = local_block(dst)
        s, s_off = local_block(src)
        if d.shape != s.shape or d_off != s_off:
            raise ValueError(f"copy between differently sharded tensors: {tuple(d.shape)}@{d_off} vs "
                             f"{tuple(s.shape)}@{s_off}")
        d.copy_(s)
