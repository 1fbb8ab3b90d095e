"""fastdiff.kernels.vb_loss (Triton) against the C++ CPU op
(torch.ops.fastdiff.vb_loss / _vb_loss_bwd) and fastdiff.reference.vb_loss
with autograd in float64: the loss, the fused gradients (grad_scale != 0) and
the recompute backward, over batches that mix the decoder NLL (t == 0, all
three 8-bit bins) and the KL to the true posterior (t > 0); plus the public
path fastdiff.vb_loss(..., backend="triton") against backend="cpu".

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors; the
variable is set here, before triton is first imported (conftest.py does the
same).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

import fastdiff  # noqa: E402  (registers torch.ops.fastdiff and its CPU kernels)
from fastdiff import reference  # noqa: E402
from fastdiff.kernels import vb_loss as K  # noqa: E402

from utils import assert_close, assert_within_eager_error, fused_backends_here  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
CPP = torch.ops.fastdiff
SCHEDULE = fastdiff.NoiseSchedule.cosine(1000)
TABLE = SCHEDULE.posterior_table("cpu")
# t == 0 (decoder NLL) next to t > 0 (KL), first and last steps included.
TIMESTEPS = [0, 1, 0, 999, 417, 0, 36, 2]
SHAPES = [
    (4, 3, 5, 7),   # odd 4-D, n = 105
    (3, 33),        # odd 1-D signal, n = 33
    (4, 2, 1100),   # n = 2200 > BLOCK, BWD_BLOCK: several programs per sample, the last masked
]
LOW = (torch.bfloat16, torch.float16)
GRAD_SCALE = 0.25  # loss.mean() over a batch of 4


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, dtype, seed=0, channels_last=False, t=None):
    """(model_mean, model_log_variance, x0, x_t, t, grad_loss): x0 on the 8-bit
    grid (randint(0, 256) / 127.5 - 1, with -1 and 1 in every sample: all three
    decoder bins), x_t = q_sample(x0, t, noise), model_mean the true posterior
    mean plus half its std of noise, model_log_variance = learned_range(v, t)
    with v uniform in [-1, 1]. Built in float64, then rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    batch = shape[0]
    t = torch.tensor(TIMESTEPS[:batch] if t is None else t, dtype=torch.int64)
    x0 = torch.randint(0, 256, shape, generator=g).double() / 127.5 - 1.0
    flat = x0.view(batch, -1)
    flat[:, 0], flat[:, -1] = -1.0, 1.0
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    x_t = fastdiff.q_sample(x0, t, noise, SCHEDULE)
    mean, lv1 = reference.q_posterior_mean_log_variance(x0, x_t, t, SCHEDULE)
    m = mean + 0.5 * torch.exp(0.5 * lv1) * torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.rand(shape, generator=g, dtype=torch.float64) * 2.0 - 1.0
    lv = reference.learned_range(v, t, SCHEDULE)
    gl = torch.randn(batch, generator=g, dtype=torch.float64).to(_acc(dtype))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [x.to(dtype).contiguous(memory_format=fmt).to(DEVICE) for x in (m, lv, x0, x_t)]
    return (*xs, t.to(DEVICE), gl.to(DEVICE))


def _tri(fn, *args):
    """A Triton launcher on DEVICE (TABLE appended where the op takes it); results on the CPU."""
    out = fn(*args)
    return tuple(o.cpu() for o in out)


def _cpu(*xs):
    return [x.cpu() if isinstance(x, torch.Tensor) else x for x in xs]


def _reference(m, lv, x0, x_t, t, gl, dtype):
    """(loss, d m, d lv) of fastdiff.reference.vb_loss in `dtype` (float64: the exact
    value from the given inputs; a 16-bit dtype: eager PyTorch), the gradients by
    autograd for upstream gl."""
    m, lv = (x.cpu().to(dtype).requires_grad_(True) for x in (m, lv))
    loss = reference.vb_loss(m, lv, x0.cpu().to(dtype), x_t.cpu().to(dtype), t.cpu(), SCHEDULE)
    gm, glv = torch.autograd.grad(loss, (m, lv), gl.cpu().to(dtype))
    return loss.detach(), gm, glv


def _loss_tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


