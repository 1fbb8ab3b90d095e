"""fastdiff.kernels (Triton) launchers against the C++ CPU kernels
(torch.ops.fastdiff) and an independent float64 eager formula, forward and
backward, plus the no-GPU compile report (`fastdiff kernels`).

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors. The
variable must be set before triton is first imported; this module sets it when
unset, so the whole pytest process then interprets Triton (conftest.py does the
same). If the kernels were compiled for a GPU instead (TRITON_INTERPRET unset
on a CUDA machine), the same tests run them on CUDA tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import importlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fastdiff  # noqa: E402,F401  (loads torch.ops.fastdiff and its CPU kernels)
from fastdiff import kernel_report  # noqa: E402

# The schedule ops; sample_and_kl has its own file (test_triton_sample_and_kl.py).
OPS = ("q_sample", "diffusion_loss", "ddpm_step", "ddim_step")

pytestmark = pytest.mark.triton

K = {op: importlib.import_module(f"fastdiff.kernels.{op}") for op in OPS}
CPP = torch.ops.fastdiff

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()
if isinstance(K["q_sample"]._q_sample_fwd_kernel, InterpretedFunction):
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover
    pytest.skip("Triton kernels were compiled (TRITON_INTERPRET unset) and there is no GPU",
                allow_module_level=True)


def _tri(fn, *args):
    """Runs a Triton launcher on DEVICE; results back on the CPU."""
    moved = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*moved)
    if isinstance(out, tuple):
        return tuple(o.cpu() for o in out)
    return out.cpu()


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------
T = 1000
SHAPES = [
    (3, 4, 5, 7),  # odd 4-D, n = 140
    (2, 3, 33),    # odd 1-D signal
    (1, 4, 8, 8),  # batch of one, SD-latent-like
    (2, 3, 700),   # n = 2100: several programs per sample and a masked tail
]
LOW = [torch.bfloat16, torch.float16]


def _table(dtype=None):
    """The kernels' (T, 4) float64 schedule table (linear betas), for any input dtype."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    ab = torch.cumprod(1.0 - betas, 0)
    return torch.stack([ab, 1.0 - ab, ab.sqrt(), (1.0 - ab).sqrt()], 1).contiguous()


def _acc(dtype):
    """The compute (opmath) dtype: the loss's dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _timesteps(batch):
    """t with 0 and T-1 among them; t_prev = t - 37, -1 where that is negative."""
    t = torch.tensor([0, T - 1, 417, 1, 36, 600, 999, 2][:batch] + [5] * max(0, batch - 8))
    t_prev = torch.where(t - 37 < 0, torch.full_like(t, -1), t - 37)
    return t, t_prev


def _randn(shape, dtype, seed, scale=1.0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# ---------------------------------------------------------------------------
# Independent eager formulas (diffusers' / improved-diffusion's step math),
# per sample with Python-float coefficients. With float64 tensors they are the
# exact reference; with a reduced-precision dtype, "eager in that dtype".
# Backward through autograd.
# ---------------------------------------------------------------------------
def _row(tab, i):
    return [float(v) for v in tab[int(i)].double()]


def _prev(tab, i):
    i = int(i)
    if i < 0:
        return 1.0, 0.0
    r = _row(tab, i)
    return r[0], r[1]


def ref_q_sample(x0, noise, t, tab):
    out = torch.empty_like(x0)
    for b in range(x0.shape[0]):
        _, _, sa, s1 = _row(tab, t[b])
        out[b] = sa * x0[b] + s1 * noise[b]
    return out


def ref_loss(m, x0, noise, t, tab, pred, gamma):
    losses = []
    for b in range(m.shape[0]):
        ab, omab, sa, s1 = _row(tab, t[b])
        target = (noise[b], x0[b], sa * noise[b] - s1 * x0[b])[pred]
        w = 1.0
        if gamma > 0:
            snr = ab / omab
            w = min(snr, gamma)
            w = w / snr if pred == 0 else (w / (snr + 1.0) if pred == 2 else w)
        losses.append(w * ((m[b] - target) ** 2).mean())
    return torch.stack(losses)


def _clip(x0, r):
    """clamp to [-r, r] whose VJP passes strictly inside (-r, r), as torch.clamp's
    (schedule_math.h pass_inside)."""
    inside = (x0 > -r) & (x0 < r)
    return torch.where(inside, x0, x0.detach().clamp(-r, r))


def _predict(x, m, sa, s1, pred):
    """(x0_hat, eps_hat) of diffusers' schedulers."""
    if pred == 0:
        return (x - s1 * m) / sa, m
    if pred == 1:
        return m, (x - sa * m) / s1
    return sa * x - s1 * m, sa * m + s1 * x


