"""diffusion_loss as Triton kernels: per-sample (min-SNR weighted) MSE against
a target built in-kernel, and its VJP.

Math: csrc/include/fastdiff/schedule_math.h (loss_coeffs, loss_residual):
  target = noise (epsilon) | x0 (sample) | sqrt(ab) noise - sqrt(1 - ab) x0 (v)
  L_b = w_b / n * sum_i (m_i - target_i)^2
  w_b = 1, or with min-SNR-gamma (Hang et al. 2023): snr = ab / (1 - ab),
        w = min(snr, gamma) / snr (epsilon) | min(snr, gamma) (sample)
            | min(snr, gamma) / (snr + 1) (v_prediction)
  VJP: d m_i = 2 w_b dL_b / n * (m_i - target_i)

Per-sample coefficients (target coefficients, w_b) are derived from the
float64 table in float64 and cast to the compute type A (fp32; fp64 for fp64
inputs), as the C++ kernels do (loss_coeffs(...).to<acc_t>()); the loss is A.

Deterministic forward, no atomics: stage 1 writes one partial sum of squares
per (sample, block of BLOCK elements), so the split depends only on n; stage 2
sums each sample's partials in a fixed order and applies w_b / n.

Fused gradient (grad_scale != 0): stage 1, which already holds m - target,
also writes grad_model_output = grad_scale * d L_b / d m
= (grad_scale 2 w_b / n) (m - target), the per-sample factor derived in
float64 and cast once to A (as the C++ kernels), the product in A, stored as
T; the autograd backward then only rescales it. diffusion_loss_bwd (the
recompute path) stays for grad_scale == 0.
"""
import torch
import triton
import triton.language as tl

from .q_sample import (
    CONFIG_DTYPES,
    NUM_WARPS,
    _div,
    _sample_block,
    _to_out,
    batch_slices,
    check_inputs,
    kernel_config,
    per_sample,
)

# Elements per stage-1 program (one partial sum each). Fixed: the reduction
# tree, hence the bits of the loss, depend only on the shape.
BLOCK = 2048
# Partials summed per step by the stage-2 program of a sample.
REDUCE_BLOCK = 1024
# Elements per program of the backward.
BWD_BLOCK = 1024

EPSILON, SAMPLE, V_PREDICTION = 0, 1, 2


@triton.jit
def _loss_weight(table_ptr, t, snr_gamma, PRED: tl.constexpr):
    """w_b of schedule_math.h loss_coeffs, in float64; snr_gamma <= 0: w_b = 1."""
    COEF: tl.constexpr = table_ptr.dtype.element_ty
    gamma = tl.full((), snr_gamma, COEF)
    ab = tl.load(table_ptr + t * 4 + 0)
    one_minus_ab = tl.load(table_ptr + t * 4 + 1)
    snr = _div(ab, one_minus_ab)
    w = tl.where(snr < gamma, snr, gamma)
    if PRED == 0:
        w = _div(w, snr)
    elif PRED == 2:
        w = _div(w, snr + 1.0)
    return tl.where(gamma > 0.0, w, tl.cast(1.0, COEF))


@triton.jit
def _loss_residual(m_ptr, x0_ptr, noise_ptr, table_ptr, t, base, offs, mask,
                   PRED: tl.constexpr):
    """m - target at elements base + offs (0 on masked lanes), in A. Reads x0
    only for sample / v targets and noise only for epsilon / v targets."""
    ACC: tl.constexpr = tl.float64 if m_ptr.dtype.element_ty == tl.float64 else tl.float32
    m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    if PRED == 0:
        target = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    elif PRED == 1:
        target = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    else:
        c_noise = tl.load(table_ptr + t * 4 + 2).to(ACC)   # sqrt(ab)
        c_x0 = (-tl.load(table_ptr + t * 4 + 3)).to(ACC)   # -sqrt(1 - ab)
        z = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        target = c_noise * z + c_x0 * x0
    return m - target


