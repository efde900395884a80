"""``salm-mtp transcribe``: audio files in, one line of text per file out; no manifest needed. And the same as a small
Python API.

    salm-mtp transcribe --model exports/demo clips/ talk.flac --format jsonl      # or --ckpt RUN/checkpoints/last.ckpt

    from salm_mtp.transcribe import Transcriber
    t = Transcriber.load("exports/demo")                         # a .ckpt, sharded checkpoint dir or export dir
    for r in t.transcribe(["a.wav", "b.flac"]):                  # -> Transcript(path, text, error, seconds)
        print(r.path, r.text)
    t.generate(samples, sample_rate=8000, task="ast")            # one clip given as an array

Audio: whatever libsndfile reads (wav, flac, ogg; mp3 with libsndfile >= 1.1), any sample rate (resampled to the
model's with a polyphase filter), several channels (averaged). Directories are searched for those extensions
(sorted). Prompts: the task's instruction (``--task asr|ast``) from the run's own config.yaml when one is found next to
the model (data.prompt), else the defaults; ``--prompt TEXT`` replaces the instruction. Decoding: ``--decode auto``
(default) drafts with what the model has (salm_mtp.decoding.modes.auto_mode); every mode gives greedy's
tokens. A file that cannot be read is reported (stderr, and its row's ``error``) and skipped.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from salm_mtp.options import option

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
"""Files a directory argument contributes (what libsndfile usually reads)."""


@dataclass
class Transcript:
    """One file's result."""

    path: str
    text: str | None
    """The decoded answer; None when the file could not be read."""
    error: str | None = None
    seconds: float = 0.0
    """Audio duration."""


