"""group_norm_silu and nn.GroupNormSiLU vs F.group_norm + F.silu (PyTorch's own kernels) and
diffusers' ResnetBlock2D norm/activation pair."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from utils import REDUCED_DTYPES, assert_close, assert_within_eager_error, fused_backends_here

BACKENDS = fused_backends_here("group_norm_silu")
CASES = [  # (shape, groups)
    ((2, 32, 5, 7), 8),      # odd spatial size
    ((3, 16, 9), 1),         # 1-D, one group
    ((2, 64, 4, 4), 32),     # two channels per group
    ((2, 8, 3, 4, 5), 4),    # 3-D
    ((4, 6), 3),             # no spatial dims
    ((2, 72, 5, 3), 8),      # channels-last: a full register block of channels + a partial vector
    ((2, 260, 5, 3), 4),     # channels-last from 256 channels: runs of 4 pixels + 3 alone, partial vector
]
LARGE = ((2, 64, 48, 48), 32)  # several CPU chunks per channel


def _inputs(shape, dtype=torch.float64, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    w = (1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def _eager(x, groups, w, b, activation="silu"):
    y = F.group_norm(x, groups, w, b, 1e-5)
    return F.silu(y) if activation == "silu" else y


def _layouts(x):
    out = [("contiguous", x)]
    if x.dim() == 4:
        out.append(("channels_last", x.to(memory_format=torch.channels_last)))
    if x.dim() == 5:
        out.append(("channels_last_3d", x.to(memory_format=torch.channels_last_3d)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES + [LARGE])
@pytest.mark.parametrize("activation", ["silu", None])
def test_matches_torch_fp64(backend, case, activation):
    shape, groups = case
    if backend == "triton" and case == LARGE:
        pytest.skip("interpreted Triton: small shapes only")
    x0, w0, b0, dy = _inputs(shape)
    for name, x in _layouts(x0):
        x, w, b = (t.clone().requires_grad_(True) for t in (x, w0, b0))
        y = fastdiff.group_norm_silu(x, groups, w, b, activation=activation, backend=backend)
        xr, wr, br = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
        yr = _eager(xr, groups, wr, br, activation)
        assert_close(y, yr, 1e-12, 1e-10, f"{name} y")
        assert y.stride() == x.stride(), f"{name}: output layout {y.stride()} != input {x.stride()}"
        got = torch.autograd.grad(y, (x, w, b), dy.to(memory_format=torch.contiguous_format))
        want = torch.autograd.grad(yr, (xr, wr, br), dy)
        for a, r, what in zip(got, want, ("dx", "dweight", "dbias")):
            assert_close(a, r, 1e-10, 1e-9, f"{name} {what}")
        assert got[0].stride() == x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_affine_and_weight_only(backend):
    x, w, _, dy = _inputs((2, 16, 5, 5))
    for weight, bias in ((None, None), (w, None)):
        xs = x.clone().requires_grad_(True)
        y = fastdiff.group_norm_silu(xs, 4, weight, bias, backend=backend)
        xr = x.clone().requires_grad_(True)
        yr = _eager(xr, 4, weight, bias)
        assert_close(y, yr, 1e-12, 1e-10, "y")
        assert_close(torch.autograd.grad(y, xs, dy)[0], torch.autograd.grad(yr, xr, dy)[0], 1e-10, 1e-9, "dx")


def _check_within_eager_error(xl, wl, bl, dyl, groups, backend):
    """y and all gradients of fastdiff on (rounded) inputs vs float64 math on the same inputs,
    within the error of eager PyTorch in the inputs' dtype."""
    xt, wt, bt = (t.double().requires_grad_(True) for t in (xl, wl, bl))
    yt = _eager(xt, groups, wt, bt)
    gt = torch.autograd.grad(yt, (xt, wt, bt), dyl.double())
    xf, wf, bf = (t.clone().requires_grad_(True) for t in (xl, wl, bl))
    yf = fastdiff.group_norm_silu(xf, groups, wf, bf, backend=backend)
    gf = torch.autograd.grad(yf, (xf, wf, bf), dyl)
    xe, we, be = (t.clone().requires_grad_(True) for t in (xl, wl, bl))
    ye = _eager(xe, groups, we, be)
    ge = torch.autograd.grad(ye, (xe, we, be), dyl)
    assert yf.dtype == xl.dtype and yf.stride() == xl.stride()
    assert_within_eager_error(yf, ye, yt, "y", floor=1e-6)
    for a, e, t, what in zip(gf, ge, gt, ("dx", "dweight", "dbias")):
        assert_within_eager_error(a, e, t, what, floor=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32,) + REDUCED_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape, groups", [((2, 32, 12, 12), 8), ((2, 264, 7, 5), 8)])  # C >= 256: pixel runs
