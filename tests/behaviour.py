"""Behaviour the architecture change of issue 26 must keep, recorded once from the code before it.

    python tests/behaviour.py record      # writes tests/fixtures/behaviour/ (run on the code before a change)

What is recorded (tests/recipes/test_behaviour.py runs the same and compares):
- the first 20 training losses of ``conf/demo.yaml`` (one process) and of ``conf/demo_fsdp2.yaml`` (2 processes,
  torchrun, gloo): the demo model on the tests' 24-clip sine corpus and tokenizer, seed 1234, no validation;
- the hypotheses ``salm-mtp evaluate`` writes for the one-process run's checkpoint on the same corpus;
- a tiny checkpoint of today's format (``tests/conf/tiny_model.yaml``'s model, weights only) and its logits on one
  fixed batch: a checkpoint written before the change must load after it and give the same logits.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ (cli_run, tiny) when run as a script
from cli_run import run_cli  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "behaviour")
STEPS = 20
COMMON = ["--trainer.max_steps=%d" % STEPS, "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
          "--data.val_manifest=null", "--data.test_manifest=null", "--data.max_duration=2.0", "--data.num_workers=0"]


def _env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{ROOT}:{os.path.join(ROOT, 'tests')}",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str]) -> None:
    """``salm-mtp`` (``cmd[0] == "salm-mtp"``: in this process, one thread) or a launcher command (a subprocess)."""
    if cmd[0] == "salm-mtp":
        out = run_cli(cmd[1:], env={"PYTHONPATH": _env()["PYTHONPATH"]}, threads=1)
    else:
        out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def losses(run_dir: str) -> list[float]:
    """The logged training losses of steps 0..STEPS-1 of the one run under ``run_dir``."""
    (path,) = glob.glob(os.path.join(run_dir, "salm/version_*/metrics.csv"))
    with open(path) as f:
        rows = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}
    return [rows[s] for s in range(STEPS)]


def fit(run_dir: str, corpus: str, tok_dir: str, nproc: int) -> list[float]:
    """``salm-mtp fit`` of the demo config (nproc 1) or its FSDP2 variant (nproc 2); its first STEPS losses."""
    conf = "conf/demo.yaml" if nproc == 1 else "conf/demo_fsdp2.yaml"
    launcher = ["salm-mtp"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "salm_mtp.cli"]
    _run([*launcher, "fit", "--config", os.path.join(ROOT, conf), f"--trainer.default_root_dir={run_dir}",
          f"--model.tokenizer_path={tok_dir}", f"--data.train_manifest={corpus}", *COMMON])
    return losses(run_dir)


def evaluate_hyps(run_dir: str, corpus: str, out_dir: str) -> list[dict]:
    """``salm-mtp evaluate`` of the run's last checkpoint on ``corpus``: its hyps.jsonl rows (id, hyp)."""
    (ckpt,) = glob.glob(os.path.join(run_dir, "salm/version_*/checkpoints/last.ckpt"))
    _run(["salm-mtp", "evaluate", "--ckpt", ckpt, "--manifest", corpus, "--out", out_dir,
          "--max-new-tokens", "12"])
    with open(os.path.join(out_dir, "hyps.jsonl")) as f:
        return [{"id": r["id"], "hyp": r["hyp"]} for r in map(json.loads, f)]


def tiny_batch(corpus: str, tokenizer):
    """One fixed collated batch of the first 4 cuts of ``corpus`` (the training collation)."""
    from lhotse import CutSet

    from salm_mtp.data.dataset import SALMDataset
    from salm_mtp.data.manifest import load_cuts

    cuts = CutSet.from_cuts(list(load_cuts(corpus))[:4])  # audio paths resolved from the manifest's directory
    return SALMDataset(tokenizer)[cuts]


def logits_of(module, batch):
    """(D+1, B, T', V) fp32 logits of one batch in eval mode: the main head's, then each MTP depth's."""
    import torch

    module.eval()
    with torch.no_grad():
        merged, _, _ = module.prepare_inputs(batch)
        h0 = module(merged.inputs_embeds)
        hiddens = [h0, *module.mtp_hiddens(h0, merged.inputs_embeds)]
        return torch.stack([module.llm.lm_head(h).float() for h in hiddens])


def record(work: str) -> None:
    """Write every fixture from this code (tests/conftest.py's corpus and tokenizer recipes)."""
    import shutil

    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from pathlib import Path

    import tiny
    from conftest import write_sine_corpus

    os.makedirs(FIXTURES, exist_ok=True)
    corpus = str(write_sine_corpus(Path(work) / "corpus", n=24))
    tok_dir = os.path.join(FIXTURES, "tokenizer")  # kept: the tests run with the very same tokenizer
    shutil.copytree(tiny.tokenizer_dir(os.path.join(work, "tok")), tok_dir, dirs_exist_ok=True)
    result = {"steps": STEPS, "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                       cwd=ROOT).stdout.strip()}
    result["demo_losses"] = fit(os.path.join(work, "demo"), corpus, tok_dir, 1)
    result["fsdp2_losses"] = fit(os.path.join(work, "fsdp2"), corpus, tok_dir, 2)
    result["evaluate_hyps"] = evaluate_hyps(os.path.join(work, "demo"), corpus, os.path.join(work, "eval"))
    # the old-format checkpoint: a tiny model trained 2 steps, saved weights-only, and its logits
    tiny_run = os.path.join(work, "tiny")
    _run(["salm-mtp", "fit", "--config", os.path.join(ROOT, "conf/tiny.yaml"),
          f"--trainer.default_root_dir={tiny_run}", f"--model.tokenizer_path={tok_dir}",
          f"--data.train_manifest={corpus}", "--trainer.max_steps=2", "--data.val_manifest=null",
          "--data.test_manifest=null", "--trainer.enable_progress_bar=false"])
    (ckpt,) = glob.glob(os.path.join(tiny_run, "salm/version_*/checkpoints/last.ckpt"))
    full = torch.load(ckpt, map_location="cpu", weights_only=False)
    slim = {k: full[k] for k in ("state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step")}
    torch.save(slim, os.path.join(FIXTURES, "tiny_v1.ckpt"))
    from salm_mtp.io.checkpoints import load_model

    module = load_model(os.path.join(FIXTURES, "tiny_v1.ckpt"))
    torch.save(logits_of(module, tiny_batch(corpus, module.tokenizer)), os.path.join(FIXTURES, "tiny_v1_logits.pt"))
    with open(os.path.join(FIXTURES, "behaviour.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "evaluate_hyps"}, indent=1))


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["record"]:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        record(tmp)
