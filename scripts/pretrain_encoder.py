#!/usr/bin/env python
"""CTC-pretrain the Parakeet encoder and save it as a HF Parakeet CTC directory.

    python scripts/pretrain_encoder.py fit --config conf/encoder_ctc.yaml [--model.export_dir=DIR]

Then train SALM on top of it: salm-mtp fit --config conf/demo.yaml --model.encoder.path=DIR
"""

import os
import sys

from lightning.pytorch.cli import LightningCLI

from salm_mtp.data.datamodule import SALMDataModule
from salm_mtp.pretrain import CTCPretrainModule

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    LightningCLI(CTCPretrainModule, SALMDataModule, parser_kwargs={"parser_mode": "omegaconf+"},
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=sys.argv[1:])
