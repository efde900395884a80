"""Evaluate a trained SALM model on a lhotse manifest: greedy hypotheses, WER/CER/BLEU, MTP acceptance.

    python scripts/evaluate.py --ckpt runs/demo/version_0/checkpoints/last.ckpt \\
        --manifest data/demo/test_cuts.jsonl.gz --out eval/demo [--decode greedy|mtp]
    python scripts/evaluate.py --model exports/demo --manifest ... --out ...

Per batch (``DynamicCutSampler`` with ``max_cuts=--batch-size``, manifest order, collated by
``SALMDataset``):
  1. batched greedy decoding with the backbone's cache (salm_mtp.generate), timed;
  2. the MTP head's drafts along the model's own greedy answer (teacher-forced, one forward) ->
     per-depth marginal agreement (metrics.mtp_acceptance; eos counts as a token, padding does not) and
     the chained acceptance a self-speculative decoder gets (depth k only when 1..k-1 agree too:
     metrics.chained_acceptance_counts) with the mean accepted length 1 + sum_k chained_k;
  3. the main head's teacher-forced top-1 accuracy on the reference answers (``main_acc``).
With ``--decode mtp`` step 1 also runs MTP self-speculative decoding (salm_mtp.decoding.speculative) on
the same prompts, greedy and MTP alternating which goes first from batch to batch; the hypotheses are
the MTP decoder's, and its live figures are added under ``spec_*`` names.

Writes to ``--out``:
  hyps.jsonl    one object per manifest cut: {"id", "task", "ref", "hyp"}; a cut whose audio could
                not be read has "hyp": null and "error" (it is counted in num_failed, never fatal)
  metrics.json  num_utterances (cuts evaluated, failed included), num_failed, num_asr, num_ast,
                wer, cer (over decoded asr cuts) with wer_errors, ref_words, cer_errors, ref_chars,
                num_empty_refs, num_empty_hyps (asr), bleu (over ast cuts; null if none),
                mtp_acceptance (marginal, one value per depth; [] without a head), mtp_chained_acceptance,
                mean_accepted_length (tokens per backbone forward; null without a head), main_acc,
                generated_tokens, decode_seconds (prompt encoding + prefill + decode steps only),
                tokens_per_s, max_new_tokens, decode ("greedy" | "mtp"). Undefined values (nan/inf) are
                written as null. The mtp_* acceptance figures above are teacher-forced along the finished
                greedy answer (offline). --decode mtp adds what the speculative decoder measured:
                spec_num_drafts, spec_tokens_per_forward (emitted tokens / verification forwards),
                spec_chained_acceptance (per depth), spec_mean_accepted_length (1 + their sum),
                spec_row_forwards / greedy_row_forwards (backbone forwards summed over rows, prefills
                included), greedy_decode_seconds / spec_decode_seconds (decoding the same encoded
                prompts), spec_speedup (their ratio), spec_identical_to_greedy, spec_mismatched_rows;
                decode_seconds then covers prompt encoding + the MTP decode.
  report.png    acceptance bars + training curves of --metrics-csv (default: the metrics.csv that
                Lightning's CSVLogger wrote next to the checkpoint's run dir, if any)

The prompt wording is PromptConfig's default: a model trained with other ``--data.prompt.*``
settings must be evaluated with the same ones (``evaluate(..., prompt=PromptConfig(...))``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from salm_mtp import metrics as M
from salm_mtp.data.prompt import PromptConfig, PromptFormatter
from salm_mtp.decoding.speculative import SpecStats, mtp_decode
from salm_mtp.generate import decode_text, encode_prompts, greedy_decode, inference, mtp_drafts
from salm_mtp.modules.merge import IGNORE_INDEX


# ------------------------------------------------------------------------------------- loading
def load_model(ckpt: str | None = None, model: str | None = None):
    """The SALMModule of a Lightning checkpoint (``ckpt``: .ckpt file or sharded directory) or of an
    export directory (``model``), on CPU (``salm_mtp.io.load_model``)."""
    from salm_mtp.io import load_model as _load

    if (ckpt is None) == (model is None):
        raise ValueError("pass exactly one of --ckpt (Lightning checkpoint) or --model (export directory)")
    if model is not None and not os.path.isdir(model):
        raise FileNotFoundError(f"--model {model!r} is not a directory; pass one written by scripts/export.py")
    if ckpt is not None and not os.path.exists(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt!r} does not exist")
    return _load(model or ckpt)


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
class _KeepFailed(torch.utils.data.Dataset):
    """SALMDataset plus ``failed``: (id, task, ref, reason) of the cuts it dropped from the batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, cuts):
        from salm_mtp.data.dataset import reference_answer

        batch = self.dataset[cuts]
        kept = set(batch["ids"])
        failed = []
        for cut in cuts:
            if cut.id in kept:
                continue
            try:
                task, ref = reference_answer(cut)
                reason = "unreadable audio"
            except (IndexError, ValueError) as e:
                task, ref, reason = None, None, f"bad supervision: {e}"
            failed.append((cut.id, task, ref, reason))
        batch["failed"] = failed
        return batch


