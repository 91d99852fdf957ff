"""tools/plot_selection.py: block indices and gates come from the real forward of a trained
checkpoint, equal nsa_attention(..., return_block_indices=True) and the independent naive
oracle on the layer's own q/k, and the CLI draws a PNG."""
import json
import os
import subprocess
import sys

import torch

from tests.distributed_utils import init_megatron, run_distributed
from tests.kernels.naive_oracle import naive_nsa
from tests.launch._runner import TINY, clean_env, pretrain_cmd, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT_FILE = os.path.join(REPO, "nsa_megatron", "attention.py")


def _capture_worker(rank, world, root):
    from nsa_megatron.functional import nsa_attention
    from nsa_tools import generate as G
    from tools import plot_selection as P

    init_megatron()
    model, tok, flat = G.load_model(G.checkpoint_path(root, None))
    ids = [int(t) for t in tok.tokenize(open(TEXT_FILE).read())][:96]
    seen_q = []
    cores = P.nsa_core_modules(model)
    handles = [c.register_forward_pre_hook(lambda m, a, kw: seen_q.append(a[0].detach().clone()), with_kwargs=True)
               for c in cores]
    records = P.capture_selection(model, torch.tensor([ids]), keep_inputs=True)
    for h in handles:
        h.remove()
    out = []
    for rec, q_seen in zip(records, seen_q):
        assert torch.equal(rec["q"], q_seen)  # the hook saw the layer's real inputs
        hp = rec["hparams"]
        _, idx = nsa_attention(rec["q"], rec["k"], rec["v"], rec["k_cmp"], rec["v_cmp"], rec["gates"],
                               rec["cu_seqlens"], k_win=rec["k_win"], v_win=rec["v_win"], scale=rec["scale"],
                               backend="reference", return_block_indices=True, **hp)
        _, naive_idx = naive_nsa(rec["q"], rec["k"], rec["v"], rec["k_cmp"], rec["v_cmp"], rec["gates"], [len(ids)],
                                 k_win=rec["k_win"], v_win=rec["v_win"], scale=rec["scale"], **hp)
        out.append({"layer": rec["layer"], "tool": rec["block_indices"], "api": idx, "naive": naive_idx,
                    "gates": rec["gates"], "diff": rec["max_abs_diff"]})
    return out, len(ids)


def test_plot_selection_from_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    run(pretrain_cmd(["num_layers=2", "train_iters=3", "eval_iters=0", f"save={ckpt}"]), timeout=150)

    (layers, n), = run_distributed(_capture_worker, 1, str(ckpt), timeout=150)
    assert [r["layer"] for r in layers] == [1, 2]
    topk = int(next(a.split("=")[1] for a in TINY if a.startswith("nsa.topk=")))
    for r in layers:
        assert r["tool"].shape == (n, 2, topk) and r["tool"].dtype == torch.int32
        assert torch.equal(r["tool"], r["api"])
        assert torch.equal(r["tool"], r["naive"])
        assert r["diff"] == 0.0
        assert r["gates"].shape == (n, 4, 3) and 0 < r["gates"].min() and r["gates"].max() < 1
    assert not torch.equal(layers[0]["tool"], layers[1]["tool"]) or not torch.equal(layers[0]["gates"], layers[1]["gates"])

    png, js = tmp_path / "sel.png", tmp_path / "sel.json"
    proc = subprocess.run([sys.executable, "tools/plot_selection.py", "--load", str(ckpt), "--text-file", TEXT_FILE,
                           "--kv-head", "1", "--out", str(png), "--json", str(js)],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = json.loads(js.read_text())
    assert summary["kv_head"] == 1 and summary["tokens"] == 128 and len(summary["layers"]) == 2
    for layer in summary["layers"]:
        assert layer["max_abs_diff_vs_layer_output"] == 0.0
        assert all(0 < g < 1 for g in layer["mean_gates"].values())
        freq = layer["block_selection_frequency"]
        assert len(freq) == 4 and freq[0] == 1.0 and all(0 <= f <= 1 for f in freq)

    bad = subprocess.run([sys.executable, "tools/plot_selection.py", "--load", str(ckpt), "--text", "x" * 64,
                          "--kv-head", "2", "--out", str(tmp_path / "no.png")],
                         cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--kv-head 2" in bad.stderr and not (tmp_path / "no.png").exists()
