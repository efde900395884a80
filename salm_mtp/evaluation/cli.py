"""``salm-mtp evaluate``: the command line of ``evaluate`` (settings from the run's own config.yaml, flags over it)."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from salm_mtp import metrics
from salm_mtp.data.datamodule import DataConfig
from salm_mtp.evaluation.data import INPUT_TYPES, check_model_path, default_metrics_csv, load_model, not_evaluated
from salm_mtp.evaluation.run import evaluate
from salm_mtp.evaluation.report import format_table
from salm_mtp.options import option, parse_options

log = logging.getLogger(__name__)


DESCRIPTION = ("Decode a lhotse manifest with a trained SALM model (greedy, or --decode mtp|ctc|ctc+mtp|auto: "
               "self-speculative decoding as well) and score it; write hyps.jsonl, metrics.json, settings.json and "
               "report.png under --out. Data, prompt and bad-cut settings come from the run's own config.yaml (found "
               "next to the checkpoint, or --config); the options below override them.")


@dataclass
class EvaluateOptions:
    """The options of ``salm-mtp evaluate`` (salm_mtp/options.py makes the parser and its help from them)."""

    out: str
    """output directory"""
    ckpt: str | None = None
    """Lightning checkpoint written by training (.ckpt file or sharded directory); give this or --model"""
    model: str | None = None
    """export directory written by `salm-mtp export` (salm_config.json, llm/, encoder/); give this or --ckpt"""
    config: str | None = None
    """the run's resolved config.yaml, whose data: section (prompt, bad-cut policy, max_duration, ...) the evaluation
    uses (default: <log_dir>/config.yaml of --ckpt, or config.yaml of --model; none found: the defaults, with a
    warning)"""
    manifest: str | None = None
    """what to evaluate: a lhotse CutSet manifest (jsonl.gz), or a conversation / text JSONL as data.inputs reads
    them (data/README.md) (default: the run's data.test_manifest)"""
    input_type: Literal[INPUT_TYPES] = option(flag="--type", default="auto")
    """the manifest's format: cuts, conversations (NeMo multimodal JSONL), text (text-only conversations or
    {messages: [...]}), or auto (from its first line). Conversations and text: each assistant turn is generated given
    the reference history and scored (turn WER, exact match, teacher-forced loss and token accuracy)"""
    batch_size: int | None = None
    """most cuts per batch, data.max_cuts (default: the run's, else 16)"""
    max_duration: float | None = None
    """seconds of audio per batch, data.max_duration (default: the run's)"""
    on_bad_cut: Literal["skip", "raise"] | None = None
    """a cut that cannot be used: skip (a hyps row with its error, counted) or raise (stop, naming it);
    data.on_bad_cut (default: the run's)"""
    max_new_tokens: int = 64
    """most tokens generated per utterance"""
    metrics_csv: str | None = None
    """CSVLogger metrics.csv for the report's training curves (default: found next to --ckpt)"""
    limit: int | None = None
    """evaluate only the first N cuts"""
    device: str | None = None
    """torch device (default: cuda if available, else cpu)"""
    num_workers: int | None = None
    """DataLoader workers reading audio, data.num_workers (default: the run's)"""
    no_progress: bool = False
    """no tqdm progress bar"""
    normalizer: Literal[metrics.NORMALIZERS] = "whisper_english"
    """text normaliser applied to references and hypotheses before WER/CER: whisper_english (Whisper's English
    normaliser, as the Open ASR Leaderboard: spoken numbers become digits), basic (lowercase, no punctuation) or none
    (raw text); metrics.json names it and also gives the raw-text WER"""
    decode: Literal["greedy", "mtp", "ctc", "ctc+mtp", "auto"] = "greedy"
    """greedy, or also self-speculative decoding of the same prompts (its hypotheses are written, with its live
    acceptance, forwards, RTFx and wall time against greedy; the output equals greedy's): mtp (the MTP head drafts),
    ctc (ASR rows: the encoder's CTC transcript drafts the whole answer), ctc+mtp (both), auto (the one that drafts
    the most that the model has)"""
    num_drafts: int | None = None
    """--decode mtp / ctc+mtp: MTP drafts per step (1..the head's depths; default all of them)"""

    def __post_init__(self) -> None:
        if (self.ckpt is None) == (self.model is None):
            raise ValueError("give one of --ckpt (a training checkpoint) or --model (an export directory)")


def parse_args(argv: list[str] | None = None) -> EvaluateOptions:
    return parse_options(EvaluateOptions, argv, prog="salm-mtp evaluate", description=DESCRIPTION)


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