def ref_ddpm(m, x, noise, t, t_prev, tab, pred, var_type, clip, r):
    outs = []
    channels = x.shape[1] if x.dim() > 1 else None
    for b in range(x.shape[0]):
        ab, omab, sa, s1 = _row(tab, t[b])
        abp, omabp = _prev(tab, t_prev[b])
        alpha = ab / abp
        # 1 - ab / abp from the 1 - alpha_bar column (no cancellation at small t).
        beta = (omab - omabp) / abp
        mb = m[b, :channels] if var_type >= 4 else m[b]
        x0, _ = _predict(x[b], mb, sa, s1, pred)
        if clip:
            x0 = _clip(x0, r)
        mean = (abp ** 0.5 * beta / omab) * x0 + (alpha ** 0.5 * omabp / omab) * x[b]
        var = max(omabp / omab * beta, 1e-20)
        if int(t[b]) == 0:
            outs.append(mean)
            continue
        if var_type in (0, 1):
            std = var ** 0.5
        elif var_type in (2, 3):
            std = beta ** 0.5
        elif var_type == 4:
            std = torch.exp(0.5 * m[b, channels:])
        else:
            frac = (m[b, channels:] + 1.0) / 2.0
            std = torch.exp(0.5 * (frac * torch.log(torch.tensor(beta, dtype=x.dtype))
                                   + (1.0 - frac) * torch.log(torch.tensor(var, dtype=x.dtype))))
        outs.append(mean + std * noise[b])
    return torch.stack(outs)