def test_low_precision_within_eager_error(backend, dtype, channels_last, shape, groups):
    x64, w64, b64, dy64 = _inputs(shape)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    _check_within_eager_error(x64.to(dtype).to(memory_format=fmt), w64.to(dtype), b64.to(dtype), dy64.to(dtype),
                              groups, backend)


# Outputs of 4 MiB and more (many CPU chunks per group; rows 64-byte aligned or not), each dtype.
LARGE_OUTPUTS = [
    ((2, 64, 96, 96), torch.float32),
    ((2, 64, 97, 89), torch.float32),
    ((2, 64, 128, 128), torch.bfloat16),
    ((2, 64, 131, 127), torch.float16),
    ((2, 32, 96, 96), torch.float64),
]


@pytest.mark.parametrize("shape, dtype", LARGE_OUTPUTS)
def test_large_outputs(shape, dtype):
    x64, w64, b64, dy64 = _inputs(shape)
    assert x64.numel() * dtype.itemsize >= 4 << 20
    if dtype in REDUCED_DTYPES:
        _check_within_eager_error(x64.to(dtype), w64.to(dtype), b64.to(dtype), dy64.to(dtype), 32, "cpu")
        return
    x, w, b = (t.to(dtype).requires_grad_(True) for t in (x64, w64, b64))
    y = fastdiff.group_norm_silu(x, 32, w, b, backend="cpu")
    got = (y,) + torch.autograd.grad(y, (x, w, b), dy64.to(dtype))
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x64, w64, b64))
    yr = _eager(xr, 32, wr, br)
    want = (yr,) + torch.autograd.grad(yr, (xr, wr, br), dy64)
    tol = 1e-5 if dtype == torch.float32 else 1e-10  # DESIGN.md: fp32 1e-5..1e-4
    for a, r, what in zip(got, want, ("y", "dx", "dweight", "dbias")):
        # relative to the largest entry: dweight / dbias are sums over 18k elements, some near 0
        assert_close(a, r, tol * r.abs().max().item(), tol, what)


def test_extreme_pre_activations(backend="cpu"):
    """fp32 silu and its gradient where a = scale x + shift runs over [-130, 130]: the sigmoid's
    exp(-a) under- and overflows there (the CPU's polynomial exp clamps and scales by 2^n)."""
    shape, groups = (2, 32, 6, 5), 32
    x64, _, _, dy64 = _inputs(shape)
    w64 = torch.full((32,), 8.0, dtype=torch.float64)
    b64 = torch.linspace(-110, 110, 32, dtype=torch.float64)
    for name, xl in _layouts(x64.float()):
        x, w, b = (t.float().clone().requires_grad_(True) for t in (xl, w64, b64))
        y = fastdiff.group_norm_silu(x, groups, w, b, backend=backend)
        got = (y,) + torch.autograd.grad(y, (x, w, b), dy64.float())
        xr, wr, br = (t.clone().requires_grad_(True) for t in (x64, w64, b64))
        yr = _eager(xr, groups, wr, br)
        want = (yr,) + torch.autograd.grad(yr, (xr, wr, br), dy64)
        assert y.abs().max() > 120 and y.min() < 0
        for a, r, what in zip(got, want, ("y", "dx", "dweight", "dbias")):
            assert torch.isfinite(a).all(), f"{name} {what}: non-finite"
            assert_close(a, r, 1e-5 * r.abs().max().item(), 1e-5, f"{name} {what}")


