"""fastdiff.kernels.group_norm_silu (Triton) against torch.nn.functional.group_norm
followed by F.silu, forward and backward (autograd for the gradients of x,
weight and bias): float64 truth for float64 / float32 inputs, and for fp16 /
bf16 the eager error rule of tests/utils.py (eager run in the same dtype).

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors; the
variable is set here, before triton is first imported (conftest.py does the
same). Interpreted shapes are kept small; the big-image shapes run on a GPU only.
"""
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

import fastdiff  # noqa: E402,F401
from fastdiff.kernels import group_norm_silu as K  # noqa: E402

from utils import assert_close, assert_within_eager_error  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
EPS = 1e-5
LOW = (torch.float16, torch.bfloat16)
# (atol, rtol) against the float64 truth: y, mean / rstd, grads.
TIGHT = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5)}

# (shape, groups, channels_last): odd spatial sizes, 1-D, 3-D, no spatial dims,
# groups of 1, 8 and 32 channels' worth.
CASES = [
    ((2, 8, 5, 7), 1, False),
    ((2, 8, 5, 7), 8, True),
    ((2, 32, 3, 3), 32, False),
    ((2, 32, 3, 3), 8, True),
    ((2, 16, 33), 8, False),
    ((2, 8, 3, 4, 5), 2, False),
    ((2, 8, 3, 4, 5), 4, True),
    ((3, 16), 8, False),
    ((1, 80, 10, 10), 8, True),  # C > 64: several channel blocks
]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fmt(x, channels_last):
    if not channels_last:
        return x.contiguous()
    return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _inputs(shape, dtype, channels_last=False, seed=0, loc=0.0, affine=(True, True)):
    g = torch.Generator().manual_seed(seed)
    x = loc + 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    # a per-channel offset, so that the channels of a group differ
    offset = torch.randn(shape[1], generator=g, dtype=torch.float64)
    x = x + offset.view(1, -1, *[1] * (len(shape) - 2))
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(shape[1], generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(shape[1], generator=g, dtype=torch.float64)
    acc = _acc(dtype)
    x, dy = (_fmt(t.to(dtype), channels_last).to(DEVICE) for t in (x, dy))
    w = w.to(acc).to(DEVICE) if affine[0] else None
    b = b.to(acc).to(DEVICE) if affine[1] else None
    return x, w, b, dy


def _eager(x, w, b, dy, groups, silu, dtype, center=0.0):
    """(y, grad_x, grad_weight, grad_bias, mean, rstd) of torch's group_norm (+ silu)
    with autograd, x and dy in `dtype` (float64: the truth; fp16 / bf16: eager,
    weight and bias fp32 as torch's mixed-dtype path, so their grads are fp32).
    The truth is taken of x - center (exact in float64 for x near center; GroupNorm
    does not change): torch's own moments lose digits when |mean| >> std."""
    acc = _acc(dtype)
    xe = (x.detach().cpu().to(dtype) - center).requires_grad_()
    we = None if w is None else w.detach().cpu().to(acc).requires_grad_()
    be = None if b is None else b.detach().cpu().to(acc).requires_grad_()
    y = F.group_norm(xe, groups, we, be, EPS)
    if silu:
        y = F.silu(y)
    y.backward(dy.cpu().to(dtype))
    flat = xe.detach().to(acc).reshape(x.shape[0], groups, -1)
    mean = flat.mean(-1) + center
    rstd = 1 / torch.sqrt(flat.var(-1, unbiased=False) + EPS)
    return (y.detach(), xe.grad, None if we is None else we.grad,
            None if be is None else be.grad, mean, rstd)


def _run(x, w, b, dy, groups, silu=True):
    y, mean, rstd = K.group_norm_silu_fwd(x, w, b, groups, EPS, silu)
    gx, gw, gb = K.group_norm_silu_bwd(dy, x, w, b, mean, rstd, groups, silu)
    return tuple(t.cpu() for t in (y, gx, gw, gb, mean, rstd)), (y, gx)


NAMES = ("y", "grad_x", "grad_weight", "grad_bias", "mean", "rstd")


def _check_contract(x, w, b, groups, outs, dev_outs):
    y, gx, gw, gb, mean, rstd = outs
    acc = _acc(x.dtype)
    for t in dev_outs:  # y and grad_x: x's shape, dtype and memory format
        assert t.shape == x.shape and t.dtype == x.dtype and t.stride() == x.stride()
    assert mean.shape == rstd.shape == (x.shape[0], groups)
    assert mean.dtype == rstd.dtype == acc and mean.is_contiguous() and rstd.is_contiguous()
    for g, p in ((gw, w), (gb, b)):
        assert g.dtype == acc and g.shape == ((x.shape[1],) if p is not None else (0,))


def _compare(outs, x, w, b, dy, groups, silu, dtype):
    truth = _eager(x, w, b, dy, groups, silu, torch.float64)
    if dtype in TIGHT:
        atol, rtol = TIGHT[dtype]
        for got, ref, name in zip(outs, truth, NAMES):
            if ref is not None:
                assert_close(got, ref, atol, rtol, name)
        return
    eager = _eager(x, w, b, dy, groups, silu, dtype)
    for i, (got, e, ref, name) in enumerate(zip(outs[:4], eager, truth, NAMES)):
        if ref is not None:
            # grad_weight / grad_bias are fp32 sums on both sides: fp32 rounding as floor
            floor = 1e-5 * max(1.0, ref.abs().max().item()) if i >= 2 else 1e-6
            assert_within_eager_error(got, e, ref, name, floor=floor)
    # the statistics are A-typed: as accurate as fp32 math on the rounded inputs
    for got, ref, name in zip(outs[4:], truth[4:], NAMES[4:]):
        assert_close(got, ref, 1e-5, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,channels_last", CASES)
def test_fwd_bwd(shape, groups, channels_last, dtype):
    x, w, b, dy = _inputs(shape, dtype, channels_last)
    outs, dev_outs = _run(x, w, b, dy, groups)
    _check_contract(x, w, b, groups, outs, dev_outs)
    _compare(outs, x, w, b, dy, groups, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,channels_last", [((2, 8, 5, 7), 4, False),
                                                        ((2, 8, 5, 7), 4, True)])
def test_plain_group_norm(shape, groups, channels_last, dtype):
    """silu=False: y = a."""
    x, w, b, dy = _inputs(shape, dtype, channels_last, seed=1)
    outs, dev_outs = _run(x, w, b, dy, groups, silu=False)
    _check_contract(x, w, b, groups, outs, dev_outs)
    _compare(outs, x, w, b, dy, groups, False, dtype)


@pytest.mark.parametrize("affine", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("silu", [True, False])
def test_weight_bias_none(affine, silu):
    """w = 1 / b = 0; the missing parameter's gradient is empty, shape (0,)."""
    x, w, b, dy = _inputs((2, 8, 5, 7), torch.float64, seed=2, affine=affine)
    outs, dev_outs = _run(x, w, b, dy, 4, silu)
    _check_contract(x, w, b, 4, outs, dev_outs)
    _compare(outs, x, w, b, dy, 4, silu, torch.float64)


# Masked lanes of a tile compute silu(shift) ~ silu(-1000 rstd w): exp overflows
# there (harmlessly: never stored nor summed), and numpy says so under the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_mean(dtype, channels_last, monkeypatch):
    """x = 1000 + noise: var from the moments must not cancel. Also with small
    tiles and several tiles per chunk (the Chan merges of stage 1)."""
    shape = (2, 4, 12, 20)
    x, w, b, dy = _inputs(shape, dtype, channels_last, seed=3, loc=1000.0)
    truth = _eager(x, w, b, dy, 2, True, torch.float64, center=1000.0)
    for small in (False, True):
        if small:
            monkeypatch.setattr(K, "TILE", 64)
            monkeypatch.setattr(K, "MAX_GROUP_PARTIALS", 8)
            monkeypatch.setattr(K, "REDUCE_BLOCK", 4)
            block_c, block_hw = K._tile_shape(4, 240, channels_last)
            assert K._chunks(4, 240, 2, block_c, block_hw) == (4 if not channels_last else 15, 4)
        outs, _ = _run(x, w, b, dy, 2)
        if dtype == torch.float64:
            for got, ref, name in zip(outs, truth, NAMES):
                assert_close(got, ref, 1e-10, 1e-10, name)
            continue
        # rstd (the variance) to a few ulp of fp32; mean to half its ulp (3e-5 at 1000).
        assert_close(outs[5], truth[5], 0, 5e-7, "rstd")
        assert_close(outs[4], truth[4], 4e-5, 0, "mean")
        # a = scale x + shift cancels to ~ulp(1000) * rstd w: the contract's formula.
        assert_close(outs[0], truth[0], 1e-3, 1e-4, "y")
        assert_close(outs[1], truth[1], 1e-3, 1e-4, "grad_x")
        assert_close(outs[2], truth[2], 1e-3, 1e-4, "grad_weight")
        assert_close(outs[3], truth[3], 1e-3, 1e-4, "grad_bias")


@pytest.mark.parametrize("channels_last", [False, True])
def test_many_chunks_and_batch_slices(channels_last, monkeypatch):
    """Small tiles: several tiles per program (stage-1 loop), several chunks per
    channel, several steps of the per-(n, g) kernels, the batch launched in
    slices (as for N > 65535), a group spread over many programs."""
    monkeypatch.setattr(K, "TILE", 128)
    monkeypatch.setattr(K, "MAX_GROUP_PARTIALS", 12)
    monkeypatch.setattr(K, "REDUCE_BLOCK", 4)
    monkeypatch.setattr(K, "batch_slices",
                        lambda n: [slice(i, min(i + 2, n)) for i in range(0, n, 2)])
    shape = (3, 12, 9, 11)
    block_c, block_hw = K._tile_shape(12, 99, channels_last)
    tiles, chunks = K._chunks(12, 99, 3, block_c, block_hw)
    assert tiles > 1 and chunks > 1
    if not channels_last:
        assert block_c == 8  # the group of channels 6..8 straddles two channel blocks
    x, w, b, dy = _inputs(shape, torch.float64, channels_last, seed=4)
    outs, _ = _run(x, w, b, dy, 4)
    _compare(outs, x, w, b, dy, 4, True, torch.float64)


def test_large_group():
    """One group of 4 x 4096 elements (G = 1): blocks of a fixed size, many
    programs per group."""
    x, w, b, dy = _inputs((1, 4, 64, 64), torch.float32, seed=5)
    outs, _ = _run(x, w, b, dy, 1)
    _compare(outs, x, w, b, dy, 1, True, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_deterministic(dtype, channels_last):
    x, w, b, dy = _inputs((2, 16, 9, 11), dtype, channels_last, seed=6)
    first, _ = _run(x, w, b, dy, 4)
    second, _ = _run(x, w, b, dy, 4)
    for a, c, name in zip(first, second, NAMES):
        assert torch.equal(a, c), name
    # the chunking depends on the sample's shape only: a sample alone gives the same bits
    alone, _ = _run(x[1:], w, b, dy[1:], 4)
    assert torch.equal(alone[0], first[0][1:]) and torch.equal(alone[1], first[1][1:])
    assert torch.equal(alone[4], first[4][1:]) and torch.equal(alone[5], first[5][1:])


def test_layouts_agree():
    """channels-last and contiguous inputs hold the same values: same y, grads."""
    x, w, b, dy = _inputs((2, 16, 6, 7), torch.float64, True, seed=7)
    cl, _ = _run(x, w, b, dy, 4)
    nchw, _ = _run(x.contiguous(), w, b, dy.contiguous(), 4)
    for a, c, name in zip(cl, nchw, NAMES):
        assert_close(a, c, 1e-13, 1e-12, name)


def test_empty():
    w = torch.ones(8, device=DEVICE)
    b = torch.zeros(8, device=DEVICE)
    x = torch.zeros((0, 8, 4, 4), device=DEVICE)
    y, mean, rstd = K.group_norm_silu_fwd(x, w, b, 4, EPS, True)
    assert y.shape == x.shape and mean.shape == rstd.shape == (0, 4)
    gx, gw, gb = K.group_norm_silu_bwd(x, x, w, b, mean, rstd, 4, True)
    assert gx.shape == x.shape
    assert torch.equal(gw.cpu(), torch.zeros(8)) and torch.equal(gb.cpu(), torch.zeros(8))
    gx, gw, gb = K.group_norm_silu_bwd(x, x, None, None, mean, rstd, 4, True)
    assert gw.shape == gb.shape == (0,)
    # no elements per group: mean 0, var 0 (group_norm_math.h group_moments)
    x = torch.zeros((2, 8, 0), device=DEVICE)
    y, mean, rstd = K.group_norm_silu_fwd(x, w, b, 4, EPS, True)
    assert y.shape == x.shape and torch.equal(mean.cpu(), torch.zeros(2, 4))
    assert_close(rstd.cpu(), torch.full((2, 4), EPS ** -0.5), 0, 1e-6, "rstd")


def test_contract_errors():
    x, w, b, dy = _inputs((2, 8, 5, 7), torch.float32)
    with pytest.raises(ValueError):
        K.group_norm_silu_fwd(x, w, b, 3, EPS, True)  # 3 does not divide 8
    with pytest.raises(ValueError):
        K.group_norm_silu_fwd(x, w.double(), b, 4, EPS, True)  # weight not A
    with pytest.raises(ValueError):
        K.group_norm_silu_fwd(x.transpose(2, 3), w, b, 4, EPS, True)  # not dense NCHW / NHWC
    with pytest.raises(ValueError):
        K.group_norm_silu_fwd(x, w, b, 4, 0.0, True)
    with pytest.raises(TypeError):
        K.group_norm_silu_fwd(x.int(), None, None, 4, EPS, True)
    y, mean, rstd = K.group_norm_silu_fwd(x, w, b, 4, EPS, True)
    with pytest.raises(ValueError):  # grad_y in another layout than x
        K.group_norm_silu_bwd(_fmt(dy, True), x, w, b, mean, rstd, 4, True)
    with pytest.raises(ValueError):  # stats of another shape
        K.group_norm_silu_bwd(dy, x, w, b, mean[:, :2], rstd[:, :2], 4, True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,groups", [((1, 128, 256, 256), 32), ((1, 512, 64, 64), 32),
                                          ((2, 1280, 16, 16), 32), ((2, 320, 64, 64), 32)])
def test_big_images_gpu(shape, groups, channels_last, dtype):
    """SD / UNet shapes (compiled kernels on a GPU only): large groups, few (n, g)."""
    x, w, b, dy = _inputs(shape, dtype, channels_last, seed=8)
    outs, dev_outs = _run(x, w, b, dy, groups)
    _check_contract(x, w, b, groups, outs, dev_outs)
    _compare(outs, x, w, b, dy, groups, True, dtype)
