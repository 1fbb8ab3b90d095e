"""fastdiff.kernels.attention (Triton, FlashAttention-2 style) against the
float64 truth, forward (out, lse) and backward (grad_q, grad_k, grad_v by
autograd through the float64 formula): float64 / float32 tight, fp16 / bf16 by
the eager error rule of tests/utils.py (eager = fastdiff.reference.attention
run in the same dtype, with autograd).

The truth is softmax(scale q k^T) v computed wholly in float64 from the inputs
as the kernels see them (rounded to their dtype). fastdiff.reference.attention
takes the softmax in fp32 whatever the input dtype (as ADM's eager U-Net
does), so in float64 it is only fp32-accurate: test_reference_agrees ties the
two together at that level.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors; the
variable is set here, before triton is first imported (conftest.py does the
same). The launcher then picks INTERPRET_BLOCK (16) tiles, so the small shapes
below still take several query / key blocks and masked tails;
test_gpu_blocks_interpreted runs the GPU tile sizes too.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

import fastdiff  # noqa: E402,F401
from fastdiff import reference  # noqa: E402
from fastdiff.kernels import attention as K  # noqa: E402

from utils import assert_close, assert_within_eager_error  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
LOW = (torch.float16, torch.bfloat16)
ALL = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# (atol, rtol) against the float64 truth, atol relative to the largest |truth|.
TIGHT = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5)}
NAMES = ("out", "grad_q", "grad_k", "grad_v")

# ((B, H, Nq, D), Nk)
CASES = [
    ((2, 2, 33, 32), 77),   # cross-attention: 77 text tokens, odd query count
    ((1, 2, 40, 40), 40),   # SD 1.x head dim 40, self-attention
    ((2, 1, 20, 64), 20),   # head dim 64 (ADM), 2 blocks of 16 with a tail
    ((1, 2, 17, 80), 30),   # head dim 80 (SD 2 / SDXL)
    ((1, 1, 12, 160), 24),  # head dim 160 (SD 1.x deepest level), BLOCK_D 256
    ((2, 3, 9, 1), 13),     # head dim 1
    ((1, 2, 21, 3), 5),     # head dim 3, fewer keys than one block
    ((1, 1, 1, 17), 77),    # one query, head dim 17
]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(shape, g):
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _inputs(qshape, nk, dtype, seed=0):
    """q, k, v, grad_out in `dtype` on DEVICE (values drawn in float64)."""
    g = torch.Generator().manual_seed(seed)
    b, h, nq, d = qshape
    q, k, v = _randn(qshape, g), _randn((b, h, nk, d), g), _randn((b, h, nk, d), g)
    do = _randn(qshape, g)
    return tuple(t.to(dtype).to(DEVICE) for t in (q, k, v, do))


def _truth(q, k, v, do, scale):
    """(out, grad_q, grad_k, grad_v, lse) of softmax(scale q k^T) v, all in float64."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    s = scale * q @ k.transpose(-1, -2)
    out = torch.softmax(s, dim=-1) @ v
    out.backward(do.cpu().double())
    return out.detach(), q.grad, k.grad, v.grad, torch.logsumexp(s.detach(), dim=-1)


def _eager(q, k, v, do, scale):
    """(out, grad_q, grad_k, grad_v) of reference.attention run in the inputs' dtype."""
    q, k, v = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    out = reference.attention(q, k, v, scale)
    out.backward(do.cpu())
    return out.detach(), q.grad, k.grad, v.grad


def _run(q, k, v, do, scale):
    """(out, grad_q, grad_k, grad_v, lse) of the Triton launchers, on the CPU."""
    out, lse = K.attention_fwd(q, k, v, scale)
    gq, gk, gv = K.attention_bwd(do, q, k, v, out, lse, scale)
    return tuple(t.cpu() for t in (out, gq, gk, gv, lse)), (out, gq, gk, gv, lse)


