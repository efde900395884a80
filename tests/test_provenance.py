"""salm_mtp/provenance.py: which manifests a run reads, and the corpus meta.json found beside them."""

from __future__ import annotations

import json

from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.provenance import data_manifests, run_environment


def test_manifests_and_corpus_meta(tmp_path, tok_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("dev.jsonl.gz", "train.jsonl.gz"):  # the sources check that their files exist
        (corpus / name).write_bytes(b"")
    (tmp_path / "x.jsonl").write_text("")
    (corpus / "meta.json").write_text(json.dumps({"seed": 3, "audio_sha256": "ab" * 32, "splits": {}}))
    dm = SALMDataModule(tokenizer_path=tok_dir, max_tokens=100, val_manifest=str(corpus / "dev.jsonl.gz"),
                        inputs=[{"name": "a", "type": "cuts", "path": str(corpus / "train.jsonl.gz"), "weight": 1},
                                {"name": "t", "type": "text", "paths": [str(tmp_path / "x.jsonl")], "weight": 1}])
    paths = data_manifests(dm)
    assert paths == [str(corpus / "dev.jsonl.gz"), str(corpus / "train.jsonl.gz"), str(tmp_path / "x.jsonl")]
    env = run_environment(paths)
    assert env["corpus"] == {str(corpus): {"seed": 3, "audio_sha256": "ab" * 32}}  # only the recorded keys
    assert env["torch_num_threads"] >= 1 and env["packages"]["torch"].startswith("2.13")
