"""``DataConfig``: every ``--data.*`` setting of a run, one dataclass with a docstring per field (the help text).

The settings are written here only. ``SALMDataModule``'s constructor and ``data_config`` take them as keyword
arguments whose signature and ``Args:`` docstring are generated from the dataclass (``takes_settings_of``), so
jsonargparse (``salm-mtp fit --data.*``, ``--help``, a run's saved ``data:`` section) reads names, types, defaults
and help from this one place.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from salm_mtp.data.mix import InputConfig, as_inputs
from salm_mtp.data.policy import POLICIES
from salm_mtp.data.prompt import PromptConfig
from salm_mtp.errors import MissingInputError, config_error

MAKE_DEMO = "salm-mtp make-demo-data"


@dataclass
class DataConfig:
    """Where the data is and how it is batched (``--data.*``)."""

    train_manifest: str | None = None
    """lhotse CutSet (jsonl.gz) for training (shorthand for one data.inputs source of type cuts); None: no
    training data, or data.inputs."""
    val_manifest: str | None = None
    """CutSet for validation; None: no validation."""
    test_manifest: str | None = None
    """CutSet for testing; None: no test set."""
    tokenizer_path: str | None = None
    """HF tokenizer directory (``AutoTokenizer.from_pretrained``); None: the model must call
    ``SALMDataModule.set_tokenizer`` before the loaders are built."""
    max_duration: float = 60.0
    """Seconds of audio per batch (the batch size is dynamic); not used when data.max_tokens is set."""
    num_buckets: int = 8
    """Duration buckets of the train sampler (cuts of similar length are batched together)."""
    shuffle: bool = True
    """Shuffle the training cuts (differently each epoch, reproducibly from ``seed``)."""
    seed: int = 0
    """Seed of the train sampler's shuffling."""
    num_workers: int = 0
    """DataLoader worker processes (0: load audio in the training process)."""
    max_cuts: int | None = None
    """Upper bound on cuts per batch (None: only ``max_duration`` limits it)."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt wording and template."""
    on_bad_cut: str = "skip"
    """What a bad cut (unreadable/empty/mis-declared/too long audio, empty or too long text, a manifest line that is
    not a cut) does: skip (left out, logged, counted as skipped_cuts/<reason>, listed in skipped_cuts.jsonl of the run
    dir) or raise (the run stops before training, naming cut, file and reason)."""
    max_cut_duration: float | None = None
    """Longest usable cut in seconds; null: only max_duration bounds it (a longer cut can never be batched)."""
    max_target_tokens: int | None = 2048
    """Most answer tokens per cut (eos excluded); longer answers are bad cuts. null: no bound."""
    max_seq_len: int | None = None
    """Most LLM positions per cut (prompt + audio embeddings + answer); null: no bound."""
    precheck: bool = True
    """Check every train and val cut (manifest lines, durations, text, audio headers) before the first training step;
    false: cuts are only checked when loaded (a bad val cut then shows at the first validation)."""
    inputs: list[InputConfig] | None = None
    """Named training sources {name, type: cuts|conversations|text, path or paths, weight, system_prompt,
    loss_turns} (formats: data/README.md); two or more are mixed by weight into an endless stream (bound the run
    with trainer.max_steps). null: data.train_manifest is the one source."""
    val_inputs: list[InputConfig] | None = None
    """Named validation sets (same fields, weight unused), each logged as val_loss/<name>; val_loss is over all
    of them. null: data.val_manifest."""
    max_tokens: int | None = None
    """Batch budget in LLM positions: b examples whose longest has L positions (text tokens + audio seconds x
    positions per second) fit when b * L <= max_tokens; replaces max_duration when set. Required with text or
    conversations sources. null: max_duration bounds batches."""
    bucket_window: int = 1000
    """With max_tokens, in training: this many consecutive examples of the (shuffled) stream are sorted by length
    and cut into budgeted batches, served in a seeded random order, so a batch holds examples of similar length
    (less padding; the source mix is unchanged over a window). 0: batches follow the stream order."""
    mix_in_batch: bool = True
    """With several training sources and bucket_window: every batch of a window carries each source in proportion to
    its share of the window (each source sorted by length and dealt across the window's batches, so a batch's rows
    of one source have similar lengths). false: the window is sorted as one, and sources of different lengths fall
    into different batches (on the demo mix many batches then hold no ASR row: docs/guide.md, "Mixing speech,
    text and spoken multi-turn conversations")."""

    def __post_init__(self) -> None:
        if self.prompt is None:
            self.prompt = PromptConfig()
        self.inputs = as_inputs(self.inputs, "data.inputs") or None
        self.val_inputs = as_inputs(self.val_inputs, "data.val_inputs") or None
        if self.inputs and self.train_manifest is not None:
            raise config_error("data.inputs", "data.inputs and data.train_manifest are both set",
                               "list the manifest in data.inputs (type: cuts) and set --data.train_manifest=null")
        if self.val_inputs and self.val_manifest is not None:
            raise config_error("data.val_inputs", "data.val_inputs and data.val_manifest are both set",
                               "list the manifest in data.val_inputs (type: cuts) and set --data.val_manifest=null")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise config_error("data.max_tokens", f"must be >= 1 or null, got {self.max_tokens}")
        if self.bucket_window < 0:
            raise config_error("data.bucket_window", f"must be >= 0, got {self.bucket_window}")
        text_like = [i.name for i in (self.inputs or []) + (self.val_inputs or []) if i.type != "cuts"]
        if text_like and self.max_tokens is None:
            raise config_error("data.max_tokens", f"sources {text_like} are conversations / text: their batches need "
                               "a token budget", "set --data.max_tokens (LLM positions per batch, e.g. 4096)")
        if self.on_bad_cut not in POLICIES:
            raise config_error("data.on_bad_cut", f"must be 'skip' or 'raise', got {self.on_bad_cut!r}")
        for key in ("max_cut_duration", "max_target_tokens", "max_seq_len"):
            val = getattr(self, key)
            if val is not None and not val > 0:
                raise config_error(f"data.{key}", f"must be > 0 or null, got {val}")
        if not self.max_duration > 0:
            raise config_error("data.max_duration", f"must be > 0, got {self.max_duration}")
        if self.num_buckets < 2:  # lhotse's DynamicBucketingSampler asserts num_buckets > 1
            raise config_error("data.num_buckets", f"must be >= 2, got {self.num_buckets}")
        if self.num_workers < 0:
            raise config_error("data.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.max_cuts is not None and self.max_cuts < 1:
            raise config_error("data.max_cuts", f"must be >= 1 or null, got {self.max_cuts}")
        for key in ("train_manifest", "val_manifest", "test_manifest"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise MissingInputError(
                    f"data.{key}: no such file {path!r}; set --data.{key}, or make the demo "
                    f"corpus with `{MAKE_DEMO}`"
                )
        if self.tokenizer_path is not None and not Path(self.tokenizer_path).is_dir():
            raise MissingInputError(
                f"data.tokenizer_path: no such directory {self.tokenizer_path!r}; set "
                f"--data.tokenizer_path (the demo tokenizer is made by `{MAKE_DEMO}`)"
            )


def takes_settings_of(cls: type) -> typing.Callable:
    """Decorator: ``fn(**settings)`` (a function, or a method with ``self``) gets the keyword-only signature of the
    dataclass ``cls``'s fields and an ``Args:`` section of their docstrings appended to its own. A field with a
    ``default_factory`` takes ``None`` (the dataclass's ``__post_init__`` fills it in)."""

    def apply(fn: typing.Callable) -> typing.Callable:
        import docstring_parser

        hints = typing.get_type_hints(cls)
        params = []
        for f in fields(cls):
            annotation, default = hints[f.name], f.default
            if f.default_factory is not MISSING:
                annotation, default = annotation | None, None
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=inspect.Parameter.empty if default is MISSING else default))
        own = list(inspect.signature(fn).parameters.values())
        leading = [p for p in own if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]  # self
        fn.__signature__ = inspect.Signature(leading + params, return_annotation=inspect.signature(fn).return_annotation)
        docs = {p.arg_name: " ".join(p.description.split())
                for p in docstring_parser.parse_from_object(cls).params if p.description}
        args = "\n".join(f"    {f.name}: {docs.get(f.name, '')}" for f in fields(cls))
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n{args}\n"
        return fn

    return apply


@takes_settings_of(DataConfig)
def data_config(**settings) -> DataConfig:
    """The ``DataConfig`` of ``--data.*`` settings (how a run's saved ``data:`` section is read back)."""
    return DataConfig(**settings)
