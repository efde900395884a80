"""Evaluate a trained SALM model on a lhotse manifest: greedy hypotheses, WER/CER/BLEU, MTP agreement.

    salm-mtp evaluate --ckpt runs/demo/salm/version_0/checkpoints/last.ckpt \\
        --manifest data/demo/test_cuts.jsonl.gz --out runs/demo/eval [--decode greedy|mtp] [--batch-size 16]
    salm-mtp evaluate --model exports/demo --manifest ... --out ...
    salm-mtp evaluate --ckpt ... --manifest data/demo/talk_test.jsonl --out ...   # conversations / text (--type)

Settings come from the run itself: its resolved ``config.yaml`` (``<log_dir>/config.yaml`` for
``<log_dir>/checkpoints/x.ckpt``, ``EXPORT/config.yaml`` for an export, or ``--config FILE``) gives the
``data:`` section (prompt wording and template, bad-cut policy and bounds, ``max_duration``, ...), read
by salm_mtp.run_config with the parser of ``salm-mtp fit``; flags override it (``--manifest``, default
the run's ``data.test_manifest``; ``--batch-size`` = ``data.max_cuts``, default the run's or 16;
``--max-duration``, ``--num-workers``, ``--on-bad-cut``). Without a config a warning says that the
defaults are used. The tokenizer is the model's own, as in training (SALMModule hands it to the
datamodule). The loader is the training code's test loader (``SALMDataModule.test_dataloader``:
``DynamicCutSampler`` in manifest order, ``SALMDataset`` collation, the run's bad-cut checks).

Per batch:
  1. batched greedy decoding with the backbone's cache (salm_mtp.generate), timed;
  2. the MTP head's drafts along the model's own finished greedy answer (teacher-forced, one forward) ->
     per-depth marginal agreement (``mtp_teacher_forced_agreement``; eos counts as a token, padding does
     not) and the chained acceptance a self-speculative decoder would get along that answer (depth k
     counts only when 1..k-1 agree too: ``mtp_teacher_forced_chained_acceptance``) with
     ``teacher_forced_mean_accepted_length`` = 1 + sum_k chained_k;
  3. the main head's teacher-forced top-1 accuracy and cross-entropy on the reference answers (``main_acc``,
     ``main_loss``).
A conversation or text set (``--type conversations|text``, detected from the first line by default; the formats
of data.inputs, data/README.md) is read by the training code's reader (``SALMDataModule.source_dataloader``) with
one row per assistant turn: the reference history before the turn (its audio clips included) is the prompt, the
turn is generated and scored against its reference (``turn_wer``, ``turn_exact_match``), and teacher-forced
(``main_loss``, ``main_acc``; summed over turns, that is the loss of every assistant turn of the set). Rows are
``<conversation id>#<k>`` for the k-th assistant turn; a bad line follows data.on_bad_cut like a bad cut.
With ``--decode mtp`` step 1 also runs MTP self-speculative decoding (salm_mtp.decoding.speculative) on
the same prompts, greedy and MTP alternating which goes first from batch to batch; the hypotheses are
the MTP decoder's, and what it measured live is added under ``spec_*`` names.

Writes to ``--out``:
  hyps.jsonl    one object per manifest cut, in manifest order: {"id", "task", "ref", "hyp"} (+ "groups" when the
                cut carries supervision.custom["groups"]); a cut the data
                code left out (unreadable audio, empty text, too long, ...: salm_mtp.data.policy) has
                "hyp": null and "error": "<reason>: <detail>" (counted in num_failed; fatal only under
                on_bad_cut=raise). Written line by line as batches finish, rewritten in manifest order at the end.
  skipped_cuts.jsonl  the skipped cuts as the training run lists them (SkipLog)
  settings.json the data settings used (``data``: the DataConfig), where they came from (``run_config``: the
                config.yaml, or null for the defaults) and the prompts actually fed to the model, read back from
                the batches (``prompts``: text per task; ``prompt_ids``: their token ids)
  metrics.json  num_utterances (cuts evaluated, failed included), num_failed, skipped_cuts (count per reason),
                num_asr, num_ast, normalizer (applied before WER/CER: --normalizer), wer, wer_raw (raw text),
                wer_by_group ({"name=value": {num, wer, wer_raw, errors, ref_words}} for every group the asr cuts
                carry in supervision.custom["groups"], e.g. "text=unseen", "voice=unseen", "kind=numbers"),
                cer (over decoded asr cuts) with wer_errors, ref_words, cer_errors,
                ref_chars, num_empty_refs, num_empty_hyps (asr), bleu (over ast cuts; null if none),
                mtp_teacher_forced_agreement (marginal, one value per depth; [] without a head),
                mtp_teacher_forced_chained_acceptance, teacher_forced_mean_accepted_length (tokens per backbone
                forward; null without a head), main_acc, main_loss (nats per answer token), num_turns, turn_wer,
                turn_exact_match (conversation / text rows; null without any), generated_tokens, decode_seconds (prompt encoding +
                prefill + decode steps only), tokens_per_s, max_new_tokens, decode ("greedy" | "mtp"). Undefined
                values (nan/inf) are written as null. The teacher-forced figures are offline: measured along the
                finished greedy answer. --decode mtp adds what the speculative decoder measured live:
                spec_num_drafts, spec_tokens_per_forward (emitted tokens / verification forwards),
                spec_chained_acceptance (per depth), spec_mean_accepted_length (1 + their sum),
                spec_row_forwards / greedy_row_forwards (backbone forwards summed over rows, prefills
                included), greedy_decode_seconds / spec_decode_seconds (decoding the same encoded
                prompts), spec_speedup (their ratio), spec_identical_to_greedy, spec_mismatched_rows;
                decode_seconds then covers prompt encoding + the MTP decode.
  report.png    teacher-forced agreement bars + training curves of --metrics-csv (default: the metrics.csv
                that Lightning's CSVLogger wrote next to the checkpoint's run dir, if any)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from lhotse import CutSet
from tqdm import tqdm

from salm_mtp import metrics as M
from salm_mtp.data.conversation import conversation_of
from salm_mtp.data.datamodule import DataConfig, SALMDataModule
from salm_mtp.data.dataset import reference_answer
from salm_mtp.data.manifest import load_cuts
from salm_mtp.data.mix import SOURCE_TYPES, PerTurn, detect_source_type, source_cuts
from salm_mtp.data.policy import BadCut, SkipLog
from salm_mtp.data.prompt import PromptConfig
from salm_mtp.decoding.speculative import SpecStats, mtp_decode
from salm_mtp.errors import MissingInputError
from salm_mtp.generate import decode_text, encode_prompts, greedy_decode, inference, mtp_drafts
from salm_mtp.modules.merge import IGNORE_INDEX

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- loading
def load_model(ckpt: str | None = None, model: str | None = None):
    """The SALMModule of a Lightning checkpoint (``ckpt``: .ckpt file or sharded directory) or of an
    export directory (``model``), on CPU (``salm_mtp.io.load_model``)."""
    from salm_mtp.io import load_model as _load

    check_model_path(ckpt, model)
    return _load(model or ckpt)


def check_model_path(ckpt: str | None, model: str | None) -> None:
    """MissingInputError unless exactly one of ``ckpt`` / ``model`` is given and exists."""
    if (ckpt is None) == (model is None):
        raise ValueError("pass exactly one of --ckpt (Lightning checkpoint) or --model (export directory)")
    if model is not None and not os.path.isdir(model):
        raise MissingInputError(f"--model {model!r} is not a directory; pass one written by `salm-mtp export`")
    if ckpt is not None and not os.path.exists(ckpt):
        raise MissingInputError(f"--ckpt {ckpt!r} does not exist; pass a .ckpt file (or sharded checkpoint "
                                "directory) that `salm-mtp fit` wrote under <log_dir>/checkpoints/")


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


# ------------------------------------------------------------------------------------- data
DEFAULT_BATCH_SIZE = 16
"""Cuts per batch when neither --batch-size nor the run's data.max_cuts says."""


