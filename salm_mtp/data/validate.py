"""``salm-mtp validate-data MANIFEST... [--config X]``: every bad cut of some manifests, before a run.

    salm-mtp validate-data data/demo/train_cuts.jsonl.gz data/demo/dev_cuts.jsonl.gz --config conf/demo.yaml

Reads every line and every cut's audio with the training checks (salm_mtp.data.policy: manifest lines,
durations, text and token lengths with the run's tokenizer and prompt, audio decoding and declared vs
actual duration), prints one line per bad cut (cut id, file, reason), a count per reason and histograms
of durations and answer lengths. Settings come from the ``data:`` section of ``--config`` files (later
files win; ``data.tokenizer_path``, else ``model.tokenizer_path``, else ``--tokenizer``). Exit code 0
when every cut is good, 1 otherwise, 2 on unusable arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np

from salm_mtp.data.policy import BadCut, CutChecker
from salm_mtp.errors import SalmError


def _config(paths: list[str]) -> dict:
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(*[OmegaConf.load(p) for p in paths]) if paths else OmegaConf.create({})
    raw = OmegaConf.to_container(merged, resolve=False)
    data, model = dict(raw.get("data") or {}), dict(raw.get("model") or {})
    tok = data.get("tokenizer_path")
    if not isinstance(tok, str) or tok.startswith("${"):
        tok = model.get("tokenizer_path")
    data["tokenizer_path"] = tok
    return data


def histogram(values: list[float], bins: int = 8, width: int = 40, unit: str = "") -> list[str]:
    """Text histogram lines: ``[lo, hi) count bar``."""
    if not values:
        return ["  (none)"]
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    top = max(int(counts.max()), 1)
    return [f"  [{lo:8.2f}, {hi:8.2f}){unit} {n:7d} {'#' * round(width * n / top)}"
            for lo, hi, n in zip(edges[:-1], edges[1:], counts)]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="salm-mtp validate-data", description=__doc__.split("\n\n")[0])
    p.add_argument("manifests", nargs="+", metavar="MANIFEST", help="lhotse CutSet manifest(s) (jsonl or jsonl.gz)")
    p.add_argument("--config", action="append", default=[], help="YAML config(s) of the run (data: section)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory when the config names none")
    args = p.parse_args(argv)
    try:
        return _validate(args)
    except SalmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _validate(args) -> int:
    from salm_mtp.data.dataset import SALMDataset, reference_answer
    from salm_mtp.data.manifest import load_cuts
    from salm_mtp.data.prompt import PromptConfig, PromptFormatter
    from salm_mtp.errors import MissingInputError

    data = _config(args.config)
    tok_path = args.tokenizer or data.get("tokenizer_path")
    if not tok_path:
        raise MissingInputError("no tokenizer: pass --config with data.tokenizer_path / model.tokenizer_path, or "
                                "--tokenizer DIR")
    from salm_mtp.model import load_tokenizer

    tok = load_tokenizer(tok_path, "data.tokenizer_path")
    prompt = data.get("prompt") or {}
    fmt = PromptFormatter(tok, PromptConfig(**prompt))
    checker = CutChecker(fmt, max_target_tokens=data.get("max_target_tokens", 2048), max_seq_len=data.get("max_seq_len"),
                         max_cut_duration=data.get("max_cut_duration"), max_duration=data.get("max_duration", 60.0))
    dataset = SALMDataset(tok, fmt, checker=checker, policy="skip")
    bad: list[BadCut] = []
    durations: list[float] = []
    lengths: list[int] = []
    n = 0
    for manifest in args.manifests:
        for cut in load_cuts(manifest, bad.append):
            n += 1
            found = checker.check_metadata(cut)
            if found is None:
                audio = dataset.load_audio(cut)
                found = audio if isinstance(audio, BadCut) else None
            if found is not None:
                bad.append(found)
                continue
            durations.append(cut.duration)
            task, answer = reference_answer(cut)
            lengths.append(len(fmt.answer_ids(task, answer)) - 1)
    for b in bad:
        print(f"BAD {b.message()}")
    counts = Counter(b.reason for b in bad)
    print(f"{n} cuts read from {len(args.manifests)} manifest(s): {len(durations)} good, "
          f"{len(bad)} bad" + (f" [{', '.join(f'{r}={c}' for r, c in sorted(counts.items()))}]" if bad else ""))
    print("duration (s) of the good cuts:")
    print("\n".join(histogram(durations, unit=" s")))
    print("answer tokens of the good cuts:")
    print("\n".join(histogram([float(x) for x in lengths])))
    return 1 if bad else 0