def ref_ddim(m, x, noise, t, t_prev, tab, pred, eta, clip, r, use_clipped):
    outs = []
    for b in range(x.shape[0]):
        ab, omab, sa, s1 = _row(tab, t[b])
        abp, omabp = _prev(tab, t_prev[b])
        x0, eps = _predict(x[b], m[b], sa, s1, pred)
        if clip:
            x0 = _clip(x0, r)
        if use_clipped:
            eps = (x[b] - sa * x0) / s1
        sigma = eta * max(omabp / omab * ((omab - omabp) / abp), 0.0) ** 0.5  # as in ddpm
        out = abp ** 0.5 * x0 + max(omabp - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma != 0:
            out = out + sigma * noise[b]
        outs.append(out)
    return torch.stack(outs)


def _ref_with_grads(fn, m, x, grad, *args, **kw):
    """fn(m, x, *args) and its VJP to (m, x), in the tensors' dtype."""
    m = m.detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(m, x, *args, **kw)
    gm, gx = torch.autograd.grad(out, (m, x), grad.to(out.dtype), allow_unused=True)
    return out.detach(), (torch.zeros_like(m) if gm is None else gm), \
        (torch.zeros_like(x) if gx is None else gx)


# ---------------------------------------------------------------------------
# Comparisons.
# ---------------------------------------------------------------------------
def _err(a, b):
    d = (a.double() - b.double()).abs()
    return f"max abs err {d.max().item():.3e}, mean {d.mean().item():.3e}"


def check_vs_cpp(tri, cpp, what):
    """Same dtype, same math: fp32/fp64 to rounding, 16-bit dtypes to one ulp."""
    assert tri.shape == cpp.shape and tri.dtype == cpp.dtype, what
    assert tri.stride() == cpp.stride(), f"{what}: strides {tri.stride()} != {cpp.stride()}"
    scale = 1.0 + cpp.double().abs().max().item()
    if cpp.dtype in LOW:
        eps = torch.finfo(cpp.dtype).eps
        ok = torch.allclose(tri.double(), cpp.double(), rtol=eps, atol=eps * scale)
    else:
        tol = 1e-5 if cpp.dtype == torch.float32 else 1e-12
        ok = torch.allclose(tri.double(), cpp.double(), rtol=tol, atol=tol * scale)
    assert ok, f"{what} vs C++: {_err(tri, cpp)}"


def check_vs_ref(tri, exact, eager=None, what=""):
    """fp32/fp64 against the float64 formula; 16-bit dtypes by flash-attention's
    rule (error at most 2x eager's in that dtype, plus one ulp of the largest)."""
    assert tri.shape == exact.shape, what
    scale = exact.abs().max().item()
    if tri.dtype in LOW:
        err = (tri.double() - exact).abs().max().item()
        eager_err = (eager.double() - exact).abs().max().item()
        floor = torch.finfo(tri.dtype).eps * scale
        assert err <= 2 * eager_err + floor, (
            f"{what}: error {err:.3e} > 2 x eager {eager_err:.3e} + {floor:.3e}")
    else:
        tol = 2e-5 if tri.dtype == torch.float32 else 1e-10
        assert torch.allclose(tri.double(), exact, rtol=tol, atol=tol * (1.0 + scale)), \
            f"{what} vs float64 formula: {_err(tri, exact)}"


# ---------------------------------------------------------------------------
# q_sample
# ---------------------------------------------------------------------------
def _run_q_sample(shape, dtype, channels_last=False):
    tab = _table(dtype)
    t, _ = _timesteps(shape[0])
    x0 = _randn(shape, dtype, 1, channels_last=channels_last)
    z = _randn(shape, dtype, 2, channels_last=channels_last)
    g = _randn(shape, dtype, 3, channels_last=channels_last)
    q = K["q_sample"]
    out = _tri(q.q_sample_fwd, x0, z, t, tab)
    check_vs_cpp(out, CPP.q_sample(x0, z, t, tab), "q_sample fwd")
    exact = ref_q_sample(x0.double(), z.double(), t, tab)
    check_vs_ref(out, exact, ref_q_sample(x0, z, t, tab), "q_sample fwd")
    gx0, gz = _tri(q.q_sample_bwd, g, t, tab)
    cx0, cz = CPP._q_sample_bwd(g, t, tab)
    check_vs_cpp(gx0, cx0, "q_sample d x0")
    check_vs_cpp(gz, cz, "q_sample d noise")
    # d x0 = sqrt(ab) g, d noise = sqrt(1 - ab) g: q_sample itself is the oracle.
    zero = torch.zeros_like(g)
    check_vs_ref(gx0, ref_q_sample(g.double(), zero.double(), t, tab),
                 ref_q_sample(g, zero, t, tab), "q_sample d x0")
    check_vs_ref(gz, ref_q_sample(zero.double(), g.double(), t, tab),
                 ref_q_sample(zero, g, t, tab), "q_sample d noise")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample(shape, dtype):
    _run_q_sample(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_sample_channels_last(dtype):
    _run_q_sample((3, 4, 5, 7), dtype, channels_last=True)


# ---------------------------------------------------------------------------
# diffusion_loss
# ---------------------------------------------------------------------------
# grad_scale values of the fused forward: 1.0 (loss.sum()) and 0.25
# (loss.mean() over a batch of 4).
GRAD_SCALES = (1.0, 0.25)


def _run_loss(shape, dtype, pred, gamma, channels_last=False):
    tab = _table(dtype)
    t, _ = _timesteps(shape[0])
    m = _randn(shape, dtype, 1, channels_last=channels_last)
    x0 = _randn(shape, dtype, 2, channels_last=channels_last)
    z = _randn(shape, dtype, 3, channels_last=channels_last)
    gl = _randn((shape[0],), _acc(dtype), 4)
    L = K["diffusion_loss"]
    loss, no_grad = _tri(L.diffusion_loss_fwd, m, x0, z, t, tab, pred, gamma, 0.0)
    assert loss.dtype == _acc(dtype) and loss.shape == (shape[0],)
    assert no_grad.shape == (0,) and no_grad.dtype == dtype, "grad_scale 0 writes no gradient"
    # The loss is computed in the compute dtype from the (rounded) inputs.
    tol = 1e-5 if loss.dtype == torch.float32 else 1e-12
    cpp, cpp_grad = CPP.diffusion_loss(m, x0, z, t, tab, pred, gamma, 0.0)
    assert torch.allclose(loss, cpp, rtol=tol, atol=0), f"loss vs C++: {_err(loss, cpp)}"
    assert cpp_grad.shape == (0,) and cpp_grad.dtype == dtype
    m64 = m.double().requires_grad_(True)
    exact = ref_loss(m64, x0.double(), z.double(), t, tab, pred, gamma)
    assert torch.allclose(loss.double(), exact.detach(), rtol=tol, atol=0), \
        f"loss vs float64 formula: {_err(loss, exact.detach())}"

    def eager_grad(g):
        """d (g . L) / d m by autograd in the input dtype (16-bit dtypes only)."""
        if dtype not in LOW:
            return None
        me = m.clone().requires_grad_(True)
        return torch.autograd.grad(ref_loss(me, x0, z, t, tab, pred, gamma), me, g.to(dtype))[0]

    # Recompute backward.
    gm = _tri(L.diffusion_loss_bwd, gl, m, x0, z, t, tab, pred, gamma)
    check_vs_cpp(gm, CPP._diffusion_loss_bwd(gl, m, x0, z, t, tab, pred, gamma), "loss d m")
    (gexact,) = torch.autograd.grad(exact, m64, gl.double(), retain_graph=True)
    check_vs_ref(gm, gexact, eager_grad(gl), "loss d m")

    # Fused forward: the same loss, plus grad_scale * d L_b / d m from stage 1.
    for gs in GRAD_SCALES:
        what = f"fused loss d m (grad_scale {gs})"
        loss_g, fused = _tri(L.diffusion_loss_fwd, m, x0, z, t, tab, pred, gamma, gs)
        assert torch.equal(loss_g, loss), f"{what}: the loss changed with WRITE_GRAD"
        assert fused.shape == m.shape and fused.dtype == dtype, what
        assert fused.stride() == m.stride(), f"{what}: strides {fused.stride()} != {m.stride()}"
        g = torch.full((shape[0],), gs, dtype=_acc(dtype))
        cpp_loss_g, cpp_fused = CPP.diffusion_loss(m, x0, z, t, tab, pred, gamma, gs)
        assert torch.allclose(loss_g, cpp_loss_g, rtol=tol, atol=0), what
        check_vs_cpp(fused, cpp_fused, what)
        # The recompute path with dL_b = grad_scale: the same gradient.
        check_vs_cpp(fused, _tri(L.diffusion_loss_bwd, g, m, x0, z, t, tab, pred, gamma),
                     f"{what} vs the recompute backward")
        (gexact,) = torch.autograd.grad(exact, m64, g.double(), retain_graph=True)
        check_vs_ref(fused, gexact, eager_grad(g), what)
    return loss


@pytest.mark.parametrize("gamma", [0.0, 5.0])  # unweighted, min-SNR-5
@pytest.mark.parametrize("pred", [0, 1, 2])  # epsilon, sample, v_prediction
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (2, 3, 700)])  # odd; n > BLOCK
def test_diffusion_loss(shape, dtype, pred, gamma):
    _run_loss(shape, dtype, pred, gamma)


