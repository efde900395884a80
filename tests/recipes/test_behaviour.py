"""Behaviour kept across the architecture change of issue 26 (recorded from the code before it: tests/behaviour.py).

- the first 20 training losses of the demo config (one process) and of its 2-process FSDP2 variant equal the
  recorded ones (<= 1e-6 relative), and ``salm-mtp evaluate`` gives the same hypotheses;
- a checkpoint written by the code before the change loads and gives the same logits (main head and MTP depths).
"""

import json
import os

import pytest
import torch

import behaviour

RECORDED = os.path.join(behaviour.FIXTURES, "behaviour.json")
TOKENIZER = os.path.join(behaviour.FIXTURES, "tokenizer")  # the one the recording used


@pytest.fixture(scope="module")
def recorded():
    with open(RECORDED) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def demo_run(corpus, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("behaviour_demo"))
    return run, behaviour.fit(run, corpus, TOKENIZER, 1)


def test_demo_config_first_losses_equal_the_recorded_ones(demo_run, recorded):
    _, losses = demo_run
    assert losses == pytest.approx(recorded["demo_losses"], rel=1e-6)


def test_evaluate_gives_the_recorded_hypotheses(demo_run, corpus, recorded, tmp_path):
    run, _ = demo_run
    assert behaviour.evaluate_hyps(run, corpus, str(tmp_path / "eval")) == recorded["evaluate_hyps"]


def test_fsdp2_first_losses_equal_the_recorded_ones(corpus, recorded, tmp_path):
    losses = behaviour.fit(str(tmp_path), corpus, TOKENIZER, 2)
    assert losses == pytest.approx(recorded["fsdp2_losses"], rel=1e-6)


def test_a_checkpoint_of_the_old_code_loads_and_gives_the_same_logits(corpus, tmp_path):
    from salm_mtp.io.checkpoints import load_model

    ckpt = torch.load(os.path.join(behaviour.FIXTURES, "tiny_v1.ckpt"), map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["tokenizer_path"] = TOKENIZER  # it recorded where its tokenizer was on that machine
    torch.save(ckpt, tmp_path / "tiny_v1.ckpt")
    module = load_model(str(tmp_path / "tiny_v1.ckpt"))
    logits = behaviour.logits_of(module, behaviour.tiny_batch(corpus, module.tokenizer))
    expected = torch.load(os.path.join(behaviour.FIXTURES, "tiny_v1_logits.pt"))
    assert logits.shape == expected.shape and logits.shape[0] == 3  # main head + 2 MTP depths
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