@triton.jit
def _diffusion_loss_fwd_kernel(
    m_ptr,          # *T   (B, n) model output, flat per sample
    x0_ptr,         # *T   (B, n) clean data (read for sample / v targets)
    noise_ptr,      # *T   (B, n) noise (read for epsilon / v targets)
    grad_m_ptr,     # *T   (B, n) output grad_scale * dL_b/dm, same layout as m
                    #      (written only when WRITE_GRAD)
    partial_ptr,    # *A   (B, P) output: partial sums of squares, P = cdiv(n, BLOCK);
                    #      A = fp32 (fp64 for fp64 inputs)
    t_ptr,          # *i64 (B,) timestep of each sample
    table_ptr,      # *f64 (T, 4) schedule table
    snr_gamma: tl.float64,   # min-SNR gamma; <= 0: unweighted (read when WRITE_GRAD)
    grad_scale: tl.float64,  # the gradient's scale, dL/dL_b (read when WRITE_GRAD)
    n,              # int  elements per sample
    num_partials,   # int  P, partials per sample
    PRED: tl.constexpr,        # prediction type: 0 epsilon, 1 sample, 2 v_prediction
    WRITE_GRAD: tl.constexpr,  # also write grad_m (grad_scale != 0)
    BLOCK: tl.constexpr,       # elements per program (= per partial)
):
    """Stage 1 of L_b = w_b / n sum_i (m_i - target_i)^2:
    partial[b, i] = sum_{j in block i} (m_j - target_j)^2 in A, target per
    schedule_math.h loss_coeffs / loss_residual (see module docstring).
    WRITE_GRAD: also grad_m_j = (grad_scale 2 w_b / n) (m_j - target_j), the
    VJP with dL_b = grad_scale (the factor in float64 then cast to A, as the
    C++ kernels; the product in A).
    VJP otherwise: the backward kernel, d m_i = 2 w_b dL_b / n (m_i - target_i)."""
    b = tl.program_id(1)
    t = tl.load(t_ptr + b)
    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    r = _loss_residual(m_ptr, x0_ptr, noise_ptr, table_ptr, t, base, offs, mask, PRED)
    tl.store(partial_ptr + b.to(tl.int64) * num_partials + tl.program_id(0), tl.sum(r * r, axis=0))
    if WRITE_GRAD:
        # The per-sample factor in float64 (as loss_coeffs), cast once to A.
        ACC: tl.constexpr = partial_ptr.dtype.element_ty
        w = _loss_weight(table_ptr, t, snr_gamma, PRED)
        scale = (grad_scale * 2.0 * w / tl.cast(n, w.dtype)).to(ACC)
        tl.store(grad_m_ptr + base + offs, _to_out(scale * r, grad_m_ptr), mask=mask)


