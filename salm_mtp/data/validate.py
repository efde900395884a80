"""``salm-mtp validate-data MANIFEST... [--config X]``: every bad cut of some manifests, before a run.

    salm-mtp validate-data data/demo/train_cuts.jsonl.gz data/demo/dev_cuts.jsonl.gz --config conf/demo.yaml
    salm-mtp validate-data data/demo/talk_train.jsonl data/demo/text_train.jsonl --config conf/demo_mix.yaml

Reads every line and every example's audio with the training checks (salm_mtp.data.policy: manifest lines,
durations, text and token lengths with the run's tokenizer and prompt, audio decoding and declared vs
actual duration; conversations: every turn, every audio turn's clip), prints one line per bad example (id,
file, reason), a count per reason and histograms of durations and target lengths. Each manifest is read as
its ``data.inputs`` type: a lhotse CutSet, NeMo conversations or text (``--type``, default detected from its
first line). Settings come from the ``data:`` section of ``--config`` files (later
files win; ``data.tokenizer_path``, else ``model.tokenizer_path``, else ``--tokenizer``). Exit code 0
when every cut is good, 1 otherwise, 2 on unusable arguments.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from salm_mtp.data.mix import SOURCE_TYPES
from salm_mtp.data.checks import CutChecker, located
from salm_mtp.data.policy import BadCut
from salm_mtp.errors import SalmError
from salm_mtp.options import option, parse_options


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


@dataclass
class ValidateDataOptions:
    """The options of ``salm-mtp validate-data`` (salm_mtp/options.py makes the parser and its help from them)."""

    manifests: list[str] = option(positional=True, metavar="MANIFEST")
    """lhotse CutSet manifest(s) (jsonl or jsonl.gz), or conversation / text JSONL (data/README.md)"""
    input_type: Literal[("auto", *SOURCE_TYPES)] = option(flag="--type", default="auto")
    """format of every MANIFEST (auto: each one's from its first line)"""
    config: list[str] = option(repeat=True, default_factory=list)
    """YAML config of the run (its data: section); repeat for several, later files win"""
    tokenizer: str | None = None
    """tokenizer directory when the config names none"""


def main(argv: list[str]) -> int:
    args = parse_options(ValidateDataOptions, argv, prog="salm-mtp validate-data",
                         description=__doc__.split("\n\n")[0])
    try:
        return _validate(args)
    except SalmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _validate(args) -> int:
    import os

    from salm_mtp.data.dataset import SALMDataset
    from salm_mtp.data.manifest import load_cuts
    from salm_mtp.data.mix import InputConfig, detect_source_type, source_cuts
    from salm_mtp.data.prompt import PromptConfig, PromptFormatter
    from salm_mtp.errors import MissingInputError

    data = _config(args.config)
    tok_path = args.tokenizer or data.get("tokenizer_path")
    if not tok_path:
        raise MissingInputError("no tokenizer: pass --config with data.tokenizer_path / model.tokenizer_path, or "
                                "--tokenizer DIR")
    from salm_mtp.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path, "data.tokenizer_path")
    prompt = data.get("prompt") or {}
    fmt = PromptFormatter(tok, PromptConfig(**prompt))
    checker = CutChecker(fmt, max_target_tokens=data.get("max_target_tokens", 2048), max_seq_len=data.get("max_seq_len"),
                         max_cut_duration=data.get("max_cut_duration"), max_duration=data.get("max_duration", 60.0))
    dataset = SALMDataset(tok, fmt, checker=checker, policy="skip")
    bad: list[BadCut] = []
    durations: list[float] = []
    lengths: list[int] = []
    kinds: Counter = Counter()
    seen: defaultdict[str, list[str]] = defaultdict(list)  # cut id -> the manifest of each of its examples
    for manifest in args.manifests:
        if not os.path.isfile(manifest):
            raise MissingInputError(f"MANIFEST {manifest!r}: no such file")
        kind = detect_source_type(manifest) if args.input_type == "auto" else args.input_type
        kinds[kind] += 1
        if kind == "cuts":
            cuts = load_cuts(manifest, bad.append)
        else:
            cuts = source_cuts(InputConfig(name="validate", type=kind, path=manifest), None, bad.append)
        for cut in cuts:
            seen[cut.id].append(manifest)
            item = checker.check_metadata(cut) or located(dataset.read(cut), cut)  # text, durations, then audio
            if isinstance(item, BadCut):
                bad.append(item)
                continue
            durations.append(cut.duration)
            lengths.append(sum(item[0].loss_mask))  # target tokens: the answer(s) and their end tokens
    for b in bad:
        print(f"BAD {b.message()}")
    duplicates = {cid: where for cid, where in seen.items() if len(where) > 1}
    for cid, where in duplicates.items():  # evaluation keys hypotheses by id; a mixed stream would weigh them twice
        print(f"DUPLICATE id {cid!r}: {len(where)} examples ({', '.join(sorted(set(where)))})")
    counts = Counter(b.reason for b in bad)
    read = ", ".join(f"{c} {k}" for k, c in sorted(kinds.items()))
    n = len(durations) + len(bad)  # bad manifest lines included
    print(f"{n} examples read from {len(args.manifests)} manifest(s) ({read}): {len(durations)} good, "
          f"{len(bad)} bad" + (f" [{', '.join(f'{r}={c}' for r, c in sorted(counts.items()))}]" if bad else ""))
    print("audio duration (s) of the good examples:")
    print("\n".join(histogram(durations, unit=" s")))
    print("target tokens (answers + end tokens) of the good examples:")
    print("\n".join(histogram([float(x) for x in lengths])))
    if n == 0:
        print(f"error: no example in {', '.join(args.manifests)}: the files are empty", file=sys.stderr)
        return 1
    if duplicates:
        print(f"{len(duplicates)} ids are used by more than one example: give every example its own id")
    return 1 if bad or duplicates else 0
