"""Typed configuration of the SALM model, one dataclass per part.

Every field has a docstring (LightningCLI shows it as ``--help``); invalid values raise in
``__post_init__`` with the full key and the flag that fixes it. Data options live in
``salm_mtp.data.datamodule.DataConfig``.

Keys as seen from the CLI: ``--model.llm.path``, ``--model.mtp.num_layers``, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salm_mtp.errors import config_error

BLOCK_SYMBOLS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
"""Block-type symbols of Nemotron-H patterns, backbone (``model.llm.pattern``) and MTP head (``model.mtp.pattern``)
alike (the ``hybrid_override_pattern`` notation): symbol -> transformers block type."""


def _check(cond: bool, key: str, msg: str) -> None:
    """ConfigError ``key: msg; set --key`` unless ``cond``."""
    if not cond:
        raise config_error(key, msg)


def check_positive(value: int, key: str) -> int:
    """``value`` when it is >= 1; else ValueError naming ``key`` (a value is never bent into range)."""
    _check(value >= 1, key, f"must be >= 1, got {value}")
    return value


def check_pattern(pattern: str, key: str) -> str:
    """Validate a block pattern such as ``"M*E-"`` and return it."""
    bad = sorted(set(pattern) - set(BLOCK_SYMBOLS))
    if not pattern or bad:
        raise config_error(key, f"{pattern!r} is not a block pattern{f' (unknown symbols {bad})' if bad else ''}",
                           f"use the symbols M (Mamba2), * (attention), - (MLP), E (MoE) in --{key}")
    return pattern


@dataclass
class EncoderConfig:
    """Parakeet / FastConformer audio encoder (``transformers.ParakeetEncoder``)."""

    path: str | None = None
    """Local HF directory of a Parakeet CTC model or bare encoder; null builds a random encoder from the fields below."""
    hidden_size: int = 96
    """Encoder width (inline build only)."""
    num_hidden_layers: int = 4
    """Number of conformer blocks (inline build only)."""
    num_attention_heads: int = 4
    """Attention heads per block (inline build only)."""
    intermediate_size: int = 256
    """Feed-forward width (inline build only)."""
    subsampling_conv_channels: int = 64
    """Channels of the subsampling convolutions (inline build only)."""
    scale_input: bool = True
    """Multiply the subsampled features by sqrt(hidden_size) (Parakeet's xscaling; inline build only)."""
    subsampling_factor: int = 8
    """Time reduction of the subsampling convolutions: 8 (80 ms frames, Parakeet's) or 4 (inline build only)."""
    conv_kernel_size: int = 9
    """Depthwise convolution kernel of each conformer block (inline build only)."""
    dropout: float = 0.1
    """Dropout inside the encoder (inline build; also applied to loaded encoders)."""
    layerdrop: float = 0.0
    """Probability of skipping a block in training. Keep 0 for distributed runs: ranks would skip different layers."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            _check(getattr(self, name) > 0, f"model.encoder.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_attention_heads == 0, "model.encoder.hidden_size",
               f"({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        _check(self.subsampling_factor in (2, 4, 8, 16), "model.encoder.subsampling_factor",
               f"must be a power of two in [2, 16], got {self.subsampling_factor}")
        _check(0.0 <= self.dropout < 1.0, "model.encoder.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(0.0 <= self.layerdrop < 1.0, "model.encoder.layerdrop", f"must be in [0, 1), got {self.layerdrop}")


@dataclass
class AdapterConfig:
    """Modality adapter: stacks encoder frames and projects them to the LLM width."""

    path: str | None = None
    """adapter.safetensors of an export (`salm-mtp export`) to start from; null = a new adapter."""
    stack_frames: int = 2
    """Encoder frames concatenated into one LLM position (2 = 160 ms per audio embedding)."""
    hidden_size: int = 256
    """Width of the adapter MLP."""

    def __post_init__(self) -> None:
        _check(self.stack_frames >= 1, "model.adapter.stack_frames", f"must be >= 1, got {self.stack_frames}")
        _check(self.hidden_size >= 1, "model.adapter.hidden_size", f"must be >= 1, got {self.hidden_size}")


@dataclass
class LLMConfig:
    """Nemotron-H LLM (``transformers.NemotronHForCausalLM``)."""

    path: str | None = None
    """Local HF directory of a Nemotron-H checkpoint (its tokenizer too); null builds a random LLM from the fields below."""
    pattern: str = "M*EM-*"
    """Block pattern of the inline LLM: M Mamba2, * attention, - MLP, E MoE (one symbol per layer)."""
    hidden_size: int = 128
    """LLM width (inline build only)."""
    num_attention_heads: int = 4
    """Query heads (inline build only)."""
    num_key_value_heads: int = 2
    """Key/value heads (inline build only)."""
    head_dim: int = 32
    """Attention head size (inline build only)."""
    intermediate_size: int = 256
    """MLP width of '-' blocks (inline build only)."""
    mamba_num_heads: int = 8
    """Mamba2 heads; mamba_num_heads * mamba_head_dim is the Mamba inner width (inline build only)."""
    mamba_head_dim: int = 32
    """Mamba2 head size (inline build only)."""
    ssm_state_size: int = 16
    """Mamba2 state size (inline build only)."""
    n_routed_experts: int = 4
    """Routed experts of 'E' blocks (inline build only)."""
    num_experts_per_tok: int = 2
    """Experts chosen per token (inline build only)."""
    moe_intermediate_size: int = 128
    """Expert MLP width (inline build only)."""
    moe_shared_expert_intermediate_size: int = 128
    """Shared-expert MLP width (inline build only)."""
    moe_latent_size: int | None = None
    """Latent size of the expert projections (Super-style); null = none (inline build only)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa or eager."""

    def __post_init__(self) -> None:
        if self.path is None:
            check_pattern(self.pattern, "model.llm.pattern")
        for name in ("hidden_size", "num_attention_heads", "head_dim", "intermediate_size", "mamba_num_heads"):
            _check(getattr(self, name) > 0, f"model.llm.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "model.llm.num_key_value_heads",
               f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})")
        _check(self.num_experts_per_tok <= self.n_routed_experts, "model.llm.num_experts_per_tok",
               f"({self.num_experts_per_tok}) must be <= n_routed_experts ({self.n_routed_experts})")
        _check(self.attn_implementation in ("sdpa", "eager"), "model.llm.attn_implementation",
               f"must be 'sdpa' or 'eager', got {self.attn_implementation!r}")


@dataclass
class MTPConfig:
    """Multi-Token Prediction head (docs/design.md §2): depth k predicts token t+1+k."""

    num_layers: int | None = 1
    """Depths D (num_nextn_predict_layers). null = as the checkpoint ships (0 if none); 0 disables MTP (and drops a shipped head)."""
    pattern: str | None = None
    """Blocks of each depth (symbols M * - E). null = the checkpoint's own MTP pattern, else '*E' for MoE LLMs and '*-' for dense ones."""
    use_repeated_layer: bool = False
    """One physical depth reused for all D iterations."""
    loss_scaling_factor: float = 0.1
    """lambda: L_mtp = lambda / D * sum_k CE_k."""
    detach_backbone: bool = False
    """Stop the MTP loss at the backbone: the head sees detached hidden states, embeddings and lm_head weight."""
    init_from_backbone: bool = False
    """Initialise a new head's blocks (norm + mixer) from the loaded backbone's last blocks of the same type instead of
    random init; the fusion (enorm, hnorm, eh_proj) and final_layernorm stay new."""
    replace_existing_head: bool = False
    """Build a new head from num_layers / pattern even when the checkpoint ships one (its mtp.* tensors are then
    ignored), e.g. a deeper head trained head_only on top of an exported SALM model."""
    training_mode: str = "joint"
    """joint: the MTP loss trains with the main loss (backbone included); head_only: only llm.mtp trains (encoder,
    adapter, backbone, embeddings and lm_head frozen and in eval mode, the backbone forward without autograd), e.g.
    to add a head to an already fine-tuned SALM checkpoint cheaply."""
    loss: str = "ce"
    """Objective of each depth: ce (the next-next token); kl (self-distillation: KL from the backbone's own detached
    next-token distribution at position t+k); lk (lk_lambda * KL + (1 - lk_lambda) * total variation)."""
    lk_lambda: float = 0.5
    """Weight of the KL term in the lk loss (1 = pure KL, 0 = pure total variation)."""

    def __post_init__(self) -> None:
        _check(self.training_mode in ("joint", "head_only"), "model.mtp.training_mode",
               f"must be 'joint' or 'head_only', got {self.training_mode!r}")
        _check(self.loss in ("ce", "kl", "lk"), "model.mtp.loss", f"must be 'ce', 'kl' or 'lk', got {self.loss!r}")
        _check(0.0 <= self.lk_lambda <= 1.0, "model.mtp.lk_lambda", f"must be in [0, 1], got {self.lk_lambda}")
        if self.num_layers is not None:
            _check(self.num_layers >= 0, "model.mtp.num_layers", f"must be >= 0, got {self.num_layers}")
        if self.pattern is not None:
            check_pattern(self.pattern, "model.mtp.pattern")
        _check(self.loss_scaling_factor >= 0, "model.mtp.loss_scaling_factor",
               f"must be >= 0, got {self.loss_scaling_factor}")


def default_lora_targets() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"]


LORA_REFUSED_TARGETS = ("out_proj", "conv1d")
"""Mamba2 modules LoRA cannot adapt in Nemotron-H (see LoRAConfig.target_modules)."""


@dataclass
class LoRAConfig:
    """LoRA adapters on the LLM (HF peft; salm_mtp/modules/lora.py). With r > 0 the LLM's own weights are frozen
    (stored in model.parallel.frozen_dtype) and only the adapters train (fp32 master weights); the encoder, the adapter
    and a new MTP head keep their own freeze settings. Export merges the adapters into the base weights."""

    r: int = 0
    """Rank of each adapter; 0 = no LoRA (the whole LLM trains, subject to model.freeze)."""
    alpha: float = 16.0
    """Scaling numerator: each adapter adds (alpha / r) * B @ A to its layer's weight."""
    dropout: float = 0.0
    """Dropout on each adapter's input (training only)."""
    target_modules: list[str] = field(default_factory=default_lora_targets)
    """Module name suffixes to adapt (nn.Linear layers): attention q/k/v/o_proj, Mamba2 in_proj, MLP and MoE shared-
    expert up/down_proj. Routed MoE experts are fused 3-D tensors (experts.up_proj (E, out, in)), not Linear modules:
    they get no adapter and stay frozen. Mamba2 out_proj and conv1d are refused: the fused CUDA Mamba kernel reads
    out_proj.weight directly (an adapter there would be silently skipped) and peft refuses to load such adapters."""
    mtp_head: bool = False
    """Adapters on a shipped MTP head too (its base weights then frozen); false = the head trains per model.freeze and
    model.mtp. A new (not shipped) head always trains in full: true is refused for it."""

    def __post_init__(self) -> None:
        _check(self.r >= 0, "model.lora.r", f"must be >= 0, got {self.r}")
        _check(self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        self.target_modules = list(self.target_modules)
        _check(bool(self.target_modules), "model.lora.target_modules", "must name at least one module")
        bad = sorted(set(self.target_modules) & set(LORA_REFUSED_TARGETS))
        _check(not bad, "model.lora.target_modules",
               f"holds {bad}: Nemotron-H's fused Mamba kernel reads out_proj.weight directly, bypassing an adapter, "
               "and peft refuses LoRA on Mamba out_proj/conv1d; remove them")

    @property
    def enabled(self) -> bool:
        """Whether adapters are built (r > 0)."""
        return self.r > 0


OPTIM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to a floor."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms and biases)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.05
    """Floor of the cosine schedule as a fraction of lr."""
    decay_steps: int | None = None
    """Length of the cosine decay; null = trainer.max_steps."""
    implementation: str = "auto"
    """AdamW kernel: fused (one kernel over all parameters), foreach, for_loop, or auto = fused where torch has
    a fused AdamW for the parameters' device (CPU, CUDA), else foreach. On CPU the per-tensor for_loop is several
    times slower than the fused step, a large share of a small-batch train step (bench/results/mtp_overhead.json)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "model.optim.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, "model.optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "model.optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.implementation in OPTIM_IMPLEMENTATIONS, "model.optim.implementation",
               f"must be one of {', '.join(OPTIM_IMPLEMENTATIONS)}, got {self.implementation!r}")


@dataclass
class ParallelConfig:
    """Distributed training options (used under Lightning's ModelParallelStrategy)."""

    activation_checkpointing: bool = False
    """Recompute each backbone block in backward to save memory."""
    encoder_activation_checkpointing: bool = False
    """Recompute each Conformer layer of the audio encoder in backward (only its input is kept): the encoder's
    activations grow with the seconds of audio per rank and dominate at 300-600 s (salm-mtp plan)."""
    param_dtype: str | None = None
    """FSDP2 mixed precision: parameter dtype for compute (e.g. bfloat16); null = full precision."""
    reduce_dtype: str | None = None
    """FSDP2 mixed precision: gradient reduction dtype (e.g. float32)."""
    frozen_dtype: str | None = None
    """Storage dtype of frozen parameters (e.g. bfloat16: half the memory of a frozen LLM); null = float32. Trainable
    parameters always keep fp32 master weights; tensors transformers keeps in fp32 (e_score_correction_bias) and the
    feature buffers stay fp32. Needs param_dtype equal to it under FSDP2, or trainer.precision=bf16-mixed otherwise."""
    tensor_parallel_size: int = 1
    """Tensor parallel size; must be 1 while MTP is enabled."""
    pipeline_parallel_size: int = 1
    """Pipeline parallel size; pipeline parallelism with MTP is not supported."""
    scale_loss_by_dp_size: bool = True
    """Multiply the optimised loss by dp_size (docs/design.md §3). Test-only switch: never turn off for training."""

    def __post_init__(self) -> None:
        for key in ("param_dtype", "reduce_dtype", "frozen_dtype"):
            val = getattr(self, key)
            _check(val in (None, "float32", "bfloat16", "float16"), f"model.parallel.{key}",
                   f"must be null, float32, bfloat16 or float16, got {val!r}")
        _check(self.tensor_parallel_size >= 1, "model.parallel.tensor_parallel_size",
               f"must be >= 1, got {self.tensor_parallel_size}")
        _check(self.pipeline_parallel_size >= 1, "model.parallel.pipeline_parallel_size",
               f"must be >= 1, got {self.pipeline_parallel_size}")


def default_freeze() -> list[str]:
    return []


@dataclass
class FreezeConfig:
    """Parameters to freeze, by regular expressions over names such as ``llm.model.layers.3.mixer.in_proj.weight``."""

    patterns: list[str] = field(default_factory=default_freeze)
    """re.search patterns; a matching parameter gets requires_grad=False (e.g. '^llm\\.model\\.' freezes the backbone)."""
    unfreeze: list[str] = field(default_factory=default_freeze)
    """Patterns re-enabled after freezing (e.g. '^llm\\.mtp\\.' to train the head of a frozen LLM)."""
