"""Multi-process worker of tests/test_parallel.py: one real Lightning training step per case.

Run by the test as::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/worker.py SPEC.json

SPEC.json holds the tokenizer directory, the models (``tiny.tiny_kwargs`` overrides, with ``init_seed``,
and config parts such as ``{"llm": {"path": HF_DIR}}``), the full batch (a torch.save'd dict) and a list
of cases. For each case every rank builds the tiny model on meta (its weights come from configure_model:
read per shard from a HF directory, or initialised from ``init_seed``), takes its half of the batch
(rank r: rows [r*B/2, (r+1)*B/2), re-padded to its own lengths) and runs ``Trainer.fit(max_steps=1)``
under the case's strategy. Before the first step a callback gathers every full initial weight, the
dtypes, buffers and the bytes each rank read and holds; just before the optimizer step another gathers
every full gradient (``DTensor.full_tensor()`` under FSDP2) and rank 0 writes ``{case}.pt``: those,
the logged loss and the plan's log lines (a ``checkpoint`` case also writes a sharded checkpoint ``{case}_ckpt/`` of
the stepped model, and its full weights). A case that raises records the error instead (both ranks
raise alike in configure_model, so nothing hangs); a hung collective dumps the stacks and exits.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ for tiny.py

import lightning as L  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import tiny  # noqa: E402
from salm_mtp.config import EncoderConfig, ParallelConfig  # noqa: E402
from salm_mtp.model import SALMModule  # noqa: E402
from salm_mtp.salm import config_from_dict  # noqa: E402
from salm_mtp.parallel import data_parallel  # noqa: E402
from salm_mtp.modules.features import LogMelFeatures  # noqa: E402


def rank_half(batch: dict, rank: int, world: int) -> dict:
    """Rows of this rank, trimmed to their own longest prompt and clip (as a real per-rank collate pads)."""
    B = batch["input_ids"].shape[0]
    lo, hi = rank * B // world, (rank + 1) * B // world
    out = {}
    for k, v in batch.items():
        out[k] = v[lo:hi] if isinstance(v, (torch.Tensor, list)) else v
    T, S = int(out["input_lens"].max()), int(out["audio_lens"].max())
    out["input_ids"], out["loss_mask"] = out["input_ids"][:, :T], out["loss_mask"][:, :T]
    out["audios"] = out["audios"][:, :S]
    return out


class PinBatchNorm(L.Callback):
    """BatchNorm (Parakeet's conv modules) on running statistics: batch statistics differ per rank by design."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for m in pl_module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


class GrabGrads(L.Callback):
    """Full gradients of every parameter, gathered on every rank (collective), kept on rank 0."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}
        self.kinds: dict[str, str] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for name, p in pl_module.named_parameters():
            g = p.grad
            self.kinds[name] = type(p).__name__
            if g is None:
                continue
            if isinstance(g, DTensor):
                g = g.full_tensor()
            self.grads[name] = g.detach().clone()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class SetLoraB(L.Callback):
    """Case key ``lora_b``: LoRA B set by name (tiny.set_lora_b) before the step, as the reference does."""

    def __init__(self, std: float | None):
        self.std = std

    def on_train_start(self, trainer, pl_module):
        if self.std is not None:
            tiny.set_lora_b(pl_module, self.std)


class GrabInit(L.Callback):
    """What every rank starts from, after configure_model and strategy setup, before the first step."""

    def __init__(self):
        self.info: dict = {}

    def on_train_start(self, trainer, pl_module):
        params = dict(pl_module.named_parameters())
        local_llm = sum(p.to_local().numel() * p.element_size() if isinstance(p, DTensor) else p.numel() * p.element_size()
                        for n, p in params.items() if n.startswith("llm."))
        mine = torch.tensor([float(pl_module.bytes_read), float(local_llm)])
        every = [torch.zeros(2) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        fresh = LogMelFeatures(pl_module.features.config)
        self.info = {
            "init_params": {n: _full(p) for n, p in params.items()},  # collective: every rank gathers
            "dtypes": {n: str(p.dtype) for n, p in params.items()},
            "requires_grad": {n: p.requires_grad for n, p in params.items()},
            "buffers": {n: b.detach().clone() for n, b in pl_module.named_buffers()},
            "fresh_feature_buffers": {"features.mel_filters": fresh.mel_filters, "features.window": fresh.window},
            "bytes_read": [float(t[0]) for t in every],
            "llm_local_bytes": [float(t[1]) for t in every],
        }


class ValLosses(L.Callback):
    """The logged validation loss of each validation run (the sanity check runs before the step)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_validation_end(self, trainer, pl_module):
        if "val_loss" in trainer.callback_metrics:
            self.losses.append(float(trainer.callback_metrics["val_loss"]))


class PlanLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "[salm_mtp.parallel]" in msg:
            self.lines.append(msg)


def module_class(prewrap: str | None):
    if prewrap is None:
        return SALMModule

    class PreWrapped(SALMModule):
        """The head reached configure_model already sharded (e.g. by a checkpoint-loading path)."""

        def configure_model(self):
            from torch.distributed.fsdp import FSDPModule, fully_shard

            if not isinstance(self.llm.mtp, FSDPModule):
                dp = self.device_mesh["data_parallel"]
                if prewrap == "head":
                    fully_shard(self.llm.mtp, mesh=dp)
                elif prewrap == "head+norm_f":  # one group: the head and the LLM's final norm
                    fully_shard([self.llm.mtp, self.llm.model.norm_f], mesh=dp)
                else:
                    raise ValueError(prewrap)
            super().configure_model()

    return PreWrapped


def run_case(spec: dict, case: dict, rank: int, world: int, plan_log: PlanLog) -> dict:
    batch = rank_half(torch.load(spec["batch"], weights_only=False), rank, world)
    model = spec["models"][case.get("model", "base")]
    kw = tiny.tiny_kwargs(spec["tok_dir"], **model["kwargs"])
    kw.update(config_from_dict(model.get("parts", {})))
    kw["parallel"] = ParallelConfig(**case.get("parallel", {}))
    if "layerdrop" in case:
        kw["encoder"] = EncoderConfig(**{**kw["encoder"].__dict__, "layerdrop": case["layerdrop"]})
    module = module_class(case.get("prewrap"))(**kw)  # on meta: weights come in configure_model
    if case["strategy"] == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    elif case["strategy"] == "hsdp":
        from salm_mtp.strategy import SALMParallelStrategy

        strategy = SALMParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                        replicate_size=case["replicate"])
    else:
        strategy = DDPStrategy(process_group_backend="gloo")
    grab, val, init = GrabGrads(), ValLosses(), GrabInit()
    validate = bool(case.get("validate"))  # sanity-check validation on the same half, before the step
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=world, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=1 if validate else 0,
        callbacks=[PinBatchNorm(), SetLoraB(case.get("lora_b")), init, grab, val], precision=case.get("precision", "32-true"),
    )
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    plan_log.lines.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader if validate else None)
    except Exception as e:  # noqa: BLE001  (recorded for the test to assert on)
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "plan": list(plan_log.lines)}
    from torch.distributed.fsdp import FSDPModule

    extra = {}
    if case.get("checkpoint"):  # a sharded checkpoint of the stepped model, and its full weights to compare
        trainer.save_checkpoint(os.path.join(spec["out"], f"{case['name']}_ckpt"))
        extra["final_params"] = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                                 for n, p in module.named_parameters()}
    return extra | init.info | {
        "grads": grab.grads,
        "param_types": grab.kinds,
        "loss": float(trainer.callback_metrics["loss"]),
        "val_losses": val.losses,
        "plan": list(plan_log.lines),
        "view_warnings": [str(w.message) for w in caught if "returned a view tensor" in str(w.message)],
        "dp_size": data_parallel(trainer)[0],
        "fsdp_modules": sorted(n or "<root>" for n, m in module.named_modules() if isinstance(m, FSDPModule)),
    }


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    faulthandler.dump_traceback_later(spec.get("hang_dump_s", 60), exit=True)  # a hung collective: show where
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    plan_log = PlanLog()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addHandler(plan_log)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.INFO)
    for case in spec["cases"]:
        result = run_case(spec, case, rank, world, plan_log)
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            torch.save(result, os.path.join(spec["out"], f"{case['name']}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