def test_silu_exp_accuracy():
    """The CPU silu's polynomial exp2 against float64 at the same fp32 pre-activations (the
    activation=None output is the kernel's own a = scale x + shift): a ~ N(0, 3), and a uniform
    over [-100, 100] (one group of uniform values, xhat in [-sqrt 3, sqrt 3], times w)."""
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(2, 64, 4000, generator=g), 3.0),
             (torch.linspace(-1, 1, 2 * 64 * 4000).reshape(2, 64, 4000), 100 / 3 ** 0.5)]
    for x, scale in cases:
        w, b = torch.full((64,), scale), torch.zeros(64)
        a = fastdiff.group_norm_silu(x, 1, w, b, activation=None, backend="cpu").double()
        y = fastdiff.group_norm_silu(x, 1, w, b, backend="cpu").double()
        assert a.abs().max() > 8
        want = F.silu(a)
        normal = want.abs() > 1e-30  # fp32 denormals and zeros carry no relative accuracy
        rel = (y - want).abs()[normal] / want.abs()[normal]
        # the polynomial's 1.5e-7, plus rounding t = -a log2 e: |a| 2^-24, the order of a's own rounding
        bound = 2e-7 + a.abs()[normal] * 2.0**-23
        assert (rel <= bound).all(), (rel - bound).max().item()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
def test_extreme_pre_activations_other_backends(backend):
    test_extreme_pre_activations(backend)


def _other_cpu_capabilities():
    from fastdiff import _C_loader
    return [c for c in _C_loader._supported_caps() if c != _C_loader.cpu_capability]