class _SkipRows(SkipLog):
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
    batches (for cuts its ``test_dataloader()``) and its ``skip_log`` (a ``_SkipRows``) every cut left out."""
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
    dm.skip_log = _SkipRows()
    dm.set_tokenizer(tokenizer)
    if audio_positions_per_second is not None:
        dm.set_audio_rate(audio_positions_per_second)  # counted in data.max_seq_len, as in training
    if limit is not None and input_type == "cuts":
        dm.use_first_cuts("test", limit)
    return dm


def eval_loader(dm: SALMDataModule, manifest: str, input_type: str = "cuts", limit: int | None = None):
    """The evaluation batches of ``manifest``: the test loader for cuts; for conversation / text sets one row per
    assistant turn (the reference history as the prompt, that turn the target: ``source_dataloader(per_turn)``)."""
    if input_type == "cuts":
        return dm.test_dataloader()
    return dm.source_dataloader(eval_source(manifest, input_type), per_turn=True, limit=limit)


def cut_groups(cut) -> dict[str, str]:
    """The evaluation groups a cut carries: ``supervision.custom["groups"]`` ({name: value}), as strings."""
    groups = ((cut.supervisions[0].custom or {}).get("groups") if cut.supervisions else None) or {}
    return {str(k): str(v) for k, v in groups.items()} if isinstance(groups, dict) else {}


def manifest_index(manifest: str, limit: int | None = None) -> dict[str, tuple[int, str | None, str | None]]:
    """{cut id: (position, task, reference)} of the manifest's (first ``limit``) cuts; unreadable lines are
    left to the datamodule, which reports them. The cuts' evaluation groups (`cut_groups`) are in
    ``index.groups``."""
    index: dict[str, tuple[int, str | None, str | None]] = _Index()
    for i, cut in enumerate(load_cuts(manifest, on_bad_line=lambda bad: None)):
        if limit is not None and i >= limit:
            break
        try:
            task, ref = reference_answer(cut) if cut.supervisions else (None, None)
        except (IndexError, ValueError):
            task, ref = None, None
        index.setdefault(cut.id, (i, task, ref))
        if cut.supervisions:
            index.groups.setdefault(cut.id, cut_groups(cut))
    return index


class _Index(dict):
    """A manifest index (id -> (position, task, reference)) with the cuts' evaluation groups beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: dict[str, dict[str, str]] = {}


