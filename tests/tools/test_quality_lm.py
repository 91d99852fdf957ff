"""tools/quality_lm.py --smoke end to end: two arms through the entry point, chunked and resumed.

The first call stops after one chunk (nsa, 2 of 4 steps); the second resumes nsa from its
checkpoint and trains full, then the report must hold both validation curves, the gap
computed from the metrics files, and a real PNG.
"""
import json
import math

from nsa_tools import experiment_runs as X
from tools import quality_lm as Q


def test_quality_lm_smoke_chunked_and_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ["--smoke", "--out-dir", str(tmp_path), "--date", "2000-01-01", "--tag", "t"]
    assert Q.main(common + ["--chunk-iters", "2", "--max-chunks", "1"]) == 0
    assert X.latest_iteration(tmp_path / "nsa" / "checkpoints") == 2
    assert not (tmp_path / "full").exists()
    first = json.loads((tmp_path / "quality-lm-2000-01-01-t.json").read_text())
    assert first["complete"] is False and first["relative_gap"] is None and first["target_met"] is False

    assert Q.main(common) == 0
    report = json.loads((tmp_path / "quality-lm-2000-01-01-t.json").read_text())
    assert report["complete"] is True and report["smoke"] is True
    assert report["train_iters"] == 4 and report["seed"] == 1234 and report["seq_length"] == 128
    assert report["resolved_config"]["model.num_layers"] == 1
    assert "card" in report and "commit" in report
    losses = {}
    for arm in ("nsa", "full"):
        metrics = X.read_metrics(tmp_path / arm / "metrics.jsonl")
        assert sorted(metrics["train"]) == [1, 2, 3, 4]
        assert sorted(metrics["valid"]) == [2, 4]
        r = report["arms"][arm]
        assert r["final_valid_iteration"] == 4 and r["iterations_done"] == 4
        assert r["final_valid_loss"] == metrics["valid"][4]["lm_loss"]
        assert [it for it, _ in r["valid_curve"]] == [2, 4]
        assert math.isfinite(r["final_valid_loss"]) and 0 < r["final_valid_loss"] < math.log(320) + 1
        assert r["params_m"] is not None and r["params_m"] > 0
        # both arms read the same samples: identical consumed-sample counters per step
        assert [m["consumed_samples"] for _, m in sorted(metrics["train"].items())] == [2, 4, 6, 8]
        losses[arm] = r["final_valid_loss"]
    assert report["arms"]["nsa"]["params_m"] != report["arms"]["full"]["params_m"]
    assert "resumed from" in (tmp_path / "nsa" / "log.txt").read_text()
    assert "resumed from" not in (tmp_path / "full" / "log.txt").read_text()
    gap = (losses["nsa"] - losses["full"]) / losses["full"]
    assert report["relative_gap"] == gap
    assert report["target_met"] == (gap <= 0.01)
    png = tmp_path / "quality-lm-2000-01-01-t.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (tmp_path / "quality-lm-2000-01-01-t.md").read_text()
    assert "SMOKE" in md and f"{gap:+.2%}" in md
    assert "complete" in capsys.readouterr().out


def test_quality_lm_rejects_bad_arms_and_keys(tmp_path, capsys):
    assert Q.main(["--smoke", "--out-dir", str(tmp_path), "--arms", "nsa,sparse"]) == 2
    assert Q.main(["--smoke", "--out-dir", str(tmp_path), "model.num_layer=2"]) == 2
    err = capsys.readouterr().err
    assert "--arms" in err and "num_layer" in err
    assert not any(tmp_path.iterdir())
