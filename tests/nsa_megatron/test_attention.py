"""NSASelfAttention on CPU: equals nsa_attention on the same projections, packs, branch modes."""
import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import build_module

from nsa_megatron.functional import nsa_attention
from nsa_megatron.spec import get_gpt_layer_with_nsa_spec
from tests.distributed_utils import init_megatron, run_distributed
from tests.nsa_megatron.gpt_harness import make_config

HIDDEN = 64


def _layer(**overrides):
    init_megatron()
    cfg = make_config(**overrides)
    spec = get_gpt_layer_with_nsa_spec(cfg).submodules.self_attention
    torch.manual_seed(0)
    layer = build_module(spec, config=cfg, layer_number=1)
    with torch.no_grad():  # make every parameter (biases included) non-trivial
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, layer


def _rope_naive(x, pos, dim, base=10000.0):
    """x [N, H, D] rotated at integer positions pos [N] (rotate-half convention)."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = pos.float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)[:, None, :]
    x1, x2 = x.chunk(2, -1)
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def _direct_worker(rank, world, branch_kv):
    cfg, layer = _layer(nsa_branch_kv=branch_kv)
    s, b = 96, 2
    hidden = torch.randn(s, b, HIDDEN, generator=torch.Generator().manual_seed(1))
    freqs = RotaryEmbedding(kv_channels=cfg.kv_channels, rotary_percent=1.0)(s)
    out, bias = layer(hidden, None, rotary_pos_emb=freqs)
    if bias is not None:
        out = out + bias

    # the same computation written out by hand
    G, dqk, dv, hkv = 2, cfg.kv_channels, cfg.nsa_v_dim, cfg.num_query_groups
    mixed = layer.linear_qkv(hidden)[0].view(s, b, hkv, -1).transpose(0, 1).reshape(b * s, hkv, -1)
    widths = [G * dqk] + ([dqk, dv] * (3 if branch_kv == "independent" else 1)) + [3 * G]
    parts = list(torch.split(mixed, widths, dim=-1))
    q = parts[0].reshape(b * s, hkv * G, dqk)
    gates = torch.sigmoid(parts[-1].reshape(b * s, hkv * G, 3))
    kv = parts[1:-1]
    (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win) = (kv[0:2], kv[2:4], kv[4:6]) if len(kv) == 6 else [kv] * 3
    pos = torch.arange(s).repeat(b)
    q, k_slc, k_win = (_rope_naive(x, pos, dqk) for x in (q, k_slc, k_win))
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32)
    core = layer.core_attention
    kc, vc = core.k_compressor(k_cmp, cu), core.v_compressor(v_cmp, cu)
    lc = (s - cfg.nsa_cmp_block) // cfg.nsa_cmp_stride + 1
    cpos = (torch.arange(lc) * cfg.nsa_cmp_stride + cfg.nsa_cmp_block - 1).repeat(b)
    kc = _rope_naive(kc, cpos, dqk)
    o = nsa_attention(
        q, k_slc, v_slc, kc, vc, gates, cu, k_win=k_win, v_win=v_win, backend="reference",
        cmp_block=cfg.nsa_cmp_block, cmp_stride=cfg.nsa_cmp_stride, slc_block=cfg.nsa_slc_block,
        topk=cfg.nsa_topk, window=cfg.nsa_window, init_blocks=cfg.nsa_init_blocks,
        local_blocks=cfg.nsa_local_blocks,
    )
    o = o.reshape(b, s, -1).transpose(0, 1)
    want, want_bias = layer.linear_proj(o)
    if want_bias is not None:
        want = want + want_bias
    return float((out - want).norm() / want.norm()), tuple(out.shape)


@pytest.mark.parametrize("branch_kv", ["independent", "shared"])
def test_layer_equals_nsa_attention_on_same_projections(branch_kv):
    (err, shape), = run_distributed(_direct_worker, 1, branch_kv)
    assert shape == (96, 2, HIDDEN)
    assert err <= 1e-5


def _packed_worker(rank, world):
    cfg, layer = _layer()
    lens = [40, 88]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randn(n, 1, HIDDEN, generator=g, requires_grad=True) for n in lens]
    freqs = RotaryEmbedding(kv_channels=cfg.kv_channels, rotary_percent=1.0)(max(lens))
    separate = [layer(x, None, rotary_pos_emb=freqs[: x.shape[0]])[0] for x in seqs]
    grads_sep = torch.autograd.grad(sum((o ** 2).sum() for o in separate), seqs)

    packed = torch.cat([x.detach() for x in seqs]).requires_grad_(True)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    out = layer(packed, None, rotary_pos_emb=freqs, packed_seq_params=psp)[0]
    (grad_packed,) = torch.autograd.grad((out ** 2).sum(), packed)
    want = torch.cat(separate)
    return (
        float((out - want).norm() / want.norm()),
        float((grad_packed - torch.cat(grads_sep)).norm() / torch.cat(grads_sep).norm()),
    )


def test_packed_thd_equals_separate_sequences():
    (out_err, grad_err), = run_distributed(_packed_worker, 1)
    assert out_err <= 1e-5 and grad_err <= 1e-5


def _backward_worker(rank, world, branch_kv):
    cfg, layer = _layer(nsa_branch_kv=branch_kv)
    hidden = torch.randn(64, 2, HIDDEN, requires_grad=True)
    freqs = RotaryEmbedding(kv_channels=cfg.kv_channels, rotary_percent=1.0)(64)
    out = layer(hidden, None, rotary_pos_emb=freqs)[0]
    out.square().sum().backward()
    width = layer.group_width
    gate_rows = torch.zeros(layer.linear_qkv.weight.shape[0], dtype=torch.bool)
    for g in range(cfg.num_query_groups):
        gate_rows[(g + 1) * width - 6 : (g + 1) * width] = True
    return {
        "finite": bool(torch.isfinite(out).all()),
        "input_grad": float(hidden.grad.norm()),
        "gate_grad": float(layer.linear_qkv.weight.grad[gate_rows].norm()),
        "compressor_grads": {n: float(p.grad.norm()) for n, p in layer.core_attention.named_parameters()},
    }


@pytest.mark.parametrize("branch_kv", ["independent", "shared"])
def test_backward_reaches_gates_and_compressors(branch_kv):
    (r,) = run_distributed(_backward_worker, 1, branch_kv)
    assert r["finite"] and r["input_grad"] > 0 and r["gate_grad"] > 0
    assert r["compressor_grads"] and all(v > 0 for v in r["compressor_grads"].values())


def _bad_input_worker(rank, world):
    cfg, layer = _layer()
    hidden = torch.randn(32, 1, HIDDEN)
    msgs = []
    for kwargs in (dict(key_value_states=hidden), dict(attention_bias=hidden)):
        try:
            layer(hidden, None, **kwargs)
        except ValueError as e:
            msgs.append(str(e))
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nsa_megatron.attention import NSASelfAttention

    plain = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4)
    try:
        NSASelfAttention(plain, get_gpt_layer_with_nsa_spec(cfg).submodules.self_attention.submodules, 1)
    except ValueError as e:
        msgs.append(str(e))
    return msgs


def test_bad_inputs_raise_value_errors_naming_the_argument():
    (msgs,) = run_distributed(_bad_input_worker, 1)
    assert len(msgs) == 3
    assert msgs[0].startswith("key_value_states") and msgs[1].startswith("attention_bias")
    assert msgs[2].startswith("config")