INPUT_TYPES = ("auto",) + SOURCE_TYPES
TURN_TASKS = ("conversation", "text")
"""Row tasks of conversation / text examples (salm_mtp.data.conversation.Conversation.kind)."""


def eval_source(manifest: str, input_type: str) -> dict:
    """The ``data.inputs`` entry that evaluates a conversation / text ``manifest`` (name "eval")."""
    return {"name": "eval", "type": input_type, "path": manifest}


def turn_index(manifest: str, input_type: str,
               limit: int | None = None) -> dict[str, tuple[int, str | None, str | None]]:
    """{turn id ``<conversation id>#<k>``: (position, task, reference turn)} of a conversation / text manifest's
    (first ``limit``) assistant turns, in the order the evaluation loader yields them; bad lines are left to the
    datamodule, which reports them."""
    from salm_mtp.data.mix import as_inputs

    cuts = CutSet(PerTurn(source_cuts(as_inputs([eval_source(manifest, input_type)])[0], None, lambda bad: None)))
    index: dict[str, tuple[int, str | None, str | None]] = _Index()
    for i, cut in enumerate(cuts):
        if limit is not None and i >= limit:
            break
        conv = conversation_of(cut)
        index.setdefault(cut.id, (i, conv.kind, conv.answer))
    return index


def batches(manifest: str, tokenizer, batch_size: int, limit: int | None = None,
            prompt: PromptConfig | None = None, num_workers: int = 0,
            data: DataConfig | None = None) -> tuple[Iterator[dict], int]:
    """(iterator over collated batches in manifest order, number of cuts): ``eval_datamodule``'s test loader."""
    if prompt is not None:
        data = replace(data if data is not None else DataConfig(), prompt=prompt)
    dm = eval_datamodule(tokenizer, manifest, data, batch_size, limit, num_workers)
    return iter(dm.test_dataloader()), len(manifest_index(manifest, limit))


# ------------------------------------------------------------------------------------- evaluation
@dataclass
class _Totals:
    """Sums over batches (fractions are formed once at the end)."""

    rows: list[dict] = field(default_factory=list)
    num_failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    acc_hits: list[float] = field(default_factory=list)
    acc_count: list[int] = field(default_factory=list)
    chain_hits: list[int] = field(default_factory=list)
    chain_count: list[int] = field(default_factory=list)
    main_correct: int = 0
    main_count: int = 0
    main_nll: float = 0.0
    decode: str = "greedy"
    spec: SpecStats | None = None
    greedy_seconds: float = 0.0
    spec_seconds: float = 0.0
    num_drafts: int | None = None
    greedy_row_forwards: int = 0
    spec_mismatched_rows: int = 0
    batches: int = 0
    last_spec_seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    """Cuts the data code left out, per reason (SkipLog.counts)."""
    prompts: dict[str, list[int]] = field(default_factory=dict)
    """Per task, the prompt token ids of the first row of that task (what the model was fed)."""


