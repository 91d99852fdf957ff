"""The synthetic associative-recall ("needle") task of ``tools/needle.py``: samples and datasets.

One sample is one document of exactly ``seq_length`` tokens (the last one the tokenizer's
end-of-document id)::

    [ filler ... OPEN k1 EQ v1 CLOSE ... filler ... OPEN k2 EQ v2 CLOSE ... ][ QUERY k2 EQ v2 CLOSE ... ] EOD
      (EQ only with ``separator``)
      \\____________________ context: C tokens of corpus text ____________/  \\___ the queries ___/

Filler is a contiguous window of corpus tokens (marker and end-of-document ids replaced by a space); ``n_pairs``
key/value records are written over it at non-overlapping positions; the target record
starts at ``round(depth * (C - record_length))``, the others are distractors at random
positions. Keys are random lowercase letters (distinct within a sample), values random
digits. The first query asks for the target: the model reads its key and must produce the
value, whose ``value_len`` tokens start at ``meta["value_pos"]`` (the one scored). With
``n_queries > 1`` queries for that many distractors follow in random order: more retrievals
per training sample, the scored one unchanged. Markers are control characters that source code never
contains (``\\x01``, ``\\x02``, ``\\x03``) and ``=``.

Because every document has exactly ``seq_length`` tokens, Megatron's GPT dataset (samples of
``seq_length`` tokens advancing by ``seq_length``) cuts the concatenation exactly at document
starts: each training sample is one needle sample.
"""
from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

OPEN, EQ, CLOSE, QUERY = "\x01", "=", "\x02", "\x03"
LETTERS = string.ascii_lowercase
DIGITS = string.digits
CONTROL = "".join(map(chr, [*range(0x04, 0x09), *range(0x0E, 0x20), 0x7F]))
"""Control characters that source code does not contain (24): one-symbol keys that occur
nowhere but in the records, so retrieval is a one-token match."""
KEY_ALPHABETS = {"letters": LETTERS, "control": CONTROL}


@dataclass
class NeedleSpec:
    """Shape of the task."""

    seq_length: int
    """Tokens per sample, the end-of-document id included."""
    n_pairs: int = 4
    """Key/value records in the context (1 target + distractors)."""
    key_len: int = 4
    """Characters per key (lowercase letters)."""
    value_len: int = 4
    """Characters per value (digits)."""
    n_queries: int = 1
    """Queries at the end (1 <= n_queries <= n_pairs): the target first, then distractors."""
    key_alphabet: str = "letters"
    """Key symbols: ``letters`` (lowercase) or ``control`` (:data:`CONTROL`, scrubbed from the filler)."""
    separator: bool = True
    """Write EQ between key and value. Without it a one-symbol key is directly followed by its
    value, so recall is the one-hop induction match (EQ also occurs in the filler)."""


class _Markers:
    """Token ids of the markers and of single letters/digits under ``tokenizer``."""

    def __init__(self, tokenizer) -> None:
        enc = lambda s: [int(t) for t in tokenizer.tokenize(s)]  # noqa: E731
        self.open, self.eq, self.close, self.query = enc(OPEN), enc(EQ), enc(CLOSE), enc(QUERY)
        self.space = enc(" ")
        self.enc = enc
        self.special = {t for ids in (self.open, self.close, self.query) for t in ids}
        self.control = {t for c in CONTROL for t in enc(c)}


def query_marker_id(tokenizer) -> int:
    """The token id that opens every query (the answer-only loss starts there).

    Raises:
        ValueError: the tokenizer splits the marker into several tokens."""
    ids = _Markers(tokenizer).query
    if len(ids) != 1:
        raise ValueError(f"the query marker {QUERY!r} is {len(ids)} tokens under this tokenizer, need 1")
    return ids[0]


def _record(m: _Markers, key: str, value: str, sep: bool) -> List[int]:
    return m.open + m.enc(key) + (m.eq if sep else []) + m.enc(value) + m.close


def _query(m: _Markers, key: str, value: str, sep: bool) -> Tuple[List[int], int]:
    """Query tokens and the offset of the value's first token inside them."""
    head = m.query + m.enc(key) + (m.eq if sep else [])
    return head + m.enc(value) + m.close, len(head)


