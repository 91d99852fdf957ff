"""Turn jsonl or plain-text files into a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Each jsonl line is one document (its ``--json-key`` field, default ``text``); each plain-text
file (any other extension) is one document. Every document is tokenized, followed by the
tokenizer's end-of-document id, and written with ``megatron.core.datasets.indexed_dataset``.

    python tools/preprocess_data.py --input a.jsonl b.txt --output-prefix data/my --tokenizer byte
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \\
        --tokenizer /models/llama/tokenizer.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Iterator, List, Sequence

import numpy as np

from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from nsa_tools.tokenizer import load_tokenizer


def iter_documents(paths: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """Yield the documents of ``paths`` in order: one per jsonl line, one per other file.

    Raises:
        ValueError: a file is missing, a jsonl line is not JSON or lacks ``json_key``.
    """
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"input file not found: {path}")
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                    if not isinstance(record, dict) or json_key not in record:
                        raise ValueError(f"{path}:{lineno}: no {json_key!r} field")
                    yield str(record[json_key])
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def write_indexed_dataset(documents: Iterable[str], output_prefix: str, tokenizer) -> dict:
    """Tokenize ``documents`` and write ``output_prefix``.bin/.idx; one sequence per document.

    Args:
        documents: texts; empty ones are skipped.
        output_prefix: path prefix of the two output files (folders are created).
        tokenizer: from ``load_tokenizer`` (``tokenize``, ``eod``, ``vocab_size``).

    Returns:
        ``{"documents": n, "tokens": total tokens written incl. eod ids}``.
    """
    folder = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(folder, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(output_prefix), dtype=dtype)
    n_docs = n_tokens = 0
    for text in documents:
        ids = tokenizer.tokenize(text)
        if len(ids) == 0:
            continue
        ids = np.concatenate([np.asarray(ids, dtype=np.int64), [tokenizer.eod]])
        builder.add_document(ids, [len(ids)])
        n_docs += 1
        n_tokens += len(ids)
    builder.finalize(get_idx_path(output_prefix))
    return {"documents": n_docs, "tokens": n_tokens}


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of this tool."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="jsonl (.jsonl/.json) or text files")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a path to tokenizer.json")
    p.add_argument("--json-key", default="text", help="field holding the text in jsonl lines")
    return p.parse_args(argv)


def main(argv: List[str] | None = None) -> int:
    """Entry point; prints one summary line, or one error line and returns 1."""
    args = parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        stats = write_indexed_dataset(iter_documents(args.input, args.json_key), args.output_prefix, tokenizer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