def _check_grad(got, cpp, exact, eager, what):
    """A gradient against the C++ op (same math: to rounding of exp / log / tanh,
    16-bit dtypes to one ulp) and the float64 autograd reference. The decoder
    gradient has cancellation (pdf(u+) - pdf(u-)), so the absolute tolerance is
    relative to the tensor's largest entry."""
    assert got.shape == cpp.shape and got.dtype == cpp.dtype, what
    assert got.stride() == cpp.stride(), f"{what}: strides {got.stride()} != {cpp.stride()}"
    scale = exact.abs().max().item()
    if got.dtype in LOW:
        eps = torch.finfo(got.dtype).eps
        assert_close(got, cpp, eps * scale, eps, f"{what} vs CPU op")
        assert_within_eager_error(got, eager, exact, what, floor=eps * scale)
    else:
        tol = 1e-12 if got.dtype == torch.float64 else 2e-6
        assert_close(got, cpp, tol * scale, tol, f"{what} vs CPU op")
        # fp32: the coefficients rounded to fp32 and the cancellations in d = c_x0 x0 +
        # c_xt x_t - m and 1 - spread leave about 1e-5 of the largest entry (the CPU op too).
        tol = 1e-10 if got.dtype == torch.float64 else 5e-5
        assert_close(got, exact, tol * scale, tol, f"{what} vs float64 reference")