def teacher_forced_hits(module, batch: dict) -> tuple[int, int, float]:
    """(correct, count, summed cross-entropy in nats) of the main head on the reference answer tokens
    (answer + eos), teacher-forced."""
    with inference(module):
        merged, _, _ = module.prepare_inputs(batch)
        h0 = module(merged.inputs_embeds)  # (B, T', H)
        keep = merged.targets != IGNORE_INDEX  # (B, T')
        logits = module.llm.lm_head(h0[keep]).float()  # (N, V): logits only where a target is
        target = merged.targets[keep]  # (N,)
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return int((logits.argmax(-1) == target).sum()), int(keep.sum()), float(nll)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_batch(module, batch: dict, max_new_tokens: int, totals: _Totals) -> None:
    """Decode one collated batch and add its hypotheses and statistics to ``totals`` (the cuts it left out
    are the caller's: ``add_failed``)."""
    if batch["input_ids"].shape[0] == 0:
        return
    for i, task in enumerate(batch["tasks"]):
        if task not in totals.prompts:
            totals.prompts[task] = batch["input_ids"][i, : int(batch["prompt_lens"][i])].tolist()
    dev = module.device
    batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    _sync(dev)
    t0 = time.perf_counter()
    prompt = encode_prompts(module, batch)
    _sync(dev)
    t_enc = time.perf_counter() - t0
    if totals.decode == "mtp":
        tokens, lengths = _greedy_and_mtp(module, batch, prompt, max_new_tokens, totals)
        totals.seconds += t_enc + totals.last_spec_seconds
    else:
        tokens, lengths = greedy_decode(module, batch, max_new_tokens=max_new_tokens, prompt=prompt)
        _sync(dev)
        totals.seconds += time.perf_counter() - t0
    totals.tokens += int(lengths.sum())
    hyps = decode_text(module.tokenizer, tokens.cpu(), lengths.cpu())
    for cid, task, ref, hyp in zip(batch["ids"], batch["tasks"], batch["answers"], hyps):
        totals.rows.append({"id": cid, "task": task, "ref": ref, "hyp": hyp})

    if module.num_mtp_depths and tokens.shape[1] > 0:
        drafts = mtp_drafts(module, batch, tokens, lengths, prompt=prompt)
        valid = torch.arange(tokens.shape[1], device=dev)[None, :] < lengths[:, None]
        fractions = M.mtp_acceptance(tokens.cpu(), drafts.cpu(), valid.cpu())
        if not totals.acc_hits:
            totals.acc_hits, totals.acc_count = [0.0] * len(fractions), [0] * len(fractions)
        for k, frac in enumerate(fractions, start=1):
            n = int(valid[:, k:].sum())  # the pairs mtp_acceptance scored for depth k
            if n:
                totals.acc_hits[k - 1] += round(frac * n)
                totals.acc_count[k - 1] += n
        chained = M.chained_acceptance_counts(tokens.cpu(), drafts.cpu(), valid.cpu())
        if not totals.chain_hits:
            totals.chain_hits, totals.chain_count = [0] * len(chained), [0] * len(chained)
        for k, (hits, n) in enumerate(chained):
            totals.chain_hits[k] += hits
            totals.chain_count[k] += n

    correct, count, nll = teacher_forced_hits(module, batch)
    totals.main_correct += correct
    totals.main_count += count
    totals.main_nll += nll


def add_failed(totals: _Totals, skipped: list[BadCut]) -> None:
    """A hyps row (hyp None, error "<reason>: <detail>") per skipped cut; manifest lines that are not cuts
    have no id and are only counted (metrics.skipped_cuts)."""
    for bad in skipped:
        if bad.cut_id is not None:
            totals.rows.append({"id": bad.cut_id, "task": None, "ref": None, "hyp": None,
                                "error": f"{bad.reason}: {bad.detail}"})
            totals.num_failed += 1


def _greedy_and_mtp(module, batch: dict, prompt, max_new_tokens: int, totals: _Totals):
    """Greedy and MTP decoding of the same encoded prompts (which runs first alternates per batch); the
    MTP tokens, timings and counts go to ``totals``."""
    dev = module.device
    order = ("greedy", "mtp") if totals.batches % 2 == 0 else ("mtp", "greedy")
    totals.batches += 1
    out = {}
    for which in order:
        _sync(dev)
        t0 = time.perf_counter()
        if which == "greedy":
            out["greedy"] = greedy_decode(module, batch, max_new_tokens=max_new_tokens, prompt=prompt)
        else:
            out["mtp"] = mtp_decode(module, batch, max_new_tokens=max_new_tokens, num_drafts=totals.num_drafts,
                                    prompt=prompt)
        _sync(dev)
        dt = time.perf_counter() - t0
        if which == "greedy":
            totals.greedy_seconds += dt
        else:
            totals.spec_seconds += dt
            totals.last_spec_seconds = dt
    (g_tokens, g_lengths), (tokens, lengths, stats) = out["greedy"], out["mtp"]
    if totals.spec is None:
        totals.spec = SpecStats(stats.num_drafts)
    totals.spec.add(stats)
    totals.greedy_row_forwards += int(g_lengths.sum())  # greedy: one backbone forward per token (prefill incl.)
    totals.spec_mismatched_rows += sum(
        int(n) != int(gn) or not torch.equal(tokens[b, :n], g_tokens[b, :n])
        for b, (n, gn) in enumerate(zip(lengths.tolist(), g_lengths.tolist())))
    return tokens, lengths


