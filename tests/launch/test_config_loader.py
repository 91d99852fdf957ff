"""Config loading: YAML + overrides, type checks, one-line errors (no training)."""
import subprocess
import sys

import pytest

from nsa_launch.config_loader import ConfigError, build_model_config, load_config
from tests.launch._runner import CONFIG, ENTRY, REPO, clean_env


def test_tiny_config_loads_and_builds_nsa_config():
    cfg = load_config(CONFIG)
    config = build_model_config(cfg, use_cpu_initialization=True)
    assert config.attention_type == "nsa"
    assert config.num_layers == cfg.model["num_layers"]
    assert config.nsa_topk == cfg.model["nsa_topk"]
    assert cfg.data.global_batch_size % cfg.data.micro_batch_size == 0


def test_override_forms_apply_in_order():
    cfg = load_config(CONFIG, ["training.lr=2e-3", "--num-layers", "3", "--nsa-topk", "5",
                               "nsa.window=48", "--bf16", "train_iters=7", "--save=/tmp/x"])
    assert cfg.training.lr == 2e-3 and isinstance(cfg.training.lr, float)
    assert cfg.model["num_layers"] == 3
    assert cfg.model["nsa_topk"] == 5 and cfg.model["nsa_window"] == 48
    assert cfg.training.bf16 is True and cfg.training.train_iters == 7
    assert cfg.checkpoint.save == "/tmp/x"


@pytest.mark.parametrize("overrides, message", [
    (["num_layer=3"], "unknown key 'num_layer' (did you mean 'num_layers'?)"),
    (["training.lr=fast"], "training.lr: expected float, got 'fast'"),
    (["--num-layers", "two"], "model.num_layers: expected int, got 'two'"),
    (["bf16=1"], "training.bf16: expected bool, got 1"),
    (["model.nsa_topk=4"], "did you mean 'nsa.topk'?"),
    (["optim.lr=1"], "unknown section 'optim'"),
    (["lr"], "cannot parse argument 'lr'"),
    (["model.normalization=BatchNorm"], "model.normalization: must be one of"),
])
def test_bad_override_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_combination_reported_by_nsa_config():
    cfg = load_config(CONFIG, ["nsa.cmp_stride=5"])
    with pytest.raises(ConfigError, match="nsa_cmp_stride=5"):
        build_model_config(cfg)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 2\n  hidden_size: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
    bad.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'model.hiden_size' \\(did you mean 'hidden_size'\\?\\)"):
        load_config(str(bad))


def test_entry_point_bad_config_exits_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  train_iters: many\n")
    proc = subprocess.run([sys.executable, ENTRY, "--config", str(bad)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert lines == ["error: training.train_iters: expected int, got 'many' (str)"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_resolved_settings(capsys):
    from nsa_launch.pretrain_nsa import main

    assert main(["--config", CONFIG, "--dry-run", "--nsa-window", "48", "train_iters=3"]) == 0
    out = capsys.readouterr().out
    assert "model.nsa_window = 48" in out and "training.train_iters = 3" in out
    assert main(["--config", CONFIG, "--dry-run", "nsa.window=-1"]) == 2
    assert "nsa_window=-1" in capsys.readouterr().err
