"""Long-context retrieval: train on a synthetic needle / associative-recall task, then measure
retrieval accuracy per (context length, depth), NSA vs full attention.

The task (``tools/needle_task.py``): key/value records scattered through corpus text, the
query key at the end, the model must produce the value. Stages (``--stage``, default all):

    data    needle train/valid datasets (``.bin/.idx`` via tools/preprocess_data.py's writer;
            filler from the corpus' train split, held-out files for valid and eval)
    train   each arm (``nsa``, ``full``) through ``launch/pretrain_nsa.py``, in resumable chunks
    eval    accuracy of every arm's latest checkpoint (or ``--load-nsa/--load-full``) on fresh
            samples from held-out filler: exact match of the greedy value, computed as
            teacher-forced argmax on every value token (the same event, one forward pass)

    python tools/needle.py --config configs/needle_nsa_4k.yaml --chunk-iters 250 --time-limit 540
    python tools/needle.py --smoke                      # CPU, tiny, both arms, ~1 minute

The config is a training config plus a ``needle:`` section (see ``NEEDLE_DEFAULTS``); the
tool writes the training part to ``<out-dir>/train_config.yaml``. Outputs:
``<report-dir>/needle-<date>[-<tag>].json`` (accuracy grid per arm, config, card, commit)
and ``.png`` (one heatmap per arm).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import yaml

from nsa_tools import experiment_runs as X
from nsa_tools.needle_task import NeedleSpec, corpus_tokens, sample_stream, write_needle_dataset

ARMS = ("nsa", "full")
TARGET_ACCURACY = 0.95
NEEDLE_DEFAULTS = {
    "n_pairs": 4,            # records per sample: 1 target + 3 distractors
    "n_queries": 1,          # queries per sample: the target's first (the one scored), then distractors'
    "key_alphabet": "letters",  # or "control": one-symbol keys found nowhere else in the sample
    "separator": True,       # "=" between key and value (False: the value follows the key directly)
    "value_alphabet": "digits",  # or "high": 128 byte values found nowhere else (byte tokenizer)
    "value_first": False,    # records as "value key" (queries stay "key value"): see NeedleSpec.value_first
    "compact_queries": False,  # queries after the first as bare "key value" (MQAR-style), no markers
    "loss_on": "all",        # "all" tokens, or "queries": only the labels from the first query marker on
    "key_len": 4,            # lowercase letters per key
    "value_len": 4,          # digits per value
    "copy_fraction": 0.0,    # share of training samples that are span-copy samples (needle_task.make_copy_sample)
    "copy_span": 16,         # tokens per copied span of a copy sample
    "train_samples": 16384,  # distinct training samples (epochs repeat beyond this)
    "valid_samples": 64,     # needle validation samples (validation loss during training)
    "data_seed": 7,
    "arms": ["nsa", "full"],
    "eval_lengths": None,    # None: [seq_length]; lengths above the trained one are not native
    "eval_depths": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
    "eval_n_queries": None,  # queries per evaluation sample (None: n_queries); only the first is scored, and
                             # causally nothing after it matters, so a short tail leaves the context long
    "eval_samples": 32,      # samples per (length, depth) cell
    "eval_batch": 4,
}
SMOKE_CONFIG = {
    "model": {"attention_type": "nsa", "num_layers": 1, "hidden_size": 64, "ffn_hidden_size": 128,
              "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16, "normalization": "RMSNorm",
              "hidden_dropout": 0.0, "attention_dropout": 0.0, "position_embedding_type": "rope"},
    "nsa": {"cmp_block": 16, "cmp_stride": 8, "slc_block": 32, "topk": 3, "window": 32},
    "data": {"seq_length": 128, "micro_batch_size": 2, "global_batch_size": 2, "tokenizer": "byte",
             "corpus_max_mb": 0.3},
    "training": {"train_iters": 3, "lr": 3.0e-3, "min_lr": 3.0e-4, "lr_warmup_iters": 1, "seed": 1234,
                 "eval_interval": 0, "eval_iters": 1},
    "checkpoint": {"save_interval": 3},
    "logging": {"log_interval": 1},
    "needle": {"n_pairs": 2, "n_queries": 2, "loss_on": "queries", "key_len": 3, "value_len": 2, "train_samples": 16, "valid_samples": 4,
               "eval_lengths": [96, 128], "eval_depths": [0.0, 0.5, 1.0], "eval_samples": 2, "eval_batch": 2},
}
"""CPU smoke: one tiny layer, 128-token samples, 3 steps per arm, a 2 x 3 grid of 2 samples."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line arguments; unrecognised ones are training overrides for every arm."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--config", default="configs/needle_nsa_4k.yaml")
    p.add_argument("--stage", choices=("data", "train", "eval", "all"), default="all")
    p.add_argument("--out-dir", default=None, help="run folder (default runs/needle_<config stem>)")
    p.add_argument("--report-dir", default=None, help="report folder (default benchmarks/, smoke: --out-dir)")
    p.add_argument("--tag", default="")
    p.add_argument("--date", default=None)
    p.add_argument("--arms", default=None, help="comma-separated arms (default: needle.arms)")
    p.add_argument("--train-iters", type=int, default=None, help="steps per arm (default: the config's)")
    p.add_argument("--chunk-iters", type=int, default=0)
    p.add_argument("--max-chunks", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=0.0)
    p.add_argument("--load-nsa", default=None, help="evaluate this checkpoint folder as the nsa arm")
    p.add_argument("--load-full", default=None, help="evaluate this checkpoint folder as the full arm")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    args, overrides = p.parse_known_args(argv)
    args.overrides = overrides
    return args


