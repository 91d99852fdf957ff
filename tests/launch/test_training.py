"""End-to-end training through launch/pretrain_nsa.py on CPU (gloo), tiny NSA model.

One uninterrupted 20-step run is the reference for the kill-and-resume test; one 2-rank
torchrun run is the reference for the two-"node" and the mpirun runs.
"""
import math
import os
import signal
import subprocess
import time

import pytest

from tests.launch._runner import BIN, ENTRY, REPO, CONFIG, TINY, clean_env, free_port, pretrain_cmd, run, train_losses

STEPS = 20
DP_STEPS = 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("ref")
    proc = run(pretrain_cmd([f"train_iters={STEPS}", "save_interval=5", f"save={out}/ckpt",
                             f"metrics_file={out}/metrics.jsonl", f"cache_dir={cache_dir}"]))
    return out, proc.stdout


def test_tiny_training_loss_falls_and_writes_checkpoint(reference_run):
    out, stdout = reference_run
    losses = train_losses(out / "metrics.jsonl")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert abs(losses[1] - math.log(320)) < 0.5  # starts near uniform over the padded vocab
    first, last = sum(losses[i] for i in range(1, 6)) / 5, sum(losses[i] for i in range(16, 21)) / 5
    assert last < first - 0.8, (first, last)
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)
    assert (out / "ckpt" / f"iter_{STEPS:07d}" / "metadata.json").exists()
    assert "iteration       20/      20" in stdout and "lm loss:" in stdout and "TFLOP/s/GPU" in stdout
    assert "> summary: 20 iterations" in stdout


def test_kill_and_resume_reproduces_the_loss_curve(reference_run, tmp_path, cache_dir):
    ref_out, _ = reference_run
    args = pretrain_cmd([f"train_iters={STEPS}", "save_interval=5", f"save={tmp_path}/ckpt",
                         f"metrics_file={tmp_path}/metrics.jsonl", f"cache_dir={cache_dir}"])
    tracker = tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"
    proc = subprocess.Popen(args, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if tracker.exists() and tracker.read_text().strip() in ("5", "10"):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed_from = int(tracker.read_text())
    assert 5 <= resumed_from < STEPS
    out = run(args).stdout
    assert f"resumed from" in out and f"(iteration {resumed_from})" in out
    ref, got = train_losses(ref_out / "metrics.jsonl"), train_losses(tmp_path / "metrics.jsonl")
    for it in range(resumed_from + 1, STEPS + 1):
        assert got[it] == ref[it], f"iteration {it}: resumed {got[it]!r} vs uninterrupted {ref[it]!r}"


def _dp_args(out, cache_dir):
    return ["--config", CONFIG, *TINY, f"train_iters={DP_STEPS}", f"metrics_file={out}/metrics.jsonl",
            f"cache_dir={cache_dir}", f"save={out}/ckpt", f"save_interval={DP_STEPS // 2}"]


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("dp2")
    run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", ENTRY, *_dp_args(out, cache_dir)])
    return train_losses(out / "metrics.jsonl")


def test_two_nodes_match_single_node(two_rank_reference, tmp_path, cache_dir):
    port = free_port()

    def node(rank):  # what each of two machines would run; the rendezvous is node 0 on localhost
        return [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", f"--node-rank={rank}",
                "--master-addr=127.0.0.1", f"--master-port={port}", ENTRY, *_dp_args(tmp_path, cache_dir)]

    nodes = [subprocess.Popen(node(r), cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    outs = [n.communicate(timeout=150)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-2000:] for o in outs)
    assert train_losses(tmp_path / "metrics.jsonl") == two_rank_reference
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == str(DP_STEPS)


def test_mpirun_two_ranks_match_torchrun(two_rank_reference, tmp_path, cache_dir):
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("mpiexec not installed (pip install mpich mpi4py)")
    pytest.importorskip("mpi4py")
    out = run([str(mpiexec), "-n", "2", str(BIN / "python"), ENTRY, *_dp_args(tmp_path, cache_dir)], timeout=150)
    assert "(mpi, gloo)" in out.stdout
    assert train_losses(tmp_path / "metrics.jsonl") == two_rank_reference


@pytest.mark.parametrize("cp_mode", ["ring", "allgather"])
def test_context_parallel_two_ranks_match_data_parallel(two_rank_reference, tmp_path, cache_dir, cp_mode):
    """CP=2 splits each sequence where DP=2 splits the batch: the same global step, same losses."""
    run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", ENTRY, *_dp_args(tmp_path, cache_dir),
         "context_parallel_size=2", f"nsa.cp_mode={cp_mode}"], timeout=150)
    got = train_losses(tmp_path / "metrics.jsonl")
    assert got.keys() == two_rank_reference.keys()
    for it, want in two_rank_reference.items():
        assert abs(got[it] - want) <= 1e-4 * abs(want), f"iteration {it}: CP {got[it]!r} vs DP {want!r}"
