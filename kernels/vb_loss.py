"""vb_loss as Triton kernels: improved DDPM's per-sample variational-bound term
(KL to the true posterior for t > 0, the decoder NLL for t == 0) in bits per
dim, and its VJP in (model_mean, model_log_variance).

Math: csrc/include/fastdiff/vlb_math.h (vlb_kl, vlb_kl_with_grad,
decoder_bin, vlb_decoder_nll, vlb_decoder_nll_with_grad; Nichol & Dhariwal
2021). Per sample b with t = t[b], the row of the float64 posterior table
[c_x0, c_xt, lv1, var1] (coef1, coef2, clipped log-variance, its exp), read in
float64 and cast to the compute type A (fp32; fp64 for fp64 inputs); per
element m (model_mean), lv (model_log_variance), x0, x_t, in A:
  t > 0:   d = c_x0 x0 + c_xt x_t - m,  e = exp(-lv)
           term = (-1 + lv - lv1 + var1 e + d d e) / 2       (losses.normal_kl)
           VJP (upstream g): spread = var1 e + d d e,
             d m = -g d e,  d lv = g (1 - spread) / 2
  t == 0:  inv_std = exp(-lv / 2), u+- = inv_std (x0 - m +- 1/255)
           cdf(u) = (1 + tanh(k (u + a u^3))) / 2, k = sqrt(2 / pi), a = 0.044715
           pdf(u) = (1 - tanh^2) / 2 k (1 + 3 a u^2)         (its derivative)
           prob = cdf(u+) (x0 < -0.999), 1 - cdf(u-) (x0 > 0.999),
                  else cdf(u+) - cdf(u-)
           term = -log(max(prob, 1e-12))   (losses.discretized_gaussian_log_likelihood)
           VJP: dprob = -g / prob where prob > 1e-12, else 0;
             p+ = pdf(u+) (0 in the top bin), p- = -pdf(u-) (0 in the bottom bin)
             d m = -dprob inv_std (p+ + p-),  d lv = -dprob (p+ u+ + p- u-) / 2
  loss[b] = sum_i term_i / (n ln 2), the sum in A, the division in float64,
  then cast to A (as the C++ kernel). g = grad_scale / (n ln 2) (fused
  forward) or grad_loss[b] / (n ln 2) (backward), in float64, cast once to A.
The operation order of each expression is vlb_math.h's (the forward without
the gradient sums the KL left to right, the one with it through `spread`), so
the numbers match the CPU kernel to rounding of exp / log / tanh.

t is uniform per sample, hence per program: each program branches once on the
scalar t (only its own branch runs, as the C++ kernels). The range of t is
checked by the Python API on this path (ops/_common.timesteps), as for
diffusion_loss; the kernels trust it.

Deterministic forward, no atomics (as sample_and_kl): stage 1 writes one
partial sum of terms per (sample, block of BLOCK elements), so the split
depends only on n; stage 2 sums each sample's partials in a fixed order and
scales by 1 / (n ln 2). Masked lanes add exactly 0 (the term of zeros is not 0).

Fused gradient (grad_scale != 0): stage 1, which already holds every piece of
the term, also writes grad_scale * d loss_b / d model_mean and
d / d model_log_variance (T, like model_mean); the autograd backward then only
rescales them. vb_loss_bwd (the recompute path) stays for grad_scale == 0.

Layout contract (the caller guarantees it, see kernels/q_sample.py): the four
per-element inputs are dense, batch outermost, with the same strides; each is
B blocks of n = numel / B elements treated as flat per sample.
"""
import torch
import triton
import triton.language as tl

from .q_sample import (
    CONFIG_DTYPES,
    NUM_WARPS,
    _div,
    _exp,
    _log,
    _sample_block,
    _to_out,
    batch_slices,
    check_inputs,
    check_like,
    kernel_config,
    per_sample,
)

# Elements per stage-1 program (one partial sum each). Fixed: the reduction
# tree, hence the bits of the loss, depend only on the shape. 1024, not
# diffusion_loss's 2048: the element math (two tanh, exp, log and a division
# per element at t == 0) at 16 elements per thread takes ~190-240 registers
# with the fused gradient, 8 per thread about half.
BLOCK = 1024
# Partials summed per step by the stage-2 program of a sample.
REDUCE_BLOCK = 1024
# Elements per program of the backward.
BWD_BLOCK = 1024