@pytest.mark.parametrize("cap", _other_cpu_capabilities())
def test_large_outputs_other_cpu_capability(cap):
    """The CPU kernels are built once per capability (vector widths, tails, the exp): run the
    tests above with the kernels of each other capability that was built and that this CPU runs."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_group_norm_silu as t;"
        "from fastdiff import _C_loader; assert _C_loader.cpu_capability == sys.argv[2], _C_loader.cpu_capability;"
        "[t.test_large_outputs(s, d) for s, d in t.LARGE_OUTPUTS]; t.test_extreme_pre_activations(); print('ok')"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), cap], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


_WORK_ORDER_CASES = [  # (shape, groups, dtype)
    ((2, 1280, 16, 16), 32, torch.float32),   # slices of several groups, 40 channels each
    ((2, 72, 17, 19), 8, torch.float32),      # more than one 256-pixel chunk; partial vectors
    ((3, 264, 7, 5), 4, torch.bfloat16),      # runs of 4 pixels + the rest
    ((2, 40, 11, 13), 8, torch.float16),
    ((2, 48, 9, 7), 4, torch.float64),
    ((2, 64, 96, 96), 32, torch.float32),     # 8-byte groups: pixel blocks unless the L2 is huge
]


def _cpu_outputs_here():
    """y, dx, dw, db of the CPU kernels for _WORK_ORDER_CASES, every layout."""
    out = []
    for shape, groups, dtype in _WORK_ORDER_CASES:
        x, w, b, dy = _inputs(shape, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for layout, xl in _layouts(x):
            args = [xl.clone().requires_grad_(True), w.to(acc).requires_grad_(True), b.to(acc).requires_grad_(True)]
            y = fastdiff.group_norm_silu(args[0], groups, args[1], args[2], backend="cpu")
            dyl = dy.to(memory_format=torch.channels_last) if layout == "channels_last" else dy
            out.append((layout, y.detach()) + torch.autograd.grad(y, args, dyl))
    return out


def _cpu_outputs_for_l2(l2_bytes, tmp_path):
    """_cpu_outputs_here() in a process whose CPU kernels plan for an L2 of l2_bytes."""
    path = tmp_path / f"l2_{l2_bytes}.pt"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import test_group_norm_silu as t;"
            "torch.save(t._cpu_outputs_here(), sys.argv[2])")
    env = dict(os.environ, FASTDIFF_CPU_L2_BYTES=str(l2_bytes))
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(path)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return torch.load(path)


def test_work_order_never_changes_the_bits(tmp_path):
    """The CPU kernels choose their work order from the L2 size (NC*: pairs of groups or one at a
    time; channels-last: slices of groups or pixel blocks). A 64-byte L2 takes single groups and
    pixel blocks everywhere, a 1 GB one pairs and slices: outputs and gradients must be bitwise
    equal, and match torch."""
    small, large = _cpu_outputs_for_l2(64, tmp_path), _cpu_outputs_for_l2(1 << 30, tmp_path)
    assert len(small) == len(large) == 2 * len(_WORK_ORDER_CASES)
    for (layout, *a), (_, *b) in zip(small, large):
        for name, ta, tb in zip(("y", "dx", "dw", "db"), a, b):
            assert ta.stride() == tb.stride() and torch.equal(ta, tb), (layout, name)
    for k, (shape, groups, dtype) in enumerate(_WORK_ORDER_CASES):
        x, w, b, _ = _inputs(shape)
        want = _eager(x, groups, w, b)
        for layout, y, *_ in large[2 * k:2 * k + 2]:
            tol = 1e-10 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 5e-2)
            assert_close(y.double(), want, tol, tol, f"y {shape} {dtype} {layout}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_statistics(backend):
    """|mean| >> std: the shifted sums keep the variance (sum of squares would cancel in fp32)."""
    x, w, b, _ = _inputs((2, 16, 16, 16), dtype=torch.float32, offset=1000.0)
    for _, xl in _layouts(x):
        got = fastdiff.group_norm_silu(xl, 4, w, b, backend=backend).double()
        want = _eager(x.double(), 4, w.double(), b.double())
        assert_close(got, want, 2e-3, 1e-3, "y at mean 1000")


def test_gradcheck_cpu():
    x, w, b, _ = _inputs((2, 8, 3, 3))
    for _, xl in _layouts(x):
        args = [t.clone().requires_grad_(True) for t in (xl, w, b)]
        assert torch.autograd.gradcheck(lambda x, w, b: fastdiff.group_norm_silu(x, 4, w, b, backend="cpu"), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_backward(backend):
    shape = (2, 64, 20, 20) if backend != "triton" else (2, 16, 6, 6)
    x, w, b, dy = _inputs(shape, dtype=torch.float32)
    for _, xl in _layouts(x):
        runs = []
        for _ in range(2):
            args = [t.clone().requires_grad_(True) for t in (xl, w, b)]
            y = fastdiff.group_norm_silu(*args[:1], 8, *args[1:], backend=backend)
            runs.append((y,) + torch.autograd.grad(y, args, dy.to(memory_format=torch.contiguous_format)))
        for a, b2 in zip(*runs):
            assert torch.equal(a, b2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_and_empty_batch(backend):
    x, w, b, _ = _inputs((2, 16, 6, 10))
    strided = x[..., ::2]  # neither contiguous nor channels_last: copied, correctly
    assert_close(fastdiff.group_norm_silu(strided, 4, w, b, backend=backend), _eager(strided, 4, w, b),
                 1e-12, 1e-10, "strided")
    empty = x[:0].clone().requires_grad_(True)
    y = fastdiff.group_norm_silu(empty, 4, w, b, backend=backend)
    assert y.shape == empty.shape
    assert torch.autograd.grad(y.sum(), empty)[0].shape == empty.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_of_any_strides(backend):
    """Autograd hands the backward whatever strides the consumer produced: an expanded
    (stride 0) gradient from .sum(), a transposed one; each is taken to x's layout."""
    x0, w0, b0, dy = _inputs((2, 8, 5, 6))
    for name, xl in _layouts(x0):
        for gname, grad in (("expanded", torch.ones(()).expand(x0.shape)),
                            ("transposed", dy.transpose(2, 3).contiguous().transpose(2, 3))):
            x, w, b = (t.clone().requires_grad_(True) for t in (xl, w0, b0))
            got = torch.autograd.grad(fastdiff.group_norm_silu(x, 4, w, b, backend=backend), (x, w, b), grad)
            xr, wr, br = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
            want = torch.autograd.grad(_eager(xr, 4, wr, br), (xr, wr, br), grad)
            for a, r, what in zip(got, want, ("dx", "dweight", "dbias")):
                assert_close(a, r, 1e-10, 1e-9, f"{name} {gname} {what}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda")])
def test_autograd_is_the_cpp_node(backend):
    """fastdiff:: ops record a C++ autograd node (csrc/autograd): no Python on the per-layer
    path of a training step."""
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    assert "CppNode" in fastdiff.group_norm_silu(x, 4, backend=backend).grad_fn.name()