@pytest.mark.parametrize("shape, dtype, channels_last", [
    ((2, 3, 33), torch.float16, False),   # odd 1-D, fp16
    ((1, 4, 8, 8), torch.float64, False),  # batch of one, fp64
    ((3, 4, 5, 7), torch.float32, True),   # channels_last
])
def test_diffusion_loss_more(shape, dtype, channels_last):
    for pred in (0, 2):
        _run_loss(shape, dtype, pred, 5.0, channels_last)


def test_diffusion_loss_multi_partial_reduction(monkeypatch):
    """Stage 1 with many partials per sample, stage 2 looping in steps with a
    masked tail; bitwise deterministic from run to run."""
    L = K["diffusion_loss"]
    monkeypatch.setattr(L, "BLOCK", 16)        # n = 140 -> 9 partials
    monkeypatch.setattr(L, "REDUCE_BLOCK", 4)  # 3 stage-2 steps, the last masked
    loss = _run_loss((3, 4, 5, 7), torch.float32, 2, 5.0)
    tab = _table()
    t, _ = _timesteps(3)
    args = [_randn((3, 4, 5, 7), torch.float32, s) for s in (1, 2, 3)]
    again, _ = _tri(L.diffusion_loss_fwd, *args, t, tab, 2, 5.0, 0.0)
    assert torch.equal(loss, again)
    fused_loss, fused = _tri(L.diffusion_loss_fwd, *args, t, tab, 2, 5.0, 0.25)
    assert torch.equal(loss, fused_loss)
    assert torch.equal(fused, _tri(L.diffusion_loss_fwd, *args, t, tab, 2, 5.0, 0.25)[1])


