"""preprocess_data: jsonl/text -> Megatron indexed dataset, read back exactly."""
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from nsa_tools.preprocess_data import main as preprocess_main
from nsa_tools.tokenizer import BYTE_EOD, ByteTokenizer


def test_round_trip_jsonl_and_text(tmp_path):
    docs = ["def f(x):\n    return x + 1\n", "héllo wörld ✓", "third"]
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d}) for d in docs[:2]) + "\n\n")
    txt = tmp_path / "b.txt"
    txt.write_text(docs[2])
    prefix = tmp_path / "out" / "ds"
    assert preprocess_main(["--input", str(jl), str(txt), "--output-prefix", str(prefix)]) == 0
    ds = IndexedDataset(str(prefix))
    assert len(ds) == 3
    tok = ByteTokenizer()
    for i, text in enumerate(docs):
        ids = ds[i]
        assert ids[-1] == BYTE_EOD
        np.testing.assert_array_equal(ids[:-1], tok.tokenize(text))
        assert tok.detokenize(ids) == text
    np.testing.assert_array_equal(ds.document_indices, [0, 1, 2, 3])


def test_bad_jsonl_line_is_reported(tmp_path, capsys):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert preprocess_main(["--input", str(jl), "--output-prefix", str(tmp_path / "x")]) == 1
    assert "bad.jsonl:2: no 'text' field" in capsys.readouterr().err


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))
    src = tmp_path / "t.txt"
    src.write_text("hello world hello")
    prefix = tmp_path / "hf"
    assert preprocess_main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer", str(path)]) == 0
    dataset = IndexedDataset(str(prefix))  # kept alive: its items are views of its memory map
    np.testing.assert_array_equal(dataset[0], [2, 3, 2, 0])
