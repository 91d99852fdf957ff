"""build_corpus: deterministic stdlib corpus with a disjoint held-out split."""
import json

from megatron.core.datasets.indexed_dataset import IndexedDataset

from nsa_tools.build_corpus import build_corpus, ensure_corpus, list_source_files, stdlib_root


def _build(prefix):
    return build_corpus(str(prefix), max_mb=0.4, valid_every=5)


def test_corpus_is_deterministic_and_split_is_disjoint(tmp_path):
    m1, m2 = _build(tmp_path / "a"), _build(tmp_path / "b")
    for split in ("train", "valid"):
        assert m1[split] == m2[split]
        assert (tmp_path / f"a_{split}.bin").read_bytes() == (tmp_path / f"b_{split}.bin").read_bytes()
        assert (tmp_path / f"a_{split}.idx").read_bytes() == (tmp_path / f"b_{split}.idx").read_bytes()
    assert not set(m1["train"]["files"]) & set(m1["valid"]["files"])
    assert m1["valid"]["documents"] >= 1 and m1["train"]["documents"] > m1["valid"]["documents"]
    ds = IndexedDataset(str(tmp_path / "a_train"))
    assert len(ds) == m1["train"]["documents"]
    first = bytes(int(b) for b in ds[0][:-1]).decode("utf-8", errors="replace")
    assert first.startswith("# file: " + m1["train"]["files"][0])
    on_disk = json.loads((tmp_path / "a_manifest.json").read_text())
    assert on_disk["train"]["files"] == m1["train"]["files"]


def test_file_order_is_sorted_and_budgeted():
    files = list_source_files(stdlib_root(), max_bytes=200_000)
    rel = [p.relative_to(stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel)
    assert sum(p.stat().st_size for p in files) <= 200_000
    assert not any("/test/" in "/" + r for r in rel)


def test_ensure_corpus_builds_once(tmp_path):
    train, valid = ensure_corpus(str(tmp_path), max_mb=0.2)
    stamp = (tmp_path / (train.rsplit("/", 1)[1] + ".bin")).stat().st_mtime_ns
    assert ensure_corpus(str(tmp_path), max_mb=0.2) == (train, valid)
    assert (tmp_path / (train.rsplit("/", 1)[1] + ".bin")).stat().st_mtime_ns == stamp
