"""Tiny models and batches shared by the tests (and by multi-process test workers)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch

from salm_mtp.config import AdapterConfig, EncoderConfig, LLMConfig, MTPConfig
from salm_mtp.data.prompt import PromptConfig, PromptFormatter
from salm_mtp.data.tokenizer import train_tokenizer

TEXTS = [
    "one two three four five six seven eight nine zero",
    "the cat sat on the mat", "a dog ran home", "1 2 3 4 5 6 7 8 9 0",
] * 5


def tokenizer_dir(root: str) -> str:
    """Train (once) and save the tiny test tokenizer under ``root``; returns its directory."""
    path = os.path.join(root, "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        train_tokenizer(TEXTS, path, vocab_size=80)
    return path


def tiny_kwargs(tok_dir: str, pattern: str = "M*E-", mtp_layers: int = 1, mtp_pattern: str | None = None,
                **overrides) -> dict:
    """SALMModule kwargs of a ~100k-parameter model using every block type."""
    kw = dict(
        tokenizer_path=tok_dir,
        encoder=EncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              subsampling_conv_channels=8, dropout=0.0),
        adapter=AdapterConfig(stack_frames=2, hidden_size=32),
        llm=LLMConfig(pattern=pattern, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      intermediate_size=64, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8,
                      n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      moe_shared_expert_intermediate_size=16),
        mtp=MTPConfig(num_layers=mtp_layers, pattern=mtp_pattern),
    )
    kw.update(overrides)
    return kw


def build(tok_dir: str, **overrides):
    """A tiny SALMModule with real weights on the CPU (built on meta, materialised, initialised)."""
    from salm_mtp.io.checkpoints import build_module

    return build_module(**tiny_kwargs(tok_dir, **overrides))


def make_batch(tokenizer, answers: list[str], audio_samples: list[int], tasks: list[str] | None = None,
               seed: int = 0) -> dict:
    """A collated batch (layout of salm_mtp.data.dataset) with random audio of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    fmt = PromptFormatter(tokenizer, PromptConfig())
    tasks = tasks or ["asr"] * len(answers)
    encs = [fmt.encode(t, a) for t, a in zip(tasks, answers)]
    B, T, S = len(encs), max(len(e.input_ids) for e in encs), max(audio_samples)
    ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    audios = torch.zeros(B, S)
    for i, e in enumerate(encs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.loss_mask)] = torch.tensor(e.loss_mask)
        audios[i, : audio_samples[i]] = torch.randn(audio_samples[i], generator=g) * 0.1
    ctc = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    U = max(len(c) for c in ctc)
    ctc_ids = torch.full((B, U), -100, dtype=torch.long)
    for i, c in enumerate(ctc):
        ctc_ids[i, : len(c)] = torch.tensor(c)
    return {
        "audios": audios, "audio_lens": torch.tensor(audio_samples), "clip_rows": torch.arange(B),
        "input_ids": ids, "input_lens": torch.tensor([len(e.input_ids) for e in encs]), "loss_mask": mask,
        "prompt_lens": torch.tensor([e.prompt_len for e in encs]),
        "ctc_ids": ctc_ids, "ctc_lens": torch.tensor([len(c) for c in ctc]),
        "ids": [f"utt{i}" for i in range(B)], "tasks": tasks, "answers": answers, "num_dropped": 0,
    }


def logged_losses(run_dir: str) -> dict[int, float]:
    """{step: loss} of the training rows of the one CSVLogger run under ``run_dir/salm``."""
    import csv
    import glob

    (path,) = glob.glob(os.path.join(run_dir, "salm/version_*/metrics.csv"))
    with open(path) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


@torch.no_grad()
def set_lora_b(module, std: float = 0.05) -> None:
    """Give every LoRA B (zero at init, which makes adapters no-ops and A's gradients zero) values that depend
    only on its name: equal for 1 process and for N FSDP2 ranks (each copies its own slice)."""
    from salm_mtp.materialize import local_block, seed_for

    for name, p in module.named_parameters():
        if ".lora_B." in name:
            g = torch.Generator().manual_seed(seed_for(0, name))
            full = torch.randn(tuple(p.shape), generator=g) * std
            local, offset = local_block(p)
            local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))].to(local.dtype))


class BatchRecorder(pl.LightningModule):
    """No model: records the row ids each training step saw (for resume tests of the data pipeline)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[str, ...]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(batch["ids"]))
        return (self.w**2).sum() + self.w.sum() * float(batch["input_lens"].sum())

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fuse_experts(state: dict) -> dict:
    """Stack per-expert ``X.experts.{e}.P.weight`` of an in-memory state dict into ``X.experts.P`` (E, out, in): an
    exported (per-expert) file in the model's fused layout, for comparing the two."""
    from salm_mtp.io.weights import group_sources

    sources = group_sources(list(state))
    return {k: torch.stack([state[x] for x in s.keys]) if s.stacked else state[s.keys[0]] for k, s in sources.items()}
