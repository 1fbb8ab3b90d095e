"""ddpm_step (DDPMScheduler.step / improved DDPM's p_sample) as Triton kernels,
and its VJP to model_output (incl. predicted-variance channels) and sample.

Math: csrc/include/fastdiff/schedule_math.h (predictor_coeffs, ddpm_coeffs,
ddpm_element, ddpm_element_vjp); Ho et al. 2020 eq. 6-7, Nichol & Dhariwal
2021 eq. 15. With ab = alpha_bar[t], abp = alpha_bar[t_prev] (1 if t_prev < 0),
alpha_t = ab / abp, beta_t = ((1 - ab) - (1 - abp)) / abp:
  x0   = clip(x0.x * x + x0.m * m)          (predicted x0, clipped to +-r if asked)
  out  = c_x0 * x0 + c_x * x + std * noise  (the noise term only where t > 0)
  c_x0 = sqrt(abp) beta_t / (1 - ab),  c_x = sqrt(alpha_t) (1 - abp) / (1 - ab)
  var  = max((1 - abp) / (1 - ab) * beta_t, 1e-20)
  std  = sqrt(var) (fixed_small[_log]) | sqrt(beta_t) (fixed_large[_log])
       | exp(v / 2) (learned) | exp((f log beta_t + (1 - f) log var) / 2),
         f = (v + 1) / 2 (learned_range), v = the predicted-variance channels.
The per-sample coefficients above are derived from the float64 table in float64
and cast to the compute type A (fp32; fp64 for fp64 inputs), as the C++ kernels
do (ddpm_coeffs(...).to<acc_t>()); the element math runs in A.
VJP (g = dL/dout):
  g_x0 = c_x0 g, masked to |x0_hat| < r when clipping
  d x = c_x g + x0.x g_x0,  d m = x0.m g_x0
  d v = g noise std * (1/2 | (log beta_t - log var) / 4)   (learned | learned_range; 0 where t == 0)
"""
import torch
import triton
import triton.language as tl

from .q_sample import (
    BLOCK,
    CONFIG_DTYPES,
    NUM_WARPS,
    _clamp,
    _div,
    _exp,
    _log,
    _pass_inside,
    _sample_block,
    _to_out,
    _sqrt,
    batch_slices,
    check_inputs,
    kernel_config,
    per_sample,
)

EPSILON, SAMPLE, V_PREDICTION = 0, 1, 2
FIXED_SMALL, FIXED_SMALL_LOG, FIXED_LARGE, FIXED_LARGE_LOG, LEARNED, LEARNED_RANGE = range(6)
# diffusers clamps the posterior variance at 1e-20 before its log.
MIN_POSTERIOR_VARIANCE = 1e-20
_MIN_POSTERIOR_VARIANCE = tl.constexpr(MIN_POSTERIOR_VARIANCE)  # for use inside kernels

# The *_log variants give the same step as their plain variants (schedule_math.h
# ddpm_coeffs), so the kernels are specialized on one code per std formula.
KERNEL_VARIANCE = {
    FIXED_SMALL: FIXED_SMALL, FIXED_SMALL_LOG: FIXED_SMALL,
    FIXED_LARGE: FIXED_LARGE, FIXED_LARGE_LOG: FIXED_LARGE,
    LEARNED: LEARNED, LEARNED_RANGE: LEARNED_RANGE,
}


# ---------------------------------------------------------------------------
# Per-sample coefficients (shared with ddim_step).
# ---------------------------------------------------------------------------
@triton.jit
def _prev_alpha(table_ptr, t_prev):
    """(abp, 1 - abp) of row t_prev; (1, 0) when t_prev < 0 (schedule_math.h prev_alpha)."""
    COEF: tl.constexpr = table_ptr.dtype.element_ty
    row = table_ptr + tl.maximum(t_prev, 0) * 4  # row 0 stands in, never used, for t_prev < 0
    ab_prev = tl.where(t_prev < 0, tl.cast(1.0, COEF), tl.load(row + 0))
    one_minus_ab_prev = tl.where(t_prev < 0, tl.cast(0.0, COEF), tl.load(row + 1))
    return ab_prev, one_minus_ab_prev