def _bnhd_memory(x):
    """x is a (B, H, N, D) view of dense (B, N, H, D) memory."""
    return x.permute(0, 2, 1, 3).is_contiguous()


def _check_contract(q, k, dev):
    out, gq, gk, gv, lse = dev
    assert out.shape == gq.shape == q.shape and gk.shape == gv.shape == k.shape
    for t in (out, gq, gk, gv):
        assert t.dtype == q.dtype and t.device == q.device and _bnhd_memory(t)
    assert lse.shape == q.shape[:3] and lse.dtype == _acc(q.dtype) and lse.is_contiguous()


def _scaled_atol(atol, ref):
    return atol * max(1.0, ref.abs().max().item())


def _compare(got, q, k, v, do, scale, dtype):
    truth = _truth(q, k, v, do, scale)
    # lse: fp32 (fp64) statistics from the rounded inputs, in every dtype
    atol, rtol = TIGHT.get(dtype, TIGHT[torch.float32])
    assert_close(got[4], truth[4], _scaled_atol(atol, truth[4]), rtol, "lse")
    if dtype in TIGHT:
        for g, t, name in zip(got[:4], truth[:4], NAMES):
            assert_close(g, t, _scaled_atol(atol, t), rtol, name)
        return
    eager = _eager(q, k, v, do, scale)
    for g, e, t, name in zip(got[:4], eager, truth[:4], NAMES):
        assert_within_eager_error(g, e, t, name)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("qshape,nk", CASES)
def test_fwd_bwd(qshape, nk, dtype):
    q, k, v, do = _inputs(qshape, nk, dtype)
    scale = qshape[3] ** -0.5
    got, dev = _run(q, k, v, do, scale)
    _check_contract(q, k, dev)
    _compare(got, q, k, v, do, scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["BNH3D", "BN3HD"])
def test_qkv_views(order, dtype):
    """q, k, v as strided views of one qkv projection output (B, N, H, 3, D) or
    (B, N, 3, H, D), grad_out a non-contiguous view, a scale other than D^-1/2:
    the same bits as with contiguous copies, and the truth's values."""
    b, n, h, d = 2, 37, 3, 24
    g = torch.Generator().manual_seed(1)
    if order == "BNH3D":
        qkv = _randn((b, n, h, 3, d), g).to(dtype).to(DEVICE)
        q, k, v = (qkv[:, :, :, i].permute(0, 2, 1, 3) for i in range(3))
    else:
        qkv = _randn((b, n, 3, h, d), g).to(dtype).to(DEVICE)
        q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    # grad_out: every other head of a wider (B, N, 2H, D) buffer
    do = _randn((b, n, 2 * h, d), g).to(dtype).to(DEVICE)[:, :, ::2].permute(0, 2, 1, 3)
    assert not q.is_contiguous() and q.stride(3) == 1 and not do.is_contiguous()
    scale = 0.3
    got, dev = _run(q, k, v, do, scale)
    _check_contract(q, k, dev)
    dense, _ = _run(*(t.contiguous() for t in (q, k, v, do)), scale)
    for a, c, name in zip(got, dense, NAMES + ("lse",)):
        assert torch.equal(a, c), name
    _compare(got, q, k, v, do, scale, dtype)


def test_mixed_layouts():
    """Cross-attention with a different layout per tensor: q contiguous (B, H, Nq, D),
    k a (B, Nk, H, D) view, v one half of a (B, Nk, 2, H, D) kv projection,
    grad_out a (B, H, Nq, 2D) slice: the same bits as contiguous copies."""
    b, h, nq, nk, d = 2, 2, 21, 19, 20
    g = torch.Generator().manual_seed(8)
    f32 = dict(dtype=torch.float32, device=DEVICE)
    q = _randn((b, h, nq, d), g).to(**f32)
    k = _randn((b, nk, h, d), g).to(**f32).permute(0, 2, 1, 3)
    v = _randn((b, nk, 2, h, d), g).to(**f32)[:, :, 1].permute(0, 2, 1, 3)
    do = _randn((b, h, nq, 2 * d), g).to(**f32)[..., d:]
    assert len({q.stride(), k.stride(), v.stride(), do.stride()}) == 4
    got, dev = _run(q, k, v, do, 0.25)
    _check_contract(q, k, dev)
    dense, _ = _run(*(t.contiguous() for t in (q, k, v, do)), 0.25)
    for a, c, name in zip(got, dense, NAMES + ("lse",)):
        assert torch.equal(a, c), name
    _compare(got, q, k, v, do, 0.25, torch.float32)


