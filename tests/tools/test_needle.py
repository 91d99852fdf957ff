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
        make_sample(np.random.default_rng(0), FILLER, NeedleSpec(256, n_pairs=2, n_queries=3), 0.5, TOK)


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
