"""ddim_step (DDIMScheduler.step, Song et al. 2021 eq. 12) as Triton kernels,
and its VJP to model_output and sample.

Math: csrc/include/fastdiff/schedule_math.h (predictor_coeffs, ddim_coeffs,
ddim_element, ddim_element_vjp). With ab = alpha_bar[t], abp = alpha_bar[t_prev]
(1 if t_prev < 0), sa = sqrt(ab), s1 = sqrt(1 - ab):
  x0    = x0.x x + x0.m m,  eps = eps.x x + eps.m m     (predictor_coeffs)
  x0c   = clip(x0, -r, r) if clipping else x0
  eps   = (x - sa x0c) / s1                             if use_clipped_model_output
  sigma = eta sqrt(max((1 - abp) / (1 - ab) * ((1 - ab) - (1 - abp)) / abp, 0))
  out   = sqrt(abp) x0c + sqrt(max(1 - abp - sigma^2, 0)) eps + sigma noise
          (the noise term, and the noise read, only where sigma != 0)
The per-sample coefficients are derived from the float64 table in float64 and
cast to the compute type A (fp32; fp64 for fp64 inputs), as the C++ kernels do
(ddim_coeffs(...).to<acc_t>()); the element math runs in A.
VJP (g = dL/dout): g_x0 = sqrt(abp) g, g_eps = sqrt(1 - abp - sigma^2) g;
  use_clipped: g_x = g_eps / s1, g_x0 -= g_eps sa / s1, g_eps = 0 (else g_x = 0);
  clipping: g_x0 masked to |x0| < r;
  d x = g_x + x0.x g_x0 + eps.x g_eps,  d m = x0.m g_x0 + eps.m g_eps.
"""
import torch
import triton
import triton.language as tl

from .ddpm_step import EPSILON, SAMPLE, V_PREDICTION, _predictor_coeffs, _prev_alpha
from .q_sample import (
    BLOCK,
    CONFIG_DTYPES,
    NUM_WARPS,
    _clamp,
    _div,
    _pass_inside,
    _sample_block,
    _to_out,
    _sqrt,
    batch_slices,
    check_inputs,
    kernel_config,
    per_sample,
)


@triton.jit
def _ddim_coeffs(table_ptr, t, t_prev, eta):
    """(sqrt(ab), 1 / sqrt(1 - ab), sqrt(abp), sqrt(1 - abp - sigma^2), sigma)
    of schedule_math.h ddim_coeffs, in the table's dtype (float64)."""
    COEF: tl.constexpr = table_ptr.dtype.element_ty
    one_minus_ab = tl.load(table_ptr + t * 4 + 1)
    sqrt_ab = tl.load(table_ptr + t * 4 + 2)
    inv_sqrt_one_minus_ab = _div(tl.full((), 1.0, COEF), tl.load(table_ptr + t * 4 + 3))
    ab_prev, one_minus_ab_prev = _prev_alpha(table_ptr, t_prev)
    var = _div(one_minus_ab_prev, one_minus_ab) * _div(one_minus_ab - one_minus_ab_prev, ab_prev)
    sigma = tl.full((), eta, COEF) * _sqrt(tl.where(var > 0.0, var, 0.0))
    out_x0 = _sqrt(ab_prev)
    dir_var = one_minus_ab_prev - sigma * sigma
    out_eps = _sqrt(tl.where(dir_var > 0.0, dir_var, 0.0))
    return sqrt_ab, inv_sqrt_one_minus_ab, out_x0, out_eps, sigma


@triton.jit
def _sample_coeffs(table_ptr, t_ptr, t_prev_ptr, b, eta, PRED: tl.constexpr, ACC: tl.constexpr):
    """Sample b's coefficients: derived in float64, cast once to ACC (DdimCoeffs::to<acc_t>)."""
    t = tl.load(t_ptr + b)
    t_prev = tl.load(t_prev_ptr + b)
    x0_x, x0_m, eps_x, eps_m = _predictor_coeffs(table_ptr, t, PRED)
    sqrt_ab, inv_s1, out_x0, out_eps, sigma = _ddim_coeffs(table_ptr, t, t_prev, eta)
    return (x0_x.to(ACC), x0_m.to(ACC), eps_x.to(ACC), eps_m.to(ACC), sqrt_ab.to(ACC), inv_s1.to(ACC),
            out_x0.to(ACC), out_eps.to(ACC), sigma.to(ACC))


