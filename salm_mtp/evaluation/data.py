"""Evaluation inputs: the model to score (a checkpoint or an export) and the manifest, read by the training code's
loader with the run's data settings; the index that puts rows back in manifest order."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

from lhotse import CutSet

from salm_mtp.data.conversation import conversation_of
from salm_mtp.data.datamodule import DataConfig, SALMDataModule
from salm_mtp.data.dataset import reference_answer
from salm_mtp.data.manifest import load_cuts
from salm_mtp.data.mix import SOURCE_TYPES, PerTurn, source_cuts
from salm_mtp.data.policy import BadCut, SkipLog
from salm_mtp.errors import MissingInputError, check_ckpt_path


def load_model(ckpt: str | None = None, model: str | None = None):
    """The SALM of a Lightning checkpoint (``ckpt``: .ckpt file or sharded directory) or of an
    export directory (``model``), on CPU (``salm_mtp.io.load_model``)."""
    from salm_mtp.io.checkpoints import load_model as _load

    check_model_path(ckpt, model)
    return _load(model or ckpt)


def check_model_path(ckpt: str | None, model: str | None) -> None:
    """MissingInputError unless exactly one of ``ckpt`` / ``model`` is given and exists."""
    if (ckpt is None) == (model is None):
        raise ValueError("pass exactly one of --ckpt (Lightning checkpoint) or --model (export directory)")
    if model is not None and not os.path.isdir(model):
        raise MissingInputError(f"--model {model!r} is not a directory; pass one written by `salm-mtp export`")
    check_ckpt_path(ckpt, "--ckpt")


def default_metrics_csv(ckpt: str | None) -> str | None:
    """The CSVLogger metrics.csv of a checkpoint's run: ``<log_dir>/metrics.csv`` for
    ``<log_dir>/checkpoints/x.ckpt`` (or next to the checkpoint); None if there is none."""
    if ckpt is None:
        return None
    here = os.path.dirname(os.path.abspath(ckpt))
    for d in (here, os.path.dirname(here)):
        path = os.path.join(d, "metrics.csv")
        if os.path.isfile(path):
            return path
    return None


DEFAULT_BATCH_SIZE = 16
"""Cuts per batch when neither --batch-size nor the run's data.max_cuts says."""


class SkipRows(SkipLog):
    """The run's SkipLog that also hands each newly skipped cut to the evaluation (a hyps row per cut)."""

    def __init__(self) -> None:
        super().__init__()
        self.new: list[BadCut] = []

    def record(self, bad: BadCut, warn: bool = True) -> bool:
        if super().record(bad, warn):
            self.new.append(bad)
            return True
        return False

    def take(self) -> list[BadCut]:
        out, self.new = self.new, []
        return out


TRAINING_ONLY = ("train_manifest", "val_manifest", "test_manifest", "tokenizer_path", "inputs", "val_inputs")
"""DataConfig fields an evaluation sets to None: the run's training and validation sources (their files need
not exist any more; the manifest to evaluate replaces test_manifest) and its tokenizer path (the model's own
tokenizer is used, as SALMModule hands it to the datamodule in training)."""


def not_evaluated() -> dict[str, None]:
    """{field: None} for the TRAINING_ONLY fields this DataConfig has."""
    names = {f.name for f in fields(DataConfig)}
    return {k: None for k in TRAINING_ONLY if k in names}