# Float constants are written inline or made with tl.full(value, dtype): a
# Python float assigned to a local inside a kernel becomes an fp32 constant
# (rounding fp64 math), and a module-level tl.constexpr float does not combine
# with tensors under the interpreter. 0.6931471805599453 is M_LN2.


@triton.jit
def _tanh(x):
    """tanh within about 2 ulp (Cephes tanhf / tanh): an odd polynomial (fp32)
    or rational function (fp64) of x^2 for |x| < 0.625, else
    1 - 2 / (exp(2 |x|) + 1); the sign of x restored. Against the exact value:
    at most 1.8 ulp in fp32 and 1.4 ulp in fp64 with a correctly rounded exp
    (the CPU op's Sleef tanh: 1 ulp). One code path on the GPU (exp from
    libdevice) and under the interpreter (which has no libdevice tanh); NaN
    stays NaN (it takes the polynomial branch)."""
    z = tl.abs(x)
    s = z * z
    if x.dtype == tl.float64:
        p = (-9.64399179425052238628e-1 * s - 9.92877231001918586564e1) * s \
            - 1.61468768441708447952e3
        q = ((s + 1.12811678491632931402e2) * s + 2.23548839060100448583e3) * s \
            + 4.84406305325125486048e3
        small = z + z * s * (p / q)
    else:
        p = (((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s
             + 1.33314422036e-1) * s - 3.33332819422e-1
        small = p * s * z + z
    # exp(80) is finite in fp32; 1 - 2 / (e + 1) rounds to 1 well before |x| = 40.
    large = 1.0 - _div(2.0, _exp(tl.minimum(z + z, 80.0)) + 1.0)
    r = tl.where(z >= 0.625, large, small)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def _approx_normal_cdf(u, WITH_PDF: tl.constexpr):
    """(cdf, pdf) of vlb_math.h approx_normal_cdf, in u's type; pdf = cdf when
    not WITH_PDF (unused)."""
    a = tl.full((), 0.044715, u.dtype)  # typed: 3 a is rounded in A, as S(3) * a
    k = tl.full((), 0.7978845608028654, u.dtype)  # sqrt(2 / pi)
    th = _tanh(k * (u + a * u * u * u))
    cdf = 0.5 * (1.0 + th)
    if WITH_PDF:
        pdf = 0.5 * (1.0 - th * th) * k * (1.0 + 3.0 * a * u * u)
    else:
        pdf = cdf
    return cdf, pdf


@triton.jit
def _decoder_term(m, lv, x, g, WITH_GRAD: tl.constexpr):
    """(nll, d m, d lv) per element at t == 0 (vlb_math.h decoder_bin,
    vlb_decoder_nll(_with_grad)); without WITH_GRAD the second and third
    values are the nll again, unused by the caller (a jit function returns one shape)."""
    inv_std = _exp(-0.5 * lv)
    centered = x - m
    u_plus = inv_std * (centered + 1.0 / 255.0)
    u_minus = inv_std * (centered - 1.0 / 255.0)
    cdf_plus, pdf_plus = _approx_normal_cdf(u_plus, WITH_GRAD)
    cdf_minus, pdf_minus = _approx_normal_cdf(u_minus, WITH_GRAD)
    bottom = x < -0.999  # bin (-inf, x + 1/255]
    top = x > 0.999      # bin [x - 1/255, inf)
    prob = tl.where(bottom, cdf_plus, tl.where(top, 1.0 - cdf_minus, cdf_plus - cdf_minus))
    floor_p = tl.full((), 1e-12, m.dtype)  # kLogProbFloor
    # torch.clamp_min: NaN stays NaN.
    nll = -_log(tl.where(prob < floor_p, floor_p, prob))
    if WITH_GRAD:
        dprob_dplus = tl.where(top, 0.0, pdf_plus)
        dprob_dminus = tl.where(bottom, 0.0, -pdf_minus)
        # d nll / d prob, passed by the clamp only where prob > 1e-12 (0 for NaN;
        # the other lanes divide by 1, not by a clamped-away 0).
        passed = prob > floor_p
        dprob = tl.where(passed, -_div(g, tl.where(passed, prob, 1.0)), 0.0)
        d_m = -(dprob * inv_std * (dprob_dplus + dprob_dminus))
        d_lv = -0.5 * dprob * (dprob_dplus * u_plus + dprob_dminus * u_minus)
    else:
        d_m = nll
        d_lv = nll
    return nll, d_m, d_lv


@triton.jit
def _kl_term(m, lv, x0, xt, c_x0, c_xt, lv1, var1, g, WITH_GRAD: tl.constexpr):
    """(kl, d m, d lv) per element at t > 0 (vlb_math.h vlb_kl(_with_grad));
    without WITH_GRAD the second and third values are the kl again, unused."""
    d = c_x0 * x0 + c_xt * xt - m
    e = _exp(-lv)
    if WITH_GRAD:
        spread = var1 * e + d * d * e  # (var1 + d^2) / exp(lv)
        kl = 0.5 * (-1.0 + lv - lv1 + spread)
        d_m = -(g * d * e)
        d_lv = 0.5 * g * (1.0 - spread)
    else:
        kl = 0.5 * (-1.0 + lv - lv1 + var1 * e + d * d * e)
        d_m = kl
        d_lv = kl
    return kl, d_m, d_lv


@triton.jit
def _vlb_block(m_ptr, lv_ptr, x0_ptr, xt_ptr, table_ptr, t, base, offs, mask, g,
               WITH_GRAD: tl.constexpr):
    """(term, d m, d lv) at elements base + offs of a sample with timestep t, in
    A; masked lanes hold the term of zeros (the caller zeroes them). One branch
    per program: t is the sample's. x_t and the table are read only for t > 0."""
    ACC: tl.constexpr = tl.float64 if m_ptr.dtype.element_ty == tl.float64 else tl.float32
    m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    lv = tl.load(lv_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    if t == 0:
        term, d_m, d_lv = _decoder_term(m, lv, x0, g, WITH_GRAD)
    else:
        row = table_ptr + t * 4
        c_x0 = tl.load(row + 0).to(ACC)  # posterior_mean_coef1
        c_xt = tl.load(row + 1).to(ACC)  # posterior_mean_coef2
        lv1 = tl.load(row + 2).to(ACC)   # clipped posterior log-variance
        var1 = tl.load(row + 3).to(ACC)  # its exp
        xt = tl.load(xt_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        term, d_m, d_lv = _kl_term(m, lv, x0, xt, c_x0, c_xt, lv1, var1, g, WITH_GRAD)
    return term, d_m, d_lv


@triton.jit
def _vb_loss_fwd_kernel(
    m_ptr,          # *T   (B, n) model_mean, flat per sample
    lv_ptr,         # *T   (B, n) model_log_variance, same layout
    x0_ptr,         # *T   (B, n) clean data x0
    xt_ptr,         # *T   (B, n) noised sample x_t (read for t > 0)
    grad_m_ptr,     # *T   (B, n) output grad_scale * d loss_b / d model_mean
                    #      (written only when WRITE_GRAD)
    grad_lv_ptr,    # *T   (B, n) output grad_scale * d loss_b / d model_log_variance
                    #      (written only when WRITE_GRAD)
    partial_ptr,    # *A   (B, P) output: partial sums of terms, P = cdiv(n, BLOCK);
                    #      A = fp32 (fp64 for fp64 inputs)
    t_ptr,          # *i64 (B,) timestep of each sample
    table_ptr,      # *f64 (T, 4) posterior table [c_x0, c_xt, lv1, var1]
    grad_scale: tl.float64,  # the gradient's scale, dL/dloss_b (read when WRITE_GRAD)
    n,              # int  elements per sample
    num_partials,   # int  P, partials per sample
    WRITE_GRAD: tl.constexpr,  # also write grad_m, grad_lv (grad_scale != 0)
    BLOCK: tl.constexpr,       # elements per program (= per partial)
):
    """Stage 1, program (i, b) on elements [i BLOCK, (i + 1) BLOCK) of sample b:
    partial[b, i] = sum_j term_j in A (the KL for t[b] > 0, the decoder NLL for
    t[b] == 0; module docstring). WRITE_GRAD: also the VJP with upstream
    g = grad_scale / (n ln 2) (float64, cast once to A), stored as T.
    Masked lanes add exactly 0."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    b = tl.program_id(1)
    t = tl.load(t_ptr + b)
    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    if WRITE_GRAD:
        g = (grad_scale / (tl.cast(n, tl.float64) * 0.6931471805599453)).to(ACC)
    else:
        g = tl.zeros((), ACC)  # unused
    term, d_m, d_lv = _vlb_block(m_ptr, lv_ptr, x0_ptr, xt_ptr, table_ptr, t, base, offs,
                                 mask, g, WRITE_GRAD)
    term = tl.where(mask, term, 0.0)
    tl.store(partial_ptr + b.to(tl.int64) * num_partials + tl.program_id(0),
             tl.sum(term, axis=0))
    if WRITE_GRAD:
        tl.store(grad_m_ptr + base + offs, _to_out(d_m, grad_m_ptr), mask=mask)
        tl.store(grad_lv_ptr + base + offs, _to_out(d_lv, grad_lv_ptr), mask=mask)


@triton.jit
def _vb_loss_fwd_reduce_kernel(
    partial_ptr,   # *A   (B, P) partial sums of terms from stage 1
    loss_ptr,      # *A   (B,) output: per-sample loss in bits per dim
    n,             # int  elements per sample (the mean's divisor)
    num_partials,  # int  P, partials per sample
    REDUCE_BLOCK: tl.constexpr,  # partials added per step
):
    """Stage 2, one program per sample: loss[b] = (sum_i partial[b, i]) / (n ln 2),
    the sum in A in a fixed order (deterministic), the division in float64 and
    the result cast to A (as the C++ kernel)."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    b = tl.program_id(0)
    row = partial_ptr + b.to(tl.int64) * num_partials
    offs = tl.arange(0, REDUCE_BLOCK)
    acc = tl.zeros([REDUCE_BLOCK], dtype=ACC)
    for k in range(0, num_partials, REDUCE_BLOCK):
        acc += tl.load(row + k + offs, mask=k + offs < num_partials, other=0.0)
    total = tl.sum(acc, axis=0).to(tl.float64)
    tl.store(loss_ptr + b, (total / (tl.cast(n, tl.float64) * 0.6931471805599453)).to(ACC))


@triton.jit
def _vb_loss_bwd_kernel(
    grad_loss_ptr,  # *A   (B,) dL/dloss_b
    m_ptr,          # *T   (B, n) model_mean
    lv_ptr,         # *T   (B, n) model_log_variance
    x0_ptr,         # *T   (B, n) clean data x0
    xt_ptr,         # *T   (B, n) noised sample x_t (read for t > 0)
    grad_m_ptr,     # *T   (B, n) output dL/d model_mean, same layout
    grad_lv_ptr,    # *T   (B, n) output dL/d model_log_variance, same layout
    t_ptr,          # *i64 (B,) timestep of each sample
    table_ptr,      # *f64 (T, 4) posterior table
    n,              # int  elements per sample
    BLOCK: tl.constexpr,  # elements per program
):
    """VJP of loss_b = sum_i term_i / (n ln 2) (vlb_math.h vlb_kl_with_grad /
    vlb_decoder_nll_with_grad) with upstream g = dL/dloss_b / (n ln 2), in
    float64 then cast to A; element math in A, stored as T."""
    ACC: tl.constexpr = grad_loss_ptr.dtype.element_ty
    b = tl.program_id(1)
    t = tl.load(t_ptr + b)
    g = (tl.load(grad_loss_ptr + b).to(tl.float64) / (tl.cast(n, tl.float64) * 0.6931471805599453)).to(ACC)
    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    _, d_m, d_lv = _vlb_block(m_ptr, lv_ptr, x0_ptr, xt_ptr, table_ptr, t, base, offs, mask,
                              g, True)
    tl.store(grad_m_ptr + base + offs, _to_out(d_m, grad_m_ptr), mask=mask)
    tl.store(grad_lv_ptr + base + offs, _to_out(d_lv, grad_lv_ptr), mask=mask)


# ---------------------------------------------------------------------------
# Launchers (signatures of torch.ops.fastdiff.vb_loss / _vb_loss_bwd).
# ---------------------------------------------------------------------------
def check_vb_inputs(model_mean, model_log_variance, x0, x_t, t, posterior):
    """Cheap contract checks (dtype, shape, device, strides; the Python API checks
    density and the range of t); returns the compute dtype A (the loss's)."""
    acc = check_inputs(model_mean, posterior, t)
    if model_mean.dim() == 0:
        raise ValueError("fastdiff triton: model_mean must have a batch dimension")
    for x, name in ((model_log_variance, "model_log_variance"), (x0, "x0"), (x_t, "x_t")):
        check_like(x, name, model_mean, "model_mean")
    return acc


def vb_loss_fwd(model_mean, model_log_variance, x0, x_t, t, posterior, grad_scale):
    """(loss (B,) in A, grad_mean, grad_log_variance): with grad_scale != 0 the
    last two are grad_scale * d loss_b / d model_mean and / d model_log_variance
    (like model_mean), written by the same stage-1 pass; with grad_scale == 0
    they are empty, shape (0,)."""
    acc = check_vb_inputs(model_mean, model_log_variance, x0, x_t, t, posterior)
    grad_scale = float(grad_scale)
    write_grad = grad_scale != 0.0
    batch, n = per_sample(model_mean)
    loss = torch.empty(batch, dtype=acc, device=model_mean.device)
    if write_grad:
        grad_m = torch.empty_like(model_mean)
        grad_lv = torch.empty_like(model_mean)
    else:
        grad_m = torch.empty((0,), dtype=model_mean.dtype, device=model_mean.device)
        grad_lv = torch.empty((0,), dtype=model_mean.dtype, device=model_mean.device)
    if batch == 0:
        return loss, grad_m, grad_lv
    if n == 0:
        return loss.fill_(float("nan")), grad_m, grad_lv  # the mean of nothing, as the CPU kernel
    num_partials = triton.cdiv(n, BLOCK)
    partial = torch.empty(batch, num_partials, dtype=acc, device=model_mean.device)
    for s in batch_slices(batch):
        # Without WRITE_GRAD grad_m_ptr / grad_lv_ptr are never touched: model_mean stands in.
        out_m = grad_m[s] if write_grad else model_mean[s]
        out_lv = grad_lv[s] if write_grad else model_mean[s]
        _vb_loss_fwd_kernel[(num_partials, s.stop - s.start)](
            model_mean[s], model_log_variance[s], x0[s], x_t[s], out_m, out_lv, partial[s],
            t[s], posterior, grad_scale, n, num_partials,
            WRITE_GRAD=write_grad, BLOCK=BLOCK, num_warps=NUM_WARPS)
        _vb_loss_fwd_reduce_kernel[(s.stop - s.start,)](
            partial[s], loss[s], n, num_partials,
            REDUCE_BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
    return loss, grad_m, grad_lv


def vb_loss_bwd(grad_loss, model_mean, model_log_variance, x0, x_t, t, posterior):
    """(grad_mean, grad_log_variance), each like model_mean, for upstream
    grad_loss (B,) in A."""
    acc = check_vb_inputs(model_mean, model_log_variance, x0, x_t, t, posterior)
    if (grad_loss.dtype != acc or grad_loss.shape != (model_mean.shape[0],)
            or grad_loss.device != model_mean.device):
        raise ValueError(f"fastdiff triton: grad_loss must be {acc} of shape "
                         f"({model_mean.shape[0]},) on {model_mean.device}, got "
                         f"{grad_loss.dtype} {tuple(grad_loss.shape)} on {grad_loss.device}")
    grad_loss = grad_loss.contiguous()
    grad_m = torch.empty_like(model_mean)
    grad_lv = torch.empty_like(model_mean)
    batch, n = per_sample(model_mean)
    if model_mean.numel() == 0:
        return grad_m, grad_lv
    for s in batch_slices(batch):
        _vb_loss_bwd_kernel[(triton.cdiv(n, BWD_BLOCK), s.stop - s.start)](
            grad_loss[s], model_mean[s], model_log_variance[s], x0[s], x_t[s], grad_m[s],
            grad_lv[s], t[s], posterior, n, BLOCK=BWD_BLOCK, num_warps=NUM_WARPS)
    return grad_m, grad_lv


_TYPES = {
    "t_ptr": "*i64", "table_ptr": "*fp64", "partial_ptr": "*{acc}", "loss_ptr": "*{acc}",
    "grad_loss_ptr": "*{acc}", "grad_scale": "fp64", "n": "i32", "num_partials": "i32",
}

KERNEL_CONFIGS = (
    # stage 1 in both variants: loss only, and loss + the fused gradients.
    [kernel_config(_vb_loss_fwd_kernel, dtype, {"WRITE_GRAD": write_grad, "BLOCK": BLOCK},
                   types=_TYPES)
     for write_grad in (False, True) for dtype in CONFIG_DTYPES]
    # stage 2 reads only A-typed buffers (fp32 for every dtype listed).
    + [kernel_config(_vb_loss_fwd_reduce_kernel, "fp32", {"REDUCE_BLOCK": REDUCE_BLOCK},
                     types=_TYPES)]
    + [kernel_config(_vb_loss_bwd_kernel, dtype, {"BLOCK": BWD_BLOCK}, types=_TYPES)
       for dtype in CONFIG_DTYPES]
)