@triton.jit
def _predictor_coeffs(table_ptr, t, PRED: tl.constexpr):
    """(x0.x, x0.m, eps.x, eps.m): x0_hat = x0.x x + x0.m m, eps_hat = eps.x x + eps.m m
    (schedule_math.h predictor_coeffs):
      epsilon: x0 = (x - s1 m) / sa,  eps = m
      sample:  x0 = m,                eps = (x - sa m) / s1
      v:       x0 = sa x - s1 m,      eps = sa m + s1 x
    with sa = sqrt(ab), s1 = sqrt(1 - ab); in the table's dtype (float64)."""
    COEF: tl.constexpr = table_ptr.dtype.element_ty
    sa = tl.load(table_ptr + t * 4 + 2)
    s1 = tl.load(table_ptr + t * 4 + 3)
    one = tl.cast(1.0, COEF)
    zero = tl.cast(0.0, COEF)
    if PRED == 0:
        x0_x = _div(one, sa)
        x0_m = _div(-s1, sa)
        eps_x = zero
        eps_m = one
    elif PRED == 1:
        x0_x = zero
        x0_m = one
        eps_x = _div(one, s1)
        eps_m = _div(-sa, s1)
    else:
        x0_x = sa
        x0_m = -s1
        eps_x = s1
        eps_m = sa
    return x0_x, x0_m, eps_x, eps_m


@triton.jit
def _ddpm_coeffs(table_ptr, t, t_prev, VAR: tl.constexpr):
    """(c_x0, c_x, std, log var, log beta_t) of schedule_math.h ddpm_coeffs, in
    the table's dtype (float64). std is the fixed std (0 for learned variances
    and where t == 0)."""
    COEF: tl.constexpr = table_ptr.dtype.element_ty
    ab = tl.load(table_ptr + t * 4 + 0)
    one_minus_ab = tl.load(table_ptr + t * 4 + 1)
    ab_prev, one_minus_ab_prev = _prev_alpha(table_ptr, t_prev)
    alpha_t = _div(ab, ab_prev)
    beta_t = _div(one_minus_ab - one_minus_ab_prev, ab_prev)
    c_x0 = _div(_sqrt(ab_prev) * beta_t, one_minus_ab)
    c_x = _div(_sqrt(alpha_t) * one_minus_ab_prev, one_minus_ab)
    var = _div(one_minus_ab_prev, one_minus_ab) * beta_t
    # tl.full: a Python float constant would be rounded to fp32 even for fp64.
    var_min = tl.full((), _MIN_POSTERIOR_VARIANCE, COEF)
    var = tl.where(var < var_min, var_min, var)
    log_var_min = _log(var)
    log_var_max = _log(beta_t)
    if VAR == 0 or VAR == 1:
        std = _sqrt(var)
    elif VAR == 2 or VAR == 3:
        std = _sqrt(beta_t)
    else:
        std = tl.full((), 0.0, COEF)  # per element, from the predicted variance
    std = tl.where(t > 0, std, 0.0)
    return c_x0, c_x, std, log_var_min, log_var_max


@triton.jit
def _sample_coeffs(table_ptr, t_ptr, t_prev_ptr, b, PRED: tl.constexpr, VAR: tl.constexpr,
                   ACC: tl.constexpr):
    """Sample b's timestep and coefficients: derived in float64, cast once to ACC
    (DdpmCoeffs::to<acc_t>)."""
    t = tl.load(t_ptr + b)
    t_prev = tl.load(t_prev_ptr + b)
    x0_x, x0_m, _, _ = _predictor_coeffs(table_ptr, t, PRED)
    c_x0, c_x, std, log_var_min, log_var_max = _ddpm_coeffs(table_ptr, t, t_prev, VAR)
    return (t, x0_x.to(ACC), x0_m.to(ACC), c_x0.to(ACC), c_x.to(ACC), std.to(ACC),
            log_var_min.to(ACC), log_var_max.to(ACC))


