"""Several ``salm-mtp`` commands in one torchrun launch: every rank runs them one after another, in process
(tests/cli_run.py), on one process group that outlives each run (the next run's strategy finds it initialised
and uses it), so a test module pays the launch and the imports once.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist/cli_session.py SPEC.json

SPEC.json: ``{"out": DIR, "runs": [{"name", "args": [...], "env": {...}}, ...]}``. After each run every rank
writes ``DIR/{name}.rank{r}.json`` ({returncode, stdout, stderr}), so a run that fails on one rank (and leaves
its peers in a collective until the test's timeout) still shows its error; the session stops at the first failed
run. A hung collective dumps every rank's stacks after ``hang_dump_s`` (default 240 s).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (cli_run, callbacks)

from cli_run import run_cli  # noqa: E402


def main(spec_path: str) -> int:
    import torch.distributed as dist

    from salm_mtp import trainer_cli

    with open(spec_path) as f:
        spec = json.load(f)
    faulthandler.dump_traceback_later(spec.get("hang_dump_s", 240), exit=True)
    trainer_cli.close_process_group = lambda: None  # the group outlives each run: the next run uses it
    rank = int(os.environ["RANK"])
    status = 0
    for run in spec["runs"]:
        out = run_cli(run["args"], env=run.get("env"))
        with open(os.path.join(spec["out"], f"{run['name']}.rank{rank}.json"), "w") as f:
            json.dump(vars(out), f)
        if out.returncode != 0:
            status = out.returncode
            break
    faulthandler.cancel_dump_traceback_later()
    if dist.is_initialized():
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter finalisation with Gloo threads around (salm_mtp.cli._leave_distributed_run)
