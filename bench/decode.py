#!/usr/bin/env python
"""Greedy vs self-speculative decoding of the same utterances (drafts from the MTP head, the encoder's CTC
transcript, or both): tokens per backbone forward, chained and CTC-draft acceptance, wall time, RTFx, and whether
the outputs are identical.

    python bench/decode.py --ckpt runs/demo/salm/version_0/checkpoints/last.ckpt \\
        --manifest data/demo/test_cuts.jsonl.gz --out runs/demo/bench_decode [--limit 64] [--batch-sizes 1,16]
    python bench/decode.py          # the floor: an untrained model of conf/demo.yaml's sizes, same utterances
    python bench/decode.py --device cuda --ckpt ...      # on a GPU (bench/gpu_check.sh)

Per batch size: the utterances are batched in manifest order (as `salm-mtp evaluate` does), their prompts
encoded once (not timed: both decoders share it), one untimed warm-up pass, then ``--repeats``
repetitions; in each, every batch is decoded by greedy (salm_mtp.generate.greedy_decode, the cached
decoder) and by each of ``--decoders`` (salm_mtp.decoding.modes.speculative_decode: mtp, ctc, ctc+mtp;
default those the model can draft with) for each ``--num-drafts``, the order
rotating from batch to batch and repetition to repetition. Wall time is the median over repetitions of
the summed decode time; speedup = greedy wall / MTP wall, the median over repetitions of that ratio
(both timed in the same repetition: the machine's speed drifts between repetitions). ``--oracle`` adds an
"mtp oracle" row, in the same rotation, whose drafts are the greedy tokens themselves (the head still
runs): the ceiling of the decoder on this model and data, every draft accepted; and a "ctc oracle" row whose ASR
rows' answer drafts are greedy's own answers (what a right CTC transcript gives; no head).

``--group-tasks``: the ASR cuts are served first, then the others, each in manifest order (the order
``salm-mtp evaluate --decode ctc*`` serves them in: salm_mtp.evaluation.data.asr_first): a batch whose rows all carry
a CTC draft can finish in one forward. The batches are read as evaluate reads them, with the checkpoint's run's data
settings (its config.yaml), and the CTC drafts are formatted by that run's prompt formatter.

``--device cuda`` (default cpu): the model on the GPU, every decode timed between torch.cuda.synchronize() calls.

Writes DIR/decode.json: the headline (first batch size, first D) as tokens_per_forward, speedup,
identical, chained_acceptance, mean_accepted_length, plus every row under "runs", and ``device``, ``peak_mib``
(the process's peak: ``memory`` names it, ``rss_hwm`` = VmHWM on cpu, ``cuda_max_allocated`` on cuda); prints a
table.
Rows: tokens = answer tokens decoded; fwd/utt = backbone forwards per utterance, prefill included
(greedy: one per token); tok/fwd = tokens per verification forward (accepted drafts + the backbone's own);
ctc acc = accepted / proposed CTC draft tokens; RTFx = seconds of audio decoded per second of decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from functools import partial

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

from common import MEMORY_MEASURES, add_device_arg, parse_device_args, process_peak, sync  # noqa: E402

from salm_mtp.decoding.modes import MODES, decode_row_groups, speculative_decode, supported_modes  # noqa: E402
from salm_mtp.decoding.stats import SpecStats  # noqa: E402
from salm_mtp.generate import (  # noqa: E402
    _eos_id, _lengths_after_eos, _pad_id, device_of, encode_prompts, greedy_decode, inference, left_padding_exact,
)

DEMO_CONF = "conf/demo.yaml"
DEMO_MANIFEST = "data/demo/test_cuts.jsonl.gz"


def untrained_demo_model(llm_pattern: str | None = None, tokenizer: str | None = None):
    """The model conf/demo.yaml trains, freshly initialised (seed 0): the floor of the benchmark.
    ``llm_pattern``: another backbone block pattern (same sizes), e.g. a deeper one whose backbone-to-head cost
    ratio is that of a real model (the head keeps its own pattern). ``tokenizer``: another tokenizer directory
    (default: the config's model.tokenizer_path)."""
    import yaml

    from salm_mtp.io.checkpoints import build_salm

    with open(DEMO_CONF) as f:
        cfg = yaml.safe_load(f)["model"]
    cfg["encoder"]["path"] = None
    if tokenizer:
        cfg["tokenizer_path"] = tokenizer
    if llm_pattern:
        cfg["llm"]["pattern"] = llm_pattern
    if not os.path.isfile(os.path.join(cfg["tokenizer_path"], "tokenizer.json")):
        raise FileNotFoundError(f"{cfg['tokenizer_path']} has no tokenizer: run `salm-mtp make-demo-data "
                                "--out data/demo` (step 1 of scripts/run_demo.sh) or pass --ckpt")
    torch.manual_seed(0)
    return build_salm(**cfg)


def oracle_decode(module, prompt, truth: torch.Tensor, max_new_tokens: int, num_drafts: int,
                  acceptance: float = 1.0, seed: int = 0):
    """mtp_decode whose drafts are ``truth`` (greedy's tokens): every draft that predicts a real token is
    accepted. ``acceptance`` < 1: each draft is instead a wrong token (truth + 1) with probability 1 - acceptance
    (seeded), so the decoder meets rejections at a chosen rate. Returns (tokens (B, max_new_tokens), SpecStats)."""
    eos_id, pad_id = _eos_id(module), _pad_id(module)
    B, dev = prompt.lengths.numel(), prompt.inputs_embeds.device
    stats = SpecStats(num_drafts)
    padded_truth = torch.full((B, max_new_tokens + num_drafts + 1), pad_id, dtype=torch.long, device=dev)
    padded_truth[:, : truth.shape[1]] = truth.to(dev)

    gen = torch.Generator().manual_seed(seed)
    vocab = module.llm.config.vocab_size

    def drafter(dec, rows):
        ref = padded_truth[rows]

        def draft(k, h):
            d = ref.gather(1, (dec.lens + k - 1).clamp(max=ref.shape[1] - 1)[:, None])[:, 0]
            if acceptance < 1.0:
                wrong = torch.rand(d.shape, generator=gen) >= acceptance
                d = torch.where(wrong.to(d.device), (d + 1) % vocab, d)
            return d
        return draft

    with inference(module):
        tokens = decode_row_groups(module, prompt, num_drafts, max_new_tokens, eos_id, pad_id,
                                   left_padding_exact(module.llm), stats, drafter)
    lengths = _lengths_after_eos(tokens, eos_id)
    tokens = tokens.masked_fill(torch.arange(max_new_tokens, device=dev)[None, :] >= lengths[:, None], pad_id)
    return tokens, stats


def ctc_oracle_decode(module, prompt, batch: dict, truth: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int,
                      acceptance: float = 1.0, seed: int = 0):
    """CTC-draft decoding (no head) whose ASR rows' answer drafts are greedy's own answers ``truth``: all accepted.
    ``acceptance`` < 1: each draft token is instead wrong (and the rest of that draft useless) with probability
    1 - acceptance (seeded). Returns (tokens (B, max_new_tokens), SpecStats)."""
    eos_id, pad_id = _eos_id(module), _pad_id(module)
    gen = torch.Generator().manual_seed(seed)
    vocab = module.llm.config.vocab_size
    answers = []
    for r, task in enumerate(batch["tasks"]):
        draft = truth[r, : int(lengths[r])].tolist() if task == "asr" else None
        for j in range(len(draft or [])):
            if acceptance < 1.0 and float(torch.rand(1, generator=gen)) >= acceptance:
                draft[j] = (draft[j] + 1) % vocab
                break
        answers.append(draft)
    stats = SpecStats(0)
    with inference(module):
        tokens = decode_row_groups(module, prompt, 0, max_new_tokens, eos_id, pad_id, left_padding_exact(module.llm),
                                   stats, answers=answers)
    # what speculative_decode does too: a forward that verified a whole draft also wrote the token after its end
    n = _lengths_after_eos(tokens, eos_id)
    tokens = tokens.masked_fill(torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= n[:, None], pad_id)
    return tokens, stats


def bench_batches(module, manifest: str, data, batch_size: int, limit: int, group_tasks: bool):
    """(the collated batches of the first ``limit`` cuts, as ``salm-mtp evaluate`` reads them with the run's data
    settings ``data``: with ``group_tasks`` ASR cuts first, as evaluate serves them to a CTC mode; the ASR answer
    format of those settings, for the CTC drafts)."""
    from salm_mtp.evaluation.data import asr_first, eval_datamodule

    dm = eval_datamodule(module.tokenizer, manifest, data, batch_size, limit, 0, module.audio_positions_per_second())
    if group_tasks:
        asr_first(dm)
    return ([b for b in dm.test_dataloader() if b["input_ids"].shape[0]],
            partial(dm.get_dataset().formatter.answer_ids, "asr"))


def bench_batch_size(module, manifest: str, limit: int, batch_size: int, drafts: list[int], repeats: int,
                     max_new_tokens: int, oracle: bool, oracle_acceptance: float = 1.0,
                     decoders: tuple[str, ...] = ("mtp",), group_tasks: bool = False,
                     data_config=None) -> list[dict]:
    """Rows of the table for one batch size (see the module docstring); ``data_config``: the run's DataConfig
    (None: the defaults)."""
    data, answer_ids = bench_batches(module, manifest, data_config, batch_size, limit, group_tasks)
    n_utts = sum(b["input_ids"].shape[0] for b in data)
    encoded = [encode_prompts(module, b, with_audio=True) for b in data]
    prompts = [e[0] for e in encoded]
    audio_seconds = sum(float(b["audio_lens"].sum()) for b in data) / module.features.config.sample_rate
    deciders = (["greedy"] + [(m, 0 if m == "ctc" else d) for m in decoders for d in (drafts if m != "ctc" else [0])]
                + ([("mtp oracle", d) for d in drafts] + [("ctc oracle", 0)] if oracle else []))
    ref: list = [None] * len(data)
    times = {k: [] for k in deciders}
    stats: dict = {}
    identical = dict.fromkeys(deciders, True)
    device = device_of(module).type

    def run(name, i):
        b, p = data[i], prompts[i]
        sync(device)
        t0 = time.perf_counter()
        if name == "greedy":
            tokens, lengths = greedy_decode(module, b, max_new_tokens=max_new_tokens, prompt=p)
            s = None
        elif name[0] in MODES:
            tokens, lengths, s = speculative_decode(module, b, name[0], max_new_tokens, num_drafts=name[1] or None,
                                                    answer_ids=answer_ids, prompt=p, audio=encoded[i][1:])
        elif name[0] == "ctc oracle":
            tokens, s = ctc_oracle_decode(module, p, b, ref[i][0], ref[i][1], max_new_tokens, oracle_acceptance, seed=i)
            tokens, lengths = tokens[:, : ref[i][0].shape[1]], ref[i][1]
        else:
            tokens, s = oracle_decode(module, p, ref[i][0], max_new_tokens, name[1], oracle_acceptance, seed=i)
            tokens, lengths = tokens[:, : ref[i][0].shape[1]], ref[i][1]
        sync(device)
        return time.perf_counter() - t0, tokens, lengths, s

    for i in range(len(data)):  # warm-up, and the reference tokens
        _, tokens, lengths, _ = run("greedy", i)
        ref[i] = (tokens, lengths)
        for name in deciders[1:]:
            run(name, i)
    for r in range(repeats):
        total = dict.fromkeys(deciders, 0.0)
        rep_stats = {k: SpecStats(k[1]) for k in deciders[1:]}
        for i in range(len(data)):
            shift = (r + i) % len(deciders)  # rotate which decoder goes first
            for name in deciders[shift:] + deciders[:shift]:
                dt, tokens, lengths, s = run(name, i)
                total[name] += dt
                identical[name] &= torch.equal(tokens, ref[i][0]) and torch.equal(lengths, ref[i][1])
                if s is not None:
                    rep_stats[name].add(s)
        for name in deciders:
            times[name].append(total[name])
        stats = rep_stats  # deterministic: every repetition counts the same
    n_tokens = sum(int(r[1].sum()) for r in ref)
    rows = [{"batch_size": batch_size, "decoder": "greedy", "num_drafts": 0, "utterances": n_utts,
             "tokens": n_tokens, "row_forwards": n_tokens, "wall_seconds": statistics.median(times["greedy"]),
             "wall_seconds_all": times["greedy"], "tokens_per_forward": 1.0, "speedup": 1.0, "identical": True,
             "audio_seconds": audio_seconds, "rtfx": audio_seconds / statistics.median(times["greedy"])}]
    for name in deciders[1:]:
        s = stats[name]
        # speedup: the median over repetitions of greedy / this decoder, both timed in the same repetition
        speedup = statistics.median(g / t for g, t in zip(times["greedy"], times[name]))
        rows.append({"batch_size": batch_size, "decoder": name[0], "num_drafts": name[1], "utterances": n_utts,
                     "tokens": n_tokens, "row_forwards": s.prefills + s.forwards,
                     "wall_seconds": statistics.median(times[name]), "wall_seconds_all": times[name],
                     "tokens_per_forward": s.tokens_per_forward, "chained_acceptance": s.chained_acceptance(),
                     "mean_accepted_length": s.mean_accepted_length(), "batch_forwards": s.batch_forwards,
                     "ctc_acceptance": s.ctc_acceptance, "ctc_drafted": s.ctc_drafted, "ctc_accepted": s.ctc_accepted,
                     "speedup": speedup, "identical": identical[name], "audio_seconds": audio_seconds,
                     "rtfx": audio_seconds / statistics.median(times[name])})
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["batch", "decoder", "utts", "tokens", "fwd/utt", "tok/fwd", "chained acc", "ctc acc", "acc.len", "wall s",
            "RTFx", "speedup", "identical"]
    lines = [head]
    for r in rows:
        name = r["decoder"] + (f" D={r['num_drafts']}" if r["num_drafts"] else "")
        acc = " ".join(f"{100 * a:.1f}%" for a in r.get("chained_acceptance", [])) or "-"
        mal = f"{r['mean_accepted_length']:.2f}" if "mean_accepted_length" in r else "-"
        ctc = f"{100 * r['ctc_acceptance']:.1f}%" if r.get("ctc_drafted") else "-"
        lines.append([str(r["batch_size"]), name, str(r["utterances"]), str(r["tokens"]),
                      f"{r['row_forwards'] / r['utterances']:.2f}", f"{r['tokens_per_forward']:.2f}", acc, ctc, mal,
                      f"{r['wall_seconds']:.3f}", f"{r['rtfx']:.1f}", f"{r['speedup']:.2f}x",
                      "yes" if r["identical"] else "NO"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="Lightning checkpoint (default: an untrained conf/demo.yaml model)")
    src.add_argument("--model", help="export directory (salm-mtp export)")
    p.add_argument("--tokenizer", default=None,
                   help="untrained model only: its tokenizer directory (default conf/demo.yaml's model.tokenizer_path)")
    p.add_argument("--manifest", default=DEMO_MANIFEST, help=f"lhotse manifest (default {DEMO_MANIFEST})")
    p.add_argument("--out", default="runs/bench_decode", help="output directory for decode.json")
    p.add_argument("--limit", type=int, default=64, help="first N utterances of the manifest (default 64)")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (default 1,16)")
    p.add_argument("--num-drafts", default=None, help="comma-separated D values (default: the head's depths)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--decoders", default=None,
                   help="comma-separated speculative modes among mtp, ctc, ctc+mtp (default: every one the model "
                        "can draft with: mtp with an MTP head, ctc with an encoder CTC head)")
    p.add_argument("--group-tasks", action="store_true",
                   help="serve ASR cuts first, as `salm-mtp evaluate --decode ctc*` does (each in manifest order): a "
                        "batch of rows that all carry a CTC draft can finish in one forward")
    p.add_argument("--oracle", action="store_true", help="also decode with oracle drafts (the ceiling)")
    p.add_argument("--oracle-acceptance", type=float, default=1.0,
                   help="--oracle: the probability that an oracle draft is right (default 1: every draft); e.g. the "
                        "acceptance a trained head reached, to see the speedup it gives on another backbone")
    p.add_argument("--llm-pattern", default=None,
                   help="untrained model only: the backbone's block pattern (default conf/demo.yaml's). A deeper one "
                        "(e.g. 8 x 'M*EM-*') gives the backbone-to-head cost ratio of a real model")
    add_device_arg(p)
    a = parse_device_args(p, argv)
    logging_quiet()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ckpt or a.model:
        from salm_mtp.io.checkpoints import load_model

        module, source = load_model(a.ckpt or a.model), a.ckpt or a.model
        data_config = run_data_settings(source)
    else:
        data_config = None
        if a.llm_pattern:
            module = untrained_demo_model(a.llm_pattern, a.tokenizer)
            source = f"untrained {DEMO_CONF} model (seed 0), backbone pattern {a.llm_pattern!r}"
        else:
            module, source = untrained_demo_model(tokenizer=a.tokenizer), f"untrained {DEMO_CONF} model (seed 0)"
    module = module.to(a.device)
    module.eval()
    supported = supported_modes(module)[1:]
    decoders = tuple(a.decoders.split(",")) if a.decoders else tuple(supported)
    unknown = [m for m in decoders if m not in supported]
    if unknown or not decoders:
        raise SystemExit(f"--decoders {a.decoders!r}: {source} drafts with {', '.join(supported) or 'nothing'}")
    drafts = [int(d) for d in a.num_drafts.split(",")] if a.num_drafts else [module.num_mtp_depths or 1]
    rows = []
    for bs in (int(b) for b in a.batch_sizes.split(",")):
        rows += bench_batch_size(module, a.manifest, a.limit, bs, drafts, a.repeats, a.max_new_tokens, a.oracle,
                                 a.oracle_acceptance, decoders, a.group_tasks, data_config)
    head = next(r for r in rows if r["decoder"] == decoders[-1])
    result = {
        "model": source, "manifest": a.manifest, "limit": a.limit, "repeats": a.repeats,
        "max_new_tokens": a.max_new_tokens, "threads": torch.get_num_threads(), "device": a.device,
        "memory": MEMORY_MEASURES[a.device], "peak_mib": round(process_peak(a.device), 1),
        "group_tasks": a.group_tasks,
        "oracle_acceptance": a.oracle_acceptance if a.oracle else None,
        "headline": {"batch_size": head["batch_size"], "decoder": head["decoder"], "num_drafts": head["num_drafts"]},
        "tokens_per_forward": head["tokens_per_forward"], "speedup": head["speedup"], "identical": head["identical"],
        "chained_acceptance": head["chained_acceptance"], "mean_accepted_length": head["mean_accepted_length"],
        "runs": rows,
    }
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "decode.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"model: {source}\nmanifest: {a.manifest} (first {a.limit}), {torch.get_num_threads()} threads, "
          f"device {a.device}, median of {a.repeats} repetitions\n")
    print(format_table(rows))
    print(f"\nwrote {path}")
    return 0 if all(r["identical"] for r in rows) else 1


def run_data_settings(src: str):
    """The data settings of the run that wrote ``src`` (its config.yaml), as ``salm-mtp evaluate`` reads them; the
    defaults (with a warning) when there is none."""
    from salm_mtp.evaluation.data import not_evaluated
    from salm_mtp.run_config import data_config_from_run, find_run_config

    run_config = find_run_config(src)
    if run_config is None:
        print(f"warning: no run config next to {src!r}: the data and prompt settings are the defaults",
              file=sys.stderr)
    return data_config_from_run(run_config, **not_evaluated())


def logging_quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
