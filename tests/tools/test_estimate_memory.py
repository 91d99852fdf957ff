"""estimate_memory: the paper's 27B MoE at 64k fits 80 GB on its named layout; bad layouts do not."""
from nsa_tools.estimate_memory import main as estimate_main

from tests.launch._runner import REPO

CFG_27B = str(REPO / "configs" / "nsa_27b_moe_64k.yaml")
CFG_1B = str(REPO / "configs" / "nsa_1b_64k_h100.yaml")


def test_27b_fits_80gb_on_its_layout(capsys):
    assert estimate_main(["--config", CFG_27B, "--gpus", "128", "--vocab", "129280"]) == 0
    out = capsys.readouterr().out
    assert "128 GPUs = TP 2 x PP 4 x CP 4 x DP 4" in out and "fits" in out
    total_params = float(out.split(": ", 1)[1].split("B parameters")[0])
    assert 26.0 < total_params < 29.0  # the paper's 27B


def test_27b_without_model_parallelism_does_not_fit(capsys):
    rc = estimate_main(["--config", CFG_27B, "--gpus", "8", "--vocab", "129280",
                        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                        "parallel.context_parallel_size=1", "parallel.sequence_parallel=false"])
    assert rc == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_1b_fits_one_h100_and_counts_nsa_flops(capsys):
    assert estimate_main(["--config", CFG_1B, "--gpus", "1"]) == 0
    nsa_out = capsys.readouterr().out
    assert estimate_main(["--config", CFG_1B, "--gpus", "1", "attention_type=full"]) == 0
    full_out = capsys.readouterr().out
    flops = [float(o.split("step FLOPs")[1].split(": ")[1].split(" total")[0]) for o in (nsa_out, full_out)]
    assert flops[0] < 0.5 * flops[1]  # at 64k NSA attends ~1/9 of the keys


def test_bad_layout_is_one_line(capsys):
    assert estimate_main(["--config", CFG_27B, "--gpus", "100", "--vocab", "129280"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpus 100: not divisible by tp*pp*cp = 32"
