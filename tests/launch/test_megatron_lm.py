"""Megatron-LM integration: NSA flags for extra_args_provider; a few steps where megatron.training exists."""
import argparse
import importlib.util
import subprocess
import sys

import pytest

from nsa_launch.megatron_lm import add_nsa_args
from tests.launch._runner import BIN, REPO, clean_env


def test_nsa_flags_map_onto_nsa_config_fields():
    from nsa_megatron.config import NSAConfig

    args = add_nsa_args(argparse.ArgumentParser()).parse_args(
        ["--attention-type", "nsa", "--nsa-topk", "8", "--nsa-window", "256", "--nsa-dense-layers", "0", "3"])
    fields = {f for f in NSAConfig.__dataclass_fields__}
    assert {k for k in vars(args)} <= fields  # core_transformer_config_from_args copies them all
    assert (args.nsa_topk, args.nsa_window, args.nsa_dense_layers) == (8, 256, [0, 3])
    assert args.nsa_cmp_block == NSAConfig.__dataclass_fields__["nsa_cmp_block"].default


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None, reason="needs megatron.training")
def test_megatron_lm_pretrain_runs_nsa(tmp_path):
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "1", str(REPO / "launch" / "megatron_lm.py"),
           "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
           "--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "8", "--group-query-attention",
           "--num-query-groups", "2", "--kv-channels", "64", "--seq-length", "2048",
           "--max-position-embeddings", "2048", "--micro-batch-size", "1", "--global-batch-size", "2",
           "--train-iters", "5", "--lr", "1e-4", "--bf16", "--position-embedding-type", "rope",
           "--normalization", "RMSNorm", "--disable-bias-linear", "--transformer-impl", "local",
           "--log-interval", "1", "--eval-iters", "0", "--split", "1,0,0",
           "--attention-type", "nsa", "--nsa-topk", "8", "--nsa-window", "256"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "iteration        5/       5" in out and "lm loss" in out
