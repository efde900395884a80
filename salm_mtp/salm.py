"""``SALM``: the speech-aware LLM as a plain ``nn.Module``, audio features -> Parakeet encoder -> adapter ->
Nemotron-H (+ MTP head). Decoding, evaluation, export, the planner and the training recipe (salm_mtp/model.py,
which is a SALM) all use it.

    SALM(...)             builds every part from typed configs with parameters on the meta device (reads local
                          config.json / tokenizer files only; no weight memory, seconds even at 120B)
    apply_freeze          model.freeze patterns, LoRA and head_only rules -> requires_grad
    materialize_weights   allocate this rank's shards and fill them: pretrained tensors read slice by slice, new
                          ones initialised identically for any world size (salm_mtp/materialize.py)
    prepare_inputs        features -> encoder -> adapter -> embed -> merge   (batch layout: salm_mtp.data.dataset)
    forward               backbone over the merged embeddings -> h0 (B, T', H) after norm_f
    mtp_hiddens           the MTP head's D depth outputs;  ctc_stats: the encoder's CTC loss sums

Its parameter names are the checkpoints' (``audio.*``, ``adapter.*``, ``llm.*``, ``llm.mtp.*``): a training
checkpoint's ``state_dict`` loads into it as it is.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict, replace

import torch

from salm_mtp.config import (
    AdapterConfig,
    EncoderConfig,
    FreezeConfig,
    LLMConfig,
    LoRAConfig,
    MTPConfig,
    OptimConfig,
    ParallelConfig,
)
from salm_mtp.data.tokenizer import ensure_audio_placeholder, load_tokenizer
from salm_mtp.errors import config_error
from salm_mtp.loss import ctc_sum
from salm_mtp.io.fill import fill_pretrained
from salm_mtp.materialize import copy_parameters, init_parameters, is_materialized, materialize, meta_parameters
from salm_mtp.modules.encoder import Adapter, AudioEncoder, encoder_config_from
from salm_mtp.modules.features import FeatureConfig, LogMelFeatures, SpecAugment, SpecAugmentConfig
from salm_mtp.modules.llm import build_llm
from salm_mtp.modules.lora import adapter_inits, apply_lora, base_name, base_view, is_adapter_param
from salm_mtp.modules.merge import MergedInputs, merge_audio_into_prompt
from salm_mtp.modules.moe_balance import MoEBalanceConfig
from salm_mtp.modules.mtp import backbone_pairs, build_mtp_head, record_mtp_in_config, shipped_mtp
from salm_mtp.parallel import broadcast_seed

PART_TYPES = {
    "encoder": EncoderConfig,
    "adapter": AdapterConfig,
    "llm": LLMConfig,
    "mtp": MTPConfig,
    "optim": OptimConfig,
    "features": FeatureConfig,
    "spec_augment": SpecAugmentConfig,
    "freeze": FreezeConfig,
    "parallel": ParallelConfig,
    "moe_balance": MoEBalanceConfig,
    "lora": LoRAConfig,
}


def config_from_dict(raw: dict) -> dict:
    """SALM / SALMModule keyword arguments from plain data (e.g. salm_config.json): dicts become their dataclasses."""
    out = {}
    for k, v in raw.items():
        if k in PART_TYPES and isinstance(v, dict):
            if k == "optim" and "betas" in v:
                v = {**v, "betas": tuple(v["betas"])}
            out[k] = PART_TYPES[k](**v)
        else:
            out[k] = v
    return out


def absolute_paths(cfg):
    """``cfg`` with its ``path`` (a local directory or file, or None) made absolute."""
    path = getattr(cfg, "path", None)
    return replace(cfg, path=os.path.abspath(path)) if path else cfg


def check_vocabulary(n_tokens: int, placeholder_id: int, llm_vocab: int, tokenizer_path: str | None,
                     llm_path: str | None) -> None:
    """ConfigError when the tokenizer has ids the LLM has no embedding for (the audio placeholder aside: audio
    replaces it before the embedding), found when the model is built instead of at the first batch."""
    top = max((i for i in (n_tokens - 1, n_tokens - 2) if i != placeholder_id), default=-1)
    if top >= llm_vocab:
        where = f"model.llm.path={llm_path!r}'s config.json" if llm_path else "the LLM built from model.llm"
        raise config_error("model.tokenizer_path", f"{tokenizer_path!r} has {n_tokens} tokens (ids up to {top} besides "
                           f"the audio placeholder) but {where} embeds {llm_vocab}",
                           "use the LLM's own tokenizer (model.tokenizer_path=null reads it from model.llm.path)")


class SALM(torch.nn.Module):
    """Speech-aware LLM with a Multi-Token Prediction head (module docstring)."""

    def __init__(self, encoder: EncoderConfig = EncoderConfig(), adapter: AdapterConfig = AdapterConfig(),
                 llm: LLMConfig = LLMConfig(), mtp: MTPConfig = MTPConfig(), features: FeatureConfig = FeatureConfig(),
                 spec_augment: SpecAugmentConfig = SpecAugmentConfig(), freeze: FreezeConfig = FreezeConfig(),
                 parallel: ParallelConfig = ParallelConfig(), lora: LoRAConfig = LoRAConfig(),
                 tokenizer_path: str | None = None, ctc_weight: float = 0.0, init_seed: int | None = None) -> None:
        """Build every part on the meta device (arguments: SALMModule's, which documents each; configs or dicts;
        paths are made absolute)."""
        super().__init__()
        parts = config_from_dict(dict(encoder=encoder, adapter=adapter, llm=llm, mtp=mtp, features=features,
                                      spec_augment=spec_augment, freeze=freeze, parallel=parallel, lora=lora))
        encoder, adapter, llm, mtp = (absolute_paths(parts[k]) if k != "mtp" else parts[k]
                                      for k in ("encoder", "adapter", "llm", "mtp"))
        if ctc_weight < 0:
            raise config_error("model.ctc_weight", f"must be >= 0, got {ctc_weight}")
        tokenizer_path = os.path.abspath(tokenizer_path) if tokenizer_path else tokenizer_path
        self.cfg_encoder, self.cfg_llm, self.cfg_mtp, self.cfg_adapter = encoder, llm, mtp, adapter
        self.cfg_freeze, self.cfg_parallel, self.cfg_lora = parts["freeze"], parts["parallel"], parts["lora"]
        self.ctc_weight = ctc_weight
        self.init_seed = init_seed
        features, spec_augment = parts["features"], parts["spec_augment"]
        self.salm_arguments = {
            **{k: asdict(v) for k, v in dict(encoder=encoder, adapter=adapter, llm=llm, mtp=mtp, features=features,
                                             spec_augment=spec_augment, freeze=parts["freeze"],
                                             parallel=parts["parallel"], lora=parts["lora"]).items()},
            "tokenizer_path": tokenizer_path, "ctc_weight": ctc_weight, "init_seed": init_seed}
        """The constructor's arguments as plain data, paths absolute (``salm_config``)."""

        self.tokenizer = load_tokenizer(tokenizer_path or llm.path)
        self.placeholder_id = ensure_audio_placeholder(self.tokenizer)

        self.features = LogMelFeatures(features)
        self.spec_augment = SpecAugment(spec_augment)
        enc_cfg, ctc_cfg = encoder_config_from(encoder)
        ctc_classes = None
        if ctc_weight > 0:
            ctc_classes = ctc_cfg.vocab_size if ctc_cfg is not None else len(self.tokenizer) + 1
            if ctc_classes != len(self.tokenizer) + 1:
                raise ValueError(
                    f"model.ctc_weight > 0 but the encoder's CTC head has {ctc_classes} classes while the tokenizer "
                    f"has {len(self.tokenizer)} tokens (+1 blank expected): pretrain the encoder with this tokenizer "
                    "or set --model.ctc_weight=0"
                )
        with meta_parameters():  # weights come in configure_model: loaded, or initialised per shard
            self.audio = AudioEncoder(enc_cfg, ctc_classes)
            self.llm = build_llm(llm, vocab_size=len(self.tokenizer))
            check_vocabulary(len(self.tokenizer), self.placeholder_id, self.llm.config.vocab_size,
                             tokenizer_path or llm.path, llm.path)
            self.adapter = Adapter(adapter, self.audio.hidden_size, self.llm.config.hidden_size)
            self.mtp_shipped = shipped_mtp(self.llm.config) is not None and not mtp.replace_existing_head
            head = build_mtp_head(self.llm, mtp)
        if head is not None:
            self.llm.mtp = head
        if self.cfg_lora.enabled:
            if self.cfg_lora.mtp_head and not (head is not None and self.mtp_shipped):
                raise ValueError("model.lora.mtp_head=true but no shipped MTP head is loaded (none in model.llm.path, "
                                 "model.mtp.num_layers=0 or replace_existing_head): a new head trains in full; set "
                                 "--model.lora.mtp_head=false")
            with meta_parameters():  # adapters on meta too: materialised and initialised with everything else
                apply_lora(self.llm, self.cfg_lora, include_head=self.cfg_lora.mtp_head)
        record_mtp_in_config(self.llm.config, head)
        self.num_mtp_depths = head.num_depths if head is not None else 0
        self.bytes_read = 0
        """Bytes of pretrained tensors this process read into its shards (``materialize_weights``): its slices
        only, about 1/world_size of each sharded checkpoint (SALMModule.configure_model logs it per rank)."""
        if mtp.training_mode == "head_only" and head is None:
            raise ValueError("model.mtp.training_mode=head_only but no MTP head is built (model.mtp.num_layers=0 or "
                             "the checkpoint ships none): set --model.mtp.num_layers to at least 1")

    # ------------------------------------------------------------------ building blocks
    @property
    def mtp_enabled(self) -> bool:
        """Whether an MTP head is attached and trained."""
        return self.num_mtp_depths > 0

    @property
    def head_only(self) -> bool:
        """model.mtp.training_mode == head_only: only llm.mtp trains, everything else frozen and in eval mode."""
        return self.cfg_mtp.training_mode == "head_only"

    def train(self, mode: bool = True):
        """Lightning's train(); under head_only every module but the head stays in eval mode (no dropout,
        no SpecAugment, BatchNorm statistics untouched)."""
        super().train(mode)
        if mode and self.head_only:
            for m in (self.features, self.spec_augment, self.audio, self.adapter, self.llm):
                m.eval()
            self.llm.mtp.train()
        return self

    @property
    def mtp_head(self):
        return getattr(self.llm, "mtp", None)

    def salm_config(self) -> dict:
        """The constructor arguments as plain data (an export's salm_config.json; ``salm_mtp.io.build_salm``)."""
        return copy.deepcopy(self.salm_arguments)

    def apply_freeze(self) -> list[str]:
        """requires_grad=False on parameters matching model.freeze.patterns (minus unfreeze); returns their names.

        Patterns see checkpoint names (``x.weight``, also for LoRA-wrapped layers). With model.lora.r > 0 the LLM's
        base weights are frozen too (the MTP head's only with model.lora.mtp_head), unless model.freeze.unfreeze
        matches them; the adapters themselves train unless head_only (model.freeze.patterns never match them).
        """
        frozen = []
        lora_on, lora_head = self.cfg_lora.enabled, self.cfg_lora.mtp_head
        for name, p in self.named_parameters():
            if self.head_only and not name.startswith("llm.mtp."):  # head_only: the head alone trains
                p.requires_grad_(False)
                frozen.append(name)
                continue
            if is_adapter_param(name):
                continue
            name = base_name(name)
            unfrozen = any(re.search(pat, name) for pat in self.cfg_freeze.unfreeze)
            lora_base = lora_on and name.startswith("llm.") and (lora_head or not name.startswith("llm.mtp."))
            hit = lora_base or any(re.search(pat, name) for pat in self.cfg_freeze.patterns)
            if hit and not unfrozen:
                p.requires_grad_(False)
                frozen.append(name)
        return frozen

    def materialize_weights(self, device: torch.device | str = "cpu", load_pretrained: bool = True,
                            init_new: bool = True) -> dict:
        """Allocate this rank's shards on ``device`` and fill them; returns {"loaded": names, "initialised": names}.

        Pretrained tensors (``load_pretrained``): the encoder from model.encoder.path, the LLM and a shipped
        MTP head (1:1) from model.llm.path, each rank reading only its slices. Every other parameter is
        initialised by its module's own init under a seed derived from ``init_seed`` and its name.
        ``mtp.init_from_backbone`` then copies the backbone's (loaded) last blocks into a new head.
        ``init_new=False`` leaves the other tensors uninitialised: only for callers that load a complete
        state dict strictly right after (salm_mtp/io/checkpoints.py's loaders).
        LoRA: the base weights are read and initialised under their checkpoint names and modules
        (``lora.base_view``: a LoRA model's base equals the plain model's for the same seed), then each adapter's
        A by kaiming-uniform under its own seed and B = 0. Names returned are the module's own.
        """
        if is_materialized(self):
            raise RuntimeError("SALM weights are already materialised")
        materialize(self, device)
        own = {id(p): n for n, p in self.named_parameters()}
        seed = broadcast_seed(self.init_seed) if init_new else 0
        initialised: set[str] = set()
        with base_view(self):  # LoRA layers unwrapped: checkpoint names, transformers' init code
            plain = {n: own[id(p)] for n, p in self.named_parameters()}
            loaded = fill_pretrained(self) if load_pretrained else set()
            if init_new:
                initialised = init_parameters(self, set(plain) - loaded, seed)
                head = self.mtp_head
                if (head is not None and self.cfg_mtp.init_from_backbone
                        and not any(n.startswith("llm.mtp.") for n in loaded)):
                    copy_parameters(backbone_pairs(head, self.llm))
        loaded = {plain.get(n, n) for n in loaded}  # buffers keep their names
        if not init_new:
            return {"loaded": loaded, "initialised": set()}
        adapters = {n for n in own.values() if is_adapter_param(n)}
        initialised = {plain[n] for n in initialised} | init_parameters(self, adapters, seed, adapter_inits(self))
        return {"loaded": loaded, "initialised": initialised}

    def audio_positions_per_second(self) -> float:
        """LLM positions per second of audio: feature frames / encoder subsampling / adapter stacking."""
        feats = self.features.config
        sub = getattr(self.audio.encoder.config, "subsampling_factor", 8)
        return feats.sample_rate / feats.hop_length / sub / self.adapter.k

    # ------------------------------------------------------------------ forward
    def prepare_inputs(self, batch: dict) -> tuple[MergedInputs, torch.Tensor, torch.Tensor]:
        """Encode the batch's audio clips, embed the prompt and merge (each clip at its own placeholder).

        Returns (merged inputs, encoder output (N, F', He), encoder lengths (N,)), N = clips of the batch (one per
        ASR cut, one per audio turn of a conversation, none for text rows). A batch without clips still runs
        the encoder and adapter once, on a short silent clip in eval mode (no BatchNorm update), joined to the
        inputs with weight 0: every rank runs the same backward, and the result is unchanged.
        """
        audios, audio_lens = batch["audios"], batch["audio_lens"]
        no_audio = audios.shape[0] == 0
        if no_audio:
            audios = audios.new_zeros(1, self.features.config.hop_length * 16)
            audio_lens = torch.full((1,), audios.shape[1], dtype=torch.long, device=audios.device)
        modes = [(m, m.training) for m in (self.features, self.spec_augment, self.audio, self.adapter)]
        if no_audio:
            for m, _ in modes:
                m.eval()
        try:
            feats, fmask = self.features(audios, audio_lens)  # (N, F, 80), (N, F)
            feats = self.spec_augment(feats, fmask)
            enc, enc_lens = self.audio(feats, fmask)  # (N, F/8, He)
            audio_emb, audio_lens = self.adapter(enc, enc_lens)  # (N, A, H)
        finally:
            if no_audio:
                for m, mode in modes:
                    m.train(mode)
        unused = None
        if no_audio:
            unused = audio_emb.sum()
            audio_emb, audio_lens, enc, enc_lens = audio_emb[:0], audio_lens[:0], enc[:0], enc_lens[:0]
        ids = batch["input_ids"]
        vocab = self.llm.config.vocab_size
        safe_ids = ids.masked_fill(ids == self.placeholder_id, 0)  # placeholder may lie outside the LLM vocab
        if ids.numel() and int(safe_ids.max()) >= vocab:
            raise ValueError(f"input_ids hold token id {int(safe_ids.max())} >= the LLM vocab size {vocab}: "
                             "tokenizer and LLM do not match (check model.tokenizer_path / model.llm.path)")
        text_emb = self.llm.get_input_embeddings()(safe_ids)  # (B, T, H)
        merged = merge_audio_into_prompt(
            text_emb, ids, batch["input_lens"], batch["loss_mask"], audio_emb, audio_lens, self.placeholder_id
        )
        if unused is not None and unused.requires_grad:
            merged.inputs_embeds = merged.inputs_embeds + 0.0 * unused
        return merged, enc, enc_lens

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Backbone over right-padded merged embeddings (B, T', H) -> h0 (B, T', H) after norm_f.

        No padding mask is needed: every block is causal, so padding at the end never reaches a
        real position.
        """
        return self.llm.model(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state

    def mtp_hiddens(self, h0: torch.Tensor, inputs_embeds: torch.Tensor) -> list[torch.Tensor]:
        """The D MTP depth outputs (B, T', H); detached inputs when the MTP loss must not reach the backbone."""
        if not self.mtp_enabled:
            return []
        if self.cfg_mtp.detach_backbone:
            h0, inputs_embeds = h0.detach(), inputs_embeds.detach()
        return self.mtp_head(h0, inputs_embeds)

    # ------------------------------------------------------------------ CTC
    def ctc_stats(self, enc: torch.Tensor, enc_lens: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed CTC loss of the encoder's CTC head on the transcript tokens, and the target-token count.

        Only clips with a transcript count (conversation clips have none); with none the head still joins the
        graph with weight 0."""
        ctc_ids, ctc_lens = batch["ctc_ids"], batch["ctc_lens"]
        keep = ctc_lens > 0
        if bool(keep.all()) and enc.shape[0] > 0:
            return ctc_sum(self.audio.ctc_head(enc), enc_lens, ctc_ids, ctc_lens, self.audio.blank_id)
        if not bool(keep.any()):
            head = self.audio.ctc_head
            zero = sum(0.0 * p.sum() for p in head.parameters() if p.requires_grad) + 0.0 * enc.sum()
            return torch.as_tensor(zero, dtype=torch.float32, device=enc.device), ctc_lens.sum().float()
        keep = keep.to(enc.device)
        return ctc_sum(self.audio.ctc_head(enc[keep]), enc_lens[keep], ctc_ids[keep], ctc_lens[keep],
                       self.audio.blank_id)
