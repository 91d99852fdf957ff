"""Distributed checkpoint of an NSA GPTModel: saved at TP=2, loaded at TP=1, same loss."""
import torch
from megatron.core import dist_checkpointing

from tests.distributed_utils import init_megatron, run_distributed
from tests.nsa_megatron.gpt_harness import SEQ, VOCAB, global_batch, make_config

from nsa_megatron.model import gpt_model_provider


def _loss(model) -> float:
    tokens, labels = global_batch(seed=3)
    positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    with torch.no_grad():
        return float(model(tokens, positions, None, labels=labels).mean())


def _save_worker(rank, world, ckpt_dir):
    init_megatron(tensor_model_parallel_size=2)
    torch.manual_seed(0)
    model = gpt_model_provider(make_config(tensor_model_parallel_size=2), VOCAB, SEQ)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return _loss(model)


def _load_worker(rank, world, ckpt_dir):
    init_megatron(seed=4321)
    torch.manual_seed(1)  # different initial weights than the saved model
    model = gpt_model_provider(make_config(), VOCAB, SEQ)
    before = _loss(model)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    names = [n for n, _ in model.named_parameters() if "compressor" in n]
    return before, _loss(model), names


def test_checkpoint_saved_at_tp2_loads_at_tp1(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    saved = run_distributed(_save_worker, 2, ckpt, timeout=120)
    assert abs(saved[0] - saved[1]) <= 1e-6 * abs(saved[0])
    (before, after, names), = run_distributed(_load_worker, 1, ckpt, timeout=120)
    assert names, "the model has no compressor parameters to checkpoint"
    assert abs(before - saved[0]) > 1e-3  # the fresh model really differed
    assert abs(after - saved[0]) <= 1e-5 * abs(saved[0])