def test_backward_op_copies_strides_but_never_converts():
    """torch.ops.fastdiff._group_norm_silu_bwd takes grad_y of any strides (copied to x's
    layout) but refuses another dtype or shape instead of converting it."""
    if "cpu" not in BACKENDS:
        pytest.skip("needs the C++ CPU kernels")
    x, w, b, dy = _inputs((2, 8, 4, 4))
    _, mean, rstd = torch.ops.fastdiff.group_norm_silu(x, w, b, 4, 1e-5, True)
    bwd = torch.ops.fastdiff._group_norm_silu_bwd
    want = bwd(dy, x, w, b, mean, rstd, 4, True)
    got = bwd(dy.transpose(2, 3).contiguous().transpose(2, 3), x, w, b, mean, rstd, 4, True)
    for g, r in zip(got, want):
        assert torch.equal(g, r)
    with pytest.raises(RuntimeError, match="grad_y dtype"):
        bwd(dy.float(), x, w, b, mean, rstd, 4, True)
    with pytest.raises(RuntimeError, match="grad_y shape"):
        bwd(dy[:1], x, w, b, mean, rstd, 4, True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda")])
def test_double_backward_is_refused(backend):
    """The backward op has no autograd: create_graph=True through it (a gradient penalty)
    raises instead of giving a wrong second derivative; first order is unaffected."""
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(fastdiff.group_norm_silu(x, 4, backend=backend).square().sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(fastdiff.group_norm_silu(x, 4, backend=backend).square().sum(), x)
    assert not g.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_parameter_dtype(backend):
    """bf16 activations with fp32 parameters (a model kept in fp32, activations cast): the
    parameters are used in fp32 and their gradients come back in fp32."""
    x, w, b, dy = _inputs((2, 16, 4, 4))
    xb = x.to(torch.bfloat16).requires_grad_(True)
    w32, b32 = (t.float().requires_grad_(True) for t in (w, b))
    y = fastdiff.group_norm_silu(xb, 4, w32, b32, backend=backend)
    assert y.dtype == torch.bfloat16
    gx, gw, gb = torch.autograd.grad(y, (xb, w32, b32), dy.to(torch.bfloat16))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gb.dtype == torch.float32
    want = _eager(xb.detach().double(), 4, w.double(), b.double())
    assert_close(y, want, 2e-2, 2e-2, "y")


@pytest.mark.parametrize("bad, match, exc", [
    (dict(num_groups=5), "must divide the number of channels C = 16", ValueError),
    (dict(num_groups=0), "num_groups must be a positive int", ValueError),
    (dict(weight=torch.ones(8)), r"weight must have shape \(16,\)", ValueError),
    (dict(bias=torch.ones(16, dtype=torch.int64)), "bias must be float", TypeError),
    (dict(x=torch.ones(2, 16, 4, dtype=torch.int32)), "x must be float", TypeError),
    (dict(x=torch.ones(16)), "x must have at least 2 dims", ValueError),
    (dict(eps=0.0), "eps must be a positive number", ValueError),
    (dict(activation="gelu"), "activation must be one of", ValueError),
])
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_bad_input(backend, bad, match, exc):
    args = dict(x=torch.randn(2, 16, 4), num_groups=4, weight=torch.ones(16), bias=torch.zeros(16), eps=1e-5,
                activation="silu")
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastdiff.group_norm_silu(**args, backend=backend)


# -- the module -------------------------------------------------------------------------------
def test_module_is_a_group_norm_and_loads_its_weights():
    ref = torch.nn.GroupNorm(8, 32)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mod = fastdiff.nn.GroupNormSiLU(8, 32)
    assert isinstance(mod, torch.nn.GroupNorm)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 6, 6)
    assert_close(mod(x), F.silu(ref(x)), 1e-5, 1e-5, "module")
    plain = fastdiff.nn.GroupNormSiLU(8, 32, activation=None, affine=False)
    assert_close(plain(x), F.group_norm(x, 8, eps=1e-5), 1e-5, 1e-5, "no activation, no affine")
    with pytest.raises(ValueError, match="activation must be one of"):
        fastdiff.nn.GroupNormSiLU(8, 32, activation="relu")


def test_matches_diffusers_resnet_block_norm():
    """diffusers' ResnetBlock2D runs norm1 then its nonlinearity (SiLU): the same numbers."""
    from diffusers.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=None, groups=32).double()
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64)
    fused = fastdiff.nn.GroupNormSiLU(32, 64, eps=block.norm1.eps).double()
    fused.load_state_dict(block.norm1.state_dict())
    assert_close(fused(x), block.nonlinearity(block.norm1(x)), 1e-12, 1e-10, "ResnetBlock2D norm1 + SiLU")
