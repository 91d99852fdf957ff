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

Variants (fields of :class:`NeedleSpec`): one-symbol keys from control characters
(``key_alphabet="control"``), one-token values from the 128 high bytes (``value_alphabet="high"``),
no separator, records written value first (``value_first``), and queries after the first as bare
``k v`` pairs (``compact_queries``) in rounds over all records (``n_queries > n_pairs``): the
MQAR-style dense layout of ``configs/needle_nsa_4k.yaml``. :func:`make_copy_sample` builds
span-copy samples that :func:`sample_stream` can mix into training data (``copy_fraction``).

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
HIGH = "".join(map(chr, range(0x80, 0x100)))
"""The 128 byte values above ASCII (byte tokenizer only, one token each): values scrubbed from
the filler, so a value is one of 128 symbols found nowhere else."""
VALUE_ALPHABETS = {"digits": DIGITS, "high": HIGH}


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
    """Queries at the end (>= 1): the target first, then the distractors in random order; past
    ``n_pairs`` further rounds over all records (each a fresh random order), for more
    retrievals per training sample. Only the first is scored."""
    key_alphabet: str = "letters"
    """Key symbols: ``letters`` (lowercase) or ``control`` (:data:`CONTROL`, scrubbed from the filler)."""
    separator: bool = True
    """Write EQ between key and value. Without it a one-symbol key is directly followed by its
    value, so recall is the one-hop induction match (EQ also occurs in the filler)."""
    value_alphabet: str = "digits"
    """Value symbols: ``digits`` or ``high`` (:data:`HIGH`, 128 byte values scrubbed from the
    filler; byte tokenizer only). With 128 values and ``n_pairs`` records, attending to the
    records alone already lowers the value loss from ln 128 to ~ln ``n_pairs``: a first
    reward on the way to the key match (with 10 digits all present, there is none)."""
    value_first: bool = False
    """Write records value first (``OPEN v k CLOSE``); queries stay ``QUERY k v``. The query key
    then finds the record by matching the key token itself, and the value is the token just
    before it: a previous-token head feeding the matched position's value (V-composition)
    instead of a match on the previous token (K-composition, the usual induction head)."""
    compact_queries: bool = False
    """Queries after the first without their markers: ``QUERY k1 v1 CLOSE k2 v2 k3 v3 ...``
    (two tokens per retrieval with one-token keys and values, MQAR-style), so more retrievals
    fit in the tail. The first (scored) query is unchanged."""


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


def _record(m: _Markers, key: List[int], value: List[int], sep: bool, value_first: bool = False) -> List[int]:
    a, b = (value, key) if value_first else (key, value)
    return m.open + a + (m.eq if sep else []) + b + m.close


def _query(m: _Markers, key: List[int], value: List[int], sep: bool) -> Tuple[List[int], int]:
    """Query tokens and the offset of the value's first token inside them."""
    head = m.query + key + (m.eq if sep else [])
    return head + value + m.close, len(head)


def _is_byte_level(tokenizer) -> bool:
    return getattr(tokenizer, "unique_identifiers", {}).get("class") == "ByteTokenizer"


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
    if spec.value_alphabet not in VALUE_ALPHABETS:
        raise ValueError(f"value_alphabet={spec.value_alphabet!r}: must be one of {sorted(VALUE_ALPHABETS)}")
    high = spec.value_alphabet == "high"
    if high and not _is_byte_level(tokenizer):
        raise ValueError("value_alphabet='high' needs the byte tokenizer (one token per byte value)")
    values = ["".join(rng.choice(list(VALUE_ALPHABETS[spec.value_alphabet]), spec.value_len)) for _ in keys]
    kid = [m.enc(k) for k in keys]
    vid = [[ord(c) for c in v] if high else m.enc(v) for v in values]
    records = [_record(m, k, v, spec.separator, spec.value_first) for k, v in zip(kid, vid)]
    r = max(len(x) for x in records)
    if spec.n_queries < 1:
        raise ValueError(f"n_queries={spec.n_queries}: must be >= 1")
    tail, value_off = _query(m, kid[0], vid[0], spec.separator)
    order = list(rng.permutation(np.arange(1, spec.n_pairs)))
    while len(order) < spec.n_queries - 1:  # beyond n_pairs: further rounds over every record
        order += list(rng.permutation(spec.n_pairs))
    for i in order[:spec.n_queries - 1]:
        q = _query(m, kid[i], vid[i], spec.separator)[0]
        tail = tail + (q[len(m.query):-len(m.close)] if spec.compact_queries else q)
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
    if high:
        scrub |= set(range(0x80, 0x100))
    ctx[np.isin(ctx, np.fromiter(scrub, dtype=np.int64))] = m.space[0]
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
            "value_ids": [int(t) for t in ids[context + value_off:context + value_off + len(vid[0])]],
            "distractor_pos": placed[1:], "record_ids": records[0]}
    return ids, meta


def copy_alphabet(tokenizer) -> np.ndarray:
    """Token ids a copy sample draws from: every id below ``vocab_size`` except the markers,
    the end-of-document id and the pad id (int64 [n])."""
    m = _Markers(tokenizer)
    banned = {*m.special, tokenizer.eod, getattr(tokenizer, "pad", None)}
    return np.array([t for t in range(tokenizer.vocab_size) if t not in banned], dtype=np.int64)