def _large_logit_inputs(dtype, sign, seed=2):
    """(q, k, v, do, scale) with every score scale q.k = sign 1e4 + O(10): q and
    k share a large common direction u (|q|, |k| ~ 240), small noise spreads
    the scores over ~20 so the softmax is not one-hot (max p ~ 0.3-0.9)."""
    b, h, nq, nk, d = 1, 2, 19, 77, 32
    g = torch.Generator().manual_seed(seed)
    u = _randn((b, h, 1, d), g)
    u = u / u.norm(dim=-1, keepdim=True)
    scale = d ** -0.5
    a = (1e4 / scale) ** 0.5
    q = a * u + 0.05 * _randn((b, h, nq, d), g)
    k = sign * a * u + 0.05 * _randn((b, h, nk, d), g)
    v, do = _randn((b, h, nk, d), g), _randn((b, h, nq, d), g)
    return tuple(t.to(dtype).to(DEVICE) for t in (q, k, v, do)) + (scale,)


# Relative tolerance (to max |truth|) of out / grad_k / grad_v with scores of 1e4:
# fp32 scores of 1e4 carry ~1e-3 absolute rounding, so p is known to ~0.1%;
# bf16 adds its rounding of p and ds (2^-8).
LARGE_RTOL = {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
EPS = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits(dtype, sign):
    """Scores of +-1e4 from fp16 / bf16 inputs (eager fp16 rounds them to a
    multiple of 8): fp32 statistics keep everything finite and at the truth.
    sign = -1: lse ~ -1e4, where an unmasked key tail would give
    exp(0 - lse) = inf and inf * 0 = nan in dq (77 keys: a masked tail)."""
    q, k, v, do, scale = _large_logit_inputs(dtype, sign)
    got, _ = _run(q, k, v, do, scale)
    for t, name in zip(got, NAMES + ("lse",)):
        assert torch.isfinite(t).all(), name
    truth = _truth(q, k, v, do, scale)
    s = scale * q.double().cpu() @ k.double().cpu().transpose(-1, -2)
    assert 0.99e4 < (sign * s).min() and (sign * s).max() < 1.01e4
    p = torch.softmax(s, dim=-1)
    assert p.max() < 0.95  # not one-hot: the gradients are not ~0
    assert_close(got[4], truth[4], 5e-3, 0, "lse")
    for i in (0, 2, 3):  # out, grad_k, grad_v
        assert_close(got[i], truth[i], _scaled_atol(LARGE_RTOL[dtype], truth[i]), 0, NAMES[i])
    # grad_q = scale sum_j ds_ij k_j with sum_j ds_ij = 0 and k_j ~ 240 u + 0.05 noise:
    # the dot cancels ~1000-fold, so its error is bounded against the sizes of its
    # terms, not against |grad_q|: ds rounded to the dtype (plus ~2e-3 from the
    # scores) gives scale |ds| |k|; delta_i = dO_i . o_i taken from the stored
    # output (rounded to the dtype, as FlashAttention-2) moves every ds_ij by
    # p_ij d(delta_i), hence scale eps (|dO_i| . |o_i|) (p |k|)_i.
    qc, kc, vc, doc = (t.double().cpu() for t in (q, k, v, do))
    dp = doc @ vc.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    eps = EPS[dtype]
    bound = 2 * scale * ((eps + 2e-3) * (ds.abs() @ kc.abs())
                         + eps * (doc.abs() * truth[0].abs()).sum(-1, keepdim=True)
                         * (p @ kc.abs()))
    err = (got[1].double() - truth[1]).abs()
    assert (err <= bound).all(), f"grad_q: max err / bound {(err / bound).max():.2f}"
    if dtype in LOW:
        # eager rounds these scores to the dtype (a multiple of 8 in fp16): its
        # out / grad_k / grad_v are off by O(1). Not grad_q: eager's softmax VJP
        # takes sum_j p dp from fp32 p, without the d(delta) term above, which
        # dominates in bf16 here (the cost of FlashAttention-2's delta = dO . o).
        eager = _eager(q, k, v, do, scale)
        for i in (0, 2, 3):
            assert_within_eager_error(got[i], eager[i], truth[i], NAMES[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic(dtype):
    """Same inputs -> bitwise the same outputs and gradients (no atomics)."""
    q, k, v, do = _inputs((2, 2, 41, 24), 50, dtype, seed=3)
    first, _ = _run(q, k, v, do, 0.2)
    second, _ = _run(q, k, v, do, 0.2)
    for a, c, name in zip(first, second, NAMES + ("lse",)):
        assert torch.equal(a, c), name
    # a batch element alone gives the same bits (no cross-(b, h) reduction)
    alone, _ = _run(q[1:], k[1:], v[1:], do[1:], 0.2)
    for a, c, name in zip(alone, first, NAMES + ("lse",)):
        assert torch.equal(a, c[1:]), name


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype,qshape,nk", [
    (torch.float16, (1, 2, 150, 64), 140),  # 128 x 64 forward tiles, 2 key blocks of 128
    (torch.float32, (1, 1, 45, 40), 70),    # fp32 32 x 32 tiles, D = 40 in BLOCK_D 64
    (torch.bfloat16, (1, 1, 20, 160), 40),  # BLOCK_D 256 tiles
])
def test_gpu_blocks_interpreted(dtype, qshape, nk, monkeypatch):
    """The GPU tile sizes (GPU_BLOCKS), interpreted."""
    blocks = K._blocks
    monkeypatch.setattr(K, "_blocks", lambda d, dt, interpret=None: blocks(d, dt, False))
    q, k, v, do = _inputs(qshape, nk, dtype, seed=4)
    scale = qshape[3] ** -0.5
    got, dev = _run(q, k, v, do, scale)
    _check_contract(q, k, dev)
    _compare(got, q, k, v, do, scale, dtype)


def test_empty():
    """No launch for B H Nq == 0: empty out / lse / grad_q, zero grad_k / grad_v
    when there are keys but no queries."""
    for qshape, nk in (((0, 2, 5, 8), 7), ((2, 0, 5, 8), 7), ((2, 3, 0, 8), 7)):
        q, k, v, do = _inputs(qshape, nk, torch.float32)
        out, lse = K.attention_fwd(q, k, v, 0.5)
        assert out.shape == q.shape and lse.shape == q.shape[:3] and _bnhd_memory(out)
        gq, gk, gv = K.attention_bwd(do, q, k, v, out, lse, 0.5)
        assert gq.shape == q.shape and gk.shape == gv.shape == k.shape
        assert torch.count_nonzero(gk) == 0 and torch.count_nonzero(gv) == 0
        for t in (gq, gk, gv):
            assert _bnhd_memory(t)


def test_fp64_scale_precision():
    """The scale reaches the fp64 kernels as an (fp32, fp32) pair: no fp32
    rounding of 1 / sqrt(D) in the float64 results."""
    hi, lo = K._split_scale(40 ** -0.5)
    assert hi + lo == 40 ** -0.5 and lo != 0.0
    q, k, v, do = _inputs((1, 1, 10, 40), 12, torch.float64, seed=5)
    got, _ = _run(q, k, v, do, 40 ** -0.5)
    truth = _truth(q, k, v, do, 40 ** -0.5)
    for g, t, name in zip(got[:4], truth[:4], NAMES):
        assert_close(g, t, 1e-13, 1e-12, name)


def test_reference_agrees():
    """reference.attention (softmax in fp32) matches the float64 truth at fp32 level."""
    q, k, v, do = _inputs((2, 2, 33, 40), 77, torch.float64, seed=6)
    out = reference.attention(q.cpu(), k.cpu(), v.cpu(), 40 ** -0.5)
    assert_close(out, _truth(q, k, v, do, 40 ** -0.5)[0], 1e-6, 1e-6, "out")


def test_contract_errors():
    q, k, v, do = _inputs((1, 2, 8, 16), 8, torch.float32)
    with pytest.raises(TypeError):
        K.attention_fwd(q.int(), k.int(), v.int(), 1.0)
    with pytest.raises(TypeError):
        K.attention_fwd(q, k.half(), v, 1.0)
    with pytest.raises(ValueError):  # head dim not contiguous
        K.attention_fwd(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), 1.0)
    with pytest.raises(ValueError):  # no keys
        K.attention_fwd(q, k[:, :, :0], v[:, :, :0], 1.0)
    with pytest.raises(ValueError):  # k and v lengths differ
        K.attention_fwd(q, k, v[:, :, :4], 1.0)
    with pytest.raises(ValueError):  # head dim over MAX_HEAD_DIM
        big = torch.zeros(1, 1, 2, K.MAX_HEAD_DIM + 1, device=DEVICE)
        K.attention_fwd(big, big, big, 1.0)
    out, lse = K.attention_fwd(q, k, v, 1.0)
    with pytest.raises(ValueError):  # lse in the wrong dtype
        K.attention_bwd(do, q, k, v, out, lse.double(), 1.0)
    with pytest.raises(ValueError):  # grad_out of another shape
        K.attention_bwd(do[:, :, :4], q, k, v, out, lse, 1.0)


