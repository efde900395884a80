"""``salm-mtp plan``: the command line of ``make_plan``."""

from __future__ import annotations

import json
import os
import sys

from salm_mtp.errors import config_error, config_errors_in_one_line
from salm_mtp.plan.build import build_parser
from salm_mtp.plan.planner import config_files, plan_from_config
from salm_mtp.plan.report import format_plan


def check_options(cfg) -> None:
    """The planner's own numbers, checked where they are read (ConfigError naming the option)."""
    for key, minimum in (("world_size", 1), ("max_world_size", 1), ("gpus_per_node", 1), ("prefetch_units", 0)):
        value = cfg[key]
        if value is not None and value < minimum:
            raise config_error(f"--{key}", f"must be >= {minimum}, got {value}",
                               f"pass --{key} {max(minimum, 1)} or more")
    for key in ("gpu_memory_gib", "cut_seconds", "text_tokens_per_second"):
        if not cfg[key] > 0:
            raise config_error(f"--{key}", f"must be > 0, got {cfg[key]}", f"pass a positive --{key}")
    if cfg.overhead_gib < 0:
        raise config_error("--overhead_gib", f"must be >= 0, got {cfg.overhead_gib}", "pass 0 or more")


def main(args: list[str] | None = None) -> dict:
    """``salm-mtp plan``: print the table, write --out; returns the plan."""
    argv = sys.argv[1:] if args is None else list(args)
    cfg = build_parser().parse_args(argv)
    check_options(cfg)
    with config_errors_in_one_line():  # a check of the config met while planning: one line
        plan = plan_from_config(cfg, config_files(argv))
    print(format_plan(plan))
    out = cfg.out
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(plan, f, indent=1)
        print(f"  plan written to {out}")
    return plan


if __name__ == "__main__":
    main()
