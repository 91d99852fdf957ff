"""Block scores and selections of the score kernel's two paths against the float64 reference:
the tensor-core path (bf16/fp16 inputs: block sums P W on the tensor cores, P as one fp16
operand or split into bf16 hi + lo) and the exact fp32 path (fp32 inputs), on varlen packs of
short and long sequences, several group sizes, head dims and (cmp_block, cmp_stride,
slc_block) choices."""
import pytest
import torch

import nsa_kernels.selection as selection
from nsa_kernels import reference as R
from nsa_kernels.interpreter import enable_interpreter_bf16_dot
from nsa_kernels.layout import compressed_cu_seqlens
from nsa_kernels.selection import block_scores_triton, select_blocks_triton, top_blocks_triton
from nsa_kernels.varlen import Varlen, poisoned_outputs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERP = DEV == "cpu"
LENS = [1, 31, 32, 63, 64, 65, 300]
# the tensor-core path's score error relative to the score: P's hi + lo halves carry each p
# within 2^-15 (hi truncated to bf16, lo rounded), plus fp32 accumulation
MMA_REL = 4e-5
# the same for one fp16 operand: each p rounded to 11 significant bits (2^-11), plus the above
FP16_REL = 2.0 ** -11 + MMA_REL


@pytest.fixture(autouse=True)
def _bf16_interpreter():
    assert enable_interpreter_bf16_dot() or torch.cuda.is_available()