def test_diffusion_loss_reads_only_the_target_inputs():
    """epsilon targets never read x0, sample targets never read noise."""
    shape, tab = (2, 3, 33), _table()
    t, _ = _timesteps(2)
    m, x0, z = (_randn(shape, torch.float32, s) for s in (1, 2, 3))
    poison = torch.full(shape, float("nan"))
    L = K["diffusion_loss"]
    gl = torch.ones(2)
    for pred, args in ((0, (m, poison, z)), (1, (m, x0, poison))):
        for gs in (0.0, 1.0):
            loss, grad = _tri(L.diffusion_loss_fwd, *args, t, tab, pred, 0.0, gs)
            assert torch.isfinite(loss).all(), f"prediction_type {pred} read an unused input"
            assert torch.isfinite(grad).all(), f"prediction_type {pred} read an unused input"
            want = _tri(L.diffusion_loss_fwd, m, x0, z, t, tab, pred, 0.0, gs)
            assert torch.equal(loss, want[0]) and torch.equal(grad, want[1])
        assert torch.isfinite(_tri(L.diffusion_loss_bwd, gl, *args, t, tab, pred, 0.0)).all()


def test_diffusion_loss_empty_sample_is_nan():
    x = torch.empty(2, 0)
    t, _ = _timesteps(2)
    fwd = K["diffusion_loss"].diffusion_loss_fwd
    loss, grad = _tri(fwd, x, x, x, t, _table(), 0, 0.0, 0.0)
    assert loss.shape == (2,) and torch.isnan(loss).all()
    assert grad.shape == (0,) and grad.dtype == x.dtype
    loss, grad = _tri(fwd, x, x, x, t, _table(), 0, 0.0, 1.0)
    assert loss.shape == (2,) and torch.isnan(loss).all()
    assert grad.shape == (2, 0) and grad.dtype == x.dtype


def test_diffusion_loss_empty_batch():
    x = torch.empty(0, 3, 4, dtype=torch.bfloat16)
    t = torch.empty(0, dtype=torch.int64)
    fwd = K["diffusion_loss"].diffusion_loss_fwd
    loss, grad = _tri(fwd, x, x, x, t, _table(), 2, 5.0, 0.0)
    assert loss.shape == (0,) and loss.dtype == torch.float32 and grad.shape == (0,)
    loss, grad = _tri(fwd, x, x, x, t, _table(), 2, 5.0, 0.5)
    assert loss.shape == (0,) and grad.shape == (0, 3, 4) and grad.dtype == torch.bfloat16