def make_sample(rng: np.random.Generator, filler: np.ndarray, spec: NeedleSpec, depth: float,
                tokenizer) -> Tuple[np.ndarray, Dict[str, object]]:
    """One needle sample without its end-of-document id.

    Args:
        rng: random source (keys, values, filler window, distractor positions).
        filler: 1-D corpus token ids to cut the context from (longer than the context).
        spec: the task shape.
        depth: where the queried record starts, as a fraction of the context (0 = first token).
        tokenizer: ``tokenize`` / ``eod`` (``nsa_tools.tokenizer``).
    Returns:
        (ids int64 [seq_length - 1], meta) with ``key``, ``value``, ``depth``, ``needle_pos``
        (first token of the queried record), ``context_len``, ``value_pos`` (first value token
        of the answer), ``value_ids`` and ``distractor_pos``.
    Raises:
        ValueError: the records do not fit in ``seq_length``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if spec.key_alphabet not in KEY_ALPHABETS:
        raise ValueError(f"key_alphabet={spec.key_alphabet!r}: must be one of {sorted(KEY_ALPHABETS)}")
    alphabet = KEY_ALPHABETS[spec.key_alphabet]
    if len(alphabet) ** spec.key_len < spec.n_pairs:
        raise ValueError(f"n_pairs={spec.n_pairs}: more than the {len(alphabet) ** spec.key_len} distinct keys "
                         f"of {spec.key_len} {spec.key_alphabet} symbols")
    m = _Markers(tokenizer)
    keys: List[str] = []
    while len(keys) < spec.n_pairs:
        k = "".join(rng.choice(list(alphabet), spec.key_len))
        if k not in keys:
            keys.append(k)
    values = ["".join(rng.choice(list(DIGITS), spec.value_len)) for _ in keys]
    records = [_record(m, k, v, spec.separator) for k, v in zip(keys, values)]
    r = max(len(x) for x in records)
    if not 1 <= spec.n_queries <= spec.n_pairs:
        raise ValueError(f"n_queries={spec.n_queries}: must be in [1, n_pairs={spec.n_pairs}]")
    tail, value_off = _query(m, keys[0], values[0], spec.separator)
    for i in rng.permutation(np.arange(1, spec.n_pairs))[:spec.n_queries - 1]:
        tail = tail + _query(m, keys[i], values[i], spec.separator)[0]
    context = spec.seq_length - 1 - len(tail)
    if context < spec.n_pairs * r * 2:
        raise ValueError(f"seq_length={spec.seq_length}: too short for {spec.n_pairs} records of {r} tokens")
    if len(filler) <= context:
        raise ValueError(f"filler corpus has {len(filler)} tokens, need more than {context}")
    start = int(rng.integers(0, len(filler) - context))
    ctx = np.array(filler[start:start + context], dtype=np.int64)
    scrub = {*m.special, tokenizer.eod}  # the corpus's document ends too: one document per sample
    if spec.key_alphabet == "control":
        scrub |= m.control
    for t in scrub:
        ctx[ctx == t] = m.space[0]
    target = int(round(depth * (context - len(records[0]))))
    placed = [target]
    for _ in range(1000 * spec.n_pairs):
        if len(placed) == spec.n_pairs:
            break
        p = int(rng.integers(0, context - r + 1))
        if all(abs(p - q) >= r + 1 for q in placed):
            placed.append(p)
    if len(placed) < spec.n_pairs:
        raise ValueError("could not place the distractor records without overlap")
    for p, rec in zip(placed, records):
        ctx[p:p + len(rec)] = rec
    ids = np.concatenate([ctx, np.asarray(tail, dtype=np.int64)])
    meta = {"key": keys[0], "value": values[0], "depth": depth, "needle_pos": target,
            "context_len": context, "value_pos": context + value_off,
            "value_ids": [int(t) for t in ids[context + value_off:context + value_off + len(m.enc(values[0]))]],
            "distractor_pos": placed[1:], "record_ids": records[0]}
    return ids, meta


def sample_stream(n: int, spec: NeedleSpec, filler: np.ndarray, tokenizer, seed: int,
                  depths: Optional[Sequence[float]] = None) -> Iterator[Tuple[np.ndarray, Dict[str, object]]]:
    """``n`` samples; depth uniform in [0, 1] per sample, or cycling through ``depths``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        depth = float(depths[i % len(depths)]) if depths else float(rng.uniform(0.0, 1.0))
        yield make_sample(rng, filler, spec, depth, tokenizer)


class _IdsTokenizer:
    """Adapter for ``write_indexed_dataset``: documents are already token ids."""

    def __init__(self, tokenizer) -> None:
        self.vocab_size, self.eod = tokenizer.vocab_size, tokenizer.eod

    @staticmethod
    def tokenize(ids):
        return ids


def write_needle_dataset(prefix: str, n: int, spec: NeedleSpec, filler: np.ndarray, tokenizer,
                         seed: int) -> Dict[str, object]:
    """Write ``prefix``.bin/.idx (one sample per document, via the project's preprocess code)
    and ``prefix``_meta.jsonl (one line of :func:`make_sample` metadata per document)."""
    from nsa_tools.preprocess_data import write_indexed_dataset

    metas: List[Dict[str, object]] = []

    def docs():
        for ids, meta in sample_stream(n, spec, filler, tokenizer, seed):
            metas.append(meta)
            yield ids

    stats = write_indexed_dataset(docs(), prefix, _IdsTokenizer(tokenizer))
    with open(f"{prefix}_meta.jsonl", "w", encoding="utf-8") as f:
        for meta in metas:
            f.write(json.dumps(meta) + "\n")
    if stats["tokens"] != n * spec.seq_length:
        raise RuntimeError(f"{prefix}: wrote {stats['tokens']} tokens, expected {n} x {spec.seq_length}")
    return {**stats, "spec": asdict(spec), "seed": seed}


def corpus_tokens(prefix: str) -> np.ndarray:
    """All tokens of an indexed dataset (``prefix``.bin/.idx) as one int64 array."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


def read_meta(prefix: str) -> List[Dict[str, object]]:
    """The metadata lines written beside a needle dataset."""
    return [json.loads(x) for x in Path(f"{prefix}_meta.jsonl").read_text().splitlines() if x.strip()]
