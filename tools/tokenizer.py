"""Tokenizers for the data tools and the training entry point.

Two kinds, both with the attributes ``megatron.core.datasets`` GPT datasets read
(``tokenize``, ``vocab_size``, ``eod``, ``pad``), duck-typed rather than subclassing
Megatron's tokenizer base, whose name and module move between megatron-core versions:

* ``ByteTokenizer`` - UTF-8 bytes 0..255 plus an end-of-document id (256) and a pad id
  (257). Needs nothing but Python, so the default corpus works offline.
* ``HFTokenizer`` - any local Hugging Face ``tokenizer.json``, through the ``tokenizers``
  package when it is importable.

``load_tokenizer("byte")`` or ``load_tokenizer("/path/to/tokenizer.json")`` picks one.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

BYTE_EOD = 256
BYTE_PAD = 257


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: id = byte value, 256 = end of document, 257 = pad."""

    unique_identifiers = {"class": "ByteTokenizer"}
    """Read by Megatron's datasets to name their index caches."""

    def tokenize(self, text: str) -> np.ndarray:
        """Encode ``text`` as its UTF-8 bytes, one id per byte (int32 [len(bytes)])."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def detokenize(self, ids) -> str:
        """Decode ids back to text; special ids are dropped, bad UTF-8 is replaced."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    @property
    def vocab(self) -> Dict[str, int]:
        """Token string -> id (bytes are shown as latin-1 characters)."""
        table = {bytes([i]).decode("latin-1"): i for i in range(256)}
        table["<eod>"] = BYTE_EOD
        table["<pad>"] = BYTE_PAD
        return table

    @property
    def inv_vocab(self) -> Dict[int, str]:
        """Id -> token string."""
        return {i: s for s, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        """258: 256 byte values plus eod and pad."""
        return 258

    @property
    def eod(self) -> int:
        """End-of-document id appended after every document."""
        return BYTE_EOD

    @property
    def pad(self) -> int:
        """Padding id (never produced by ``tokenize``)."""
        return BYTE_PAD


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` package.

    Args:
        path: the ``tokenizer.json`` file (or a folder holding one).
        eod_token: the token appended after each document; the first of
            ``<|endoftext|>``, ``</s>``, ``<eos>`` found in the vocabulary when None.
    """

    def __init__(self, path: str, eod_token: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError(
                f"tokenizer {path!r} needs the 'tokenizers' package (pip install tokenizers); "
                "use tokenizer=byte to work without it"
            ) from exc
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file not found: {path}")
        self._tok = Tokenizer.from_file(path)
        self.unique_identifiers = {"class": "HFTokenizer", "path": os.path.abspath(path)}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        candidates = [eod_token] if eod_token else ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
        found = [c for c in candidates if c in vocab]
        if not found:
            raise ValueError(f"tokenizer {path}: no end-of-document token among {candidates}")
        self._eod = vocab[found[0]]
        self._vocab = vocab

    def tokenize(self, text: str) -> np.ndarray:
        """Encode ``text`` without special tokens (int32 ids)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def detokenize(self, ids) -> str:
        """Decode ids back to text."""
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab(self) -> Dict[str, int]:
        """Token string -> id."""
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        """Id -> token string."""
        return {i: s for s, i in self._vocab.items()}

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """End-of-document id."""
        return self._eod

    @property
    def pad(self) -> int:
        """No pad id of its own: raising makes Megatron's datasets pad with -1 (masked)."""
        raise NotImplementedError("HFTokenizer has no pad id")



def load_tokenizer(spec: str) -> "ByteTokenizer | HFTokenizer":
    """Return the tokenizer named by ``spec``: ``"byte"`` or a path to ``tokenizer.json``.

    Raises:
        ValueError: the spec is neither ``byte`` nor an existing file/folder.
    """
    if spec == "byte":
        return ByteTokenizer()
    if os.path.exists(spec):
        return HFTokenizer(spec)
    raise ValueError(f"tokenizer must be 'byte' or a path to a tokenizer.json, got {spec!r}")