@triton.jit
def _learned_std(v, log_var_min, log_var_max, VAR: tl.constexpr):
    """std from the predicted variance channel v (schedule_math.h ddpm_learned_std)."""
    if VAR == 4:
        std = _exp(0.5 * v)
    else:
        f = (v + 1.0) * 0.5
        std = _exp(0.5 * (f * log_var_max + (1.0 - f) * log_var_min))
    return std


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------
@triton.jit
def _ddpm_step_fwd_kernel(
    m_ptr,       # *T   (B, n) model output, or (B, 2n) [output | predicted variance] if learned
    x_ptr,       # *T   (B, n) sample x_t, flat per sample
    noise_ptr,   # *T   (B, n) noise, read only where t > 0 and has_noise (else a dummy)
    out_ptr,     # *T   (B, n) output x_{t_prev}, same layout as x
    t_ptr,       # *i64 (B,) timestep of each sample
    t_prev_ptr,  # *i64 (B,) previous timestep; < 0 means alpha_bar_prev = 1
    table_ptr,   # *f64 (T, 4) schedule table
    clip_range: tl.float64,  # r of clip(x0, -r, r) (used if CLIP)
    has_noise,   # int  0: no noise term (the step's mean), 1: noise_ptr is the noise
    n,           # int  elements per sample of x
    m_stride,    # int  elements per sample of model output: n, or 2n if learned
    PRED: tl.constexpr,   # prediction type: 0 epsilon, 1 sample, 2 v_prediction
    VAR: tl.constexpr,    # variance type: 0 fixed_small, 2 fixed_large, 4 learned, 5 learned_range
    CLIP: tl.constexpr,   # clip the predicted x0 to [-r, r]
    BLOCK: tl.constexpr,  # elements per program
):
    """Forward (schedule_math.h ddpm_coeffs, ddpm_element; module docstring):
      x0 = clip(x0.x x + x0.m m, -r, r),  out = c_x0 x0 + c_x x + [t > 0] std noise,
      std = fixed (VAR 0/2) | exp(v / 2) (4) | exp((f log beta_t + (1 - f) log var) / 2),
      f = (v + 1) / 2 (5), v = the variance channels m[b, n:2n].
    VJP (the backward kernel): g_x0 = c_x0 g [|x0_hat| < r], d x = c_x g + x0.x g_x0,
      d m = x0.m g_x0, d v = [t > 0] g noise std (1/2 | (log beta_t - log var) / 4)."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    LEARNED: tl.constexpr = VAR == 4 or VAR == 5
    b = tl.program_id(1)
    t, x0_x, x0_m, c_x0, c_x, std, log_var_min, log_var_max = _sample_coeffs(
        table_ptr, t_ptr, t_prev_ptr, b, PRED, VAR, ACC)
    add_noise = (t > 0) & (has_noise != 0)
    r = tl.full((), clip_range, ACC)

    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    m_base = b.to(tl.int64) * m_stride + start
    x = tl.load(x_ptr + base + offs, mask=mask).to(ACC)
    m = tl.load(m_ptr + m_base + offs, mask=mask).to(ACC)
    x0 = x0_x * x + x0_m * m
    if CLIP:
        x0 = _clamp(x0, -r, r)
    out = c_x0 * x0 + c_x * x
    noise_mask = mask & add_noise
    z = tl.load(noise_ptr + base + offs, mask=noise_mask, other=0.0).to(ACC)
    if LEARNED:
        v = tl.load(m_ptr + m_base + n + offs, mask=noise_mask, other=0.0).to(ACC)
        out = tl.where(add_noise, out + _learned_std(v, log_var_min, log_var_max, VAR) * z, out)
    else:
        out = tl.where(add_noise, out + std * z, out)
    tl.store(out_ptr + base + offs, _to_out(out, out_ptr), mask=mask)


@triton.jit
def _ddpm_step_bwd_kernel(
    grad_out_ptr,  # *T   (B, n) dL/dout
    m_ptr,         # *T   (B, n) model output, or (B, 2n) with the variance channels if learned
    x_ptr,         # *T   (B, n) sample x_t
    noise_ptr,     # *T   (B, n) noise, read only if learned, t > 0 and has_noise (else a dummy)
    grad_m_ptr,    # *T   (B, n | 2n) output dL/dm (incl. dL/dv if learned), layout of m
    grad_x_ptr,    # *T   (B, n) output dL/dx, layout of x
    t_ptr,         # *i64 (B,) timestep of each sample
    t_prev_ptr,    # *i64 (B,) previous timestep; < 0 means alpha_bar_prev = 1
    table_ptr,     # *f64 (T, 4) schedule table
    clip_range: tl.float64,  # r of clip(x0, -r, r) (used if CLIP)
    has_noise,   # int  0: no noise term (the step's mean), 1: noise_ptr is the noise
    n,             # int  elements per sample of x
    m_stride,      # int  elements per sample of model output: n, or 2n if learned
    PRED: tl.constexpr,   # prediction type: 0 epsilon, 1 sample, 2 v_prediction
    VAR: tl.constexpr,    # variance type: 0 fixed_small, 2 fixed_large, 4 learned, 5 learned_range
    CLIP: tl.constexpr,   # clip the predicted x0 to [-r, r]
    BLOCK: tl.constexpr,  # elements per program
):
    """VJP of out = c_x0 clip(x0.x x + x0.m m) + c_x x + [t > 0] std(v) noise
    (schedule_math.h ddpm_element_vjp; module docstring), g = dL/dout:
      g_x0 = c_x0 g, zeroed where |x0_hat| > r when clipping
      d x = c_x g + x0.x g_x0,  d m = x0.m g_x0
      d v = [t > 0] g noise std * (1/2 (learned) | (log beta_t - log var) / 4 (learned_range))."""
    ACC: tl.constexpr = tl.float64 if grad_out_ptr.dtype.element_ty == tl.float64 else tl.float32
    LEARNED: tl.constexpr = VAR == 4 or VAR == 5
    b = tl.program_id(1)
    t, x0_x, x0_m, c_x0, c_x, std, log_var_min, log_var_max = _sample_coeffs(
        table_ptr, t_ptr, t_prev_ptr, b, PRED, VAR, ACC)
    add_noise = (t > 0) & (has_noise != 0)
    r = tl.full((), clip_range, ACC)

    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    m_base = b.to(tl.int64) * m_stride + start
    g = tl.load(grad_out_ptr + base + offs, mask=mask).to(ACC)
    g_x0 = c_x0 * g
    if CLIP:
        x = tl.load(x_ptr + base + offs, mask=mask).to(ACC)
        m = tl.load(m_ptr + m_base + offs, mask=mask).to(ACC)
        g_x0 = _pass_inside(g_x0, x0_x * x + x0_m * m, -r, r)
    grad_x = c_x * g + x0_x * g_x0
    grad_m = x0_m * g_x0
    tl.store(grad_x_ptr + base + offs, _to_out(grad_x, grad_x_ptr), mask=mask)
    tl.store(grad_m_ptr + m_base + offs, _to_out(grad_m, grad_m_ptr), mask=mask)
    if LEARNED:
        noise_mask = mask & add_noise
        v = tl.load(m_ptr + m_base + n + offs, mask=noise_mask, other=0.0).to(ACC)
        z = tl.load(noise_ptr + base + offs, mask=noise_mask, other=0.0).to(ACC)
        if VAR == 4:
            dlog = tl.cast(0.5, ACC)
        else:
            dlog = 0.25 * (log_var_max - log_var_min)
        grad_v = g * z * _learned_std(v, log_var_min, log_var_max, VAR) * dlog
        grad_v = tl.where(add_noise, grad_v, 0.0)
        tl.store(grad_m_ptr + m_base + n + offs, _to_out(grad_v, grad_m_ptr),
                 mask=mask)


# ---------------------------------------------------------------------------
# Launchers (signatures of torch.ops.fastdiff.ddpm_step / _ddpm_step_bwd).
# ---------------------------------------------------------------------------
def _check(model_output, sample, t, t_prev, table, variance_type):
    check_inputs(sample, table, t, t_prev)
    batch, n = per_sample(sample)
    learned = variance_type in (LEARNED, LEARNED_RANGE)
    if learned and not (model_output.is_contiguous() and sample.is_contiguous()
                        and model_output.numel() == 2 * sample.numel()):
        raise ValueError("fastdiff triton: learned variance needs contiguous (B, 2C, ...) "
                         "model_output and contiguous sample")
    if not learned and model_output.shape != sample.shape:
        raise ValueError(f"fastdiff triton: model_output shape {tuple(model_output.shape)} "
                         f"!= sample shape {tuple(sample.shape)}")
    return batch, n, (2 * n if learned else n)


def ddpm_step_fwd(model_output, sample, noise, t, t_prev, table, prediction_type,
                  variance_type, clip_sample, clip_sample_range):
    batch, n, m_stride = _check(model_output, sample, t, t_prev, table, variance_type)
    out = torch.empty_like(sample)
    if out.numel() == 0:
        return out
    # No noise: the step's mean; the kernel never loads the dummy.
    has_noise = int(noise is not None)
    noise = sample if noise is None else noise
    for s in batch_slices(batch):
        _ddpm_step_fwd_kernel[(triton.cdiv(n, BLOCK), s.stop - s.start)](
            model_output[s], sample[s], noise[s], out[s], t[s], t_prev[s], table,
            float(clip_sample_range), has_noise, n, m_stride,
            PRED=int(prediction_type), VAR=KERNEL_VARIANCE[int(variance_type)],
            CLIP=bool(clip_sample), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def ddpm_step_bwd(grad_out, model_output, sample, noise, t, t_prev, table, prediction_type,
                  variance_type, clip_sample, clip_sample_range):
    batch, n, m_stride = _check(model_output, sample, t, t_prev, table, variance_type)
    grad_m = torch.empty_like(model_output)
    grad_x = torch.empty_like(sample)
    if sample.numel() == 0:
        return grad_m, grad_x
    has_noise = int(noise is not None)
    noise = sample if noise is None else noise
    for s in batch_slices(batch):
        _ddpm_step_bwd_kernel[(triton.cdiv(n, BLOCK), s.stop - s.start)](
            grad_out[s], model_output[s], sample[s], noise[s], grad_m[s], grad_x[s], t[s],
            t_prev[s], table, float(clip_sample_range), has_noise, n, m_stride,
            PRED=int(prediction_type), VAR=KERNEL_VARIANCE[int(variance_type)],
            CLIP=bool(clip_sample), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad_m, grad_x


_TYPES = {
    "t_ptr": "*i64", "t_prev_ptr": "*i64", "table_ptr": "*fp64", "clip_range": "fp64",
    "has_noise": "i32", "n": "i32", "m_stride": "i32",
}

KERNEL_CONFIGS = [
    kernel_config(kernel, dtype,
                  {"PRED": pred, "VAR": var, "CLIP": clip, "BLOCK": BLOCK}, types=_TYPES)
    for kernel in (_ddpm_step_fwd_kernel, _ddpm_step_bwd_kernel)
    for pred in (EPSILON, SAMPLE, V_PREDICTION)
    for var in sorted(set(KERNEL_VARIANCE.values()))
    for clip in (False, True)
    for dtype in CONFIG_DTYPES
]
