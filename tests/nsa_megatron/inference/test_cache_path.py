"""The KV-cache path of a tiny NSA GPTModel computes the same function as its full forward.

Several prompts of different lengths (one shorter than the compression block) are prefilled
in chunks (first chunk: training path on the pack; later chunks: cache path), then decoded
teacher-forced one token per step, all sequences together. Logits of every position must
equal the full-sequence forward; the compressed cache must equal compressing the whole
sequence with the layer's compressor.
"""
import pytest
import torch

from tests.distributed_utils import init_megatron, run_distributed
from tests.nsa_megatron.gpt_harness import VOCAB, make_config

PROMPTS = (50, 5, 77)  # tokens of each prompt; lengths < l, not multiples of d or l' included
DECODE_STEPS = 21
CHUNK = 32


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _worker(rank, world, overrides):
    from nsa_megatron.attention import NSASelfAttention
    from nsa_megatron.inference import NSAGenerator
    from nsa_megatron.model import gpt_model_provider

    init_megatron()
    torch.manual_seed(0)
    model = gpt_model_provider(make_config(**overrides), VOCAB, 128).eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (p + DECODE_STEPS,), generator=gen) for p in PROMPTS]

    # full forward of every sequence alone, capturing the NSA layers' inputs
    captured, full = {}, []
    hooks = [layer.self_attention.register_forward_pre_hook(
        lambda mod, args, i=i: captured.setdefault(i, []).append(args[0].detach()))
        for i, layer in enumerate(model.decoder.layers) if isinstance(layer.self_attention, NSASelfAttention)]
    with torch.no_grad():
        for s in seqs:
            full.append(model(s[None], torch.arange(len(s))[None], None)[0].float())
    for h in hooks:
        h.remove()

    g = NSAGenerator(model, batch=len(seqs), capacity=128, prefill_chunk=CHUNK)
    cached = [[] for _ in seqs]
    offset = 0
    while any(offset < p for p in PROMPTS):
        ids = [b for b, p in enumerate(PROMPTS) if offset < p]
        toks = [seqs[b][offset:min(offset + CHUNK, PROMPTS[b])] for b in ids]
        logits = g.step(ids, toks, logits_of="all")
        rows = torch.tensor([0] + [len(t) for t in toks]).cumsum(0).tolist()
        for i, b in enumerate(ids):
            cached[b].append(logits[rows[i]:rows[i + 1]])
        offset += CHUNK
    for step in range(DECODE_STEPS):
        tok = torch.stack([s[p + step] for s, p in zip(seqs, PROMPTS)])
        logits = g.decode(tok)
        for b in range(len(seqs)):
            cached[b].append(logits[b:b + 1])
    logit_err = max(_rel(torch.cat(c), f) for c, f in zip(cached, full))

    cmp_err, checked = 0.0, 0
    for i, inputs in captured.items():
        attn, cache = model.decoder.layers[i].self_attention, g.layer_caches[i]
        for b, h in enumerate(inputs):
            parts = {k: x.squeeze(1) for k, x in attn.get_nsa_tensors(h).items()}
            src_k, src_v = (parts["k_cmp"], parts["v_cmp"]) if "k_cmp" in parts else (parts["k"], parts["v"])
            cu = torch.tensor([0, h.shape[0]], dtype=torch.int32)
            with torch.no_grad():
                k_ref, v_ref = attn.core_attention.compress(src_k, src_v, cu, g.ctx.rope)
            k_c, v_c = cache.compressed_prefix(b, h.shape[0])
            assert k_c.shape == k_ref.shape and k_ref.shape[0] > 0
            cmp_err = max(cmp_err, _rel(k_c, k_ref), _rel(v_c, v_ref))
            checked += 1
    return logit_err, cmp_err, checked, g.lengths


@pytest.mark.parametrize("overrides", [
    {},  # paper layout: independent K/V per branch, every layer NSA
    {"nsa_branch_kv": "shared", "nsa_dense_layers": [1], "nsa_compressor": "linear"},
], ids=["independent", "shared+dense-layer"])
def test_cache_path_equals_full_forward(overrides):
    (logit_err, cmp_err, checked, lengths), = run_distributed(_worker, 1, overrides, timeout=240)
    assert lengths == [p + DECODE_STEPS for p in PROMPTS]
    assert checked >= len(PROMPTS)
    assert logit_err <= 2e-5, logit_err
    assert cmp_err <= 1e-5, cmp_err
