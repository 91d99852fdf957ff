"""tools/generate.py: a checkpoint saved at TP=2 (training layout) generates at TP=1 on CPU.

The greedy continuation through the KV cache must equal greedy decoding by repeated
full-sequence forwards of the TP=2 model that wrote the checkpoint.
"""
import os

import torch

from tests.distributed_utils import init_megatron, run_distributed

PROMPTS = ["def f(x):", "import o"]
NEW = 8
OVERRIDES = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.kv_channels=16",
             "model.num_attention_heads=4", "model.num_query_groups=2", "nsa.cmp_block=4", "nsa.cmp_stride=2",
             "nsa.slc_block=8", "nsa.topk=3", "nsa.window=8", "data.seq_length=64",
             "parallel.tensor_model_parallel_size=2", "model.init_method_std=0.2"]


def _save_worker(rank, world, root):
    from megatron.core import dist_checkpointing

    from nsa_launch.checkpointing import TRACKER, iteration_dir
    from nsa_launch.config_loader import build_model_config, load_config, to_flat_dict
    from nsa_launch.training import padded_vocab_size
    from nsa_megatron.model import gpt_model_provider
    from nsa_tools.tokenizer import load_tokenizer

    init_megatron(tensor_model_parallel_size=2)
    cfg = load_config("configs/tiny_cpu.yaml", OVERRIDES)
    tok = load_tokenizer("byte")
    vocab = padded_vocab_size(tok.vocab_size, cfg.data.make_vocab_size_divisible_by, 2)
    torch.manual_seed(0)
    model = gpt_model_provider(build_model_config(cfg, use_cpu_initialization=True), vocab, 64,
                               parallel_output=False).eval()
    path = iteration_dir(root, 3)
    if rank == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 3,
                             "extra": {"config": to_flat_dict(cfg)}}, path)
    if rank == 0:
        with open(os.path.join(root, TRACKER), "w") as f:
            f.write("3")
    outs = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = [int(t) for t in tok.tokenize(text)]
            for _ in range(NEW):
                x = torch.tensor(ids)[None]
                logits = model(x, torch.arange(len(ids))[None], None)
                ids.append(int(logits[0, -1].argmax()))
            outs.append(ids[len(tok.tokenize(text)):])
    return outs


def _generate_worker(rank, world, root):
    from nsa_megatron.inference import NSAGenerator
    from tools import generate as G

    init_megatron()
    model, tok, flat = G.load_model(G.checkpoint_path(root, None))
    assert flat["parallel.tensor_model_parallel_size"] == 2
    prompts = [[int(t) for t in tok.tokenize(p)] for p in PROMPTS]
    gen = NSAGenerator(model, batch=2, capacity=32, prefill_chunk=4)
    greedy = gen.generate(prompts, NEW)
    sampled = gen.generate(prompts, NEW, temperature=1.0, top_p=0.9, seed=5)
    return greedy, sampled, gen.ctx.backend


def test_generate_from_tp2_checkpoint(tmp_path):
    root = str(tmp_path)
    want = run_distributed(_save_worker, 2, root)
    assert want[0] == want[1]
    (greedy, sampled, backend), = run_distributed(_generate_worker, 1, root)
    assert backend == "reference"
    assert greedy == want[0]
    assert all(len(s) == NEW for s in sampled) and sampled != greedy