def make_copy_sample(rng: np.random.Generator, seq_length: int, tokenizer, span_len: int = 16,
                     alphabet: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict[str, object]]:
    """One span-copy sample without its end-of-document id::

        [ C random tokens ][ QUERY span ][ QUERY span ] ... [ QUERY span(cut) ]

    The first half (``C = seq_length - 1 - (seq_length - 1) // 2`` tokens) is uniformly random
    ids; the second half is query marker + ``span_len`` tokens copied from a random position
    of the context, again and again (the last span cut to fit). Within a span every token but
    the first is predicted by one induction step (find the current token in the context, copy
    its successor): the circuit that one-token-key retrieval uses. The spans start at random
    offsets, so a fixed-distance (positional) copy does not solve it. With the answer-only loss
    (from the first query marker on) a span-copy sample supervises ~``seq_length / 2`` such
    tokens where a needle sample supervises ``n_queries`` retrievals; mixed into the training
    data (``copy_fraction`` of :func:`sample_stream`) it forms the circuit early.

    Args:
        rng: random source.
        seq_length: tokens per sample, the end-of-document id included.
        tokenizer: ``tokenize`` / ``eod`` / ``vocab_size``.
        span_len: tokens per copied span (>= 2).
        alphabet: ids to draw from (default :func:`copy_alphabet`).
    Returns:
        (ids int64 [seq_length - 1], meta ``{"kind": "copy", "context_len", "span_starts"}``).
    Raises:
        ValueError: ``span_len`` < 2 or the sample is too short for one span.
    """
    if span_len < 2:
        raise ValueError(f"span_len={span_len}: must be >= 2")
    tail_len = (seq_length - 1) // 2
    context = seq_length - 1 - tail_len
    if tail_len < 2 or context < span_len:
        raise ValueError(f"seq_length={seq_length}: too short for a copy span of {span_len} tokens")
    alphabet = copy_alphabet(tokenizer) if alphabet is None else alphabet
    ctx = rng.choice(alphabet, context)
    tail: List[int] = []
    starts: List[int] = []
    q = query_marker_id(tokenizer)
    while len(tail) < tail_len:
        start = int(rng.integers(0, context - span_len + 1))
        starts.append(start)
        tail += [q, *ctx[start:start + span_len].tolist()]
    ids = np.concatenate([ctx, np.asarray(tail[:tail_len], dtype=np.int64)]).astype(np.int64)
    return ids, {"kind": "copy", "context_len": int(context), "span_starts": starts}


def sample_stream(n: int, spec: NeedleSpec, filler: np.ndarray, tokenizer, seed: int,
                  depths: Optional[Sequence[float]] = None, copy_fraction: float = 0.0,
                  copy_span: int = 16) -> Iterator[Tuple[np.ndarray, Dict[str, object]]]:
    """``n`` samples; depth uniform in [0, 1] per sample, or cycling through ``depths``.

    With ``copy_fraction`` > 0 each sample is, independently with that probability, a copy
    sample (:func:`make_copy_sample` with ``span_len=copy_span``, meta ``kind: copy``) instead of a needle sample (meta
    ``kind: needle``): a fixed mixture, since the training loader shuffles documents.

    Raises:
        ValueError: ``copy_fraction`` outside [0, 1).
    """
    if not 0.0 <= copy_fraction < 1.0:
        raise ValueError(f"copy_fraction={copy_fraction}: must be in [0, 1)")
    rng = np.random.default_rng(seed)
    alphabet = copy_alphabet(tokenizer) if copy_fraction > 0 else None
    for i in range(n):
        depth = float(depths[i % len(depths)]) if depths else float(rng.uniform(0.0, 1.0))
        if copy_fraction > 0 and rng.random() < copy_fraction:
            yield make_copy_sample(rng, spec.seq_length, tokenizer, copy_span, alphabet)
            continue
        ids, meta = make_sample(rng, filler, spec, depth, tokenizer)
        yield ids, {"kind": "needle", **meta}


class _IdsTokenizer:
    """Adapter for ``write_indexed_dataset``: documents are already token ids."""

    def __init__(self, tokenizer) -> None:
        self.vocab_size, self.eod = tokenizer.vocab_size, tokenizer.eod

    @staticmethod
    def tokenize(ids):
        return ids


def write_needle_dataset(prefix: str, n: int, spec: NeedleSpec, filler: np.ndarray, tokenizer,
                         seed: int, copy_fraction: float = 0.0, copy_span: int = 16) -> Dict[str, object]:
    """Write ``prefix``.bin/.idx (one sample per document, via the project's preprocess code)
    and ``prefix``_meta.jsonl (one line of sample metadata per document); ``copy_fraction``
    and ``copy_span`` as in :func:`sample_stream`."""
    from nsa_tools.preprocess_data import write_indexed_dataset

    metas: List[Dict[str, object]] = []

    def docs():
        for ids, meta in sample_stream(n, spec, filler, tokenizer, seed, copy_fraction=copy_fraction,
                                       copy_span=copy_span):
            metas.append(meta)
            yield ids

    stats = write_indexed_dataset(docs(), prefix, _IdsTokenizer(tokenizer))
    with open(f"{prefix}_meta.jsonl", "w", encoding="utf-8") as f:
        for meta in metas:
            f.write(json.dumps(meta) + "\n")
    if stats["tokens"] != n * spec.seq_length:
        raise RuntimeError(f"{prefix}: wrote {stats['tokens']} tokens, expected {n} x {spec.seq_length}")
    return {**stats, "spec": asdict(spec), "seed": seed, "copy_fraction": copy_fraction,
            "copy_span": copy_span, "copy_samples": sum(m["kind"] == "copy" for m in metas)}


def corpus_tokens(prefix: str) -> np.ndarray:
    """All tokens of an indexed dataset (``prefix``.bin/.idx) as one int64 array."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


def read_meta(prefix: str) -> List[Dict[str, object]]:
    """The metadata lines written beside a needle dataset."""
    return [json.loads(x) for x in Path(f"{prefix}_meta.jsonl").read_text().splitlines() if x.strip()]