def _problem(lens, g, hkv, dqk, hp, dtype, seed):
    """Random q, k_cmp in ``dtype``, the fp32 lse of the compressed branch, and the float64
    reference scores of exactly those inputs. Returns a dict of everything a check needs."""
    l_c, d_c, l_s = hp
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    kc_cu = compressed_cu_seqlens(cu, l_c, d_c)
    q = torch.randn(int(cu[-1]), hkv * g, dqk, generator=gen).to(dtype)
    kc = (1.5 * torch.randn(int(kc_cu[-1]), hkv, dqk, generator=gen)).to(dtype)
    scale = dqk ** -0.5
    nb = -(-max(lens) // l_s)
    scores, lses, pos = [], [], []
    for n in range(len(lens)):
        a, b, ca, cb = int(cu[n]), int(cu[n + 1]), int(kc_cu[n]), int(kc_cu[n + 1])
        p = torch.arange(b - a)
        qd, kd = q[a:b].double(), kc[ca:cb].double()
        _, lse = R.compressed_attention(qd, kd, kd, p, cmp_block=l_c, cmp_stride=d_c, scale=scale)
        lse = lse.float().double()  # the kernel reads the fp32 lse the compressed branch stores
        scores.append(R.selection_scores(qd, kd, p, lse, cmp_block=l_c, cmp_stride=d_c,
                                         slc_block=l_s, scale=scale, num_blocks=nb))
        lses.append(lse)
        pos.append(p)
    kw = dict(cmp_block=l_c, cmp_stride=d_c, slc_block=l_s)
    return dict(q=q.to(DEV), kc=kc.to(DEV), lse=torch.cat(lses).float().to(DEV), scale=scale,
                layout=Varlen.build(cu.to(DEV)), kc_cu=kc_cu.to(DEV), ref=torch.cat(scores),
                pos=torch.cat(pos), kw=kw)


def _run(pb, topk=4, init=1, local=2):
    """(scores, blocks) on problem ``pb``, outputs poisoned: the score kernel, then the top-n
    kernel on its scores (``select_blocks_triton`` chains the same two kernels)."""
    with poisoned_outputs():
        s = block_scores_triton(pb["q"], pb["kc"], pb["lse"], pb["layout"], pb["kc_cu"],
                                scale=pb["scale"], **pb["kw"])
        b = top_blocks_triton(s, pb["pos"].to(torch.int32).to(DEV), topk=topk, init_blocks=init,
                              local_blocks=local, slc_block=pb["kw"]["slc_block"])
    return s.double().cpu(), b.cpu()


def _ref_blocks(pb, scores, topk=4, init=1, local=2):
    return R.select_blocks(scores, pb["pos"], slc_block=pb["kw"]["slc_block"], topk=topk,
                           init_blocks=init, local_blocks=local)


def _check_near_ties(blocks, ref_blocks, ref, rel):
    """Rows whose selection differs may only swap blocks whose reference scores lie within
    ``rel`` (relative) of each other."""
    for t, h in (blocks != ref_blocks).any(-1).nonzero().tolist():
        got, want = set(blocks[t, h].tolist()), set(ref_blocks[t, h].tolist())
        extra = torch.tensor(sorted(got - want))
        missing = torch.tensor(sorted(want - got))
        lo, hi = ref[t, h, extra].min(), ref[t, h, missing].max()
        assert hi - lo <= rel * hi, (t, h, float(lo), float(hi))


CASES = [  # (group size, head dim, (cmp_block, cmp_stride, slc_block), TILE_OVERRIDE, lengths)
    (16, 128, (32, 16, 64), dict(ROWS=1024) if INTERP else {}, LENS),  # GPU: default tiles
    (1, 64, (32, 16, 64), dict(ROWS=32, NC=16), LENS + [520]),  # unmasked steps from t = 447
    (2, 192, (16, 16, 64), dict(ROWS=32, NC=32), LENS),  # Dqk padded to 256; no spill
    (3, 64, (8, 4, 16), dict(ROWS=64, NC=16), LENS),  # G_PAD = 4 > G; unmasked from t = 111
    (4, 64, (32, 8, 32), dict(ROWS=64, NC=16), LENS),  # 3 of 4 tokens spill; unmasked t >= 223
]


@pytest.mark.parametrize("split,rel", [(True, MMA_REL), (False, FP16_REL)], ids=["split", "fp16"])
@pytest.mark.parametrize("g,dqk,hp,tiles,lens", CASES)
def test_mma_scores_match_reference(monkeypatch, g, dqk, hp, tiles, lens, split, rel):
    """bf16 inputs: scores within ``rel`` of the float64 scores of the same bf16 inputs,
    every block written (poisoned outputs), and selections equal to the reference's except
    where two reference scores are within that error of each other."""
    monkeypatch.setattr(selection, "TILE_OVERRIDE", dict(tiles, split=split))
    pb = _problem(lens, g, 1, dqk, hp, torch.bfloat16, seed=g + dqk)
    scores, blocks = _run(pb)
    ref = pb["ref"]
    assert torch.isfinite(scores).all()
    assert bool(((scores - ref).abs() <= rel * ref.abs() + 1e-12).all()), \
        float(((scores - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    _check_near_ties(blocks, _ref_blocks(pb, ref), ref, 2 * rel)


@pytest.mark.skipif(not INTERP, reason="fp32 dots run as tf32 on a GPU")
def test_mma_path_on_fp32_inputs_and_split(monkeypatch):
    """The tensor-core path forced on fp32 inputs stays within MMA_REL; the single fp16 pass
    (split=False) is coarser, as its rounding of each p (2^-11) says: the lo dot is what
    buys the precision."""
    pb = _problem(LENS, 4, 1, 64, (32, 16, 64), torch.float32, seed=3)
    ref = pb["ref"]
    monkeypatch.setattr(selection, "TILE_OVERRIDE", dict(ROWS=128, NC=32, mma=True, split=True))
    scores, _ = _run(pb)
    assert bool(((scores - ref).abs() <= MMA_REL * ref.abs() + 1e-12).all())
    monkeypatch.setattr(selection, "TILE_OVERRIDE", dict(ROWS=128, NC=32, mma=True, split=False))
    scores, _ = _run(pb)
    rel = ((scores - ref).abs() / ref.abs().clamp_min(1e-30))[ref.abs() > 1e-6]
    assert MMA_REL < float(rel.max()) <= FP16_REL


@pytest.mark.skipif(not INTERP, reason="fp32 dots run as tf32 on a GPU")
@pytest.mark.parametrize("tiles", [dict(ROWS=128), dict(ROWS=32, BJ=4)])
def test_fp32_scores_exact_path(monkeypatch, tiles):
    """fp32 inputs take the exact path: scores within fp32 rounding and selections identical
    to the reference selection from the kernel's own scores and from the float64 scores."""
    monkeypatch.setattr(selection, "TILE_OVERRIDE", tiles)
    pb = _problem(LENS, 3, 1, 64, (32, 16, 64), torch.float32, seed=5)
    scores, blocks = _run(pb)
    ref = pb["ref"]
    assert bool(((scores - ref).abs() <= 1e-5 * ref.abs() + 1e-12).all())
    vis = torch.arange(ref.shape[-1])[None, :] <= (pb["pos"] // 64)[:, None]
    assert torch.equal(blocks, _ref_blocks(pb, torch.where(vis[:, None], scores, 0.0)))
    assert torch.equal(blocks, _ref_blocks(pb, ref))


def test_select_blocks_fp16_in_row_chunks():
    """fp16 inputs take the tensor-core path too (the default single fp16 pass); the full
    launcher, with a score budget that splits the queries into several row chunks."""
    pb = _problem([7, 130, 64], 4, 2, 64, (32, 16, 64), torch.float16, seed=9)
    ref = pb["ref"]
    with poisoned_outputs():
        blocks = select_blocks_triton(pb["q"], pb["kc"], pb["lse"], pb["layout"], pb["kc_cu"],
                                      scale=pb["scale"], topk=4, init_blocks=1, local_blocks=2,
                                      budget_bytes=4 * 2 * 4 * 40, **pb["kw"])
    _check_near_ties(blocks.cpu(), _ref_blocks(pb, ref), ref, 2 * FP16_REL)
