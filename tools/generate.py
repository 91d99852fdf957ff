"""Generate text with an NSA GPT checkpoint written by ``launch/pretrain_nsa.py``.

    python tools/generate.py --load runs/tiny_cpu/checkpoints --prompt "def main(" --max-new-tokens 64
    python tools/generate.py --load CKPT --prompt "import os" --prompt "class A" --temperature 0.8 --top-p 0.9

The run config stored in the checkpoint rebuilds the model at tensor/pipeline parallel size
1 (``dist_checkpointing`` reshards a checkpoint saved at any TP size); the vocabulary is
padded as in training. On CPU the cache path uses the PyTorch reference, on GPU the Triton
decode kernels (``--backend`` overrides). Several ``--prompt`` values decode as one batch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import List, Optional


def parse_args(argv: Optional[List[str]]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint folder (holding latest_checkpointed_iteration.txt)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to load (default: the latest)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default=None,
                   help="attention backend of prefill/decode (default: the checkpoint's nsa.backend)")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="longest prompt piece per prefill step")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's data.tokenizer")
    p.add_argument("--stop-at-eod", action="store_true", help="stop a sequence at the end-of-document token")
    return p.parse_args(argv)


def _init_single_process():
    """A world of one (gloo on CPU, NCCL on GPU) with Megatron's parallel state at TP=PP=1."""
    import socket

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def checkpoint_path(root: str, iteration: Optional[int]) -> str:
    """The ``iter_XXXXXXX`` folder to load from ``root``."""
    from nsa_launch.checkpointing import iteration_dir, latest_iteration

    if not os.path.isdir(root):
        raise ValueError(f"--load: {root} is not a folder")
    it = iteration if iteration is not None else latest_iteration(root)
    if it is None:
        raise ValueError(f"--load: {root} holds no complete checkpoint (no tracker file)")
    path = iteration_dir(root, it)
    if not os.path.isdir(path):
        raise ValueError(f"--iteration: {path} does not exist")
    return path


def run_config_from_flat(flat: dict):
    """Rebuild the training RunConfig (parallel sizes reset to 1) from the checkpoint's flat dict."""
    from nsa_launch.config_loader import SECTIONS, RunConfig

    cfg = RunConfig(source="checkpoint")
    cfg.model = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    for name, cls in SECTIONS.items():
        if name == "parallel":
            continue
        values = {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + ".")}
        setattr(cfg, name, cls(**values))
    return cfg


def load_model(path: str, tokenizer_override: Optional[str] = None):
    """(GPTModel in eval mode on this device, tokenizer, flat run config) from a checkpoint folder."""
    import torch
    from megatron.core import dist_checkpointing

    from nsa_launch.config_loader import build_model_config
    from nsa_launch.training import padded_vocab_size
    from nsa_megatron.model import gpt_model_provider
    from nsa_tools.tokenizer import load_tokenizer

    common = dist_checkpointing.load_common_state_dict(path)
    flat = (common.get("extra") or {}).get("config")
    if not flat:
        raise ValueError(f"--load: {path} has no run config (not written by launch/pretrain_nsa.py)")
    cfg = run_config_from_flat(flat)
    tokenizer = load_tokenizer(tokenizer_override or cfg.data.tokenizer)
    trained_tp = int(flat.get("parallel.tensor_model_parallel_size", 1))
    vocab = padded_vocab_size(tokenizer.vocab_size, cfg.data.make_vocab_size_divisible_by, trained_tp)
    config = build_model_config(cfg, use_cpu_initialization=True)
    model = gpt_model_provider(config, vocab, cfg.data.seq_length, parallel_output=False,
                               position_embedding_type=cfg.model.get("position_embedding_type", "rope"))
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(state["model"])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device).eval(), tokenizer, flat


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    args = parse_args(argv)
    import torch

    from nsa_megatron.compat import apply_cpu_compat
    from nsa_megatron.inference import NSAGenerator

    if args.max_new_tokens < 1 or args.prefill_chunk < 1:
        print("error: --max-new-tokens and --prefill-chunk must be >= 1", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        apply_cpu_compat()
    try:
        path = checkpoint_path(args.load, args.iteration)
        _init_single_process()
        model, tokenizer, _ = load_model(path, args.tokenizer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompts = [[int(t) for t in tokenizer.tokenize(p)] for p in args.prompt]
    if any(not p for p in prompts):
        print("error: --prompt: every prompt needs at least one token", file=sys.stderr)
        return 2
    capacity = max(len(p) for p in prompts) + args.max_new_tokens
    gen = NSAGenerator(model, batch=len(prompts), capacity=capacity, backend=args.backend,
                       prefill_chunk=args.prefill_chunk)
    start = time.perf_counter()
    out = gen.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       eos_id=tokenizer.eod if args.stop_at_eod else None, seed=args.seed)
    seconds = time.perf_counter() - start
    for text, toks in zip(args.prompt, out):
        print(f"=== {text!r} ->")
        print(text + tokenizer.detokenize(toks))
    total = sum(len(t) for t in out)
    print(f"> {total} tokens in {seconds:.2f} s ({total / max(seconds, 1e-9):.1f} tokens/s, "
          f"backend {gen.ctx.backend}, checkpoint {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