@triton.jit
def _ddim_step_fwd_kernel(
    m_ptr,       # *T   (B, n) model output, flat per sample
    x_ptr,       # *T   (B, n) sample x_t, same layout
    noise_ptr,   # *T   (B, n) noise, read only where sigma != 0 (dummy if eta == 0)
    out_ptr,     # *T   (B, n) output x_{t_prev}, same layout
    t_ptr,       # *i64 (B,) timestep of each sample
    t_prev_ptr,  # *i64 (B,) previous timestep; < 0 means alpha_bar_prev = 1
    table_ptr,   # *f64 (T, 4) schedule table
    eta: tl.float64,         # DDIM eta (0: deterministic)
    clip_range: tl.float64,  # r of clip(x0, -r, r) (used if CLIP)
    n,           # int  elements per sample
    PRED: tl.constexpr,         # prediction type: 0 epsilon, 1 sample, 2 v_prediction
    CLIP: tl.constexpr,         # clip the predicted x0 to [-r, r]
    USE_CLIPPED: tl.constexpr,  # recompute eps from the clipped x0
    BLOCK: tl.constexpr,        # elements per program
):
    """Forward (schedule_math.h ddim_coeffs, ddim_element; module docstring):
      x0c = clip(x0.x x + x0.m m, -r, r), eps = eps.x x + eps.m m
            (or (x - sqrt(ab) x0c) / sqrt(1 - ab) with USE_CLIPPED),
      out = sqrt(abp) x0c + sqrt(1 - abp - sigma^2) eps + [sigma != 0] sigma noise.
    VJP (the backward kernel): through the same affine maps and the clip mask."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(1)
    x0_x, x0_m, eps_x, eps_m, sqrt_ab, inv_s1, out_x0, out_eps, sigma = _sample_coeffs(
        table_ptr, t_ptr, t_prev_ptr, b, eta, PRED, ACC)
    r = tl.full((), clip_range, ACC)

    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    x = tl.load(x_ptr + base + offs, mask=mask).to(ACC)
    m = tl.load(m_ptr + base + offs, mask=mask).to(ACC)
    x0 = x0_x * x + x0_m * m
    eps = eps_x * x + eps_m * m
    if CLIP:
        x0 = _clamp(x0, -r, r)
    if USE_CLIPPED:
        eps = (x - sqrt_ab * x0) * inv_s1
    out = out_x0 * x0 + out_eps * eps
    # mask & (sigma != 0), compared per element: Triton 3.8's interpreter
    # mis-types a scalar float comparison once it is broadcast.
    add_noise = tl.where(mask, sigma, 0.0) != 0.0
    z = tl.load(noise_ptr + base + offs, mask=add_noise, other=0.0).to(ACC)
    out = tl.where(add_noise, out + sigma * z, out)
    tl.store(out_ptr + base + offs, _to_out(out, out_ptr), mask=mask)


@triton.jit
def _ddim_step_bwd_kernel(
    grad_out_ptr,  # *T   (B, n) dL/dout
    m_ptr,         # *T   (B, n) model output (read only if CLIP)
    x_ptr,         # *T   (B, n) sample x_t (read only if CLIP)
    grad_m_ptr,    # *T   (B, n) output dL/dm, same layout
    grad_x_ptr,    # *T   (B, n) output dL/dx, same layout
    t_ptr,         # *i64 (B,) timestep of each sample
    t_prev_ptr,    # *i64 (B,) previous timestep; < 0 means alpha_bar_prev = 1
    table_ptr,     # *f64 (T, 4) schedule table
    eta: tl.float64,         # DDIM eta
    clip_range: tl.float64,  # r of clip(x0, -r, r) (used if CLIP)
    n,             # int  elements per sample
    PRED: tl.constexpr,         # prediction type: 0 epsilon, 1 sample, 2 v_prediction
    CLIP: tl.constexpr,         # clip the predicted x0 to [-r, r]
    USE_CLIPPED: tl.constexpr,  # eps recomputed from the clipped x0
    BLOCK: tl.constexpr,        # elements per program
):
    """VJP of out = sqrt(abp) x0c + sqrt(1 - abp - sigma^2) eps + sigma noise
    (schedule_math.h ddim_element_vjp; module docstring), g = dL/dout:
      g_x0 = sqrt(abp) g, g_eps = sqrt(1 - abp - sigma^2) g, g_x = 0;
      USE_CLIPPED: g_x = g_eps / s1, g_x0 -= g_eps sa / s1, g_eps = 0;
      CLIP: g_x0 zeroed where |x0_hat| > r;
      d x = g_x + x0.x g_x0 + eps.x g_eps,  d m = x0.m g_x0 + eps.m g_eps."""
    ACC: tl.constexpr = tl.float64 if grad_out_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(1)
    x0_x, x0_m, eps_x, eps_m, sqrt_ab, inv_s1, out_x0, out_eps, sigma = _sample_coeffs(
        table_ptr, t_ptr, t_prev_ptr, b, eta, PRED, ACC)
    r = tl.full((), clip_range, ACC)

    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    g = tl.load(grad_out_ptr + base + offs, mask=mask).to(ACC)
    g_x0 = out_x0 * g
    g_eps = out_eps * g
    g_x = tl.zeros_like(g)
    if USE_CLIPPED:
        # eps = (x - sqrt(ab) x0c) / sqrt(1 - ab) no longer depends on eps_hat.
        g_x = g_eps * inv_s1
        g_x0 = g_x0 - g_eps * (sqrt_ab * inv_s1)
        g_eps = tl.zeros_like(g)
    if CLIP:
        x = tl.load(x_ptr + base + offs, mask=mask).to(ACC)
        m = tl.load(m_ptr + base + offs, mask=mask).to(ACC)
        g_x0 = _pass_inside(g_x0, x0_x * x + x0_m * m, -r, r)
    grad_x = g_x + x0_x * g_x0 + eps_x * g_eps
    grad_m = x0_m * g_x0 + eps_m * g_eps
    tl.store(grad_x_ptr + base + offs, _to_out(grad_x, grad_x_ptr), mask=mask)
    tl.store(grad_m_ptr + base + offs, _to_out(grad_m, grad_m_ptr), mask=mask)


# ---------------------------------------------------------------------------
# Launchers (signatures of torch.ops.fastdiff.ddim_step / _ddim_step_bwd).
# ---------------------------------------------------------------------------
def _check(model_output, sample, t, t_prev, table):
    check_inputs(sample, table, t, t_prev)
    if model_output.shape != sample.shape or model_output.stride() != sample.stride():
        raise ValueError(f"fastdiff triton: model_output {tuple(model_output.shape)} must have "
                         f"sample's shape and strides {tuple(sample.shape)}")
    return per_sample(sample)


def ddim_step_fwd(model_output, sample, noise, t, t_prev, table, prediction_type, eta,
                  clip_sample, clip_sample_range, use_clipped_model_output):
    batch, n = _check(model_output, sample, t, t_prev, table)
    if noise is None and eta != 0.0:
        raise ValueError("fastdiff triton: ddim_step needs noise when eta > 0")
    out = torch.empty_like(sample)
    if out.numel() == 0:
        return out
    # Without noise (eta == 0, so sigma == 0) the kernel never loads it.
    noise = sample if noise is None else noise
    for s in batch_slices(batch):
        _ddim_step_fwd_kernel[(triton.cdiv(n, BLOCK), s.stop - s.start)](
            model_output[s], sample[s], noise[s], out[s], t[s], t_prev[s], table,
            float(eta), float(clip_sample_range), n,
            PRED=int(prediction_type), CLIP=bool(clip_sample),
            USE_CLIPPED=bool(use_clipped_model_output), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def ddim_step_bwd(grad_out, model_output, sample, t, t_prev, table, prediction_type, eta,
                  clip_sample, clip_sample_range, use_clipped_model_output):
    batch, n = _check(model_output, sample, t, t_prev, table)
    grad_m = torch.empty_like(model_output)
    grad_x = torch.empty_like(sample)
    if sample.numel() == 0:
        return grad_m, grad_x
    for s in batch_slices(batch):
        _ddim_step_bwd_kernel[(triton.cdiv(n, BLOCK), s.stop - s.start)](
            grad_out[s], model_output[s], sample[s], grad_m[s], grad_x[s], t[s], t_prev[s],
            table, float(eta), float(clip_sample_range), n,
            PRED=int(prediction_type), CLIP=bool(clip_sample),
            USE_CLIPPED=bool(use_clipped_model_output), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad_m, grad_x


_TYPES = {
    "t_ptr": "*i64", "t_prev_ptr": "*i64", "table_ptr": "*fp64", "eta": "fp64",
    "clip_range": "fp64", "n": "i32",
}

KERNEL_CONFIGS = [
    kernel_config(kernel, dtype,
                  {"PRED": pred, "CLIP": clip, "USE_CLIPPED": use_clipped, "BLOCK": BLOCK},
                  types=_TYPES)
    for kernel in (_ddim_step_fwd_kernel, _ddim_step_bwd_kernel)
    for pred in (EPSILON, SAMPLE, V_PREDICTION)
    for clip in (False, True)
    for use_clipped in (False, True)
    for dtype in CONFIG_DTYPES
]
