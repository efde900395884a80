"""Tests of salm_mtp/io/weights.py: sliced reads equal safetensors' own, bytes counted, truncation named."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from salm_mtp.io.weights import CheckpointError, Source, TensorReader, checkpoint_files_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_slices_equal_the_full_tensor_rows(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(7, 5, generator=g).to(dtype), "e.0": torch.randn(3, 2, generator=g).to(dtype),
         "e.1": torch.randn(3, 2, generator=g).to(dtype), "s": torch.tensor(3.0)}
    f = str(tmp_path / "m.safetensors")
    save_file(t, f)
    files = checkpoint_files_of(f)
    with TensorReader(files) as r:
        assert r.shape(Source(("a",))) == (7, 5)
        assert torch.equal(r.read(Source(("a",)), (3, 0), (4, 5)), t["a"][3:7])
        assert torch.equal(r.read(Source(("a",)), (2, 1), (2, 3)), t["a"][2:4, 1:4])  # not whole rows: get_slice
        stack = r.read(Source(("e.0", "e.1"), stacked=True), (1, 0, 0), (1, 3, 2))
        assert torch.equal(stack, t["e.1"][None])
        assert torch.equal(r.read(Source(("s",)), (), ()), t["s"])
    assert r.bytes_read == (4 * 5 + 2 * 3 + 3 * 2) * t["a"].element_size() + 4 and r.tensors_read == 4  # one per read


def test_truncated_file_names_file_and_tensor(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(64, 8)}, str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with TensorReader({"w": str(f)}) as r, pytest.raises(
            CheckpointError, match=r"m\.safetensors' is truncated: it holds \d+ bytes, its tensors need \d+; re-down"):
        r.read(Source(("w",)), (0, 0), (64, 8))
    f.write_bytes(data[:5])  # not even a header; and text that is no safetensors file at all
    with pytest.raises(CheckpointError, match=r"m\.safetensors' is not a safetensors file \(a 5-byte file announces"):
        checkpoint_files_of(str(f))
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")  # a Git LFS pointer
    with pytest.raises(CheckpointError, match=r"m\.safetensors' is not a safetensors file"):
        checkpoint_files_of(str(f))
    assert load_file is not None