def load_needle_config(args) -> tuple:
    """(training config dict, needle settings, out_dir, report_dir)."""
    if args.smoke:
        raw = json.loads(json.dumps(SMOKE_CONFIG))
        stem = "smoke"
    else:
        path = Path(args.config)
        raw = yaml.safe_load((path if path.is_absolute() else X.REPO / path).read_text()) or {}
        stem = path.stem
    needle = {**NEEDLE_DEFAULTS, **(raw.pop("needle", None) or {})}
    if args.train_iters:
        raw.setdefault("training", {})["train_iters"] = args.train_iters
    unknown = set(needle) - set(NEEDLE_DEFAULTS)
    if unknown:
        raise ValueError(f"needle: unknown keys {sorted(unknown)}")
    if needle["loss_on"] not in ("all", "queries"):
        raise ValueError(f"needle.loss_on={needle['loss_on']!r}: must be 'all' or 'queries'")
    from nsa_tools.needle_task import KEY_ALPHABETS, VALUE_ALPHABETS

    for key, allowed in (("key_alphabet", KEY_ALPHABETS), ("value_alphabet", VALUE_ALPHABETS)):
        if needle[key] not in allowed:
            raise ValueError(f"needle.{key}={needle[key]!r}: must be one of {sorted(allowed)}")
    if not isinstance(needle["copy_fraction"], (int, float)) or not 0.0 <= needle["copy_fraction"] < 1.0:
        raise ValueError(f"needle.copy_fraction={needle['copy_fraction']!r}: must be a number in [0, 1)")
    if needle["eval_n_queries"] is not None and (not isinstance(needle["eval_n_queries"], int)
                                                 or needle["eval_n_queries"] < 1):
        raise ValueError(f"needle.eval_n_queries={needle['eval_n_queries']!r}: must be null or an integer >= 1")
    if not isinstance(needle["copy_span"], int) or needle["copy_span"] < 2:
        raise ValueError(f"needle.copy_span={needle['copy_span']!r}: must be an integer >= 2")
    out_dir = Path(args.out_dir or X.REPO / "runs" / f"needle_{stem}")
    report_dir = Path(args.report_dir or (out_dir if args.smoke else X.REPO / "benchmarks"))
    return raw, needle, out_dir, report_dir


SPEC_KEYS = ("n_pairs", "key_len", "value_len", "n_queries", "key_alphabet", "separator", "value_alphabet",
             "value_first", "compact_queries")
"""The ``needle:`` settings that shape a sample (the fields of ``NeedleSpec`` but its length)."""


def needle_spec(seq_length: int, needle: dict) -> NeedleSpec:
    """The sample shape of ``needle`` settings at ``seq_length`` tokens (training and evaluation alike)."""
    return NeedleSpec(seq_length, **{k: needle[k] for k in SPEC_KEYS})


def _cache_dir(data_section: dict) -> str:
    """``data.cache_dir`` resolved as the entry point resolves it (relative to the repository)."""
    path = Path(data_section.get("cache_dir", "data/cache"))
    return str(path if path.is_absolute() else X.REPO / path)