def eval_datamodule(tokenizer, manifest: str, data: DataConfig | None = None, batch_size: int | None = None,
                    limit: int | None = None, num_workers: int | None = None,
                    audio_positions_per_second: float | None = None, input_type: str = "cuts") -> SALMDataModule:
    """The training data code with ``manifest`` as its test split: ``data`` (the run's DataConfig; None: the
    defaults) with ``max_cuts = batch_size`` (None: the run's, else DEFAULT_BATCH_SIZE), the model's
    ``tokenizer``, no train/val manifests. ``eval_loader(dm, manifest, input_type)`` yields the evaluation
    batches (for cuts its ``test_dataloader()``) and its ``skip_log`` (a ``SkipRows``) every cut left out."""
    if input_type not in SOURCE_TYPES:
        raise ValueError(f"--type must be one of {', '.join(INPUT_TYPES)}, got {input_type!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not os.path.isfile(manifest):
        raise MissingInputError(f"--manifest {manifest!r}: no such file; pass a lhotse CutSet manifest (jsonl.gz) "
                                "or a conversation / text JSONL (data/README.md)")
    data = data if data is not None else DataConfig()
    cfg = replace(data, **{**not_evaluated(), "test_manifest": manifest if input_type == "cuts" else None,
                           "max_cuts": batch_size if batch_size is not None else (data.max_cuts or DEFAULT_BATCH_SIZE),
                           "num_workers": data.num_workers if num_workers is None else num_workers})
    dm = SALMDataModule.from_config(cfg)
    dm.skip_log = SkipRows()
    dm.connect(tokenizer, audio_positions_per_second)  # as training does: data.max_seq_len counts the audio
    if limit is not None and input_type == "cuts":
        dm.use_first_cuts("test", limit)
    return dm


def eval_loader(dm: SALMDataModule, manifest: str, input_type: str = "cuts", limit: int | None = None):
    """The evaluation batches of ``manifest``: the test loader for cuts; for conversation / text sets one row per
    assistant turn (the reference history as the prompt, that turn the target: ``source_dataloader(per_turn)``)."""
    if input_type == "cuts":
        return dm.test_dataloader()
    return dm.source_dataloader(eval_source(manifest, input_type), per_turn=True, limit=limit)


def cut_task(cut) -> str:
    """A cut's task (``supervision.custom["task"]``, default asr; "" without a supervision)."""
    return ((cut.supervisions[0].custom or {}).get("task", "asr")) if cut.supervisions else ""


def asr_first(dm: SALMDataModule) -> None:
    """Serve ``dm``'s test cuts with the ASR ones first (each in manifest order): with CTC drafts, a batch whose rows
    all carry one can finish in its prompt's forward. Rows are put back in manifest order by the index."""
    dm.reorder("test", key=lambda cut: cut_task(cut) != "asr")


def cut_groups(cut) -> dict[str, str]:
    """The evaluation groups a cut carries: ``supervision.custom["groups"]`` ({name: value}), as strings."""
    groups = ((cut.supervisions[0].custom or {}).get("groups") if cut.supervisions else None) or {}
    return {str(k): str(v) for k, v in groups.items()} if isinstance(groups, dict) else {}


@dataclass
class ManifestIndex:
    """What evaluation needs of a manifest besides its audio: each row's place, task and reference, and groups."""

    rows: dict[str, tuple[int, str | None, str | None]] = field(default_factory=dict)
    """{row id: (position, task, reference)}: cut ids, or turn ids ``<conversation id>#<k>``."""
    groups: dict[str, dict[str, str]] = field(default_factory=dict)
    """{cut id: its evaluation groups} (``cut_groups``) of the cuts that have any."""
    duplicates: list[str] = field(default_factory=list)
    """Row ids met more than once (each after its first): hypotheses are keyed by id, so evaluate refuses them."""

    def add(self, row_id: str, row: tuple[int, str | None, str | None]) -> None:
        """Index a row; a repeated id is recorded in ``duplicates`` (the first row stays)."""
        if row_id in self.rows:
            self.duplicates.append(row_id)
        else:
            self.rows[row_id] = row


def manifest_index(manifest: str, limit: int | None = None) -> ManifestIndex:
    """The index of the manifest's (first ``limit``) cuts; unreadable lines are left to the datamodule, which
    reports them."""
    index = ManifestIndex()
    for i, cut in enumerate(load_cuts(manifest, on_bad_line=lambda bad: None)):
        if limit is not None and i >= limit:
            break
        try:
            task, ref = reference_answer(cut) if cut.supervisions else (None, None)
        except (IndexError, ValueError):
            task, ref = None, None
        index.add(cut.id, (i, task, ref))
        groups = cut_groups(cut)
        if groups:
            index.groups.setdefault(cut.id, groups)
    return index


INPUT_TYPES = ("auto",) + SOURCE_TYPES
TURN_TASKS = ("conversation", "text")
"""Row tasks of conversation / text examples (salm_mtp.data.conversation.Conversation.kind)."""


def eval_source(manifest: str, input_type: str) -> dict:
    """The ``data.inputs`` entry that evaluates a conversation / text ``manifest`` (name "eval")."""
    return {"name": "eval", "type": input_type, "path": manifest}


def turn_index(manifest: str, input_type: str, limit: int | None = None) -> ManifestIndex:
    """The index of a conversation / text manifest's (first ``limit``) assistant turns (rows by turn id, with the
    reference turn), in the order the evaluation loader yields them; bad lines are left to the datamodule, which
    reports them."""
    from salm_mtp.data.mix import as_inputs

    cuts = CutSet(PerTurn(source_cuts(as_inputs([eval_source(manifest, input_type)])[0], None, lambda bad: None)))
    index = ManifestIndex()
    for i, cut in enumerate(cuts):
        if limit is not None and i >= limit:
            break
        conv = conversation_of(cut)
        index.add(cut.id, (i, conv.kind, conv.answer))
    return index
