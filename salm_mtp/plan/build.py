"""The planner's inputs: the ``salm-mtp fit`` parser (the same config merging) and the model built on meta."""

from __future__ import annotations

import contextlib
import os


GIB = 1024**3
ROOT_UNIT = "<root>"
STANDIN_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "data", "configs", "tokenizer")


@contextlib.contextmanager
def attribute_docstrings():
    """Let jsonargparse read the config dataclasses' field docstrings (the --help texts), then restore its setting."""
    from jsonargparse import set_parsing_settings

    try:
        from jsonargparse._optionals import get_docstring_parse_options

        before = get_docstring_parse_options()["attribute_docstrings"]
    except (ImportError, KeyError):
        before = False
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        yield
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=before)


def build_parser():
    """The ``salm-mtp plan`` parser: the training config's sections plus the planner's options."""
    with attribute_docstrings():
        return _build_parser()


def _build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from salm_mtp.data.datamodule import DataConfig
    from salm_mtp.model import SALMModule

    p = ArgumentParser(prog="salm-mtp plan", parser_mode="omegaconf+",
                       description="Per-rank memory of a training config under the FSDP2 plan (meta device).")
    p.add_argument("--config", action=ActionConfigFile, help="training YAML (conf/*.yaml), as for salm-mtp fit")
    p.add_class_arguments(SALMModule, "model", help="SALMModule arguments (the config's model: section)")
    # DataConfig holds SALMDataModule's arguments (same names and defaults) with a docstring per field
    p.add_class_arguments(DataConfig, "data", help="data arguments; data.max_duration sizes the activations")
    p.add_argument("--trainer", type=dict, default={},
                   help="the config's trainer: section; devices x num_nodes is the default world size")
    p.add_argument("--seed_everything", type=int | bool | None, default=None, help="read and ignored")
    p.add_argument("--world_size", type=int | None, default=None,
                   help="data-parallel ranks to plan for; null = trainer.devices x trainer.num_nodes")
    p.add_argument("--gpu_memory_gib", type=float, default=80.0, help="memory of one GPU in GiB")
    p.add_argument("--out", type=str | None, default=None, help="write the plan as JSON to this file")
    p.add_argument("--tokenizer", type=str | None, default=None,
                   help="tokenizer to use when model.tokenizer_path / model.llm.path hold none (planning from a bare "
                        "config.json); null = the stand-in data/configs/tokenizer. With model.llm.path set only the "
                        "audio placeholder and CTC class count depend on it")
    p.add_argument("--text_tokens_per_second", type=float, default=5.0,
                   help="text tokens (prompt + transcript) per second of audio in a batch")
    p.add_argument("--cut_seconds", type=float, default=20.0,
                   help="length of one cut: sets the encoder's quadratic attention-score term")
    p.add_argument("--overhead_gib", type=float, default=3.0,
                   help="fixed per-rank overhead in GiB (CUDA context, NCCL buffers, fragmentation)")
    p.add_argument("--prefetch_units", type=int, default=2,
                   help="non-root FSDP groups unsharded at once (the running one + the prefetched one)")
    p.add_argument("--max_world_size", type=int, default=1024,
                   help="largest world size tried when searching the smallest one that fits")
    p.add_argument("--gpus_per_node", type=int, default=8,
                   help="GPUs per node, for the HSDP layouts (nodes x GPUs; shard within a replica, replicate across)")
    p.add_argument("--layout_gpus", type=list[int], default=[8, 16, 32, 64],
                   help="total GPU counts for which the smallest-shard HSDP layout is printed")
    return p


def has_tokenizer(path: str | None) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return path is not None and any(os.path.isfile(os.path.join(path, n)) for n in names)


def model_kwargs(cfg, tokenizer: str | None = None) -> tuple[dict, str | None]:
    """SALMModule keyword arguments from the parsed ``model`` section, and a note when a stand-in tokenizer is used.

    A config pointing model.llm.path at a bare config.json (data/configs/*) has no tokenizer; the LLM's vocabulary
    comes from config.json, so a stand-in tokenizer changes no parameter count (unless an inline encoder gets a
    CTC head sized by it).
    """
    from salm_mtp.salm import config_from_dict

    kw = config_from_dict(cfg.model.as_dict())
    tok = kw.get("tokenizer_path") or kw["llm"].path
    if has_tokenizer(tok):
        return kw, None
    if kw["llm"].path is None:
        raise FileNotFoundError(
            f"model.tokenizer_path={kw.get('tokenizer_path')!r} holds no tokenizer and model.llm.path is null: the "
            "inline LLM's vocabulary is the tokenizer's size. Set --model.tokenizer_path (e.g. tests/tokenizer or "
            "data/demo/tokenizer)"
        )
    kw["tokenizer_path"] = tokenizer or os.path.relpath(STANDIN_TOKENIZER)
    return kw, f"no tokenizer at {tok!r}: using {kw['tokenizer_path']!r} (the vocabulary comes from config.json)"


def build_model(kwargs: dict):
    """The plain SALM of ``kwargs`` on meta (the training recipe's own settings left out), frozen and cast as
    the recipe's configure_model would before sharding."""
    from salm_mtp.io.checkpoints import salm_arguments
    from salm_mtp.parallel import apply_param_dtypes
    from salm_mtp.salm import SALM

    model = SALM(**salm_arguments(kwargs))
    model.apply_freeze()
    apply_param_dtypes(model)
    return model