def _run(shape, dtype, channels_last=False, seed=0):
    m, lv, x0, x_t, t, gl = _inputs(shape, dtype, seed, channels_last)
    args = (m, lv, x0, x_t, t, TABLE.to(DEVICE))
    cargs = _cpu(*args)
    acc = _acc(dtype)
    ex_loss, ex_gm, ex_glv = _reference(m, lv, x0, x_t, t, gl, torch.float64)
    eager = _reference(m, lv, x0, x_t, t, gl, dtype) if dtype in LOW else (None,) * 3
    tol = _loss_tol(dtype)

    # Loss only.
    loss, gm0, glv0 = _tri(K.vb_loss_fwd, *args, 0.0)
    assert loss.dtype == acc and loss.shape == (shape[0],)
    for g in (gm0, glv0):
        assert g.shape == (0,) and g.dtype == dtype, "grad_scale 0 writes no gradient"
    cpp_loss = CPP.vb_loss(*cargs, 0.0)[0]
    assert_close(loss, cpp_loss, 0, tol, "loss vs CPU op")
    # The loss is computed in A from the (rounded) inputs: fp32 is close to float64.
    assert_close(loss, ex_loss, 0, 1e-10 if dtype == torch.float64 else 2e-5,
                 "loss vs float64 reference")

    # Recompute backward.
    gm, glv = _tri(K.vb_loss_bwd, gl, *args)
    cgm, cglv = CPP._vb_loss_bwd(gl.cpu(), *cargs)
    _check_grad(gm, cgm, ex_gm, eager[1], "bwd d mean")
    _check_grad(glv, cglv, ex_glv, eager[2], "bwd d log_variance")

    # Fused forward: the loss (to rounding: the KL is summed through `spread`, as
    # vlb_kl_with_grad) and grad_scale * d loss_b / d inputs from stage 1.
    loss_g, fgm, fglv = _tri(K.vb_loss_fwd, *args, GRAD_SCALE)
    c_loss_g, c_fgm, c_fglv = CPP.vb_loss(*cargs, GRAD_SCALE)
    assert_close(loss_g, c_loss_g, 0, tol, "fused loss vs CPU op")
    assert_close(loss_g, loss, 0, tol, "fused loss vs loss only")
    g = torch.full((shape[0],), GRAD_SCALE, dtype=acc)
    _, fx_gm, fx_glv = _reference(m, lv, x0, x_t, t, g, torch.float64)
    f_eager = _reference(m, lv, x0, x_t, t, g, dtype) if dtype in LOW else (None,) * 3
    _check_grad(fgm, c_fgm, fx_gm, f_eager[1], "fused d mean")
    _check_grad(fglv, c_fglv, fx_glv, f_eager[2], "fused d log_variance")
    # The recompute path with dL/dloss_b = grad_scale: the same numbers.
    rgm, rglv = _tri(K.vb_loss_bwd, g.to(DEVICE), *args)
    assert torch.equal(fgm, rgm) and torch.equal(fglv, rglv), "fused vs recompute gradient"
    return loss, fgm, fglv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_vb_loss(shape, dtype):
    _run(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last(dtype):
    shape = (4, 3, 5, 7)
    loss, gm, glv = _run(shape, dtype, channels_last=True, seed=1)
    m, lv, x0, x_t, t, _ = _inputs(shape, dtype, seed=1, channels_last=True)
    assert m.stride() != m.contiguous().stride() and gm.stride() == m.stride()
    # The contiguous layout: the same elements, the same per-element gradients.
    args = [x.contiguous() for x in (m, lv, x0, x_t)]
    loss_c, gm_c, glv_c = _tri(K.vb_loss_fwd, *args, t, TABLE.to(DEVICE), GRAD_SCALE)
    assert torch.equal(gm_c, gm.contiguous()) and torch.equal(glv_c, glv.contiguous())
    assert_close(loss_c, loss, 0, 1e-5, "loss layouts")


def test_decoder_bins_and_branch_inputs():
    """t == 0 hits all three decoder bins and never reads x_t or the table row;
    t > 0 samples reproduce the KL branch."""
    shape = (3, 4, 9)
    m, lv, x0, x_t, t, gl = _inputs(shape, torch.float64, seed=2, t=[0, 0, 0])
    assert (x0 < -0.999).any() and (x0 > 0.999).any() and ((x0.abs() < 0.999)).any()
    poison = torch.full_like(x_t, float("nan"))
    table = TABLE.to(DEVICE)
    loss, gm, glv = _tri(K.vb_loss_fwd, m, lv, x0, poison, t, table, 1.0)
    want = _tri(K.vb_loss_fwd, m, lv, x0, x_t, t, table, 1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(gm).all(), "t == 0 read x_t"
    assert all(torch.equal(a, b) for a, b in zip((loss, gm, glv), want))
    bgm, bglv = _tri(K.vb_loss_bwd, gl, m, lv, x0, poison, t, table)
    assert torch.isfinite(bgm).all() and torch.isfinite(bglv).all(), "t == 0 read x_t"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic(dtype):
    args = _inputs((4, 2, 1100), dtype, seed=3)[:5]
    table = TABLE.to(DEVICE)
    a = _tri(K.vb_loss_fwd, *args, table, GRAD_SCALE)
    b = _tri(K.vb_loss_fwd, *args, table, GRAD_SCALE)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_multi_step_reduce_and_batch_slices(monkeypatch):
    """Small BLOCK / REDUCE_BLOCK: many partials, several stage-2 steps, a tail,
    and the batch launched in slices (as for B > 65535)."""
    monkeypatch.setattr(K, "BLOCK", 32)
    monkeypatch.setattr(K, "REDUCE_BLOCK", 2)
    monkeypatch.setattr(K, "BWD_BLOCK", 64)
    monkeypatch.setattr(K, "batch_slices", lambda b: [slice(i, min(i + 2, b)) for i in range(0, b, 2)])
    shape = (5, 3, 37)  # n = 111: 4 partials, the last masked; 2 stage-2 steps
    m, lv, x0, x_t, t, gl = _inputs(shape, torch.float64, seed=4)
    args = (m, lv, x0, x_t, t, TABLE.to(DEVICE))
    ex_loss, ex_gm, ex_glv = _reference(m, lv, x0, x_t, t, gl, torch.float64)
    loss, _, _ = _tri(K.vb_loss_fwd, *args, 0.0)
    assert_close(loss, ex_loss, 0, 1e-10, "loss")
    gm, glv = _tri(K.vb_loss_bwd, gl, *args)
    cgm, cglv = CPP._vb_loss_bwd(gl.cpu(), *_cpu(*args))
    _check_grad(gm, cgm, ex_gm, None, "d mean")
    _check_grad(glv, cglv, ex_glv, None, "d log_variance")


def test_empty():
    table = TABLE.to(DEVICE)
    x = torch.zeros((0, 3, 4), dtype=torch.bfloat16, device=DEVICE)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    loss, gm, glv = _tri(K.vb_loss_fwd, x, x, x, x, t, table, 0.0)
    c_loss, c_gm, _ = CPP.vb_loss(*_cpu(x, x, x, x, t, table), 0.0)
    assert loss.shape == c_loss.shape == (0,) and loss.dtype == c_loss.dtype == torch.float32
    assert gm.shape == glv.shape == c_gm.shape == (0,) and gm.dtype == torch.bfloat16
    loss, gm, glv = _tri(K.vb_loss_fwd, x, x, x, x, t, table, 0.5)
    assert loss.shape == (0,) and gm.shape == glv.shape == (0, 3, 4) and gm.dtype == torch.bfloat16
    gm, glv = _tri(K.vb_loss_bwd, torch.zeros(0, device=DEVICE), x, x, x, x, t, table)
    assert gm.shape == glv.shape == (0, 3, 4)
    # n == 0: the mean of nothing, NaN (as the CPU kernel).
    x = torch.zeros((2, 0), device=DEVICE)
    t = torch.tensor([0, 5], device=DEVICE)
    loss, gm, _ = _tri(K.vb_loss_fwd, x, x, x, x, t, table, 1.0)
    assert loss.shape == (2,) and torch.isnan(loss).all() and gm.shape == (2, 0)


def test_contract_errors():
    m, lv, x0, x_t, t, gl = _inputs((2, 3, 4), torch.float32)
    table = TABLE.to(DEVICE)
    with pytest.raises(ValueError):
        K.vb_loss_fwd(m, lv.double(), x0, x_t, t, table, 0.0)
    with pytest.raises(ValueError):
        K.vb_loss_fwd(m, lv, x0, x_t[:1], t, table, 0.0)
    with pytest.raises(ValueError):
        K.vb_loss_fwd(m, lv, x0, x_t, t.int(), table, 0.0)
    with pytest.raises(ValueError):
        K.vb_loss_bwd(gl.double(), m, lv, x0, x_t, t, table)  # grad_loss not A
    with pytest.raises(TypeError):
        K.vb_loss_fwd(*(x.int() for x in (m, lv, x0, x_t)), t, table, 0.0)


def test_configs_cover_every_launch_variant():
    seen = {(c["name"], tuple(sorted(c["constexprs"].items())), c["dtype"]) for c in K.KERNEL_CONFIGS}
    for dtype in ("fp32", "bf16", "fp16"):
        for write_grad in (False, True):
            key = {"WRITE_GRAD": write_grad, "BLOCK": K.BLOCK}
            assert ("_vb_loss_fwd_kernel", tuple(sorted(key.items())), dtype) in seen
        assert ("_vb_loss_bwd_kernel", (("BLOCK", K.BWD_BLOCK),), dtype) in seen
    assert ("_vb_loss_fwd_reduce_kernel", (("REDUCE_BLOCK", K.REDUCE_BLOCK),), "fp32") in seen
    for cfg in K.KERNEL_CONFIGS:
        assert list(cfg["signature"]) == list(cfg["kernel"].arg_names), cfg["name"]


# ---------------------------------------------------------------------------
# The public op: fastdiff.vb_loss(..., backend="triton") against backend="cpu",
# forward and backward into all four inputs.
# ---------------------------------------------------------------------------
@pytest.mark.skipif(DEVICE != "cpu", reason="compares CPU tensors with the CPU backend")
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_op_triton_vs_cpu(dtype, reduction):
    assert {"cpu", "triton"} <= set(fused_backends_here("vb_loss"))
    shape = (4, 3, 5, 7)
    inputs = _inputs(shape, dtype, seed=5)[:4]
    t = torch.tensor(TIMESTEPS[:4])
    up = torch.randn(shape[0] if reduction == "none" else (), generator=torch.Generator().manual_seed(6))
    results = {}
    for backend in ("cpu", "triton"):
        xs = [x.clone().requires_grad_(True) for x in inputs]
        loss = fastdiff.vb_loss(*xs, t, SCHEDULE, reduction, backend=backend)
        grads = torch.autograd.grad(loss, xs, up.to(loss.dtype), retain_graph=True)
        # A second backward recomputes the gradients with the backward kernel.
        again = torch.autograd.grad(loss, xs, up.to(loss.dtype))
        results[backend] = (loss.detach(), grads, again)
    (c_loss, c_grads, c_again), (loss, grads, again) = results["cpu"], results["triton"]
    assert loss.dtype == dtype and loss.shape == c_loss.shape
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_close(loss, c_loss, 0, tol, "loss")
    names = ("d model_mean", "d model_log_variance", "d x0", "d x_t")
    for got, want, name in zip(grads + again, c_grads + c_again, names + names):
        scale = want.double().abs().max().item()
        ftol = 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert_close(got, want, ftol * scale, ftol, name)