@triton.jit
def _diffusion_loss_fwd_reduce_kernel(
    partial_ptr,   # *A   (B, P) partial sums of squares from stage 1
    loss_ptr,      # *A   (B,) output: per-sample loss L_b
    t_ptr,         # *i64 (B,) timestep of each sample
    table_ptr,     # *f64 (T, 4) schedule table
    snr_gamma: tl.float64,  # min-SNR gamma; <= 0: unweighted
    n,             # int  elements per sample (the mean's divisor)
    num_partials,  # int  P, partials per sample
    PRED: tl.constexpr,          # prediction type (selects the min-SNR weight)
    REDUCE_BLOCK: tl.constexpr,  # partials added per step
):
    """Stage 2, one program per sample: L_b = w_b * (sum_i partial[b, i]) / n
    in A, the sum in a fixed order (deterministic); w_b per loss_coeffs
    (float64, then cast to A)."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    b = tl.program_id(0)
    t = tl.load(t_ptr + b)
    row = partial_ptr + b.to(tl.int64) * num_partials
    offs = tl.arange(0, REDUCE_BLOCK)
    acc = tl.zeros([REDUCE_BLOCK], dtype=ACC)
    for k in range(0, num_partials, REDUCE_BLOCK):
        acc += tl.load(row + k + offs, mask=k + offs < num_partials, other=0.0)
    total = tl.sum(acc, axis=0)
    w = _loss_weight(table_ptr, t, snr_gamma, PRED).to(ACC)
    tl.store(loss_ptr + b, _div(w * total, tl.cast(n, ACC)))


@triton.jit
def _diffusion_loss_bwd_kernel(
    grad_loss_ptr,  # *A   (B,) dL/dL_b
    m_ptr,          # *T   (B, n) model output
    x0_ptr,         # *T   (B, n) clean data (read for sample / v targets)
    noise_ptr,      # *T   (B, n) noise (read for epsilon / v targets)
    grad_m_ptr,     # *T   (B, n) output dL/dm, same layout as m
    t_ptr,          # *i64 (B,) timestep of each sample
    table_ptr,      # *f64 (T, 4) schedule table
    snr_gamma: tl.float64,  # min-SNR gamma; <= 0: unweighted
    n,              # int  elements per sample
    PRED: tl.constexpr,   # prediction type: 0 epsilon, 1 sample, 2 v_prediction
    BLOCK: tl.constexpr,  # elements per program
):
    """VJP of L_b = w_b / n sum_i (m_i - target_i)^2:
    d m_i = (2 w_b dL_b / n) (m_i - target_i)  (schedule_math.h loss_coeffs;
    the scale computed in A as in the CPU kernel)."""
    ACC: tl.constexpr = grad_loss_ptr.dtype.element_ty
    b = tl.program_id(1)
    t = tl.load(t_ptr + b)
    w = _loss_weight(table_ptr, t, snr_gamma, PRED).to(ACC)
    scale = _div(2.0 * w * tl.load(grad_loss_ptr + b), tl.cast(n, ACC))
    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    r = _loss_residual(m_ptr, x0_ptr, noise_ptr, table_ptr, t, base, offs, mask, PRED)
    tl.store(grad_m_ptr + base + offs, _to_out(scale * r, grad_m_ptr), mask=mask)


# ---------------------------------------------------------------------------
# Launchers (signatures of torch.ops.fastdiff.diffusion_loss / _diffusion_loss_bwd).
# ---------------------------------------------------------------------------
def diffusion_loss_fwd(model_output, x0, noise, t, table, prediction_type, snr_gamma,
                       grad_scale):
    """(loss (B,) in A, grad_model_output): with grad_scale != 0 the second is
    grad_scale * dL_b/d model_output (like model_output), written by the same
    stage-1 pass; with grad_scale == 0 it is empty, shape (0,)."""
    acc = check_inputs(model_output, table, t)
    pred = int(prediction_type)
    grad_scale = float(grad_scale)
    write_grad = grad_scale != 0.0
    batch, n = per_sample(model_output)
    loss = torch.empty(batch, dtype=acc, device=model_output.device)
    if write_grad:
        grad_m = torch.empty_like(model_output)
    else:
        grad_m = torch.empty((0,), dtype=model_output.dtype, device=model_output.device)
    if batch == 0:
        return loss, grad_m
    if n == 0:
        return loss.fill_(float("nan")), grad_m  # the mean of nothing, as the CPU kernel
    num_partials = triton.cdiv(n, BLOCK)
    partial = torch.empty(batch, num_partials, dtype=acc, device=model_output.device)
    for s in batch_slices(batch):
        # Without WRITE_GRAD grad_m_ptr is never touched: model_output stands in.
        out = grad_m[s] if write_grad else model_output[s]
        _diffusion_loss_fwd_kernel[(num_partials, s.stop - s.start)](
            model_output[s], x0[s], noise[s], out, partial[s], t[s], table,
            float(snr_gamma), grad_scale, n, num_partials,
            PRED=pred, WRITE_GRAD=write_grad, BLOCK=BLOCK, num_warps=NUM_WARPS)
        _diffusion_loss_fwd_reduce_kernel[(s.stop - s.start,)](
            partial[s], loss[s], t[s], table, float(snr_gamma), n, num_partials,
            PRED=pred, REDUCE_BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
    return loss, grad_m


def diffusion_loss_bwd(grad_loss, model_output, x0, noise, t, table, prediction_type, snr_gamma):
    acc = check_inputs(model_output, table, t)
    if grad_loss.dtype != acc or grad_loss.shape != (model_output.shape[0],):
        raise ValueError(f"fastdiff triton: grad_loss must be {acc} of shape "
                         f"({model_output.shape[0]},), got {grad_loss.dtype} "
                         f"{tuple(grad_loss.shape)}")
    grad_loss = grad_loss.contiguous()
    grad_m = torch.empty_like(model_output)
    batch, n = per_sample(model_output)
    if model_output.numel() == 0:
        return grad_m
    for s in batch_slices(batch):
        _diffusion_loss_bwd_kernel[(triton.cdiv(n, BWD_BLOCK), s.stop - s.start)](
            grad_loss[s], model_output[s], x0[s], noise[s], grad_m[s], t[s], table,
            float(snr_gamma), n, PRED=int(prediction_type), BLOCK=BWD_BLOCK,
            num_warps=NUM_WARPS)
    return grad_m


_TYPES = {
    "t_ptr": "*i64", "table_ptr": "*fp64", "partial_ptr": "*{acc}", "loss_ptr": "*{acc}",
    "grad_loss_ptr": "*{acc}", "snr_gamma": "fp64", "grad_scale": "fp64", "n": "i32",
    "num_partials": "i32",
}

KERNEL_CONFIGS = (
    # stage 1 in both variants: loss only, and loss + the fused gradient.
    [kernel_config(_diffusion_loss_fwd_kernel, dtype,
                   {"PRED": pred, "WRITE_GRAD": write_grad, "BLOCK": BLOCK}, types=_TYPES)
     for write_grad in (False, True) for pred in (EPSILON, SAMPLE, V_PREDICTION)
     for dtype in CONFIG_DTYPES]
    # stage 2 reads only A-typed buffers (fp32 for every dtype listed).
    + [kernel_config(_diffusion_loss_fwd_reduce_kernel, "fp32",
                     {"PRED": pred, "REDUCE_BLOCK": REDUCE_BLOCK}, types=_TYPES)
       for pred in (EPSILON, SAMPLE, V_PREDICTION)]
    + [kernel_config(_diffusion_loss_bwd_kernel, dtype, {"PRED": pred, "BLOCK": BWD_BLOCK},
                     types=_TYPES)
       for pred in (EPSILON, SAMPLE, V_PREDICTION) for dtype in CONFIG_DTYPES]
)