def test_diffusion_loss_configs_cover_both_write_grad_variants():
    """`fastdiff kernels` compiles stage 1 with and without the fused gradient."""
    L = K["diffusion_loss"]
    seen = {(tuple(sorted(c["constexprs"].items())), c["dtype"])
            for c in L.KERNEL_CONFIGS if c["name"] == "_diffusion_loss_fwd_kernel"}
    for pred, write_grad, dtype in itertools.product(range(3), (False, True),
                                                      ("fp32", "bf16", "fp16")):
        key = {"PRED": pred, "WRITE_GRAD": write_grad, "BLOCK": L.BLOCK}
        assert (tuple(sorted(key.items())), dtype) in seen


# ---------------------------------------------------------------------------
# ddpm_step
# ---------------------------------------------------------------------------
def _run_ddpm(shape, dtype, pred, var, clip, channels_last=False, noise=True, r=1.0):
    tab = _table(dtype)
    t, t_prev = _timesteps(shape[0])
    mshape = (shape[0], 2 * shape[1]) + tuple(shape[2:]) if var >= 4 else shape
    m = _randn(mshape, dtype, 1, channels_last=channels_last)
    if var == 5:  # learned_range interpolates with v in [-1, 1]
        m = m.clamp(-1.0, 1.0)
    x = _randn(shape, dtype, 2, channels_last=channels_last)
    z = _randn(shape, dtype, 3, channels_last=channels_last) if noise else None
    g = _randn(shape, dtype, 4, channels_last=channels_last)
    if not noise:  # the last step of sampling: t == 0, alpha_bar_prev = 1
        t, t_prev = torch.zeros_like(t), torch.full_like(t_prev, -1)
    P = K["ddpm_step"]
    args = (t, t_prev, tab, pred, var, clip, r)
    out = _tri(P.ddpm_step_fwd, m, x, z, *args)
    gm, gx = _tri(P.ddpm_step_bwd, g, m, x, z, *args)
    check_vs_cpp(out, CPP.ddpm_step(m, x, z, *args), "ddpm fwd")
    cgm, cgx = CPP._ddpm_step_bwd(g, m, x, z, *args)
    check_vs_cpp(gm, cgm, "ddpm d model_output")
    check_vs_cpp(gx, cgx, "ddpm d sample")
    zz = torch.zeros_like(x) if z is None else z
    ref = (tab, pred, var, clip, r)
    exact = _ref_with_grads(lambda mm, xx: ref_ddpm(mm, xx, zz.double(), t, t_prev, *ref),
                            m.double(), x.double(), g.double())
    eager = (_ref_with_grads(lambda mm, xx: ref_ddpm(mm, xx, zz, t, t_prev, *ref), m, x, g)
             if dtype in LOW else (None,) * 3)
    for name, a, e, l in zip(("fwd", "d model_output", "d sample"), (out, gm, gx), exact, eager):
        check_vs_ref(a, e, l, f"ddpm {name}")


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("var", range(6))  # fixed_small(_log), fixed_large(_log), learned(_range)
@pytest.mark.parametrize("pred", [0, 1, 2])
def test_ddpm_step(pred, var, clip):
    _run_ddpm((3, 4, 5, 7), torch.float32, pred, var, clip)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 33), (1, 4, 8, 8), (2, 3, 700)])
def test_ddpm_step_dtypes_shapes(shape, dtype):
    for pred, var, clip in ((0, 0, True), (2, 5, False), (1, 4, True)):
        _run_ddpm(shape, dtype, pred, var, clip)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddpm_step_channels_last(dtype):
    for pred, var in ((0, 1), (2, 2)):
        _run_ddpm((3, 4, 5, 7), dtype, pred, var, True, channels_last=True)


@pytest.mark.parametrize("var", [0, 5])
def test_ddpm_step_without_noise_at_t0(var):
    """noise=None when every t == 0: never read."""
    _run_ddpm((2, 3, 33), torch.float32, 0, var, True, noise=False)