def audio_files(paths: list[str]) -> list[str]:
    """Files and the audio files under directories (recursively, sorted), in the order given."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = [os.path.join(d, f) for d, _, files in os.walk(p) for f in files
                     if f.lower().endswith(AUDIO_EXTENSIONS)]
            out += sorted(found)
        else:
            out.append(p)
    return out


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Float32 ``samples`` at ``rate`` resampled to ``target`` (polyphase filter; the same array when equal)."""
    if rate == target:
        return samples
    from scipy.signal import resample_poly

    g = np.gcd(int(rate), int(target))
    return resample_poly(samples, int(target) // g, int(rate) // g).astype(np.float32)


def read_audio(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate`` (channels averaged, resampled)."""
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32", always_2d=True)  # (samples, channels)
    mono = resample(data.mean(axis=1), rate, sample_rate)
    if mono.size == 0:
        raise ValueError("no samples")
    return mono


@dataclass
class Transcriber:
    """A loaded model with its prompt formatter; ``transcribe`` files or ``generate`` on arrays."""

    model: torch.nn.Module
    formatter: object
    decode: str = "auto"
    """greedy, mtp, ctc, ctc+mtp or auto."""
    max_new_tokens: int = 128
    batch_size: int = 8
    _mode: str = field(default="", init=False)

    @classmethod
    def load(cls, path: str, device: str | None = None, config: str | None = None, **kw) -> Transcriber:
        """The model at ``path`` (.ckpt, sharded dir or export) with the prompt settings of its run's config.yaml
        (``config``: that file; default found next to the model; none: PromptConfig's defaults)."""
        from salm_mtp.data.prompt import PromptConfig, PromptFormatter
        from salm_mtp.io.checkpoints import load_model
        from salm_mtp.run_config import find_run_config, read_data_section

        model = load_model(path).eval()
        model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = config or find_run_config(path)
        prompt = (read_data_section(config).get("prompt") if config else None) or {}
        return cls(model, PromptFormatter(model.tokenizer, PromptConfig(**prompt)), **kw)

    @property
    def mode(self) -> str:
        if not self._mode:
            from salm_mtp.decoding.modes import resolve_mode

            self._mode = resolve_mode(self.model, self.decode)
        return self._mode

    def _batch(self, clips: list[np.ndarray], task: str, instruction: str | None) -> dict:
        """The collated prompt-only batch (salm_mtp/data/dataset.py's layout) of ``clips``."""
        fmt = self.formatter
        if instruction is not None:
            from salm_mtp.data.prompt import PromptFormatter

            fmt = PromptFormatter(fmt.tokenizer, replace(fmt.cfg, asr_instruction=instruction))
        ids = fmt.prompt_ids("asr" if instruction is not None else task)
        B, S = len(clips), max(c.size for c in clips)
        audios = torch.zeros(B, S)
        for i, c in enumerate(clips):
            audios[i, : c.size] = torch.from_numpy(c)
        input_ids = torch.tensor([ids] * B)
        return {"audios": audios, "audio_lens": torch.tensor([c.size for c in clips]), "clip_rows": torch.arange(B),
                "input_ids": input_ids, "input_lens": torch.full((B,), len(ids)),
                "loss_mask": torch.zeros_like(input_ids, dtype=torch.bool), "prompt_lens": torch.full((B,), len(ids)),
                "tasks": [task if instruction is None else "prompt"] * B}

    def generate(self, clips: list[np.ndarray] | np.ndarray, sample_rate: int | None = None, task: str = "asr",
                 instruction: str | None = None) -> list[str]:
        """Answers for clips given as arrays (one array: one clip) at ``sample_rate`` (default the model's)."""
        from salm_mtp.decoding.modes import speculative_decode
        from salm_mtp.generate import decode_text, greedy_decode

        rate = self.model.features.config.sample_rate
        if isinstance(clips, np.ndarray) and clips.ndim == 1:
            clips = [clips]
        clips = [resample(np.asarray(c, dtype=np.float32).reshape(-1), sample_rate or rate, rate) for c in clips]
        batch = self._batch(clips, task, instruction)
        if self.mode == "greedy":
            tokens, lengths = greedy_decode(self.model, batch, self.max_new_tokens)
        else:
            fmt = self.formatter
            tokens, lengths, _ = speculative_decode(self.model, batch, self.mode, self.max_new_tokens,
                                                    answer_ids=lambda text: fmt.answer_ids("asr", text))
        return decode_text(self.model.tokenizer, tokens.cpu(), lengths.cpu())

    def transcribe(self, paths: list[str], task: str = "asr", instruction: str | None = None,
                   progress: bool = False):
        """Yields a ``Transcript`` per file (directories expanded), in order; unreadable files carry their error."""
        from tqdm import tqdm

        files = audio_files(paths)
        rate = self.model.features.config.sample_rate
        with tqdm(total=len(files), unit="file", desc="transcribe", disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(files), self.batch_size):
                chunk, clips, out = files[start: start + self.batch_size], [], []
                for path in chunk:
                    try:
                        clips.append(read_audio(path, rate))
                        out.append(Transcript(path, None, seconds=clips[-1].size / rate))
                    except Exception as e:  # noqa: BLE001  (libsndfile, scipy: anything unreadable)
                        out.append(Transcript(path, None, error=f"unreadable audio: {type(e).__name__}: "
                                                                 f"{str(e).strip()[:200]}"))
                texts = iter(self.generate(clips, task=task, instruction=instruction) if clips else [])
                for r in out:
                    if r.error is None:
                        r.text = next(texts)
                    bar.update(1)
                    yield r


@dataclass
class TranscribeOptions:
    """The options of ``salm-mtp transcribe`` (salm_mtp/options.py makes the parser and its help from them)."""

    inputs: list[str] = option(positional=True, metavar="AUDIO", default_factory=list)
    """audio files or directories (searched for wav, flac, ogg, mp3, ...)"""
    ckpt: str | None = None
    """Lightning checkpoint (.ckpt file or sharded directory); give this or --model"""
    model: str | None = None
    """export directory written by `salm-mtp export`; give this or --ckpt"""
    config: str | None = None
    """the run's config.yaml whose data.prompt the prompts follow (default: found next to the model)"""
    task: Literal["asr", "ast"] = "asr"
    """asr (a transcript) or ast (a translation, the instruction of data.prompt.ast_instruction)"""
    prompt: str | None = None
    """an instruction of your own instead of the task's"""
    format: Literal["text", "jsonl", "tsv"] = "text"
    """text (one answer per line), jsonl ({path, text, error, seconds}) or tsv (path, text)"""
    out: str | None = None
    """write the lines to this file instead of stdout"""
    decode: Literal["greedy", "mtp", "ctc", "ctc+mtp", "auto"] = "auto"
    """decoding mode; every mode gives greedy's tokens (auto: the one that drafts the most)"""
    batch_size: int = 8
    """files decoded together"""
    max_new_tokens: int = 128
    """most tokens per answer"""
    device: str | None = None
    """torch device (default: cuda if available, else cpu)"""
    no_progress: bool = False
    """no progress bar"""

    def __post_init__(self) -> None:
        if (self.ckpt is None) == (self.model is None):
            raise ValueError("give one of --ckpt (a training checkpoint) or --model (an export directory)")
        if not self.inputs:
            raise ValueError("no AUDIO given: pass audio files or directories")


def _line(r: Transcript, fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps({"path": r.path, "text": r.text, "error": r.error, "seconds": round(r.seconds, 3)},
                          ensure_ascii=False)
    text = "" if r.text is None else r.text.replace("\t", " ").replace("\n", " ")
    return f"{r.path}\t{text}" if fmt == "tsv" else text


def main(argv: list[str] | None = None) -> int:
    """``salm-mtp transcribe``; exit status 1 when a file could not be read, else 0."""
    from salm_mtp.errors import check_ckpt_path
    from salm_mtp.options import parse_options

    args = parse_options(TranscribeOptions, argv, prog="salm-mtp transcribe", description=__doc__.split("\n\n")[0])
    src = args.ckpt or args.model
    if args.ckpt:
        check_ckpt_path(args.ckpt, "--ckpt")
    t = Transcriber.load(src, device=args.device, config=args.config, decode=args.decode,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    failed = 0
    out = open(args.out, "w") if args.out else sys.stdout
    try:
        for r in t.transcribe(args.inputs, task=args.task, instruction=args.prompt, progress=not args.no_progress):
            if r.error is not None:
                failed += 1
                print(f"skipped {r.path}: {r.error}", file=sys.stderr)
                if args.format == "text":
                    continue
            print(_line(r, args.format), file=out, flush=True)
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{failed} file(s) could not be read" if failed else "", file=sys.stderr, end="\n" if failed else "")
    return 1 if failed else 0
