import json

import pytest

from tools.plot_cp import load_series, main, scaling_rows


def _record(path, rows, topic="cp"):
    path.write_text(json.dumps({"topic": topic, "rows": rows}))
    return path


def _row(impl, gpus, fwd, bwd, seq=1024):
    return {"impl": impl, "seq": seq, "gpus": gpus, "fwd_ms": fwd, "bwd_ms": bwd}


def test_series_and_scaling(tmp_path):
    a = _record(tmp_path / "a.json", [_row("nsa-cp1", 1, 30, 50), _row("cudnn", 1, 99, 99),
                                      _row("nsa-cp2-ring", 2, 20, 30), _row("nsa-cp4-ring", 4, 10, 20)])
    b = _record(tmp_path / "b.json", [_row("nsa-cp4-ring", 4, 9, 16), _row("nsa-cp2-allgather", 2, 25, 25)])
    series = load_series([a, b])
    assert series == {1024: {"ring": {1: 80.0, 2: 50.0, 4: 25.0}, "allgather": {1: 80.0, 2: 50.0}}}
    rows = {(m, g): (s, e) for _, m, g, _, s, e in scaling_rows(series)}
    assert rows[("ring", 4)] == pytest.approx((2.0, 1.0))
    assert rows[("ring", 2)] == pytest.approx((1.0, 1.0))
    assert rows[("ring", 1)] == pytest.approx((50 / 80, 50 / 80 * 2))


def test_main_writes_png(tmp_path, capsys):
    rec = _record(tmp_path / "r.json", [_row("nsa-cp1", 1, 30, 50), _row("nsa-cp2-ring", 2, 20, 30),
                                        _row("nsa-cp4-ring", 4, 11, 16)])
    out = tmp_path / "cp.png"
    assert main([str(rec), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert "| 1024 | ring | 4 | 27.0 | 1.85x | 93% |" in capsys.readouterr().out


def test_rejects_other_records(tmp_path):
    rec = _record(tmp_path / "k.json", [_row("nsa", 1, 1, 1)], topic="kernels")
    with pytest.raises(ValueError, match="not a tools/bench_cp.py record"):
        load_series([rec])