def stage_data(train_cfg: dict, needle: dict, out_dir: Path) -> Dict[str, str]:
    """Build (once) the needle train/valid datasets; return their prefixes."""
    from nsa_tools.build_corpus import ensure_corpus
    from nsa_tools.tokenizer import load_tokenizer

    d = train_cfg.get("data", {})
    seq = int(d.get("seq_length", 256))
    tok_name = d.get("tokenizer", "byte")
    spec = needle_spec(seq, needle)
    data_dir = out_dir / "data"
    prefixes = {"train": str(data_dir / f"needle_{seq}_train"), "valid": str(data_dir / f"needle_{seq}_valid")}
    stamp = data_dir / "dataset.json"
    want = {"spec": spec.__dict__, "train_samples": needle["train_samples"],
            "valid_samples": needle["valid_samples"], "seed": needle["data_seed"], "tokenizer": tok_name,
            "copy_fraction": needle["copy_fraction"], "copy_span": needle["copy_span"]}
    if stamp.is_file() and json.loads(stamp.read_text()).get("settings") == want:
        return prefixes
    tok = load_tokenizer(tok_name)
    corpus_train, corpus_valid = ensure_corpus(_cache_dir(d), tok_name, float(d.get("corpus_max_mb", 4.0)))
    stats = {
        "train": write_needle_dataset(prefixes["train"], needle["train_samples"], spec,
                                      corpus_tokens(corpus_train), tok, needle["data_seed"],
                                      copy_fraction=float(needle["copy_fraction"]),
                                      copy_span=int(needle["copy_span"])),
        "valid": write_needle_dataset(prefixes["valid"], needle["valid_samples"], spec,
                                      corpus_tokens(corpus_valid), tok, needle["data_seed"] + 1),
    }
    stamp.write_text(json.dumps({"settings": want, "stats": stats, "corpus": [corpus_train, corpus_valid]}, indent=1))
    print(f"> needle data: {needle['train_samples']} train / {needle['valid_samples']} valid samples "
          f"of {seq} tokens in {data_dir}", flush=True)
    return prefixes


def query_loss_overrides(train_cfg: dict, needle: dict) -> List[str]:
    """``["data.loss_from_token=<query marker id>"]`` when ``needle.loss_on`` is ``queries``."""
    from nsa_tools.needle_task import query_marker_id
    from nsa_tools.tokenizer import load_tokenizer

    if needle["loss_on"] == "all":
        return []
    tok = load_tokenizer(train_cfg.get("data", {}).get("tokenizer", "byte"))
    return [f"data.loss_from_token={query_marker_id(tok)}"]


def stage_train(args, train_cfg: dict, needle: dict, out_dir: Path, prefixes: Dict[str, str],
                arms: List[str]) -> None:
    """Train every arm (resumable chunks) on the needle data through the entry point."""
    cfg_path = out_dir / "train_config.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(train_cfg, sort_keys=False))
    iters = int(train_cfg.get("training", {}).get("train_iters", 100))
    base = [f"data.train_data_path={prefixes['train']}", f"data.valid_data_path={prefixes['valid']}",
            *query_loss_overrides(train_cfg, needle), *args.overrides]
    X.run_arms(str(cfg_path), {a: [*base, f"model.attention_type={a}"] for a in arms}, out_dir, iters,
               args.chunk_iters, args.max_chunks, args.time_limit)


def accuracy_grid(model, tokenizer, needle: dict, lengths: List[int], filler: np.ndarray,
                  seed: int) -> Dict[str, object]:
    """Exact-match retrieval accuracy of ``model`` per (length, depth) on fresh samples.

    A sample counts as retrieved when the argmax at every value position (given the query and
    the correct earlier value tokens) is the right token: exactly when greedy decoding after
    the query would write the value. Returns ``{"lengths", "depths", "accuracy": [[...]]
    (lengths x depths), "token_accuracy", "samples_per_cell"}``.
    """
    import torch

    device = next(model.parameters()).device
    depths = [float(x) for x in needle["eval_depths"]]
    acc = np.zeros((len(lengths), len(depths)))
    tok_acc = np.zeros_like(acc)
    n, bs = int(needle["eval_samples"]), int(needle["eval_batch"])
    for li, length in enumerate(lengths):
        spec = needle_spec(length, {**needle, "n_queries": needle["eval_n_queries"] or needle["n_queries"]})
        for di, depth in enumerate(depths):
            samples = list(sample_stream(n, spec, filler, tokenizer, seed + 1000 * li + di, depths=[depth]))
            hits = tok_hits = tok_total = 0
            for b0 in range(0, n, bs):
                batch = samples[b0:b0 + bs]
                ids = torch.tensor(np.stack([np.append(s, tokenizer.eod) for s, _ in batch]), device=device)
                pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
                with torch.no_grad():
                    logits = model(ids, pos, None)
                pred = logits.argmax(-1)
                for row, (_, meta) in enumerate(batch):
                    vp, want = int(meta["value_pos"]), meta["value_ids"]
                    got = pred[row, vp - 1:vp - 1 + len(want)].tolist()
                    ok = [int(g) == int(w) for g, w in zip(got, want)]
                    hits += all(ok)
                    tok_hits += sum(ok)
                    tok_total += len(want)
            acc[li, di] = hits / n
            tok_acc[li, di] = tok_hits / tok_total
    return {"lengths": lengths, "depths": depths, "accuracy": acc.tolist(),
            "token_accuracy": tok_acc.tolist(), "samples_per_cell": n}


