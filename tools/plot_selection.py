"""Draw what a trained NSA model selects: blocks chosen per query, and the branch gates.

    python tools/plot_selection.py --load runs/quality_lm/nsa/checkpoints --text-file some.py \\
        --out benchmarks/selection.png [--kv-head 0] [--max-tokens 4096]

For a checkpoint written by ``launch/pretrain_nsa.py`` and an input text, one forward pass of
the real model runs with a forward hook on every ``NSACoreAttention``. The hook takes the
exact tensors the layer received (queries, keys, compressor inputs, gates, boundaries) and
calls ``nsa_attention(..., return_block_indices=True)`` on them, checking that the output it
gets equals the layer's own output (so the indices are those of that forward). No change to
the model code is needed.

The PNG has one panel per NSA layer (query position x selection-block index, a cell lit when
the query's KV group ``--kv-head`` selected that block) and a bar chart of the mean gate value
per branch (compressed, selected, window) per layer. ``--json`` writes the numbers: mean gates,
how often each block was selected, the hook's output check.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

BRANCHES = ("compressed", "selected", "window")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line arguments of this tool."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint folder (holding latest_checkpointed_iteration.txt)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to load (default: the latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="input text")
    src.add_argument("--text-file", help="file whose text is the input")
    p.add_argument("--max-tokens", type=int, default=None, help="truncate the input (default: trained seq_length)")
    p.add_argument("--kv-head", type=int, default=0, help="KV head (GQA group) whose selection is drawn")
    p.add_argument("--out", default="selection.png", help="PNG path")
    p.add_argument("--json", default=None, help="also write the numbers here")
    return p.parse_args(argv)


def nsa_core_modules(model) -> List:
    """The ``NSACoreAttention`` modules of ``model`` in layer order."""
    from nsa_megatron.core_attention import NSACoreAttention

    return [m for m in model.modules() if isinstance(m, NSACoreAttention)]


def capture_selection(model, tokens, keep_inputs: bool = False) -> List[Dict[str, object]]:
    """Run ``model`` on ``tokens`` [b, s] and return, per NSA layer, what its core attention did.

    Each entry: ``layer`` (1-based layer number), ``block_indices`` int32 [T, HKV, topk] (T = b*s,
    batch-major; ascending, -1 padded), ``gates`` [T, HQ, 3], ``max_abs_diff`` between the
    hook's recomputed output and the layer's output, ``hparams``; with ``keep_inputs`` also the
    layer's ``q``, ``k``, ``k_cmp``, ``v_cmp``, ``cu_seqlens`` etc. Context parallelism is not
    supported (the model must be built with context_parallel_size 1).
    """
    import torch

    from nsa_megatron.functional import nsa_attention

    records: List[Dict[str, object]] = []

    def hook(module, args, kwargs, output):
        names = ("q", "k", "v", "k_win", "v_win", "k_cmp_src", "v_cmp_src", "gates", "cu_seqlens")
        x = dict(zip(names, args))
        x.update({k: v for k, v in kwargs.items() if k in names})
        if module.cp_size > 1:
            raise ValueError("capture_selection: context parallelism is not supported")
        with torch.no_grad():
            k_cmp, v_cmp = module.compress(x["k_cmp_src"], x["v_cmp_src"], x["cu_seqlens"], kwargs.get("rope_cmp"))
            out, idx = nsa_attention(x["q"], x["k"], x["v"], k_cmp, v_cmp, x["gates"], x["cu_seqlens"],
                                     scale=module.softmax_scale, k_win=x["k_win"], v_win=x["v_win"],
                                     backend=module.backend, return_block_indices=True, **module.hparams)
        rec = {"layer": module.layer_number, "block_indices": idx.detach().cpu(),
               "gates": x["gates"].detach().float().cpu(),
               "max_abs_diff": float((out.float() - output.float()).abs().max()),
               "hparams": dict(module.hparams)}
        if keep_inputs:
            rec.update({k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in x.items()})
            rec.update(k_cmp=k_cmp.detach().cpu(), v_cmp=v_cmp.detach().cpu(), output=output.detach().cpu(),
                       scale=module.softmax_scale)
        records.append(rec)

    cores = nsa_core_modules(model)
    if not cores:
        raise ValueError("the model has no NSA layers (attention_type full?)")
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in cores]
    try:
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        with torch.no_grad():
            model(tokens, pos, None)
    finally:
        for h in handles:
            h.remove()
    return records


def selection_matrix(block_indices, kv_head: int, seq_len: int, slc_block: int) -> np.ndarray:
    """[seq_len, n_blocks] 0/1 matrix of the first sequence: row t = blocks query t selected."""
    idx = np.asarray(block_indices)[:seq_len, kv_head]
    n_blocks = -(-seq_len // slc_block)
    mat = np.zeros((seq_len, n_blocks), dtype=np.float32)
    for t in range(seq_len):
        chosen = idx[t][idx[t] >= 0]
        mat[t, chosen] = 1.0
    return mat


def summarize(records: List[Dict[str, object]], kv_head: int, seq_len: int) -> Dict[str, object]:
    """Mean gate per branch per layer and per-block selection frequency (JSON-ready)."""
    layers = []
    for r in records:
        g = np.asarray(r["gates"]).reshape(-1, 3)
        mat = selection_matrix(r["block_indices"], kv_head, seq_len, r["hparams"]["slc_block"])
        layers.append({"layer": r["layer"], "mean_gates": dict(zip(BRANCHES, g.mean(0).tolist())),
                       "block_selection_frequency": mat.mean(0).tolist(),
                       "max_abs_diff_vs_layer_output": r["max_abs_diff"]})
    return {"kv_head": kv_head, "tokens": seq_len, "layers": layers}


def plot(records: List[Dict[str, object]], kv_head: int, seq_len: int, path: str, title: str) -> None:
    """Selection heatmaps (one per layer) above a grouped bar chart of the mean gates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(records)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = plt.figure(figsize=(3.6 * cols, 3.4 * rows + 3.0), dpi=110)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[3.4] * rows + [2.6])
    for i, r in enumerate(records):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        mat = selection_matrix(r["block_indices"], kv_head, seq_len, r["hparams"]["slc_block"])
        ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"layer {r['layer']}, KV head {kv_head}", fontsize=9)
        ax.set_xlabel(f"selection block ({r['hparams']['slc_block']} tokens)", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
    ax = fig.add_subplot(grid[rows, :])
    means = np.array([np.asarray(r["gates"]).reshape(-1, 3).mean(0) for r in records])
    x = np.arange(n)
    for j, name in enumerate(BRANCHES):
        ax.bar(x + (j - 1) * 0.27, means[:, j], width=0.27, label=name)
    ax.set_xticks(x, [str(r["layer"]) for r in records])
    ax.set_xlabel("layer")
    ax.set_ylabel("mean gate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: load, forward once with hooks, draw; exit 2 on bad arguments."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    args = parse_args(argv)
    import torch

    from nsa_megatron.compat import apply_cpu_compat
    from nsa_tools import generate as G

    if not torch.cuda.is_available():
        apply_cpu_compat()
    try:
        text = args.text if args.text is not None else Path(args.text_file).read_text(errors="replace")
        path = G.checkpoint_path(args.load, args.iteration)
        G._init_single_process()
        model, tok, flat = G.load_model(path)
        ids = [int(t) for t in tok.tokenize(text)][: args.max_tokens or int(flat["data.seq_length"])]
        cores = nsa_core_modules(model)
        if not cores:
            raise ValueError(f"{path}: the model has no NSA layers (attention_type {flat.get('model.attention_type')})")
        if not 0 <= args.kv_head < cores[0].num_kv_heads:
            raise ValueError(f"--kv-head {args.kv_head}: the model has {cores[0].num_kv_heads} KV heads")
        if len(ids) < cores[0].hparams["cmp_block"]:
            raise ValueError(f"input has {len(ids)} tokens, NSA needs at least {cores[0].hparams['cmp_block']}")
        device = next(model.parameters()).device
        records = capture_selection(model, torch.tensor([ids], device=device))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    worst = max(r["max_abs_diff"] for r in records)
    plot(records, args.kv_head, len(ids), args.out, f"NSA selection and gates: {path} ({len(ids)} tokens)")
    summary = {"checkpoint": path, **summarize(records, args.kv_head, len(ids))}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    gates = "; ".join(f"layer {l['layer']}: " + " ".join(f"{k[:3]} {v:.2f}" for k, v in l["mean_gates"].items())
                      for l in summary["layers"])
    print(f"> {args.out}: {len(records)} NSA layers, {len(ids)} tokens, hook output check max |diff| "
          f"{worst:.2e} | mean gates {gates}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
