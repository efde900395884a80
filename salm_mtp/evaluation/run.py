"""``evaluate``: decode a manifest with a model and write hyps.jsonl, skipped_cuts.jsonl, settings.json, metrics.json
and report.png (formats: salm_mtp/evaluation/__init__.py)."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, replace
from functools import partial

from tqdm import tqdm

from salm_mtp import metrics
from salm_mtp.data.datamodule import DataConfig
from salm_mtp.data.mix import detect_source_type
from salm_mtp.data.prompt import PromptConfig
from salm_mtp.decoding.modes import resolve_mode
from salm_mtp.errors import SalmError
from salm_mtp.evaluation.data import (ManifestIndex, SkipRows, asr_first, eval_datamodule, eval_loader, manifest_index,
                                      turn_index)
from salm_mtp.evaluation.decode import DecodeSettings, Totals, add_failed, evaluate_batch
from salm_mtp.evaluation.report import pct
from salm_mtp.evaluation.score import summarise

log = logging.getLogger(__name__)


def evaluate(module, manifest: str, out_dir: str, batch_size: int | None = None, max_new_tokens: int = 64,
             limit: int | None = None, metrics_csv: str | None = None, title: str | None = None,
             prompt: PromptConfig | None = None, num_workers: int | None = None, progress: bool = True,
             decode: str = "greedy", num_drafts: int | None = None, data: DataConfig | None = None,
             run_config: str | None = None, input_type: str = "auto", normalizer: str = "whisper_english") -> dict:
    """Decode ``manifest`` with ``module``; write hyps.jsonl, skipped_cuts.jsonl, settings.json, metrics.json and
    report.png under ``out_dir`` (module docstring).

    ``data``: the run's data settings (None: DataConfig's defaults; ``prompt`` replaces its prompt), batched by
    ``eval_datamodule`` with ``batch_size`` cuts (None: the run's data.max_cuts, else 16); ``run_config``: the file
    they came from (recorded in settings.json). ``decode``: "greedy", a speculative mode (mtp, ctc, ctc+mtp: decoded
    as well and timed against greedy, its hypotheses written; mtp with ``num_drafts`` drafts per step, default all
    the head's depths) or auto (the one that drafts the most: salm_mtp.decoding.modes.auto_mode).
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
    metrics.get_normalizer(normalizer)  # an unknown name fails before any decoding
    decode = resolve_mode(module, decode)
    if prompt is not None:
        data = replace(data if data is not None else DataConfig(), prompt=prompt)
    if input_type == "auto":
        input_type = detect_source_type(manifest) if os.path.isfile(manifest) else "cuts"
    dm = eval_datamodule(module.tokenizer, manifest, data, batch_size, limit, num_workers,
                         module.audio_positions_per_second(), input_type)
    if decode.startswith("ctc") and input_type == "cuts":
        asr_first(dm)
    os.makedirs(out_dir, exist_ok=True)
    skip: SkipRows = dm.skip_log
    skip.set_path(os.path.join(out_dir, "skipped_cuts.jsonl"))
    index = manifest_index(manifest, limit) if input_type == "cuts" else turn_index(manifest, input_type, limit)
    if not index.rows:  # every metric would be n/a while the run exits 0: a result that looks fine but is not
        raise SalmError(f"--manifest {manifest!r} holds no example to evaluate (0 read); check the file "
                        f"(`salm-mtp validate-data {manifest}`)")
    if index.duplicates:  # hypotheses are keyed by id: a repeated one would be scored twice (or overwritten)
        dup = sorted(set(index.duplicates))
        raise SalmError(f"--manifest {manifest!r}: {len(dup)} ids are used by more than one example (e.g. "
                        f"{dup[0]!r}); give every example its own id (`salm-mtp validate-data {manifest}` lists them)")
    loader = eval_loader(dm, manifest, input_type, limit)
    formatter = dm.get_dataset().formatter
    settings = DecodeSettings(max_new_tokens, decode, num_drafts, partial(formatter.answer_ids, "asr"))
    totals = Totals()
    was_training = module.training
    module.eval()
    hyps_path = os.path.join(out_dir, "hyps.jsonl")
    bar = tqdm(total=len(index.rows), unit="utt", desc="decode", disable=not progress)
    with open(hyps_path, "w") as f, bar:  # tqdm counts rows: cuts, or assistant turns
        for batch in loader:
            start = len(totals.rows)
            dm.report_skipped(batch)  # the cuts SALMDataset left out of this batch, as the training loop counts them
            add_failed(totals, skip.take())  # ... and those the sampler's checks left out before it
            evaluate_batch(module, batch, settings, totals)
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
    result = summarise(totals, module.num_mtp_depths, settings, normalizer)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    agreement = [math.nan if a is None else a for a in result["mtp_teacher_forced_agreement"]]
    if title is None:
        bleu = "n/a" if result["bleu"] is None else f"{result['bleu']:.1f}"
        title = f"{os.path.basename(manifest)}: WER {pct(result['wer'])}, BLEU {bleu}, {result['num_utterances']} utts"
        if result["num_turns"]:
            title = (f"{os.path.basename(manifest)}: turn WER {pct(result['turn_wer'])}, main_loss "
                     f"{result['main_loss']:.3f}, {result['num_turns']} turns")
    plot_report(os.path.join(out_dir, "report.png"), agreement, metrics_csv, title)
    return result


def _in_manifest_order(rows: list[dict], index: ManifestIndex) -> None:
    """Sort ``rows`` (in place) by manifest position; a failed row gets its task and reference from there, and
    every row its evaluation groups (when the manifest has any)."""
    for row in rows:
        if row["hyp"] is None and row["id"] in index.rows:
            _, row["task"], row["ref"] = index.rows[row["id"]]
        if index.groups.get(row["id"]):
            row["groups"] = index.groups[row["id"]]
    rows.sort(key=lambda r: index.rows.get(r["id"], (len(index.rows),))[0])


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