def batches(manifest: str, tokenizer, batch_size: int, limit: int | None = None,
            prompt: PromptConfig | None = None, num_workers: int = 0) -> tuple[Iterator[dict], int]:
    """(iterator over collated batches in manifest order, number of cuts)."""
    from lhotse.dataset import DynamicCutSampler

    from salm_mtp.data.datamodule import load_cuts
    from salm_mtp.data.dataset import SALMDataset

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"--manifest {manifest!r}: no such file")
    cuts = load_cuts(manifest)
    if limit is not None:
        cuts = cuts.subset(first=limit)
    cuts = cuts.to_eager()
    sampler = DynamicCutSampler(cuts, max_cuts=batch_size, shuffle=False, world_size=1, rank=0)
    dataset = _KeepFailed(SALMDataset(tokenizer, PromptFormatter(tokenizer, prompt or PromptConfig())))
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers)
    return iter(loader), len(cuts)


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
    decode: str = "greedy"
    spec: SpecStats | None = None
    greedy_seconds: float = 0.0
    spec_seconds: float = 0.0
    num_drafts: int | None = None
    greedy_row_forwards: int = 0
    spec_mismatched_rows: int = 0
    batches: int = 0
    last_spec_seconds: float = 0.0


def teacher_forced_hits(module, batch: dict) -> tuple[int, int]:
    """(correct, count) of the main head's top-1 on the reference answer tokens (answer + eos)."""
    with inference(module):
        merged, _, _ = module.prepare_inputs(batch)
        h0 = module(merged.inputs_embeds)  # (B, T', H)
        keep = merged.targets != IGNORE_INDEX  # (B, T')
        pred = module.llm.lm_head(h0[keep]).float().argmax(-1)  # (N,): logits only where a target is
    return int((pred == merged.targets[keep]).sum()), int(keep.sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_batch(module, batch: dict, max_new_tokens: int, totals: _Totals) -> None:
    """Decode one collated batch and add its hypotheses and statistics to ``totals``."""
    for cid, task, ref, reason in batch.get("failed", []):
        totals.rows.append({"id": cid, "task": task, "ref": ref, "hyp": None, "error": reason})
        totals.num_failed += 1
    if batch["input_ids"].shape[0] == 0:
        return
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

    correct, count = teacher_forced_hits(module, batch)
    totals.main_correct += correct
    totals.main_count += count


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


def summarise(totals: _Totals, num_depths: int, max_new_tokens: int) -> dict:
    """metrics.json content (keys in the module docstring)."""
    ok = [r for r in totals.rows if r["hyp"] is not None]
    asr = [r for r in ok if r["task"] == "asr"]
    ast = [r for r in ok if r["task"] == "ast"]
    w = M.wer([r["ref"] for r in asr], [r["hyp"] for r in asr])
    c = M.cer([r["ref"] for r in asr], [r["hyp"] for r in asr])
    b = M.bleu([r["ref"] for r in ast], [r["hyp"] for r in ast]) if ast else None
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
        "num_asr": len(asr),
        "num_ast": len(ast),
        "wer": w["wer"],
        "cer": c["cer"],
        "wer_errors": w["errors"],
        "ref_words": w["ref_words"],
        "cer_errors": c["errors"],
        "ref_chars": c["ref_chars"],
        "num_empty_refs": w["num_empty_refs"],
        "num_empty_hyps": w["num_empty_hyps"],
        "bleu": b["bleu"] if b is not None else None,
        "mtp_acceptance": [_finite(a) for a in acceptance],
        "mtp_chained_acceptance": [_finite(a) for a in chained],
        "mean_accepted_length": M.mean_accepted_length(chained) if num_depths else None,
        "main_acc": totals.main_correct / totals.main_count if totals.main_count else math.nan,
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
        ("asr / ast", f"{m['num_asr']} / {m['num_ast']}"),
        ("WER", fmt(m["wer"], pct=True)),
        ("CER", fmt(m["cer"], pct=True)),
        ("BLEU", fmt(m["bleu"])),
        ("main_acc (teacher-forced)", fmt(m["main_acc"], pct=True)),
    ]
    for k, a in enumerate(m["mtp_acceptance"], start=1):
        rows.append((f"MTP acceptance depth {k} (marginal)", fmt(a, pct=True)))
    for k, a in enumerate(m.get("mtp_chained_acceptance") or [], start=1):
        rows.append((f"MTP chained acceptance depth {k}", fmt(a, pct=True)))
    if m.get("mean_accepted_length") is not None:
        rows.append(("mean accepted length (tokens/forward)", fmt(m["mean_accepted_length"])))
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