def test_ddpm_step_does_not_read_noise_at_t0():
    shape, tab = (3, 4, 5, 7), _table()
    t, t_prev = _timesteps(3)  # t[0] == 0
    m = _randn((3, 8, 5, 7), torch.float32, 1)
    x = _randn(shape, torch.float32, 2)
    z = _randn(shape, torch.float32, 3)
    z[0] = float("nan")
    P = K["ddpm_step"]
    args = (t, t_prev, tab, 0, 5, False, 1.0)
    z[1] = float("nan")  # t[1] > 0: read
    out = _tri(P.ddpm_step_fwd, m, x, z, *args)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    gm, gx = _tri(P.ddpm_step_bwd, torch.ones_like(x), m, x, z, *args)
    assert torch.isfinite(gm[0]).all() and torch.isnan(gm[1, 4:]).all()
    assert torch.isfinite(gx).all()


# ---------------------------------------------------------------------------
# ddim_step
# ---------------------------------------------------------------------------
def _run_ddim(shape, dtype, pred, eta, clip, use_clipped, channels_last=False, r=1.0):
    tab = _table(dtype)
    t, t_prev = _timesteps(shape[0])
    m = _randn(shape, dtype, 1, channels_last=channels_last)
    x = _randn(shape, dtype, 2, channels_last=channels_last)
    z = _randn(shape, dtype, 3, channels_last=channels_last) if eta > 0 else None
    g = _randn(shape, dtype, 4, channels_last=channels_last)
    D = K["ddim_step"]
    out = _tri(D.ddim_step_fwd, m, x, z, t, t_prev, tab, pred, eta, clip, r, use_clipped)
    check_vs_cpp(out, CPP.ddim_step(m, x, z, t, t_prev, tab, pred, eta, clip, r, use_clipped),
                 "ddim fwd")
    bargs = (t, t_prev, tab, pred, eta, clip, r, use_clipped)
    gm, gx = _tri(D.ddim_step_bwd, g, m, x, *bargs)
    cgm, cgx = CPP._ddim_step_bwd(g, m, x, *bargs)
    check_vs_cpp(gm, cgm, "ddim d model_output")
    check_vs_cpp(gx, cgx, "ddim d sample")
    zz = torch.zeros_like(x) if z is None else z
    ref = (tab, pred, eta, clip, r, use_clipped)
    exact = _ref_with_grads(lambda mm, xx: ref_ddim(mm, xx, zz.double(), t, t_prev, *ref),
                            m.double(), x.double(), g.double())
    eager = (_ref_with_grads(lambda mm, xx: ref_ddim(mm, xx, zz, t, t_prev, *ref), m, x, g)
             if dtype in LOW else (None,) * 3)
    for name, a, e, l in zip(("fwd", "d model_output", "d sample"), (out, gm, gx), exact, eager):
        check_vs_ref(a, e, l, f"ddim {name}")


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("pred", [0, 1, 2])
def test_ddim_step(pred, eta, clip, use_clipped):
    _run_ddim((3, 4, 5, 7), torch.float32, pred, eta, clip, use_clipped)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 33), (1, 4, 8, 8), (2, 3, 700)])
