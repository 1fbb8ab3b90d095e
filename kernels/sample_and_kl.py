"""sample_and_kl as Triton kernels: the reparameterized sample of a diagonal
Gaussian and its per-sample KL to N(0, I) in one pass, and the VJP.

Math: csrc/include/fastdiff/gaussian_math.h (gaussian_sample_and_kl,
gaussian_sample_and_kl_vjp); VAE posterior q(z|x) = N(mu, diag(exp(lv)))
(Kingma & Welling 2014):
  std_i = exp(lv_i / 2),   z_i = mu_i + std_i eps_i          (reparameterization)
  kl_b  = sum_i (mu_i^2 + std_i std_i - 1 - lv_i) / 2        (KL(q || N(0, I)))
  VJP with upstream g_z (per element; 0 when grad_z or the noise is None) and
  g_kl (per sample):
  d mu_i = g_z_i + g_kl[b] mu_i
  d lv_i = (g_z_i eps_i std_i + g_kl[b] (std_i std_i - 1)) / 2
exp(lv) is computed as std * std (one exponential per element, as the C++
kernels). Element math in the compute type A (fp32; fp64 for fp64 inputs:
at::opmath_type), loads and stores in the input dtype T; kl is A.

Deterministic forward, no atomics: stage 1 writes z for its block and one
partial KL sum per (sample, block of BLOCK elements), so the split depends
only on n; stage 2 sums each sample's partials in a fixed order.

Layout contract (the caller guarantees it, see kernels/q_sample.py): mean,
logvar, noise (and grad_z) are dense, batch outermost, with the same strides;
each is B blocks of n = numel / B elements treated as flat per sample.
"""
import torch
import triton
import triton.language as tl

from .q_sample import (
    CONFIG_DTYPES,
    NUM_WARPS,
    TRITON_DTYPES,
    _exp,
    _sample_block,
    _to_out,
    batch_slices,
    check_like,
    kernel_config,
    per_sample,
)

# Elements per stage-1 program (one partial KL sum each). Fixed: the reduction
# tree, hence the bits of kl, depend only on the shape.
BLOCK = 2048
# Partials summed per step by the stage-2 program of a sample.
REDUCE_BLOCK = 1024
# Elements per program of the backward.
BWD_BLOCK = 1024


@triton.jit
def _sample_and_kl_fwd_kernel(
    mean_ptr,      # *T   (B, n) posterior mean mu, flat per sample
    logvar_ptr,    # *T   (B, n) posterior log-variance lv, same layout as mean
    noise_ptr,     # *T   (B, n) standard normal eps (read only when HAS_NOISE)
    z_ptr,         # *T   (B, n) output z = mu + std eps (written only when HAS_NOISE)
    partial_ptr,   # *A   (B, P) output: partial KL sums, P = cdiv(n, BLOCK);
                   #      A = fp32 (fp64 for fp64 inputs)
    n,             # int  elements per sample
    num_partials,  # int  P, partials per sample
    HAS_NOISE: tl.constexpr,  # noise given: also sample z
    BLOCK: tl.constexpr,      # elements per program (= per partial)
):
    """Stage 1, program (i, b) on elements [i BLOCK, (i + 1) BLOCK) of sample b:
    std_j = exp(lv_j / 2), z_j = mu_j + std_j eps_j (HAS_NOISE), and
    partial[b, i] = sum_j (mu_j^2 + std_j std_j - 1 - lv_j) / 2, all in A
    (gaussian_math.h gaussian_sample_and_kl). Masked lanes add exactly 0."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    b = tl.program_id(1)
    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    mu = tl.load(mean_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    lv = tl.load(logvar_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    std = _exp(0.5 * lv)
    var = std * std
    kl = 0.5 * (mu * mu + var - 1.0 - lv)
    kl = tl.where(mask, kl, 0.0)
    tl.store(partial_ptr + b.to(tl.int64) * num_partials + tl.program_id(0),
             tl.sum(kl, axis=0))
    if HAS_NOISE:
        eps = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        tl.store(z_ptr + base + offs, _to_out(mu + std * eps, z_ptr), mask=mask)


@triton.jit
def _sample_and_kl_fwd_reduce_kernel(
    partial_ptr,   # *A   (B, P) partial KL sums from stage 1
    kl_ptr,        # *A   (B,) output: per-sample KL
    num_partials,  # int  P, partials per sample
    REDUCE_BLOCK: tl.constexpr,  # partials added per step
):
    """Stage 2, one program per sample: kl[b] = sum_i partial[b, i] in A, in a
    fixed order (deterministic)."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    b = tl.program_id(0)
    row = partial_ptr + b.to(tl.int64) * num_partials
    offs = tl.arange(0, REDUCE_BLOCK)
    acc = tl.zeros([REDUCE_BLOCK], dtype=ACC)
    for k in range(0, num_partials, REDUCE_BLOCK):
        acc += tl.load(row + k + offs, mask=k + offs < num_partials, other=0.0)
    tl.store(kl_ptr + b, tl.sum(acc, axis=0))