def evaluate(module, manifest: str, out_dir: str, batch_size: int = 16, max_new_tokens: int = 64,
             limit: int | None = None, metrics_csv: str | None = None, title: str | None = None,
             prompt: PromptConfig | None = None, num_workers: int = 0, progress: bool = True,
             decode: str = "greedy", num_drafts: int | None = None) -> dict:
    """Decode ``manifest`` with ``module``, write hyps.jsonl / metrics.json / report.png under ``out_dir``.

    ``decode``: "greedy", or "mtp" (also MTP self-speculative decoding with ``num_drafts`` drafts per step,
    default all the head's depths; its hypotheses are written).

    Returns the metrics dict (as written to metrics.json). hyps.jsonl is written line by line as
    batches finish, so an interrupted run keeps what it decoded.
    """
    from salm_mtp.report import plot_report

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if decode not in ("greedy", "mtp"):
        raise ValueError(f"--decode must be greedy or mtp, got {decode!r}")
    if decode == "mtp" and not module.num_mtp_depths:
        raise ValueError("--decode mtp needs a model with an MTP head (this one has none); use --decode greedy")
    os.makedirs(out_dir, exist_ok=True)
    it, n_cuts = batches(manifest, module.tokenizer, batch_size, limit, prompt, num_workers)
    totals = _Totals(decode=decode, num_drafts=num_drafts)
    was_training = module.training
    module.eval()
    hyps_path = os.path.join(out_dir, "hyps.jsonl")
    with open(hyps_path, "w") as f, tqdm(total=n_cuts, unit="utt", desc="decode", disable=not progress) as bar:
        for batch in it:
            start = len(totals.rows)
            evaluate_batch(module, batch, max_new_tokens, totals)
            for row in totals.rows[start:]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(totals.rows) - start)
            if totals.seconds > 0:
                bar.set_postfix(tok_s=f"{totals.tokens / totals.seconds:.1f}", failed=totals.num_failed)
    module.train(was_training)
    result = summarise(totals, module.num_mtp_depths, max_new_tokens)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    acceptance = [math.nan if a is None else a for a in result["mtp_acceptance"]]
    if title is None:
        bleu = "n/a" if result["bleu"] is None else f"{result['bleu']:.1f}"
        title = f"{os.path.basename(manifest)}: WER {_pct(result['wer'])}, BLEU {bleu}, {result['num_utterances']} utts"
    plot_report(os.path.join(out_dir, "report.png"), acceptance, metrics_csv, title)
    return result


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


# ------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None):
    import argparse

    p = argparse.ArgumentParser(
        prog="scripts/evaluate.py",
        description="Greedy-decode a lhotse manifest with a trained SALM model; write hyps.jsonl, metrics.json, "
                    "report.png.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="Lightning checkpoint (.ckpt file) written by training")
    src.add_argument("--model", help="export directory written by scripts/export.py (salm_config.json, llm/, encoder/)")
    p.add_argument("--manifest", required=True, help="lhotse CutSet manifest (jsonl.gz) to evaluate")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="cuts per batch (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per utterance (default 64)")
    p.add_argument("--metrics-csv", default=None,
                   help="CSVLogger metrics.csv for the report's training curves (default: found next to --ckpt)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N cuts")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading audio (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--decode", choices=("greedy", "mtp"), default="greedy",
                   help="greedy (default), or mtp: also MTP self-speculative decoding of the same prompts (its "
                        "hypotheses are written), with its live acceptance, forwards and wall time against greedy")
    p.add_argument("--num-drafts", type=int, default=None,
                   help="--decode mtp: drafts per step (1..the head's depths; default all of them)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="You are using DynamicCutSampler with an eagerly read CutSet")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = load_model(args.ckpt, args.model).to(device)
    metrics_csv = args.metrics_csv if args.metrics_csv is not None else default_metrics_csv(args.ckpt)
    result = evaluate(module, args.manifest, args.out, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, limit=args.limit, metrics_csv=metrics_csv,
                      num_workers=args.num_workers, progress=not args.no_progress, decode=args.decode,
                      num_drafts=args.num_drafts)
    print(format_table(result))
    print(f"wrote {os.path.join(args.out, 'hyps.jsonl')}, metrics.json, report.png")
    return 0