def _finite(x):
    """JSON-safe number: nan/inf become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def summarise(totals: _Totals, num_depths: int, max_new_tokens: int, normalizer: str = "whisper_english") -> dict:
    """metrics.json content (keys in the module docstring)."""
    ok = [r for r in totals.rows if r["hyp"] is not None]
    asr = [r for r in ok if r["task"] == "asr"]
    ast = [r for r in ok if r["task"] == "ast"]
    w = M.wer([r["ref"] for r in asr], [r["hyp"] for r in asr], normalizer)
    w_raw = M.wer([r["ref"] for r in asr], [r["hyp"] for r in asr], "none")
    c = M.cer([r["ref"] for r in asr], [r["hyp"] for r in asr], normalizer)
    b = M.bleu([r["ref"] for r in ast], [r["hyp"] for r in ast]) if ast else None
    turns = [r for r in ok if r["task"] in TURN_TASKS]
    tw = M.wer([r["ref"] for r in turns], [r["hyp"] for r in turns], normalizer) if turns else None
    if num_depths:
        acceptance = [h / n if n else math.nan for h, n in zip(totals.acc_hits, totals.acc_count)]
        acceptance += [math.nan] * (num_depths - len(acceptance))  # no tokens decoded at all
        chained = [h / n if n else math.nan for h, n in zip(totals.chain_hits, totals.chain_count)]
        chained += [math.nan] * (num_depths - len(chained))
    else:
        acceptance, chained = [], []
    out = {
        "num_utterances": len(totals.rows),
        "num_failed": totals.num_failed,
        "skipped_cuts": dict(sorted(totals.skipped.items())),
        "num_asr": len(asr),
        "num_ast": len(ast),
        "normalizer": normalizer,
        "wer": w["wer"],
        "wer_raw": w_raw["wer"],
        "wer_by_group": {k: {kk: _finite(vv) for kk, vv in g.items()} for k, g in M.wer_by_group(asr, normalizer).items()},
        "cer": c["cer"],
        "wer_errors": w["errors"],
        "ref_words": w["ref_words"],
        "cer_errors": c["errors"],
        "ref_chars": c["ref_chars"],
        "num_empty_refs": w["num_empty_refs"],
        "num_empty_hyps": w["num_empty_hyps"],
        "bleu": b["bleu"] if b is not None else None,
        "mtp_teacher_forced_agreement": [_finite(a) for a in acceptance],
        "mtp_teacher_forced_chained_acceptance": [_finite(a) for a in chained],
        "teacher_forced_mean_accepted_length": M.mean_accepted_length(chained) if num_depths else None,
        "main_acc": totals.main_correct / totals.main_count if totals.main_count else math.nan,
        "main_loss": totals.main_nll / totals.main_count if totals.main_count else math.nan,
        "num_turns": len(turns),
        "turn_wer": tw["wer"] if tw is not None else None,
        "turn_exact_match": (sum(M.normalize_text(r["ref"]) == M.normalize_text(r["hyp"]) for r in turns) / len(turns)
                             if turns else None),
        "generated_tokens": totals.tokens,
        "decode_seconds": totals.seconds,
        "tokens_per_s": totals.tokens / totals.seconds if totals.seconds > 0 else math.nan,
        "max_new_tokens": max_new_tokens,
        "decode": totals.decode,
    }
    if totals.decode == "mtp":
        spec = totals.spec or SpecStats(totals.num_drafts or num_depths)
        rows = len(ok)
        out.update({
            "spec_num_drafts": spec.num_drafts,
            "spec_tokens_per_forward": spec.tokens_per_forward,
            "spec_chained_acceptance": [_finite(a) for a in spec.chained_acceptance()],
            "spec_mean_accepted_length": spec.mean_accepted_length(),
            "spec_row_forwards": rows + spec.forwards,
            "greedy_row_forwards": totals.greedy_row_forwards,
            "greedy_decode_seconds": totals.greedy_seconds,
            "spec_decode_seconds": totals.spec_seconds,
            "spec_speedup": totals.greedy_seconds / totals.spec_seconds if totals.spec_seconds > 0 else math.nan,
            "spec_identical_to_greedy": totals.spec_mismatched_rows == 0,
            "spec_mismatched_rows": totals.spec_mismatched_rows,
        })
    return {k: _finite(v) for k, v in out.items()}


def format_table(m: dict) -> str:
    """A small two-column text table of the headline metrics."""

    def fmt(v, pct=False):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{100 * v:.2f}%" if pct else f"{v:.2f}"
        return str(v)

    rows = [
        ("utterances", fmt(m["num_utterances"])),
        ("failed", fmt(m["num_failed"])),
        ("skipped (data policy)", ", ".join(f"{r}={n}" for r, n in sorted((m.get("skipped_cuts") or {}).items()))
         or "0"),
        ("asr / ast", f"{m['num_asr']} / {m['num_ast']}"),
        (f"WER ({m.get('normalizer', 'basic')} normaliser)", fmt(m["wer"], pct=True)),
    ]
    if m.get("wer_raw") is not None and m.get("wer_raw") != m["wer"]:
        rows.append(("WER (raw text)", fmt(m["wer_raw"], pct=True)))
    for key, g in (m.get("wer_by_group") or {}).items():
        raw = f", raw {fmt(g['wer_raw'], pct=True)}" if g["wer_raw"] != g["wer"] else ""
        rows.append((f"  WER {key} ({g['num']} utts)", f"{fmt(g['wer'], pct=True)}{raw}"))
    rows += [
        ("CER", fmt(m["cer"], pct=True)),
        ("BLEU", fmt(m["bleu"])),
        ("main_acc (teacher-forced)", fmt(m["main_acc"], pct=True)),
        ("main_loss (teacher-forced, nats/token)", fmt(m.get("main_loss"))),
    ]
    if m.get("num_turns"):
        rows += [("assistant turns (reference history)", fmt(m["num_turns"])),
                 ("turn WER", fmt(m["turn_wer"], pct=True)),
                 ("turn exact match", fmt(m["turn_exact_match"], pct=True))]
    for k, a in enumerate(m["mtp_teacher_forced_agreement"], start=1):
        rows.append((f"MTP agreement depth {k} (teacher-forced, marginal)", fmt(a, pct=True)))
    for k, a in enumerate(m.get("mtp_teacher_forced_chained_acceptance") or [], start=1):
        rows.append((f"MTP chained acceptance depth {k} (teacher-forced)", fmt(a, pct=True)))
    if m.get("teacher_forced_mean_accepted_length") is not None:
        rows.append(("mean accepted length (teacher-forced, tokens/forward)",
                     fmt(m["teacher_forced_mean_accepted_length"])))
    rows += [("tokens/s", fmt(m["tokens_per_s"])), ("decode seconds", fmt(m["decode_seconds"]))]
    if m.get("decode") == "mtp":
        rows += [("MTP decoding: drafts per step", fmt(m["spec_num_drafts"])),
                 ("  tokens per verification forward", fmt(m["spec_tokens_per_forward"]))]
        for k, a in enumerate(m["spec_chained_acceptance"], start=1):
            rows.append((f"  chained acceptance depth {k} (live)", fmt(a, pct=True)))
        rows += [("  mean accepted length (live)", fmt(m["spec_mean_accepted_length"])),
                 ("  backbone forwards greedy / mtp", f"{m['greedy_row_forwards']} / {m['spec_row_forwards']}"),
                 ("  decode seconds greedy / mtp",
                  f"{fmt(m['greedy_decode_seconds'])} / {fmt(m['spec_decode_seconds'])}"),
                 ("  speedup (greedy / mtp wall)", fmt(m["spec_speedup"])),
                 ("  identical to greedy", "yes" if m["spec_identical_to_greedy"] else
                  f"NO ({m['spec_mismatched_rows']} rows differ)")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def evaluate(module, manifest: str, out_dir: str, batch_size: int | None = None, max_new_tokens: int = 64,
             limit: int | None = None, metrics_csv: str | None = None, title: str | None = None,
             prompt: PromptConfig | None = None, num_workers: int | None = None, progress: bool = True,
             decode: str = "greedy", num_drafts: int | None = None, data: DataConfig | None = None,
             run_config: str | None = None, input_type: str = "auto", normalizer: str = "whisper_english") -> dict:
    """Decode ``manifest`` with ``module``; write hyps.jsonl, skipped_cuts.jsonl, settings.json, metrics.json and
    report.png under ``out_dir`` (module docstring).

    ``data``: the run's data settings (None: DataConfig's defaults; ``prompt`` replaces its prompt), batched by
    ``eval_datamodule`` with ``batch_size`` cuts (None: the run's data.max_cuts, else 16); ``run_config``: the file
    they came from (recorded in settings.json). ``decode``: "greedy", or "mtp" (also MTP self-speculative decoding
    with ``num_drafts`` drafts per step, default all the head's depths; its hypotheses are written).
    ``input_type``: cuts (a lhotse manifest), conversations or text (JSONL as ``data.inputs`` reads them: every
    assistant turn is generated given the reference history before it, and scored: turn_wer, turn_exact_match,
    main_loss, main_acc), or auto (salm_mtp.data.mix.detect_source_type). ``normalizer``: the text normaliser
    applied before WER/CER (salm_mtp.metrics.NORMALIZERS); metrics.json names it and adds the raw-text WER and
    the WER of every group the cuts carry in ``supervision.custom["groups"]`` (``wer_by_group``).

    Returns the metrics dict (as written to metrics.json). hyps.jsonl is written line by line as batches
    finish, so an interrupted run keeps what it decoded, then rewritten in manifest order.
    """
    from salm_mtp.report import plot_report

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    M.get_normalizer(normalizer)  # an unknown name fails before any decoding
    if decode not in ("greedy", "mtp"):
        raise ValueError(f"--decode must be greedy or mtp, got {decode!r}")
    if decode == "mtp" and not module.num_mtp_depths:
        raise ValueError("--decode mtp needs a model with an MTP head (this one has none); use --decode greedy")
    if prompt is not None:
        data = replace(data if data is not None else DataConfig(), prompt=prompt)
    if input_type == "auto":
        input_type = detect_source_type(manifest) if os.path.isfile(manifest) else "cuts"
    dm = eval_datamodule(module.tokenizer, manifest, data, batch_size, limit, num_workers,
                         module.audio_positions_per_second(), input_type)
    os.makedirs(out_dir, exist_ok=True)
    skip: _SkipRows = dm.skip_log
    skip.set_path(os.path.join(out_dir, "skipped_cuts.jsonl"))
    index = manifest_index(manifest, limit) if input_type == "cuts" else turn_index(manifest, input_type, limit)
    loader = eval_loader(dm, manifest, input_type, limit)
    totals = _Totals(decode=decode, num_drafts=num_drafts)
    was_training = module.training
    module.eval()
    hyps_path = os.path.join(out_dir, "hyps.jsonl")
    bar = tqdm(total=len(index), unit="utt", desc="decode", disable=not progress)
    with open(hyps_path, "w") as f, bar:  # tqdm counts rows: cuts, or assistant turns
        for batch in loader:
            start = len(totals.rows)
            dm.report_skipped(batch)  # the cuts SALMDataset left out of this batch, as the training loop counts them
            add_failed(totals, skip.take())  # ... and those the sampler's checks left out before it
            evaluate_batch(module, batch, max_new_tokens, totals)
            for row in totals.rows[start:]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(totals.rows) - start)
            if totals.seconds > 0:
                bar.set_postfix(tok_s=f"{totals.tokens / totals.seconds:.1f}", failed=totals.num_failed)
        add_failed(totals, skip.take())  # cuts after the last batch
    module.train(was_training)
    totals.skipped = dict(skip.counts)
    _in_manifest_order(totals.rows, index)
    with open(hyps_path, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in totals.rows)
    _write_settings(os.path.join(out_dir, "settings.json"), dm.cfg, run_config, totals.prompts, module.tokenizer)
    if skip.total:
        log.warning("%s", skip.summary())
    result = summarise(totals, module.num_mtp_depths, max_new_tokens, normalizer)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    agreement = [math.nan if a is None else a for a in result["mtp_teacher_forced_agreement"]]
    if title is None:
        bleu = "n/a" if result["bleu"] is None else f"{result['bleu']:.1f}"
        title = f"{os.path.basename(manifest)}: WER {_pct(result['wer'])}, BLEU {bleu}, {result['num_utterances']} utts"
        if result["num_turns"]:
            title = (f"{os.path.basename(manifest)}: turn WER {_pct(result['turn_wer'])}, main_loss "
                     f"{result['main_loss']:.3f}, {result['num_turns']} turns")
    plot_report(os.path.join(out_dir, "report.png"), agreement, metrics_csv, title)
    return result


def _in_manifest_order(rows: list[dict], index: dict[str, tuple[int, str | None, str | None]]) -> None:
    """Sort ``rows`` (in place) by manifest position; a failed row gets its task and reference from there, and
    every row its evaluation groups (when the manifest has any)."""
    groups = getattr(index, "groups", {})
    for row in rows:
        if row["hyp"] is None and row["id"] in index:
            _, row["task"], row["ref"] = index[row["id"]]
        if groups.get(row["id"]):
            row["groups"] = groups[row["id"]]
    rows.sort(key=lambda r: index.get(r["id"], (len(index),))[0])


def _write_settings(path: str, cfg: DataConfig, run_config: str | None, prompts: dict[str, list[int]],
                    tokenizer) -> None:
    settings = {
        "run_config": run_config,
        "data": asdict(cfg),
        "prompts": {task: tokenizer.decode(ids) for task, ids in sorted(prompts.items())},
        "prompt_ids": dict(sorted(prompts.items())),
    }
    with open(path, "w") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False, default=str)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


# ------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None):
    import argparse

    p = argparse.ArgumentParser(
        prog="salm-mtp evaluate",
        description="Decode a lhotse manifest with a trained SALM model (greedy, or --decode mtp: MTP "
                    "self-speculative decoding as well) and score it; write hyps.jsonl, metrics.json, settings.json "
                    "and report.png under --out. Data, prompt and bad-cut settings come from the run's own "
                    "config.yaml (found next to the checkpoint, or --config); the flags below override them.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="Lightning checkpoint written by training (.ckpt file or sharded directory)")
    src.add_argument("--model", help="export directory written by `salm-mtp export` (salm_config.json, llm/, encoder/)")
    p.add_argument("--config", default=None,
                   help="the run's resolved config.yaml, whose data: section (prompt, bad-cut policy, max_duration, "
                        "...) the evaluation uses (default: <log_dir>/config.yaml of --ckpt, or config.yaml of "
                        "--model; none found: the defaults, with a warning)")
    p.add_argument("--manifest", default=None,
                   help="what to evaluate: a lhotse CutSet manifest (jsonl.gz), or a conversation / text JSONL as "
                        "data.inputs reads them (data/README.md) (default: the run's data.test_manifest)")
    p.add_argument("--type", dest="input_type", choices=INPUT_TYPES, default="auto",
                   help="the manifest's format: cuts, conversations (NeMo multimodal JSONL), text (text-only "
                        "conversations or {messages: [...]}), or auto (default: from its first line). Conversations "
                        "and text: each assistant turn is generated given the reference history and scored (turn WER, "
                        "exact match, teacher-forced loss and token accuracy)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"most cuts per batch, data.max_cuts (default: the run's, else {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max-duration", type=float, default=None,
                   help="seconds of audio per batch, data.max_duration (default: the run's)")
    p.add_argument("--on-bad-cut", choices=("skip", "raise"), default=None,
                   help="a cut that cannot be used: skip (a hyps row with its error, counted) or raise (stop, naming "
                        "it); data.on_bad_cut (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per utterance (default 64)")
    p.add_argument("--metrics-csv", default=None,
                   help="CSVLogger metrics.csv for the report's training curves (default: found next to --ckpt)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N cuts")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers reading audio, data.num_workers (default: the run's)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--normalizer", choices=M.NORMALIZERS, default="whisper_english",
                   help="text normaliser applied to references and hypotheses before WER/CER: whisper_english "
                        "(default; Whisper's English normaliser, as the Open ASR Leaderboard: spoken numbers become "
                        "digits), basic (lowercase, no punctuation) or none (raw text); metrics.json names it and "
                        "also gives the raw-text WER")
    p.add_argument("--decode", choices=("greedy", "mtp"), default="greedy",
                   help="greedy (default), or mtp: also MTP self-speculative decoding of the same prompts (its "
                        "hypotheses are written), with its live acceptance, forwards and wall time against greedy")
    p.add_argument("--num-drafts", type=int, default=None,
                   help="--decode mtp: drafts per step (1..the head's depths; default all of them)")
    return p.parse_args(argv)


def run_data_config(args) -> tuple[DataConfig, str | None, str]:
    """(data settings, the config file they came from or None, manifest) for the parsed ``args``."""
    from salm_mtp.errors import SalmError
    from salm_mtp.run_config import data_config_from_run, find_run_config, read_data_section

    src = args.ckpt or args.model
    if args.config is not None:
        if not os.path.isfile(args.config):
            raise SalmError(f"--config {args.config!r}: no such file; pass the config.yaml that `salm-mtp fit` saved "
                            "in the run's log directory")
        run_config = args.config
    else:
        run_config = find_run_config(src)
        if run_config is None:
            log.warning("no run config (config.yaml) next to %r: the data and prompt settings are the defaults "
                        "(DataConfig, PromptConfig). A model trained with other --data.* settings (e.g. "
                        "--data.prompt.asr_instruction) must be evaluated with them: pass --config RUN/config.yaml",
                        src)
    manifest = args.manifest
    if manifest is None:
        manifest = (read_data_section(run_config) if run_config else {}).get("test_manifest")
        if manifest is None:
            raise SalmError("no manifest to evaluate: pass --manifest (the run config has no data.test_manifest)")
    overrides: dict = not_evaluated()
    for key, value in (("max_duration", args.max_duration), ("on_bad_cut", args.on_bad_cut),
                       ("num_workers", args.num_workers)):
        if value is not None:
            overrides[key] = value
    return data_config_from_run(run_config, **overrides), run_config, manifest


def main(argv: list[str] | None = None) -> int:
    """``salm-mtp evaluate``; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="You are using DynamicCutSampler with an eagerly read CutSet")
    check_model_path(args.ckpt, args.model)
    data, run_config, manifest = run_data_config(args)
    print(f"data settings: {run_config or 'defaults (no run config)'}", flush=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = load_model(args.ckpt, args.model).to(device)
    metrics_csv = args.metrics_csv if args.metrics_csv is not None else default_metrics_csv(args.ckpt)
    result = evaluate(module, manifest, args.out, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, limit=args.limit, metrics_csv=metrics_csv,
                      progress=not args.no_progress, decode=args.decode, num_drafts=args.num_drafts, data=data,
                      run_config=run_config, input_type=args.input_type, normalizer=args.normalizer)
    print(format_table(result))
    print(f"wrote {os.path.join(args.out, 'hyps.jsonl')}, metrics.json, settings.json, report.png")
    return 0