def test_kernel_configs_cover_launches():
    """KERNEL_CONFIGS (compiled by `fastdiff kernels`) lists every (kernel, dtype,
    tiles, warps) a GPU launch of any head dim 1..MAX_HEAD_DIM picks."""
    listed = {(c["name"], c["dtype"], c["constexprs"]["BLOCK_M"],
               c["constexprs"].get("BLOCK_N"), c["constexprs"]["BLOCK_D"], c["num_warps"])
              for c in K.KERNEL_CONFIGS}
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"),
                        (torch.bfloat16, "bf16")):
        for d in range(1, K.MAX_HEAD_DIM + 1):
            blocks, block_d = K._blocks(d, dtype, interpret=False)
            assert K._num_stages(dtype, block_d) == 3  # the stages the report compiles
            for kernel, key in (("_attention_fwd_kernel", "fwd"),
                                ("_attention_bwd_dkdv_kernel", "dkdv"),
                                ("_attention_bwd_dq_kernel", "dq")):
                m, n, w = blocks[key]
                assert (kernel, name, m, n, block_d, w) in listed, (kernel, name, d)
            assert ("_attention_bwd_preprocess_kernel", name, K._pre_block_m(block_d), None,
                    block_d, K.PRE_WARPS) in listed


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qshape,nk", [((2, 8, 4096, 40), 4096), ((2, 8, 1024, 80), 77),
                                       ((2, 4, 256, 160), 256), ((1, 4, 1000, 64), 1000)])
def test_unet_shapes_gpu(qshape, nk, dtype):
    """SD-sized self- and cross-attention (compiled kernels on a GPU only)."""
    q, k, v, do = _inputs(qshape, nk, dtype, seed=7)
    scale = qshape[3] ** -0.5
    got, dev = _run(q, k, v, do, scale)
    _check_contract(q, k, dev)
    _compare(got, q, k, v, do, scale, dtype)
