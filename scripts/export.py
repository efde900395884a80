#!/usr/bin/env python
"""Export a trained SALM checkpoint to HF-format directories for serving and re-loading.

    python scripts/export.py --ckpt runs/demo/.../checkpoints/last.ckpt --out exports/demo

Writes DIR/llm (Nemotron-H with its mtp.* head, tokenizer), DIR/encoder (Parakeet),
DIR/adapter.safetensors and DIR/salm_config.json; see salm_mtp.io.export_hf.
"""

from __future__ import annotations

import argparse
import os
import sys

from salm_mtp.io import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt file, or a sharded FSDP2 checkpoint dir)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    if not os.path.exists(args.ckpt):
        print(f"error: --ckpt {args.ckpt!r} does not exist", file=sys.stderr)
        return 2
    paths = export_checkpoint(args.ckpt, args.out)
    for name, path in paths.items():
        print(f"{name:8s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
