"""A run's own resolved ``config.yaml``: found next to its checkpoints, its ``data:`` section read back.

``salm-mtp fit`` saves the resolved config (every override and interpolation applied) as
``<log_dir>/config.yaml`` (Lightning's SaveConfigCallback); checkpoints go to ``<log_dir>/checkpoints/``.
``salm-mtp export`` copies that file to ``EXPORT/config.yaml``. Evaluation reads the ``data:`` section
back, so a run trained with ``--data.prompt.*`` (or any other data setting) changed is evaluated with
the same settings:

    path = find_run_config("runs/demo/salm/version_0/checkpoints/last.ckpt")   # .../version_0/config.yaml
    cfg = data_config_from_run(path, test_manifest="data/demo/test_cuts.jsonl.gz", max_cuts=16)

The section is parsed as ``salm-mtp fit`` parses ``--data.*`` (jsonargparse over the same signature, generated
from ``DataConfig``: salm_mtp/data/config.py), so every key, type and check is the training one; no data module
is built.
"""

from __future__ import annotations

import os
from typing import Any

from salm_mtp.data.config import DataConfig, data_config
from salm_mtp.errors import SalmError

CONFIG_NAME = "config.yaml"
"""File name of the resolved config in a run's log directory (and in an export directory)."""


def find_run_config(path: str) -> str | None:
    """The resolved config of the run that wrote ``path`` (a .ckpt file, a sharded checkpoint directory
    or an export directory), or None.

    Looked for in the export directory itself, then next to the checkpoint and in the directory above
    (``<log_dir>/checkpoints/x.ckpt`` -> ``<log_dir>/config.yaml``); never higher, where another run's
    config could be found.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "salm_config.json")):  # an export
        places = [path]
    else:
        here = os.path.dirname(path)
        places = [here, os.path.dirname(here)]
    for d in places:
        candidate = os.path.join(d, CONFIG_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


def read_data_section(config_file: str) -> dict[str, Any]:
    """The ``data:`` mapping of a resolved config (empty when it has none)."""
    import yaml

    try:
        with open(config_file) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SalmError(f"--config {config_file!r}: cannot read it as YAML ({str(e)[:200]}); pass the config.yaml "
                        "that `salm-mtp fit` saved in the run's log directory") from None
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SalmError(f"--config {config_file!r}: its data section is a {type(data).__name__}, not a mapping of "
                        "--data.* settings")
    return dict(data)


def data_config_from_run(config_file: str | None, **overrides: Any) -> DataConfig:
    """The run's DataConfig (``data:`` of ``config_file``; None: every default), ``overrides`` applied first.

    The section is parsed like ``--data.*`` in ``salm-mtp fit`` (same parser, types and checks); keys of
    ``overrides`` replace the run's values before the checks run (a train manifest that no longer
    exists is no error when the override sets it to None).
    """
    from argparse import ArgumentError

    from jsonargparse import ArgumentParser

    section = read_data_section(config_file) if config_file is not None else {}
    section.update(overrides)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(data_config, "data", fail_untyped=False, sub_configs=True)
    where = f"the data section of {config_file!r}" if config_file else "the data defaults"
    try:
        ns = parser.instantiate_classes(parser.parse_object({"data": section}))
        return data_config(**{k: ns["data"][k] for k in ns["data"].keys() if "." not in k})
    except (ArgumentError, ValueError, TypeError, FileNotFoundError) as e:
        raise SalmError(f"{where}: {str(e).strip()[:600]}. Override the key on the command line, or pass another "
                        "run config with --config") from None
