"""tools/needle.py: the samples hold the key/value at the stated depth, the scorer reads the
right positions, and --smoke trains both arms and writes an accuracy grid and a heatmap."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nsa_tools import needle_task
from nsa_tools.needle_task import NeedleSpec, make_sample, read_meta
from nsa_tools.tokenizer import ByteTokenizer
from tools import needle as N

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK = ByteTokenizer()
FILLER = np.frombuffer(b"def f(x):\n    return x + 1  # \x01 \x02 \x03 stray markers\n" * 200, np.uint8).astype(np.int64)


def _check_sample(ids, meta, spec):
    """The record sits at the stated position/depth, the query and value close the sample."""
    text = bytes(int(t) for t in ids).decode("latin-1")
    record = f"\x01{meta['key']}={meta['value']}\x02"
    pos, ctx = meta["needle_pos"], meta["context_len"]
    assert len(ids) == spec.seq_length - 1
    assert text[pos:pos + len(record)] == record
    assert abs(pos - meta["depth"] * (ctx - len(record))) <= 0.5
    assert text[ctx:].startswith(f"\x03{meta['key']}={meta['value']}\x02")
    assert text[meta["value_pos"]:meta["value_pos"] + spec.value_len] == meta["value"]
    assert meta["value_ids"] == list(meta["value"].encode())
    assert text.count("\x01") == spec.n_pairs and text.count("\x03") == spec.n_queries  # filler markers scrubbed
    assert text.count(f"\x01{meta['key']}=") == 1  # the key is unique among the records
    starts = sorted([pos, *meta["distractor_pos"]])
    assert all(b - a > len(record) for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_sample_layout(depth):
    spec = NeedleSpec(256, n_pairs=3, key_len=4, value_len=5)
    ids, meta = make_sample(np.random.default_rng(3), FILLER, spec, depth, TOK)
    _check_sample(ids, meta, spec)
    assert meta["depth"] == depth


def test_extra_queries_follow_the_scored_one_and_ask_distractors():
    spec = NeedleSpec(256, n_pairs=4, key_len=2, value_len=3, n_queries=3)
    ids, meta = make_sample(np.random.default_rng(5), FILLER, spec, 0.5, TOK)
    text = bytes(int(t) for t in ids).decode("latin-1")
    queries = text[meta["context_len"]:].split("\x03")[1:]
    assert len(ids) == spec.seq_length - 1 and len(queries) == 3
    assert queries[0] == f"{meta['key']}={meta['value']}\x02"  # the scored query comes first
    assert text[meta["value_pos"]:meta["value_pos"] + spec.value_len] == meta["value"]
    for q in queries[1:]:
        key, value = q[:-1].split("=")
        assert key != meta["key"] and text[:meta["context_len"]].count(f"\x01{key}={value}\x02") == 1
    assert len({q.split("=")[0] for q in queries}) == 3


def test_control_keys_are_single_symbols_found_only_in_records_and_queries():
    spec = NeedleSpec(256, n_pairs=5, key_len=1, value_len=2, n_queries=5, key_alphabet="control")
    dirty = FILLER.copy()
    dirty[::7] = 0x05  # a key symbol inside the filler must be scrubbed
    ids, meta = make_sample(np.random.default_rng(1), dirty, spec, 0.25, TOK)
    text = bytes(int(t) for t in ids).decode("latin-1")
    assert len(meta["key"]) == 1 and meta["key"] in needle_task.CONTROL
    assert text[meta["context_len"]:].startswith(f"\x03{meta['key']}={meta['value']}\x02")
    bare, _ = make_sample(np.random.default_rng(1), dirty, NeedleSpec(**{**spec.__dict__, "separator": False}), 0.25, TOK)
    bare_text = bytes(int(t) for t in bare).decode("latin-1")
    assert bare_text.endswith("\x02") and f"\x01{meta['key']}{meta['value']}\x02" in bare_text
    keys = [c for c in text if c in needle_task.CONTROL]
    assert len(keys) == 10 and sorted(keys[:5]) == sorted(keys[5:])  # each key: once in a record, once queried
    with pytest.raises(ValueError, match="distinct keys"):
        make_sample(np.random.default_rng(0), FILLER, NeedleSpec(256, n_pairs=25, key_len=1, key_alphabet="control"),
                    0.5, TOK)


def test_sample_rejects_bad_shapes():
    with pytest.raises(ValueError, match="depth"):
        make_sample(np.random.default_rng(0), FILLER, NeedleSpec(256), 1.5, TOK)
    with pytest.raises(ValueError, match="too short"):
        make_sample(np.random.default_rng(0), FILLER, NeedleSpec(40, n_pairs=4), 0.5, TOK)
    with pytest.raises(ValueError, match="n_queries"):
        make_sample(np.random.default_rng(0), FILLER, NeedleSpec(256, n_pairs=2, n_queries=0), 0.5, TOK)


class _Oracle(torch.nn.Module):
    """Logits peaked on the next token (shift=1: a perfect model) or the current one (shift=0)."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, pos, mask):
        target = torch.roll(ids, -self.shift, dims=1)
        return torch.nn.functional.one_hot(target, 320).float()


