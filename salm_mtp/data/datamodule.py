"""Lightning data module: lhotse manifests -> samplers -> loaders (train loader resumable).

    dm = SALMDataModule(train_manifest="data/demo/train_cuts.jsonl.gz",
                        val_manifest="data/demo/dev_cuts.jsonl.gz",
                        tokenizer_path="data/demo/tokenizer")

- train: ``DynamicBucketingSampler`` (batches of up to ``max_duration`` seconds of audio, cuts of
  similar length together, shuffled per epoch from ``seed``) inside a ``ResumableDataLoader``;
  val/test: ``DynamicCutSampler`` in manifest order. The dataset (``SALMDataset``) only collates.
- Distributed: each data-parallel rank reads its own batches (the lhotse sampler shards by
  rank; with a ``data_parallel`` device mesh, tensor-parallel peers read the same batches), so
  the Trainer must not inject its DistributedSampler: ``--trainer.use_distributed_sampler false``.
- Mid-epoch resume: Lightning's fit loop stores ``train_dataloader().state_dict()`` in every
  checkpoint (``FitLoop.on_save_checkpoint`` -> ``CombinedLoader._state_dicts``, which picks
  loaders with ``state_dict``/``load_state_dict``) and hands it back to the fresh loader before
  the first batch on resume (``FitLoop.setup_data`` -> ``_load_combined_loader_states``). The
  state is ``{"epoch", "batches_done"}``; the next iteration skips ``batches_done`` sampler
  batches without reading their audio. Lightning fetches one batch ahead, so inside a Trainer
  ``batches_done`` counts the batches the training loop took, not the one waiting in its
  prefetch buffer.
- Manifests may store audio paths relative to their own directory (the demo corpus does):
  ``load_cuts`` resolves them, so the data loads from any working directory.
- Bad cuts (salm_mtp.data.policy) follow ``on_bad_cut``. Before the first training batch
  (``precheck``) every train and val cut is checked (manifest line, duration, text, audio header);
  under "raise" the first bad one stops the run there, under "skip" they are counted in ``skip_log``
  and left out by the samplers, so no batch ever holds more than ``max_duration`` seconds.
- Named sources (``data.inputs``: cuts, conversations, text; salm_mtp.data.mix): two or more are mixed by weight
  into one endless, seeded stream (train with ``trainer.max_steps``); rows carry their source index
  (``source_ids``) for the per-source metrics. ``data.max_tokens`` bounds batches in LLM positions (padded
  B x longest, audio counted as the positions it becomes); ``data.val_inputs`` gives named validation sets.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from functools import partial
from itertools import islice

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lhotse import CutSet
from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from salm_mtp.data.dataset import SALMDataset
from salm_mtp.data.manifest import load_cuts
from salm_mtp.data.mix import BudgetSampler, Endless, InputConfig, PerTurn, Prepared, as_inputs, mix, source_cuts
from salm_mtp.data.checks import CutChecker, located
from salm_mtp.data.config import MAKE_DEMO, DataConfig, takes_settings_of
from salm_mtp.data.loader import ResumableDataLoader, ResumableSampler, ignore_stop_signals
from salm_mtp.data.policy import BadCut, SkipLog, handle
from salm_mtp.data.precheck import Precheck
from salm_mtp.data.prompt import PromptFormatter
from salm_mtp.errors import SalmError, check_ckpt_path, check_writable_dir
from salm_mtp.lightning_private import fit_epoch, injects_distributed_sampler, prefetched_batches

log = logging.getLogger(__name__)


class SALMDataModule(pl.LightningDataModule):
    """Loads manifests and the tokenizer; builds the samplers and loaders. Its arguments are ``DataConfig``'s fields
    (salm_mtp/data/config.py documents each one; the constructor's signature and help are generated from it)."""

    @takes_settings_of(DataConfig)
    def __init__(self, **settings) -> None:
        """The settings (keyword arguments) are ``DataConfig``'s fields."""
        super().__init__()
        self.cfg = DataConfig(**settings)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.dataset: SALMDataset | None = None
        self._cuts: dict[str, CutSet] = {}
        self.skip_log = SkipLog()
        """Cuts skipped by this process (samplers, precheck) and reported by the training loop's batches."""
        self.audio_positions_per_second: float | None = None
        self._precheck = Precheck()  # what the check before training found (salm_mtp/data/precheck.py)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> SALMDataModule:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})

    # ---- tokenizer -------------------------------------------------------------------------
    def connect(self, tokenizer: PreTrainedTokenizerBase, audio_positions_per_second: float | None = None) -> None:
        """The one link from a model (training, evaluation, pretraining all call this): its tokenizer, with the
        audio placeholder, replaces ``tokenizer_path``; its LLM positions per second of audio are counted in
        ``max_seq_len`` / ``max_tokens``."""
        self.set_tokenizer(tokenizer)
        if audio_positions_per_second is not None:
            self.set_audio_rate(audio_positions_per_second)

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Use ``tokenizer`` (e.g. the model's) instead of loading ``tokenizer_path``."""
        self.tokenizer = tokenizer
        self.dataset = None  # rebuilt with this tokenizer

    def set_audio_rate(self, positions_per_second: float) -> None:
        """LLM positions per second of audio (from the model): counted in ``max_seq_len``."""
        self.audio_positions_per_second = positions_per_second
        self.dataset = None

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded from ``tokenizer_path`` on first use."""
        if self.tokenizer is None:
            if self.cfg.tokenizer_path is None:
                raise ValueError(
                    "no tokenizer: set --data.tokenizer_path or call SALMDataModule.set_tokenizer()"
                )
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.tokenizer_path)
            except (OSError, ValueError) as e:
                from salm_mtp.errors import SalmError

                raise SalmError(f"data.tokenizer_path={self.cfg.tokenizer_path!r}: no loadable tokenizer there "
                                f"({str(e)[:200]}); set --data.tokenizer_path") from None
        return self.tokenizer

    def checker(self, for_batching: bool = True) -> CutChecker:
        """The bad-cut checks of these settings (``for_batching``: a cut must fit in one batch)."""
        return CutChecker(
            self.get_dataset().formatter,
            max_target_tokens=self.cfg.max_target_tokens,
            max_seq_len=self.cfg.max_seq_len,
            max_cut_duration=self.cfg.max_cut_duration,
            max_duration=self.cfg.max_duration if for_batching else None,
            audio_positions_per_second=self.audio_positions_per_second,
            max_tokens=self.cfg.max_tokens if for_batching else None,
        )

    def get_dataset(self) -> SALMDataset:
        if self.dataset is None:
            tok = self.get_tokenizer()
            fmt = PromptFormatter(tok, self.cfg.prompt)
            self.dataset = SALMDataset(tok, fmt, policy=self.cfg.on_bad_cut)
            self.dataset.checker = self.checker()
        return self.dataset

    def report_skipped(self, batch: dict) -> None:
        """Count the cuts a (worker-built) batch left out; called by the loop for every batch it takes."""
        for bad in batch.get("skipped", ()):
            self.skip_log.record(BadCut(**bad), warn=False)

    # ---- cuts and samplers -----------------------------------------------------------------
    def _cutset(self, split: str) -> CutSet:
        if split not in self._cuts:
            key = f"{split}_manifest"
            path = getattr(self.cfg, key)
            if path is None:
                raise ValueError(f"data.{key} is not set; set --data.{key} (e.g. `{MAKE_DEMO}`)")
            self._cuts[split] = load_cuts(path, self._on_bad)
        return self._cuts[split]

    def use_first_cuts(self, split: str, n: int) -> None:
        """Use only the first ``n`` cuts of ``split``'s manifest from now on (``salm-mtp evaluate --limit``)."""
        if n < 1:
            raise ValueError(f"--limit must be >= 1, got {n}")
        self._cuts[split] = self._cutset(split).subset(first=n)

    def reorder(self, split: str, key) -> None:
        """Serve ``split``'s cuts sorted by ``key(cut)``, stable (manifest order among equal keys)."""
        self._cuts[split] = CutSet.from_cuts(sorted(self._cutset(split), key=key))

    def _on_bad(self, bad: BadCut) -> None:
        handle(bad, self.cfg.on_bad_cut, self.skip_log)

    def _usable(self, split: str, with_text: bool = True) -> CutSet:
        """The split's cuts without bad ones (policy applied); each fits in one batch of max_duration."""
        return self._prepared(self._cutset(split), split, with_text)

    def _prepared(self, cuts, key: str, with_text: bool = True) -> CutSet:
        """``cuts`` without bad ones (policy applied; ``key`` names the set in the precheck's bad list), each
        fitting in one batch; with ``max_tokens`` each carries its LLM positions (salm_mtp.data.mix.Prepared)."""
        checker = self.checker()

        def check(cut) -> BadCut | None:
            return located(checker.check_duration(cut) or (checker.check_text(cut) if with_text else None), cut)

        measure = checker.positions if self.cfg.max_tokens is not None else None
        return CutSet(Prepared(cuts, check, measure, self._on_bad, skip=partial(self._precheck.skips, key)))

    # ---- named sources (data.inputs / data.val_inputs) ------------------------------------------
    def source_names(self) -> list[str]:
        """Names of the training sources (data.inputs; empty with data.train_manifest): the batches' source_ids
        index this list."""
        return [spec.name for spec in self.cfg.inputs or []]

    def val_names(self) -> list[str]:
        """Names of the validation sets (data.val_inputs; empty with data.val_manifest), in loader order."""
        return [spec.name for spec in self.cfg.val_inputs or []]

    def _source(self, split: str, index: int) -> CutSet:
        """The lazy examples of data.inputs[index] (split "train", tagged with the index) or data.val_inputs[index]."""
        key = f"{split}/{index}"
        if key not in self._cuts:
            specs = self.cfg.inputs if split == "train" else self.cfg.val_inputs
            self._cuts[key] = source_cuts(specs[index], index if split == "train" else None, self._on_bad)
        return self._cuts[key]

    def _check_sets(self) -> list[tuple[str, str, CutSet]]:
        """(bad-list key, config key, examples) of every train and val set."""
        out = []
        for split in ("train", "val"):
            specs = self.cfg.inputs if split == "train" else self.cfg.val_inputs
            if specs:
                key = "inputs" if split == "train" else "val_inputs"
                out += [(f"{split}/{s.name}", f"data.{key}[{s.name!r}]", self._source(split, i))
                        for i, s in enumerate(specs)]
            elif getattr(self.cfg, f"{split}_manifest") is not None:
                out.append((split, f"data.{split}_manifest", self._cutset(split)))
        return out

    def train_cuts(self) -> CutSet:
        """The training examples as the train sampler reads them: one source as it is, several mixed by weight
        into one endless seeded stream (salm_mtp.data.mix)."""
        specs = self.cfg.inputs
        if not specs:
            return self._usable("train")
        sets = [self._prepared(self._source("train", i), f"train/{s.name}") for i, s in enumerate(specs)]
        if len(sets) == 1:
            return sets[0]
        streams = [Endless(c, self.cfg.seed, s.name, shuffle=self.cfg.shuffle,
                           why_empty=partial(self.why_unusable, f"train/{s.name}")) for c, s in zip(sets, specs)]
        return mix(streams, [s.weight for s in specs], self.cfg.seed)

    def _budget_sampler(self, cuts: CutSet, shuffle: bool, world_size: int, rank: int,
                        bucket: bool = False) -> BudgetSampler:
        """Batches bounded by data.max_tokens LLM positions (salm_mtp.data.mix.BudgetSampler); ``bucket``: sorted
        by length per data.bucket_window examples (training)."""
        if self.audio_positions_per_second is None:
            log.warning("data.max_tokens: the audio rate is unknown (set_audio_rate not called): audio counts 1 "
                        "position per clip")
        return BudgetSampler(cuts, self.cfg.max_tokens, max_cuts=self.cfg.max_cuts, shuffle=shuffle,
                             seed=self.cfg.seed, world_size=world_size, rank=rank,
                             bucket_window=self.cfg.bucket_window if bucket else 0,
                             mix_in_batch=self.cfg.mix_in_batch)

    def precheck(self) -> None:
        """Check every train and val cut once (manifest lines, durations, text, audio headers), before training."""
        if self.cfg.precheck:
            checker = self.checker()
            self._precheck.run(partial(checker.check_metadata, with_header=True), self._check_sets(), self._on_bad)

    def why_unusable(self, key: str) -> str:
        """Why the set ``key`` (``_check_sets``: a split, or ``split/<source name>``) holds no usable example, in one
        line naming its config key and files."""
        split, _, source = key.partition("/")
        if source:
            spec = next(s for s in (self.cfg.inputs if split == "train" else self.cfg.val_inputs) if s.name == source)
            name = f"data.{'inputs' if split == 'train' else 'val_inputs'}[{source!r}] {spec.files()}"
        else:
            name = f"data.{split}_manifest {getattr(self.cfg, f'{split}_manifest')!r}"
        return self._precheck.why_unusable(key, name, self.skip_log.summary())

    def _dp_rank_and_size(self) -> tuple[int, int]:
        """(rank, size) of the data-parallel group: batches differ across it, not inside TP."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        from salm_mtp.mesh import trainer_dp_mesh  # HSDP: replicate x shard, flattened

        dp = trainer_dp_mesh(trainer)
        if dp is not None:
            return dp.get_local_rank(), dp.size()
        return trainer.global_rank, trainer.world_size

    def _check_no_distributed_sampler(self) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and injects_distributed_sampler(trainer):
            raise ValueError(
                "the lhotse samplers shard the data across ranks themselves, but the Trainer would "
                "replace them with a DistributedSampler; set --trainer.use_distributed_sampler false"
            )

    def setup(self, stage: str | None = None) -> None:
        """The earliest hook of a run: checks the checkpoint to restore and the output directory first."""
        self._check_no_distributed_sampler()
        trainer = self.trainer
        if trainer is not None:
            check_ckpt_path(getattr(trainer, "ckpt_path", None))
            if trainer.is_global_zero:
                check_writable_dir(trainer.default_root_dir, "trainer.default_root_dir")

    # ---- loaders ---------------------------------------------------------------------------
    def _warn_if_before_restore(self) -> None:
        """Lightning only restores the loader state when it builds the loader after restoring
        the checkpoint; ``trainer.estimated_stepping_batches`` with ``max_epochs`` set builds it
        earlier, inside ``configure_optimizers`` (Lightning issue #20550)."""
        trainer = self.trainer
        if trainer is not None and trainer.ckpt_path is not None and trainer.global_step == 0:
            rank_zero_warn(
                "train_dataloader() was requested before the checkpoint was restored (e.g. by "
                "trainer.estimated_stepping_batches in configure_optimizers with max_epochs set): "
                "Lightning will not restore the loader's position, so this epoch restarts from its "
                "first batch. Use --trainer.max_steps without --trainer.max_epochs, or compute the "
                "schedule length from trainer.max_steps."
            )

    def train_dataloader(self) -> ResumableDataLoader:
        self._warn_if_before_restore()
        self.precheck()
        rank, world_size = self._dp_rank_and_size()
        cuts = self.train_cuts()
        # lhotse refuses more buckets than cuts: tiny (test) sets get one bucket per cut
        num_buckets = sum(1 for _ in islice(cuts, self.cfg.num_buckets))
        if num_buckets == 0:
            raise SalmError(self.why_unusable(f"train/{self.cfg.inputs[0].name}" if self.cfg.inputs else "train"))
        if num_buckets < self.cfg.num_buckets:
            n = num_buckets
            log.warning("data.num_buckets=%d > %d training cuts: using %d", self.cfg.num_buckets, n, n)
        # a mixed stream is already shuffled: lhotse's length buckets would hold a backlog that skews the sources'
        # shares for hundreds of steps; the budget sampler sorts by length within data.bucket_window examples only
        mixed = len(self.cfg.inputs or []) > 1
        shuffle = self.cfg.shuffle and not mixed
        if self.cfg.max_tokens is not None:  # LLM-position budget, strict
            sampler = self._budget_sampler(cuts, shuffle, world_size, rank, bucket=True)
        else:
            common = dict(max_duration=self.cfg.max_duration, max_cuts=self.cfg.max_cuts, shuffle=shuffle,
                          seed=self.cfg.seed, drop_last=False, world_size=world_size, rank=rank)
            if mixed or num_buckets < 2:  # (one usable cut: lhotse's bucketing needs two buckets)
                sampler = DynamicCutSampler(cuts, **common)
            else:
                sampler = DynamicBucketingSampler(cuts, num_buckets=num_buckets, **common)
        # Lightning iterates (and prefetches) the loader before its set_epoch() call, so start
        # with the epoch it is about to run: right after an end-of-epoch checkpoint, that is
        # the next epoch, and Lightning restores no loader state in that case.
        sampler.set_epoch(fit_epoch(self.trainer))
        loader = ResumableDataLoader(
            self.get_dataset(),
            ResumableSampler(sampler),
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            worker_init_fn=ignore_stop_signals if self.cfg.num_workers > 0 else None,
        )
        loader.pending = lambda: prefetched_batches(self.trainer)
        loader.stream, loader.dp_size = self.stream_signature(), world_size
        return loader

    def stream_signature(self) -> dict:
        """The settings that decide the training stream's batches (a resume compares them with the checkpoint's)."""
        c = self.cfg
        inputs = [{"name": s.name, "type": s.type, "files": list(s.files()), "weight": s.weight}
                  for s in (c.inputs or [])]
        return {"train_manifest": c.train_manifest, "inputs": inputs, "seed": c.seed, "shuffle": c.shuffle,
                "max_duration": c.max_duration, "max_tokens": c.max_tokens, "max_cuts": c.max_cuts,
                "num_buckets": c.num_buckets, "bucket_window": c.bucket_window, "mix_in_batch": c.mix_in_batch}

    def _eval_dataloader(self, split: str, with_text: bool = True) -> DataLoader:
        return self._eval_loader(self._usable(split, with_text), with_text)

    def _eval_loader(self, cuts: CutSet, with_text: bool = True) -> DataLoader:
        """Loader of usable ``cuts`` in their order (no shuffling), sharded over the data-parallel ranks."""
        rank, world_size = self._dp_rank_and_size()
        if self.cfg.max_tokens is not None:
            sampler = self._budget_sampler(cuts, False, world_size, rank)
        else:
            sampler = DynamicCutSampler(cuts, max_duration=self.cfg.max_duration, max_cuts=self.cfg.max_cuts,
                                        shuffle=False, world_size=world_size, rank=rank)
        dataset = self.get_dataset()
        if not with_text:  # prediction: references are not needed, only the audio
            dataset = SALMDataset(dataset.tokenizer, dataset.formatter, checker=dataset.checker,
                                  policy=dataset.policy, check_text=False)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=self.cfg.num_workers,
                          worker_init_fn=ignore_stop_signals if self.cfg.num_workers > 0 else None)

    def val_dataloader(self) -> DataLoader | list:
        # no val manifest: an empty list tells Lightning there is no validation
        if self.cfg.val_inputs:
            self.precheck()
            return [self._eval_loader(self._prepared(self._source("val", i), f"val/{s.name}"))
                    for i, s in enumerate(self.cfg.val_inputs)]
        if self.cfg.val_manifest is None:
            return []
        self.precheck()  # validate/test runs without fit, or the sanity check before the first train batch
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def source_dataloader(self, spec: InputConfig | dict, per_turn: bool = False,
                          limit: int | None = None) -> DataLoader:
        """Loader of one named set (``data.inputs`` form) in file order, for evaluation. ``per_turn``: each
        conversation becomes one row per assistant turn, the reference history before it as the prompt
        (``prompt_lens``) and that turn as the only target (salm_mtp.data.conversation.turn_examples).
        ``limit``: only the first N examples (rows)."""
        spec = as_inputs([spec])[0]
        cuts = source_cuts(spec, None, self._on_bad)
        if per_turn:
            cuts = CutSet(PerTurn(cuts))
        if limit is not None:
            if limit < 1:
                raise ValueError(f"--limit must be >= 1, got {limit}")
            cuts = cuts.subset(first=limit)
        return self._eval_loader(self._prepared(cuts, f"eval/{spec.name}"))

    def predict_dataloader(self) -> DataLoader:
        """``salm-mtp predict`` decodes the test manifest (``--data.test_manifest``)."""
        return self._eval_dataloader("test", with_text=False)
