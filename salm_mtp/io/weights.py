"""Low-level tensor I/O of local HF checkpoint directories: lazy safetensors slices, key maps, writing.

This module knows tensors and key names, never a SALMModule (whole-model I/O is ``salm_mtp.io``).

Reading is lazy and per rank: :class:`TensorReader` keeps each safetensors file open and returns
only the slice a rank owns (``get_slice(name)[a:b]``), so no rank ever reads a whole file or a whole
model. A module tensor's :class:`Source` says which checkpoint key(s) hold it:

  * the backbone's on-disk prefix ``backbone.`` becomes ``model.`` in memory;
  * per-expert ``X.experts.{e}.{up,down}_proj.weight`` (on disk) are stacked into the fused in-memory
    ``X.experts.{up,down}_proj`` of shape (E, out, in): a rank owning experts [a, b) reads only those.

Every missing or unexpected tensor is reported by name: nothing is silently re-initialised.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from salm_mtp.errors import SalmError

EXPERT_RE = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")



class CheckpointError(SalmError, ValueError):
    """A checkpoint directory does not hold what the model needs, or one of its files cannot be read."""


def _safe_open(file: str, header_checked: bool = False):
    """``safe_open(file)``, its failure (a truncated or corrupt file) a CheckpointError naming the file; the header is
    checked first (``safetensors_header`` names a cut-short file before the memory map does) unless the caller has."""
    if not header_checked:
        safetensors_header(file)
    try:
        return safe_open(file, "pt")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: all mean the file is unusable
        raise CheckpointError(f"{file!r} is not a readable safetensors file ({type(e).__name__}: {e}); re-download "
                              "or re-export it") from None


def checkpoint_files(path: str) -> dict[str, str]:
    """Map every tensor name of a local HF directory to its safetensors file (reads headers only)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        with _safe_open(single) as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(
        f"{path!r} holds no model.safetensors or model.safetensors.index.json: not a local HF checkpoint directory"
    )


def checkpoint_files_of(file: str) -> dict[str, str]:
    """Map every tensor name of one safetensors file to that file."""
    if not os.path.isfile(file):
        raise CheckpointError(f"{file!r} does not exist")
    with _safe_open(file) as f:
        return {k: file for k in f.keys()}