def stage_eval(train_cfg: dict, needle: dict, checkpoints: Dict[str, str]) -> Dict[str, dict]:
    """Load each arm's checkpoint in this process and measure its accuracy grid."""
    import torch

    from nsa_tools import generate as G
    from nsa_tools.build_corpus import ensure_corpus

    if not torch.cuda.is_available():
        from nsa_megatron.compat import apply_cpu_compat

        apply_cpu_compat()
    G._init_single_process()
    d = train_cfg.get("data", {})
    _, corpus_valid = ensure_corpus(_cache_dir(d), d.get("tokenizer", "byte"), float(d.get("corpus_max_mb", 4.0)))
    filler = corpus_tokens(corpus_valid)
    results = {}
    for arm, root in checkpoints.items():
        path = G.checkpoint_path(root, None)
        model, tok, flat = G.load_model(path)
        lengths = [int(x) for x in (needle["eval_lengths"] or [flat["data.seq_length"]])]
        grid = accuracy_grid(model, tok, needle, lengths, filler, seed=int(needle["data_seed"]) + 99)
        results[arm] = {"checkpoint": path, "attention_type": flat.get("model.attention_type"),
                        "trained_seq_length": flat.get("data.seq_length"),
                        "train_iters": flat.get("training.train_iters"), **grid}
        del model
        print(f"> needle eval {arm}: mean accuracy {np.mean(grid['accuracy']):.3f} over "
              f"{len(lengths)} lengths x {len(grid['depths'])} depths", flush=True)
    return results


def plot_heatmaps(results: Dict[str, dict], path: Path) -> None:
    """One accuracy heatmap (context length x depth) per arm, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results)
    fig, axes = plt.subplots(1, len(arms), figsize=(5.5 * len(arms), 3.6), dpi=120, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        r = results[arm]
        acc = np.asarray(r["accuracy"])
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(r["depths"])), [f"{d:.1f}" for d in r["depths"]])
        ax.set_yticks(range(len(r["lengths"])), [str(x) for x in r["lengths"]])
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xlabel("needle depth (fraction of context)")
        ax.set_ylabel("context length")
        ax.set_title(f"{arm}: retrieval accuracy")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the requested stages; exit 2 on configuration errors, 1 on a failed training run."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    args = parse_args(argv)
    try:
        train_cfg, needle, out_dir, report_dir = load_needle_config(args)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    arms = [a.strip() for a in (args.arms.split(",") if args.arms else needle["arms"]) if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        print(f"error: arms must be some of {','.join(ARMS)}", file=sys.stderr)
        return 2
    if args.stage in ("data", "train", "all"):
        prefixes = stage_data(train_cfg, needle, out_dir)
    if args.stage in ("train", "all"):
        try:
            stage_train(args, train_cfg, needle, out_dir, prefixes, arms)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        iters = int(train_cfg.get("training", {}).get("train_iters", 100))
        if any(X.latest_iteration(X.arm_paths(out_dir, a)["ckpt"]) < iters for a in arms):
            print("> training incomplete: rerun the same command to continue (no evaluation yet)")
            return 0
    if args.stage not in ("eval", "all"):
        return 0
    given = {"nsa": args.load_nsa, "full": args.load_full}
    checkpoints = {a: given[a] or str(X.arm_paths(out_dir, a)["ckpt"]) for a in arms}
    checkpoints.update({a: p for a, p in given.items() if p})
    results = stage_eval(train_cfg, needle, checkpoints)
    date = args.date or datetime.date.today().isoformat()
    stem = f"needle-{date}" + (f"-{args.tag}" if args.tag else "")
    report_dir.mkdir(parents=True, exist_ok=True)
    longest = {a: r["accuracy"][int(np.argmax(r["lengths"]))] for a, r in results.items()}
    report = {"experiment": "needle", "date": date, "smoke": bool(args.smoke),
              "config": "smoke" if args.smoke else args.config, "overrides": args.overrides,
              "train_config": train_cfg, "needle": needle, "arms": results,
              "target_accuracy": TARGET_ACCURACY,
              "min_accuracy_at_longest": {a: min(v) for a, v in longest.items()},
              "target_met": {a: min(v) >= TARGET_ACCURACY for a, v in longest.items()},
              "card": X.device_card(), **X.git_commit()}
    (report_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_heatmaps(results, report_dir / f"{stem}.png")
    print(f"> needle report {report_dir / stem}.json / .png; min accuracy at the longest length: "
          + ", ".join(f"{a} {v:.3f}" for a, v in report["min_accuracy_at_longest"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
