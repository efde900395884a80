"""Filling a materialised model's parts from their pretrained sources, each rank reading only its slices
(``materialize.fill_from_checkpoint`` over the lazy safetensors slices of ``salm_mtp.io.weights``). A SALM's
adapter, encoder, LLM and shipped MTP head (``fill_pretrained``) and the encoder of CTC pretraining
(salm_mtp/pretrain.py: ``fill_encoder``) are filled here.
"""

from __future__ import annotations

from collections.abc import Callable

from salm_mtp.io import weights
from salm_mtp.materialize import fill_from_checkpoint


def fill_part(model, part: str, files: dict[str, str], sources: dict, what: str,
              skip: Callable[[str], bool] = lambda k: False, prefix: str = "") -> set[str]:
    """Fill ``model.<part>`` from ``sources`` (this rank's slices only); returns the root-level names filled and
    adds the bytes read to ``model.bytes_read`` when it keeps that count. ``prefix`` goes before tensor names in
    errors."""
    with weights.TensorReader(files) as reader:
        names = fill_from_checkpoint(getattr(model, part), reader, sources, what, prefix=prefix, skip=skip)
    if hasattr(model, "bytes_read"):
        model.bytes_read += reader.bytes_read
    return {f"{part}.{n}" for n in names}


def fill_encoder(model, path: str, with_ctc_head: bool, part: str = "audio") -> set[str]:
    """``model.<part>`` (an AudioEncoder) from the HF Parakeet directory ``path``, its CTC head too if asked."""
    files = weights.checkpoint_files(path)
    sources = weights.encoder_sources(files, with_ctc_head=with_ctc_head)
    return fill_part(model, part, files, sources, f"encoder checkpoint {path!r}")


def fill_pretrained(model) -> set[str]:
    """Read a SALM's configured pretrained parts into it (materialised): model.adapter.path, model.encoder.path,
    model.llm.path (its shipped MTP head 1:1 when the model keeps it); returns the names filled."""
    loaded: set[str] = set()
    if model.cfg_adapter.path is not None:
        path = model.cfg_adapter.path
        files = weights.checkpoint_files_of(path)
        loaded |= fill_part(model, "adapter", files, {k: weights.Source((k,)) for k in files},
                            f"model.adapter.path={path!r}", prefix="adapter.")
    if model.cfg_encoder.path is not None:
        loaded |= fill_encoder(model, model.cfg_encoder.path, with_ctc_head=model.audio.ctc_head is not None)
    if model.cfg_llm.path is not None:
        path = model.cfg_llm.path
        files = weights.checkpoint_files(path)
        load_mtp = model.mtp_enabled and model.mtp_shipped
        if load_mtp and not any(k.startswith("mtp.") for k in files):
            raise weights.CheckpointError(
                f"model.llm.path={path!r}: config.json declares an MTP head (num_nextn_predict_layers > 0) but "
                "the safetensors hold no mtp.* tensors; refusing to re-initialise it. Set --model.mtp.num_layers=0"
                " to train without it"
            )
        tied = bool(getattr(model.llm.config, "tie_word_embeddings", False))
        sources = weights.llm_sources(files, load_mtp, getattr(model.llm.config, "n_routed_experts", None))
        if tied:
            sources.pop("lm_head.weight", None)

        def skip(k: str) -> bool:
            return (k.startswith("mtp.") and not load_mtp) or (tied and k == "lm_head.weight")

        loaded |= fill_part(model, "llm", files, sources, f"LLM checkpoint {path!r}", skip=skip)
    return loaded
