"""Build the embedded default corpus: Python's own standard-library source files.

Every machine that runs this project has them, they are long real documents, and they are
the repository-level code NSA is meant for - so the README's main command needs no
download. Files are taken in sorted relative-path order (deterministic), test folders are
left out, each file becomes one document headed by its path, and a fixed, hash-chosen
subset of files (``valid_every``: about one in N) is held out as the validation split.

    python tools/build_corpus.py --out data/cache/pystdlib [--max-mb 4] [--tokenizer byte]

writes ``<out>_train.{bin,idx}``, ``<out>_valid.{bin,idx}`` and ``<out>_manifest.json``.
The training entry point calls :func:`ensure_corpus`, which builds it only when absent.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
from typing import Dict, List, Tuple

from nsa_tools.preprocess_data import write_indexed_dataset
from nsa_tools.tokenizer import load_tokenizer

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> pathlib.Path:
    """Folder of the running interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: pathlib.Path, max_bytes: int) -> List[pathlib.Path]:
    """Sorted ``*.py`` files under ``root`` (test folders skipped), at most ``max_bytes`` in total.

    Files are visited in sorted relative-path order; a file that would pass the byte budget
    is skipped and the walk goes on, so the result depends only on the files present.
    """
    files = sorted(
        (p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    chosen, total = [], 0
    for p in files:
        size = p.stat().st_size
        if size == 0 or total + size > max_bytes:
            continue
        chosen.append(p)
        total += size
    return chosen


def is_validation(rel_path: str, valid_every: int) -> bool:
    """Whether a file belongs to the held-out split: a stable hash of its relative path."""
    digest = hashlib.sha1(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % valid_every == 0


def build_corpus(out_prefix: str, tokenizer: str = "byte", max_mb: float = 4.0,
                 valid_every: int = 25, root: str | None = None) -> Dict[str, object]:
    """Write the train/valid indexed datasets and a manifest; return the manifest.

    Args:
        out_prefix: output path prefix (``<out>_train``, ``<out>_valid``, ``<out>_manifest.json``).
        tokenizer: ``"byte"`` or a ``tokenizer.json`` path.
        max_mb: byte budget of source text (train + valid).
        valid_every: about one file in ``valid_every`` goes to the validation split.
        root: source folder; the interpreter's standard library when None.
    """
    if valid_every < 2:
        raise ValueError(f"valid_every must be >= 2, got {valid_every}")
    base = pathlib.Path(root) if root else stdlib_root()
    if not base.is_dir():
        raise ValueError(f"corpus source folder not found: {base}")
    files = list_source_files(base, int(max_mb * 1e6))
    rels = [p.relative_to(base).as_posix() for p in files]
    split = {"train": [], "valid": []}
    for p, rel in zip(files, rels):
        split["valid" if is_validation(rel, valid_every) else "train"].append((p, rel))
    if not split["train"] or not split["valid"]:
        raise ValueError(f"corpus from {base} too small: {len(files)} files")
    tok = load_tokenizer(tokenizer)
    manifest: Dict[str, object] = {"source": str(base), "tokenizer": tokenizer, "max_mb": max_mb,
                                   "valid_every": valid_every}
    for name, items in split.items():
        docs = (f"# file: {rel}\n" + p.read_text(encoding="utf-8", errors="replace") for p, rel in items)
        stats = write_indexed_dataset(docs, f"{out_prefix}_{name}", tok)
        manifest[name] = {"files": [rel for _, rel in items], **stats}
    with open(f"{out_prefix}_manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def ensure_corpus(cache_dir: str, tokenizer: str = "byte", max_mb: float = 4.0,
                  valid_every: int = 25) -> Tuple[str, str]:
    """Return ``(train_prefix, valid_prefix)`` of the default corpus, building it if absent.

    The name encodes the Python version, tokenizer and size, so different settings never
    share files. Call it on one rank and barrier before the others read.
    """
    tag = "byte" if tokenizer == "byte" else hashlib.sha1(tokenizer.encode()).hexdigest()[:8]
    ver = f"py{sys.version_info.major}{sys.version_info.minor}"
    prefix = os.path.join(cache_dir, f"pystdlib_{ver}_{tag}_{max_mb:g}mb_v{valid_every}")
    if not os.path.exists(f"{prefix}_manifest.json"):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"> building the default corpus (Python {ver[2]}.{ver[3:]} standard library, {max_mb:g} MB) "
              f"into {prefix}_* (first run only)", flush=True)
        m = build_corpus(prefix, tokenizer, max_mb, valid_every)
        print(f"> corpus: train {m['train']['documents']} files / {m['train']['tokens']} tokens, "
              f"valid {m['valid']['documents']} files / {m['valid']['tokens']} tokens", flush=True)
    return f"{prefix}_train", f"{prefix}_valid"


def main(argv: List[str] | None = None) -> int:
    """Command-line entry point; prints one summary line (or one error line, exit 1)."""
    p = argparse.ArgumentParser(description="Build the Python-stdlib corpus as Megatron indexed datasets.")
    p.add_argument("--out", default="data/cache/pystdlib", help="output prefix")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a path to tokenizer.json")
    p.add_argument("--max-mb", type=float, default=4.0, help="source-text budget in MB")
    p.add_argument("--valid-every", type=int, default=25, help="hold out ~1 file in N")
    p.add_argument("--root", default=None, help="source folder (default: the stdlib)")
    args = p.parse_args(argv)
    try:
        m = build_corpus(args.out, args.tokenizer, args.max_mb, args.valid_every, args.root)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"corpus {args.out}: train {m['train']['documents']} files / {m['train']['tokens']} tokens, "
          f"valid {m['valid']['documents']} files / {m['valid']['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