def test_accuracy_grid_scores_the_value_positions():
    needle = {**N.NEEDLE_DEFAULTS, "n_pairs": 2, "eval_depths": [0.0, 0.5, 1.0], "eval_samples": 3, "eval_batch": 2}
    perfect = N.accuracy_grid(_Oracle(1), TOK, needle, [128, 192], FILLER, seed=1)
    assert perfect["accuracy"] == [[1.0] * 3] * 2 and perfect["token_accuracy"] == [[1.0] * 3] * 2
    wrong = N.accuracy_grid(_Oracle(0), TOK, needle, [128], FILLER, seed=1)
    assert wrong["accuracy"] == [[0.0] * 3]


def test_needle_smoke_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "tools/needle.py", "--smoke", "--out-dir", str(tmp_path),
                           "--date", "2000-01-01"], cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    spec = NeedleSpec(128, n_pairs=2, key_len=3, value_len=2, n_queries=2)
    for split in ("train", "valid"):
        prefix = str(tmp_path / "data" / f"needle_128_{split}")
        docs, metas = IndexedDataset(prefix), read_meta(prefix)
        assert len(docs) == len(metas) == {"train": 16, "valid": 4}[split]
        for i, meta in enumerate(metas):
            doc = np.asarray(docs[i])
            assert len(doc) == 128 and doc[-1] == TOK.eod
            _check_sample(doc[:-1], meta, spec)
        assert len({m["key"] for m in metas}) > 1 and 0 < np.mean([m["depth"] for m in metas]) < 1
    assert "data.loss_from_token=3" in (tmp_path / "nsa" / "log.txt").read_text()  # loss_on: queries
    report = json.loads((tmp_path / "needle-2000-01-01.json").read_text())
    assert set(report["arms"]) == {"nsa", "full"}
    for arm, r in report["arms"].items():
        assert r["attention_type"] == arm and r["lengths"] == [96, 128] and r["depths"] == [0.0, 0.5, 1.0]
        acc = np.asarray(r["accuracy"])
        assert acc.shape == (2, 3) and ((acc >= 0) & (acc <= 1)).all()
        assert r["checkpoint"].endswith("iter_0000003")
    assert set(report["target_met"]) == {"nsa", "full"} and "commit" in report
    png = tmp_path / "needle-2000-01-01.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_copy_sample_spans_come_from_the_context_at_random_offsets():
    ids, meta = needle_task.make_copy_sample(np.random.default_rng(2), 256, TOK, span_len=12)
    q = needle_task.query_marker_id(TOK)
    ctx = meta["context_len"]
    assert len(ids) == 255 and meta["kind"] == "copy" and ctx == 128
    assert q not in ids[:ctx] and TOK.eod not in ids and ids[ctx] == q
    spans = [s for s in np.split(ids[ctx:], np.flatnonzero(ids[ctx:] == q))[1:]]
    assert len(spans) == len(meta["span_starts"]) == -(-127 // 13)
    for span, start in zip(spans, meta["span_starts"]):
        assert span[0] == q and (span[1:] == ids[start:start + len(span) - 1]).all()
    assert len(set(meta["span_starts"])) > 1  # not a fixed-distance copy
    with pytest.raises(ValueError, match="span_len"):
        needle_task.make_copy_sample(np.random.default_rng(0), 256, TOK, span_len=1)
    with pytest.raises(ValueError, match="too short"):
        needle_task.make_copy_sample(np.random.default_rng(0), 16, TOK, span_len=12)


def test_copy_fraction_mixes_copy_samples_into_the_stream():
    spec = NeedleSpec(128, n_pairs=3, key_len=1, value_len=1, n_queries=3, key_alphabet="control", separator=False)
    plain = [m for _, m in needle_task.sample_stream(8, spec, FILLER, TOK, seed=4)]
    assert {m["kind"] for m in plain} == {"needle"}
    mixed = list(needle_task.sample_stream(200, spec, FILLER, TOK, seed=4, copy_fraction=0.5, copy_span=8))
    kinds = [m["kind"] for _, m in mixed]
    assert 70 < kinds.count("copy") < 130 and all(len(ids) == 127 for ids, _ in mixed)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="copy_fraction"):
            next(needle_task.sample_stream(1, spec, FILLER, TOK, seed=0, copy_fraction=bad))