@triton.jit
def _sample_and_kl_bwd_kernel(
    grad_z_ptr,     # *T   (B, n) dL/dz (read only when HAS_GRAD_Z)
    grad_kl_ptr,    # *A   (B,) dL/dkl_b
    mean_ptr,       # *T   (B, n) posterior mean mu
    logvar_ptr,     # *T   (B, n) posterior log-variance lv
    noise_ptr,      # *T   (B, n) eps that made z (read only when HAS_GRAD_Z)
    grad_mean_ptr,  # *T   (B, n) output dL/dmu, same layout as mean
    grad_lv_ptr,    # *T   (B, n) output dL/dlv, same layout as mean
    n,              # int  elements per sample
    HAS_GRAD_Z: tl.constexpr,  # grad_z and noise given; else g_z = 0
    BLOCK: tl.constexpr,       # elements per program
):
    """VJP of z = mu + exp(lv / 2) eps, kl_b = sum (mu^2 + exp(lv) - 1 - lv) / 2
    (gaussian_math.h gaussian_sample_and_kl_vjp), in A:
    d mu = g_z + g_kl[b] mu,  d lv = (g_z eps std + g_kl[b] (std std - 1)) / 2,
    std = exp(lv / 2); g_z = 0 (and eps unread) without HAS_GRAD_Z."""
    ACC: tl.constexpr = grad_kl_ptr.dtype.element_ty
    b = tl.program_id(1)
    g_kl = tl.load(grad_kl_ptr + b)
    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    mu = tl.load(mean_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    lv = tl.load(logvar_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    std = _exp(0.5 * lv)
    if HAS_GRAD_Z:
        g_z = tl.load(grad_z_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        eps = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        d_mu = g_z + g_kl * mu
        d_lv = 0.5 * (g_z * eps * std + g_kl * (std * std - 1.0))
    else:
        d_mu = g_kl * mu
        d_lv = 0.5 * (g_kl * (std * std - 1.0))
    tl.store(grad_mean_ptr + base + offs, _to_out(d_mu, grad_mean_ptr), mask=mask)
    tl.store(grad_lv_ptr + base + offs, _to_out(d_lv, grad_lv_ptr), mask=mask)


# ---------------------------------------------------------------------------
# Launchers (signatures of torch.ops.fastdiff.sample_and_kl / _sample_and_kl_bwd).
# ---------------------------------------------------------------------------
def check_gaussian_inputs(mean, logvar, noise):
    """Cheap contract checks (dtype, shape, device, strides; the Python API
    checks density); returns the compute dtype A (the dtype of kl)."""
    if mean.dtype not in TRITON_DTYPES:
        raise TypeError(f"fastdiff triton: unsupported dtype {mean.dtype}")
    if mean.dim() == 0:
        raise ValueError("fastdiff triton: mean must have a batch dimension")
    check_like(logvar, "logvar", mean, "mean")
    if noise is not None:
        check_like(noise, "noise", mean, "mean")
    return torch.float64 if mean.dtype == torch.float64 else torch.float32


def sample_and_kl_fwd(mean, logvar, noise):
    """(z, kl): z = mean + exp(logvar / 2) noise like mean (empty, shape (0,),
    when noise is None) and kl (B,) in A."""
    acc = check_gaussian_inputs(mean, logvar, noise)
    has_noise = noise is not None
    batch, n = per_sample(mean)
    if has_noise:
        z = torch.empty_like(mean)
    else:
        z = torch.empty((0,), dtype=mean.dtype, device=mean.device)
    kl = torch.empty(batch, dtype=acc, device=mean.device)
    if batch == 0:
        return z, kl
    if n == 0:
        return z, kl.zero_()  # the sum of nothing, as the CPU kernel
    num_partials = triton.cdiv(n, BLOCK)
    partial = torch.empty(batch, num_partials, dtype=acc, device=mean.device)
    for s in batch_slices(batch):
        # Without HAS_NOISE noise_ptr / z_ptr are never touched: mean stands in.
        eps = noise[s] if has_noise else mean[s]
        out = z[s] if has_noise else mean[s]
        _sample_and_kl_fwd_kernel[(num_partials, s.stop - s.start)](
            mean[s], logvar[s], eps, out, partial[s], n, num_partials,
            HAS_NOISE=has_noise, BLOCK=BLOCK, num_warps=NUM_WARPS)
        _sample_and_kl_fwd_reduce_kernel[(s.stop - s.start,)](
            partial[s], kl[s], num_partials,
            REDUCE_BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
    return z, kl


def sample_and_kl_bwd(grad_z, grad_kl, mean, logvar, noise):
    """(grad_mean, grad_logvar), each like mean; grad_z None: g_z = 0."""
    acc = check_gaussian_inputs(mean, logvar, noise)
    if grad_z is not None:
        if noise is None:
            raise ValueError("fastdiff triton: grad_z given without the noise that made z")
        check_like(grad_z, "grad_z", mean, "mean")
    if (grad_kl.dtype != acc or grad_kl.shape != (mean.shape[0],)
            or grad_kl.device != mean.device):
        raise ValueError(f"fastdiff triton: grad_kl must be {acc} of shape "
                         f"({mean.shape[0]},) on {mean.device}, got {grad_kl.dtype} "
                         f"{tuple(grad_kl.shape)} on {grad_kl.device}")
    grad_kl = grad_kl.contiguous()
    has_grad_z = grad_z is not None and noise is not None
    grad_mean = torch.empty_like(mean)
    grad_lv = torch.empty_like(mean)
    batch, n = per_sample(mean)
    if mean.numel() == 0:
        return grad_mean, grad_lv
    for s in batch_slices(batch):
        # Without HAS_GRAD_Z grad_z_ptr / noise_ptr are never touched: mean stands in.
        gz = grad_z[s] if has_grad_z else mean[s]
        eps = noise[s] if has_grad_z else mean[s]
        _sample_and_kl_bwd_kernel[(triton.cdiv(n, BWD_BLOCK), s.stop - s.start)](
            gz, grad_kl[s], mean[s], logvar[s], eps, grad_mean[s], grad_lv[s], n,
            HAS_GRAD_Z=has_grad_z, BLOCK=BWD_BLOCK, num_warps=NUM_WARPS)
    return grad_mean, grad_lv


_TYPES = {
    "partial_ptr": "*{acc}", "kl_ptr": "*{acc}", "grad_kl_ptr": "*{acc}", "n": "i32",
    "num_partials": "i32",
}

KERNEL_CONFIGS = (
    # stage 1 in both variants: KL only, and z + KL.
    [kernel_config(_sample_and_kl_fwd_kernel, dtype,
                   {"HAS_NOISE": has_noise, "BLOCK": BLOCK}, types=_TYPES)
     for has_noise in (False, True) for dtype in CONFIG_DTYPES]
    # stage 2 reads only A-typed buffers (fp32 for every dtype listed).
    + [kernel_config(_sample_and_kl_fwd_reduce_kernel, "fp32",
                     {"REDUCE_BLOCK": REDUCE_BLOCK}, types=_TYPES)]
    + [kernel_config(_sample_and_kl_bwd_kernel, dtype,
                     {"HAS_GRAD_Z": has_grad_z, "BLOCK": BWD_BLOCK}, types=_TYPES)
       for has_grad_z in (False, True) for dtype in CONFIG_DTYPES]
)