@dataclass(frozen=True)
class Source:
    """Where one module tensor lives on disk: one key, or E per-expert keys stacked along dim 0."""

    keys: tuple[str, ...]
    """Checkpoint tensor names (one, or one per expert in expert order)."""
    stacked: bool = False
    """True: the module tensor is ``torch.stack`` of ``keys`` (fused experts)."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_header(file: str) -> tuple[dict, int]:
    """(the JSON header of a safetensors file, the byte offset where its data starts)."""
    fix = "re-download or re-export it"
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{file!r} is not a safetensors file (a {size}-byte file announces a {n}-byte "
                                      f"header): truncated or another format; {fix}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{file!r} cannot be read ({e.strerror or e}); {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file!r} is not a safetensors file (its header is not JSON: {e}); {fix}") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file!r} is truncated: it holds {size} bytes, its tensors need {8 + n + end}; {fix}")
    return header, 8 + n


class TensorReader:
    """Reads slices of named tensors from a set of safetensors files, keeping each file open once.

    A block that spans whole rows (all an FSDP2 Shard(0) slice or one expert ever needs) is read as one
    byte range with ``os.pread`` into a fresh buffer: unlike the memory map behind ``safe_open``, no page
    of the file stays resident in this process after the copy, so a rank's memory grows by its shard only.
    Other blocks go through ``safe_open(...).get_slice``.

        with TensorReader(files) as r:
            t = r.read(Source(("backbone.embeddings.weight",)), offset=(0, 0), shape=(100, 64))
    """

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._open: dict[str, object] = {}
        self._headers: dict[str, tuple[dict, int]] = {}
        self._fds: dict[str, int] = {}
        self.bytes_read = 0
        """Bytes of tensor data this reader has read (only the slices asked for)."""
        self.tensors_read = 0

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        for f in self._open.values():
            f.__exit__(None, None, None)
        self._open.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _header(self, file: str) -> tuple[dict, int]:
        if file not in self._headers:
            self._headers[file] = safetensors_header(file)
        return self._headers[file]

    def _handle(self, key: str):
        file = self.files[key]
        if file not in self._open:
            self._header(file)  # read once per file: the row reads use it too
            self._open[file] = _safe_open(file, header_checked=True).__enter__()
        return self._open[file]

    def shape(self, source: Source) -> tuple[int, ...]:
        """Global shape of the module tensor ``source`` describes (read from the headers only)."""
        key = source.keys[0]
        one = tuple(self._header(self.files[key])[0][key]["shape"])
        return (len(source.keys), *one) if source.stacked else one

    def read(self, source: Source, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The block ``[offset, offset + shape)`` of the module tensor (all of it for 0-d tensors)."""
        if source.stacked:
            lo, n = offset[0], shape[0]
            parts = [self._read_one(k, offset[1:], shape[1:]) for k in source.keys[lo : lo + n]]
            if not parts:  # this rank owns no expert of the stack (more ranks than experts)
                return torch.empty(shape)
            return torch.stack(parts)
        return self._read_one(source.keys[0], offset, shape)

    def _read_rows(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        """Rows [offset[0], offset[0] + shape[0]) of a tensor read with one pread; None if not whole rows."""
        file = self.files[key]
        header, data_start = self._header(file)
        info = header.get(key)
        dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if info else None
        full = tuple(info["shape"]) if info else ()
        if dtype is None or not full or tuple(shape[1:]) != full[1:] or any(offset[1:]):
            return None
        row = dtype.itemsize
        for d in full[1:]:
            row *= d
        begin = data_start + info["data_offsets"][0] + offset[0] * row
        nbytes = shape[0] * row
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            got = os.preadv(self._fds[file], [view[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"{file!r}: tensor {key} is truncated (read {done} of {nbytes} bytes)")
            done += got
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).view(shape)

    def _read_one(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        t = self._read_rows(key, offset, shape) if shape else None
        if t is None and not shape:
            t = self._handle(key).get_tensor(key)
        elif t is None:
            index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            t = self._handle(key).get_slice(key)[index]
        self.bytes_read += t.numel() * t.element_size()
        self.tensors_read += 1
        return t


# ------------------------------------------------------------------------------- key maps
def to_module_key(k: str) -> str:
    """On-disk Nemotron-H name -> in-memory name (``backbone.`` -> ``model.``)."""
    return "model." + k[len("backbone.") :] if k.startswith("backbone.") else k


def group_sources(keys: list[str], rename=lambda k: k) -> dict[str, Source]:
    """Sources of the module tensors behind checkpoint ``keys``: per-expert keys grouped into stacks.

    Raises CheckpointError naming the first missing expert tensor of a gap in the indices.
    """
    stacks: dict[str, dict[int, str]] = defaultdict(dict)
    out: dict[str, Source] = {}
    for k in keys:
        m = EXPERT_RE.match(k)
        if m:
            stacks[f"{m['prefix']}.{m['proj']}"][int(m["idx"])] = k
        else:
            out[rename(k)] = Source((k,))
    for name, experts in stacks.items():
        gap = [e for e in range(max(experts) + 1) if e not in experts]
        if gap:
            prefix, proj = name.rsplit(".", 1)
            raise CheckpointError(f"missing tensor {prefix}.{gap[0]}.{proj}.weight (experts {gap} absent)")
        out[rename(name)] = Source(tuple(experts[e] for e in range(len(experts))), stacked=True)
    return out


def check_sources(targets: dict[str, tuple[int, ...]], sources: dict[str, Source], reader: TensorReader,
                  what: str, prefix: str = "") -> None:
    """Fail with the names of missing / unexpected / misshapen tensors (``targets``: name -> module shape)."""
    missing = sorted(set(targets) - set(sources))
    unexpected = sorted(set(sources) - set(targets))
    shapes = []
    for k in sorted(set(targets) & set(sources)):
        disk = reader.shape(sources[k])
        if tuple(disk) != tuple(targets[k]):
            shapes.append(f"{prefix}{k}: checkpoint {tuple(disk)} vs model {tuple(targets[k])}")
    problems = []
    if missing:
        problems.append(f"missing tensors {[prefix + k for k in missing[:20]]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {[prefix + k for k in unexpected[:20]]}")
    if shapes:
        problems.append(f"shape mismatches {shapes[:20]}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def llm_sources(files: dict[str, str], load_mtp: bool, num_experts: int | None = None) -> dict[str, Source]:
    """Sources of a Nemotron-H LLM's tensors by in-memory name (``model.*``, ``lm_head.*``, ``mtp.*``).

    ``mtp.*`` is included only with ``load_mtp``. With ``num_experts`` a stack with fewer experts fails by name.
    """
    keys = [k for k in files if load_mtp or not k.startswith("mtp.")]
    sources = group_sources(keys, to_module_key)
    if num_experts is not None:
        for name, src in sources.items():
            if src.stacked and len(src.keys) < num_experts:
                prefix, proj = src.keys[0].rsplit(".experts.", 1)[0], name.rsplit(".", 1)[1]
                raise CheckpointError(f"missing tensor {prefix}.experts.{len(src.keys)}.{proj}.weight "
                                      f"(experts {list(range(len(src.keys), num_experts))} absent)")
    return sources


def encoder_sources(files: dict[str, str], with_ctc_head: bool) -> dict[str, Source]:
    """Sources of an AudioEncoder (``encoder.*``, ``ctc_head.*``) from a Parakeet CTC or bare encoder directory."""
    keys = list(files)
    bare = not any(k.startswith("encoder.") for k in keys)
    sources = {("encoder." + k if bare else k): Source((k,)) for k in keys}
    if not with_ctc_head:
        sources = {k: v for k, v in sources.items() if not k.startswith("ctc_head.")}
    return sources


# ------------------------------------------------------------------------------- writing
def save_tensors(module_state: dict[str, torch.Tensor], file: str) -> None:
    """Write a state dict as safetensors (contiguous CPU copies)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in module_state.items()}, file)


def save_encoder_hf(audio_encoder: torch.nn.Module, out_dir: str) -> None:
    """Write an AudioEncoder as a HF Parakeet CTC directory (bare encoder config when it has no CTC head).

    The blank is the last class (``pad_token_id = vocab_size - 1``), as in released Parakeet CTC models.
    """
    from transformers import ParakeetCTCConfig

    os.makedirs(out_dir, exist_ok=True)
    enc_config = audio_encoder.encoder.config
    if audio_encoder.ctc_head is not None:
        classes = audio_encoder.ctc_head.out_channels
        cfg = ParakeetCTCConfig(encoder_config=enc_config.to_dict(), vocab_size=classes, pad_token_id=classes - 1)
    else:
        cfg = enc_config
    cfg.save_pretrained(out_dir)
    save_tensors(audio_encoder.state_dict(), os.path.join(out_dir, "model.safetensors"))
