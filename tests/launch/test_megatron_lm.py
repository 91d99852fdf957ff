"""Megatron-LM integration: NSA flags for extra_args_provider; a few steps where megatron.training exists.

``megatron.training.pretrain`` comes in two APIs (classic Megatron-LM keywords, or the config
container of the megatron-core 0.19 wheel); ``launch/megatron_lm.py`` detects which one is
installed, so the same command line runs on both.
"""
import argparse
import importlib.util
import subprocess
import sys
import textwrap

import pytest

from nsa_launch.megatron_lm import add_nsa_args, pretrain_api
from tests.launch._runner import BIN, REPO, clean_env, free_port


def test_nsa_flags_map_onto_nsa_config_fields():
    from nsa_megatron.config import NSAConfig

    args = add_nsa_args(argparse.ArgumentParser()).parse_args(
        ["--attention-type", "nsa", "--nsa-topk", "8", "--nsa-window", "256", "--nsa-dense-layers", "0", "3"])
    fields = {f for f in NSAConfig.__dataclass_fields__}
    assert {k for k in vars(args)} <= fields  # core_transformer_config_from_args copies them all
    assert (args.nsa_topk, args.nsa_window, args.nsa_dense_layers) == (8, 256, [0, 3])
    assert args.nsa_cmp_block == NSAConfig.__dataclass_fields__["nsa_cmp_block"].default


HAVE_MEGATRON_TRAINING = importlib.util.find_spec("megatron.training") is not None

# Megatron-LM flags for a small NSA GPT on mock data with NullTokenizer, the local transformer
# implementation, and no kernel that needs TransformerEngine or Apex (RoPE fusion, fused
# weight-gradient accumulation, persistent layer norm). ``--eval-interval`` is given because
# megatron-core 0.19's default (None) breaks its sample-count arithmetic.
def megatron_flags(seq: int, layers: int, hidden: int, heads: int, groups: int, head_dim: int,
                   topk: int, window: int) -> list:
    """Command-line flags of ``launch/megatron_lm.py`` for a tiny mock-data NSA run."""
    return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
            "--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--group-query-attention", "--num-query-groups", str(groups), "--kv-channels", str(head_dim),
            "--seq-length", str(seq), "--max-position-embeddings", str(seq),
            "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "5", "--lr", "1e-4",
            "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--disable-bias-linear",
            "--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
            "--no-persist-layer-norm", "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
            "--split", "1,0,0", "--attention-type", "nsa", "--nsa-topk", str(topk), "--nsa-window", str(window)]


def test_pretrain_api_detection():
    def classic(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
                process_non_loss_data_func=None, extra_args_provider=None, args_defaults={}):
        pass

    def container(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
                  model_provider=None):
        pass

    def other(x):
        pass

    assert pretrain_api(classic) == "classic"
    assert pretrain_api(container) == "container"
    with pytest.raises(RuntimeError, match="unknown pretrain"):
        pretrain_api(other)


CPU_CHECK = textwrap.dedent("""
    import os, sys, torch
    from nsa_launch import megatron_lm as mlm
    from megatron.training import pretrain
    print("API", mlm.pretrain_api(pretrain))
    if mlm.pretrain_api(pretrain) != "container":
        sys.exit(0)  # the classic API parses and builds inside pretrain(), which needs CUDA
    args = mlm.parse_megatron_args()
    cfg = mlm.build_config_container(args)
    assert cfg.model is None and cfg.train.train_iters == 5, cfg.train
    from nsa_megatron.compat import apply_cpu_compat
    apply_cpu_compat()
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps, tensor_parallel
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    model = mlm.nsa_model_provider(pre_process=True, post_process=True, config=None, pg_collection=None)
    print("CONFIG", type(model.config).__name__, model.config.nsa_topk, model.config.nsa_window)
    print("CORE", sorted({type(l.self_attention.core_attention).__name__ for l in model.decoder.layers}))
    train_ds, _, _ = mlm.datasets_provider([4, 0, 0])
    it = iter(torch.utils.data.DataLoader(train_ds, batch_size=args.micro_batch_size))
    out, loss_fn = mlm.forward_step(it, model)
    loss, tokens, report = loss_fn(out)
    (loss / tokens).backward()
    print("LOSS", float(loss / tokens), int(tokens))
""")


@pytest.mark.skipif(not HAVE_MEGATRON_TRAINING, reason="needs megatron.training")
def test_config_container_path_builds_and_steps_nsa_on_cpu(tmp_path):
    """Everything ``pretrain()`` of the container API does before its CUDA-only initialize_megatron:
    parse Megatron + NSA flags, build the PretrainConfigContainer, build the model with
    ``nsa_model_provider`` (NSA core attention, NSAConfig from the flags), mock datasets, one
    ``forward_step`` with backward - on CPU, single gloo rank."""
    env = clean_env()
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""})
    flags = megatron_flags(seq=128, layers=2, hidden=64, heads=4, groups=2, head_dim=16, topk=3, window=32)
    flags += ["--nsa-cmp-block", "16", "--nsa-cmp-stride", "8", "--nsa-slc-block", "32"]
    proc = subprocess.run([sys.executable, "-c", CPU_CHECK, *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    if "API container" not in out:
        pytest.skip("classic pretrain() API: argument parsing happens inside pretrain() (CUDA only)")
    assert "CONFIG NSAConfig 3 32" in out and "CORE ['NSACoreAttention']" in out, out[-4000:]
    loss = float(out.split("LOSS ")[1].split()[0])
    assert 5.0 < loss < 9.0, out[-2000:]  # ~ln(1024) = 6.93 for an untrained model


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_MEGATRON_TRAINING, reason="needs megatron.training")
def test_megatron_lm_pretrain_runs_nsa(tmp_path):
    """Megatron-LM's own ``pretrain()`` (whichever API is installed) trains an NSA GPT 5 steps."""
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "1", str(REPO / "launch" / "megatron_lm.py"),
           *megatron_flags(seq=2048, layers=2, hidden=256, heads=8, groups=2, head_dim=64, topk=8, window=256),
           "--bf16"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "iteration        5/       5" in out and "lm loss" in out, out[-4000:]