@pytest.mark.parametrize("key,value,match", [("copy_fraction", 1.0, "copy_fraction"), ("copy_fraction", "x", "copy_fraction"),
                                             ("copy_span", 1, "copy_span"), ("loss_on", "context", "loss_on"),
                                             ("eval_n_queries", 0, "eval_n_queries"), ("value_alphabet", "hex", "value_alphabet"),
                                             ("key_alphabet", "greek", "key_alphabet")])
def test_bad_needle_settings_are_rejected(tmp_path, key, value, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data": {"seq_length": 128}, "needle": {key: value}}))
    with pytest.raises(ValueError, match=match):
        N.load_needle_config(N.parse_args(["--config", str(cfg)]))


def test_queries_past_n_pairs_run_further_rounds_over_all_records():
    spec = NeedleSpec(256, n_pairs=3, key_len=1, value_len=1, n_queries=8, key_alphabet="control", separator=False)
    ids, meta = make_sample(np.random.default_rng(6), FILLER, spec, 0.5, TOK)
    text = bytes(int(t) for t in ids).decode("latin-1")
    queries = text[meta["context_len"]:].split("\x03")[1:]
    assert len(queries) == 8 and queries[0] == f"{meta['key']}{meta['value']}\x02"
    records = {q for q in queries}
    assert len(records) == 3 and all(f"\x01{q}" in text[:meta["context_len"]] for q in records)
    assert len(set(queries[:3])) == 3 and len(set(queries[3:6])) == 3  # each round asks every record once


def test_mqar_layout_high_values_compact_queries_value_first():
    """One-token keys and values, values from the 128 high bytes (scrubbed from the filler),
    bare "key value" queries after the first, records optionally value first."""
    dirty = FILLER.copy()
    dirty[::5] = 0xC3  # a value symbol inside the filler must be scrubbed
    for value_first in (False, True):
        spec = NeedleSpec(256, n_pairs=6, key_len=1, value_len=1, n_queries=10, key_alphabet="control",
                          separator=False, value_alphabet="high", value_first=value_first, compact_queries=True)
        ids, meta = make_sample(np.random.default_rng(8), dirty, spec, 0.4, TOK)
        ctx, key, val = meta["context_len"], ord(meta["key"]), meta["value_ids"][0]
        assert len(ids) == 255 and 0x80 <= val < 0x100 and meta["value_ids"] == [ord(meta["value"])]
        high = ids[:ctx][(ids[:ctx] >= 0x80) & (ids[:ctx] < 0x100)]
        assert len(high) == 6  # only the records' values
        rec = [0x01, val, key, 0x02] if value_first else [0x01, key, val, 0x02]
        assert ids[meta["needle_pos"]:meta["needle_pos"] + 4].tolist() == rec
        tail = ids[ctx:].tolist()
        assert tail[:4] == [0x03, key, val, 0x02] and ids[meta["value_pos"]] == val
        pairs = np.array(tail[4:]).reshape(-1, 2)
        assert len(pairs) == 9 and np.isin(pairs[:, 0], [ord(c) for c in needle_task.CONTROL]).all() and (pairs[:, 1] >= 0x80).all()
        lookup = {int(ids[p + (2 if value_first else 1)]): int(ids[p + (1 if value_first else 2)])
                  for p in [meta["needle_pos"], *meta["distractor_pos"]]}
        assert all(lookup[k] == v for k, v in pairs.tolist())  # every bare query asks a record's value
    with pytest.raises(ValueError, match="value_alphabet"):
        make_sample(np.random.default_rng(0), FILLER, NeedleSpec(256, value_alphabet="hex"), 0.5, TOK)


def test_accuracy_grid_on_the_mqar_design_uses_eval_n_queries():
    needle = {**N.NEEDLE_DEFAULTS, "n_pairs": 4, "key_len": 1, "value_len": 1, "key_alphabet": "control",
              "separator": False, "value_alphabet": "high", "compact_queries": True, "n_queries": 400,
              "eval_n_queries": 4, "eval_depths": [0.0, 1.0], "eval_samples": 2, "eval_batch": 2}
    perfect = N.accuracy_grid(_Oracle(1), TOK, needle, [96, 128], FILLER, seed=1)  # 400 queries would not fit
    assert perfect["accuracy"] == [[1.0] * 2] * 2
    assert N.accuracy_grid(_Oracle(0), TOK, needle, [128], FILLER, seed=1)["accuracy"] == [[0.0] * 2]