def test_ddim_step_dtypes_shapes(shape, dtype):
    for pred, eta, clip, use_clipped in ((0, 0.0, True, True), (2, 1.0, True, False),
                                         (1, 0.5, False, True)):
        _run_ddim(shape, dtype, pred, eta, clip, use_clipped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddim_step_channels_last(dtype):
    _run_ddim((3, 4, 5, 7), dtype, 2, 0.5, True, True, channels_last=True)


def test_ddim_step_does_not_read_noise_where_sigma_is_zero():
    """sigma == 0 where t_prev < 0 (alpha_bar_prev = 1) and everywhere when eta == 0."""
    shape, tab = (3, 4, 5, 7), _table()
    t, t_prev = _timesteps(3)  # t_prev[0] == -1
    m, x, z = (_randn(shape, torch.float32, s) for s in (1, 2, 3))
    z[0] = float("nan")
    z[1] = float("nan")  # sigma > 0: read
    D = K["ddim_step"]
    out = _tri(D.ddim_step_fwd, m, x, z, t, t_prev, tab, 0, 1.0, False, 1.0, False)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    z[:] = float("nan")
    out = _tri(D.ddim_step_fwd, m, x, z, t, t_prev, tab, 0, 0.0, False, 1.0, False)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------
# Launch geometry: several programs per sample and batches split over launches.
# ---------------------------------------------------------------------------
def test_small_blocks_and_batch_slices(monkeypatch):
    """BLOCK = 32 (n = 140: five programs per sample, the last masked) and at
    most 2 samples per launch (the gridDim.y split) for every op."""
    for op in OPS:
        monkeypatch.setattr(K[op], "BLOCK", 32)
    monkeypatch.setattr(K["diffusion_loss"], "BWD_BLOCK", 32)
    monkeypatch.setattr(K["q_sample"], "MAX_GRID_Y", 2)
    shape = (5, 4, 5, 7)
    _run_q_sample(shape, torch.float32)
    _run_loss(shape, torch.float32, 2, 5.0)
    _run_ddpm(shape, torch.float32, 0, 5, True)
    _run_ddim(shape, torch.float32, 2, 0.5, True, True)


# ---------------------------------------------------------------------------
# The compile report: every Triton config compiles for sm_80 and sm_90 without
# a GPU, with no spills (about a minute on 2 cores from a cold Triton cache).
# ---------------------------------------------------------------------------
def test_kernel_configs_are_well_formed():
    for op in OPS:
        configs = K[op].KERNEL_CONFIGS
        assert configs, op
        for cfg in configs:
            names = list(cfg["signature"])
            assert names == list(cfg["kernel"].arg_names), cfg["name"]
            assert all(cfg["signature"][k] == "constexpr" for k in cfg["constexprs"])


def test_kernel_report_compiles_everything_without_spills():
    out = io.StringIO()
    rc = kernel_report.run(("sm_80", "sm_90"), out=out)
    text = out.getvalue()
    assert rc == 0, text[-6000:]
    assert "0 failed" in text and "spilling 0" in text, text[-3000:]


def test_parse_resource_usage():
    kr = kernel_report
    text = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z5otherPf:
  REG:10 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    rows = kr.parse_resource_usage(text)
    assert rows == [("sm_80", "_Z5otherPf", {"REG": 10, "STACK": 0, "SHARED": 1024, "LOCAL": 8,
                                              "CONSTANT[0]": 360, "TEXTURE": 0, "SURFACE": 0,
                                              "SAMPLER": 0})]


def test_all_combinations_are_listed():
    """KERNEL_CONFIGS covers every constexpr combination the launchers use."""
    P, D = K["ddpm_step"], K["ddim_step"]
    seen = {(c["name"], tuple(sorted(c["constexprs"].items())), c["dtype"])
            for c in P.KERNEL_CONFIGS + D.KERNEL_CONFIGS}
    for pred, var, clip, dtype in itertools.product(range(3), range(6), (False, True),
                                                    ("fp32", "bf16", "fp16")):
        key = {"PRED": pred, "VAR": P.KERNEL_VARIANCE[var], "CLIP": clip, "BLOCK": P.BLOCK}
        for k in ("_ddpm_step_fwd_kernel", "_ddpm_step_bwd_kernel"):
            assert (k, tuple(sorted(key.items())), dtype) in seen
    for pred, clip, uc, dtype in itertools.product(range(3), (False, True), (False, True),
                                                   ("fp32", "bf16", "fp16")):
        key = {"PRED": pred, "CLIP": clip, "USE_CLIPPED": uc, "BLOCK": D.BLOCK}
        for k in ("_ddim_step_fwd_kernel", "_ddim_step_bwd_kernel"):
            assert (k, tuple(sorted(key.items())), dtype) in seen
