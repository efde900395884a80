"""``salm-mtp plan``: the command line of ``make_plan``."""

from __future__ import annotations

import json
import os
import sys
from salm_mtp.plan.build import build_parser
from salm_mtp.plan.planner import config_files, plan_from_config
from salm_mtp.plan.report import format_plan


def main(args: list[str] | None = None) -> dict:
    """``salm-mtp plan``: print the table, write --out; returns the plan."""
    argv = sys.argv[1:] if args is None else list(args)
    cfg = build_parser().parse_args(argv)
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
