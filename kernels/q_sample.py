"""q_sample (forward diffusion) as Triton kernels, plus the helpers every
fastdiff Triton kernel shares (block indexing, IEEE division/sqrt, launch
helpers and the KERNEL_CONFIGS format read by fastdiff/kernel_report.py).

Math: csrc/include/fastdiff/schedule_math.h (q_sample_coeffs), Ho et al. 2020
eq. 4:  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise.

Precision (as the C++ kernels): the schedule table is float64; each program
derives its sample's coefficients from it in float64 (a handful of scalar ops,
where differences such as beta_t would lose digits in fp32), casts them once to
the compute type A (fp32; fp64 for fp64 inputs: at::opmath_type) and does the
element math in A, loading and storing the input dtype T.

Layout contract (checked by the Python API, see fastdiff/ops): every per-sample
tensor is B blocks of n = numel / B elements, batch outermost and dense
(contiguous or channels_last), all inputs sharing the same strides; the
kernels treat memory as flat per sample. Grid (cdiv(n, BLOCK), B): program
(i, b) loads t[b] and its table row, computes the sample's coefficients as
scalars, then processes elements [i * BLOCK, (i + 1) * BLOCK) of sample b.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..ops._common import batch_flat, memory_order

# Elements per program of the element-wise kernels: 8 per thread at 4 warps,
# i.e. 128-bit accesses for 16-bit dtypes and two for fp32.
BLOCK = 1024
NUM_WARPS = 4

# CUDA limits gridDim.y (our batch axis) to 65535; larger batches are
# launched in slices of at most this many samples.
MAX_GRID_Y = 65535

# Columns of the schedule table (schedule_math.h: TableColumn).
COL_ALPHA_BAR = 0
COL_ONE_MINUS_ALPHA_BAR = 1
COL_SQRT_ALPHA_BAR = 2
COL_SQRT_ONE_MINUS_ALPHA_BAR = 3
NUM_COLUMNS = 4

# Input dtypes the launchers accept, as Triton type names, and the type they
# compute in (at::opmath_type). The schedule table is always float64.
TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
}
ACC_DTYPES = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp32", "fp64": "fp64"}
# Input dtypes listed in KERNEL_CONFIGS (compiled by `fastdiff kernels`): the
# GPU training/sampling dtypes. fp64 launches work (Triton JIT-compiles them on
# first use) and are tested under the interpreter, but are left out of the
# report to keep it fast.
CONFIG_DTYPES = ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------
# Device helpers shared by all fastdiff Triton kernels.
# ---------------------------------------------------------------------------
@triton.jit
def _sample_block(n, BLOCK: tl.constexpr):
    """This program's slice of its sample: (start, offs, mask).

    start is the int64 element offset of the block inside the sample (n may
    exceed 2^31 - BLOCK), offs = arange(BLOCK) (int32), mask = start + offs < n.
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    rem = tl.minimum(n - start, BLOCK).to(tl.int32)
    return start, offs, offs < rem


@triton.jit
def _div(a, b):
    """a / b rounded to nearest (fp32 '/' in Triton is the approximate div.full)."""
    if b.dtype == tl.float32:
        q = tl.math.div_rn(a, b)
    else:
        q = a / b
    return q


@triton.jit
def _sqrt(x):
    """IEEE square root (tl.sqrt is the approximate one in fp32)."""
    if x.dtype == tl.float32:
        r = tl.math.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


# Triton's interpreter (TRITON_INTERPRET=1) has no libdevice; it evaluates
# tl.exp / tl.log in numpy, which are exact there.
_INTERPRET = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _exp(x):
    """exp as std::exp: libdevice (about 1 ulp), not the ex2.approx of tl.exp."""
    if _INTERPRET:
        y = tl.exp(x)
    else:
        y = libdevice.exp(x)
    return y


@triton.jit
def _log(x):
    """log as std::log (libdevice)."""
    if _INTERPRET:
        y = tl.log(x)
    else:
        y = libdevice.log(x)
    return y


@triton.jit
def _cast(x, DT: tl.constexpr):
    """x cast to DT, rounded to nearest even (cvt.rn on the GPU, as at::BFloat16 /
    at::Half on the CPU). The interpreter truncates fp32 -> bf16, so there the
    value is first rounded to bf16 precision by hand."""
    if _INTERPRET and DT == tl.bfloat16 and x.dtype == tl.float32:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(DT)


@triton.jit
def _to_out(x, ptr):
    """x cast to ptr's element type (rounded as _cast does)."""
    return _cast(x, ptr.dtype.element_ty)


@triton.jit
def _clamp(v, lo, hi):
    """torch.clamp / schedule_math.h clamp_value: NaN stays NaN."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _pass_inside(g, v, lo, hi):
    """torch.clamp's VJP: g where lo < v < hi, else 0 (at the bounds and for NaN too)."""
    return tl.where((v > lo) & (v < hi), g, 0.0)


# ---------------------------------------------------------------------------
# Host helpers shared by the launchers.
# ---------------------------------------------------------------------------
def per_sample(x):
    """(B, n) of a per-sample tensor: B blocks of n elements, batch outermost."""
    batch = x.shape[0]
    return batch, (x.numel() // batch if batch else 0)


def check_inputs(ref, table, *ts):
    """Cheap contract checks (dtype, device); the Python API checks the rest.
    Returns the compute dtype (the dtype of diffusion_loss's loss)."""
    if ref.dtype not in TRITON_DTYPES:
        raise TypeError(f"fastdiff triton: unsupported dtype {ref.dtype}")
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    if table.dtype != torch.float64 or table.dim() != 2 or table.shape[1] != NUM_COLUMNS:
        raise ValueError(f"fastdiff triton: the schedule table must be float64 of shape "
                         f"(T, {NUM_COLUMNS}), got {table.dtype} {tuple(table.shape)}")
    if not table.is_contiguous():
        raise ValueError("fastdiff triton: table must be contiguous")
    for t in ts:
        if t.dtype != torch.int64 or t.shape != (ref.shape[0],):
            raise ValueError(f"fastdiff triton: timesteps must be int64 of shape "
                             f"({ref.shape[0]},), got {t.dtype} {tuple(t.shape)}")
    for t in (table,) + ts:
        if t.device != ref.device:
            raise ValueError(f"fastdiff triton: {t.device} tensor given for {ref.device} inputs")
    return acc


def check_like(x, name, ref, ref_name):
    """x matches ref in dtype, shape and device, and lays out memory the same way (dense,
    batch outer; strides of size-1 dims do not matter)."""
    if (x.dtype != ref.dtype or x.shape != ref.shape or x.device != ref.device
            or not batch_flat(x) or memory_order(x) != memory_order(ref)):
        raise ValueError(f"fastdiff triton: {name} must match {ref_name} (dtype, shape, device, "
                         f"strides), got {x.dtype} {tuple(x.shape)} {x.stride()} on "
                         f"{x.device} for {ref.dtype} {tuple(ref.shape)} "
                         f"{ref.stride()} on {ref.device}")


def batch_slices(batch):
    """Slices of the batch launched together (gridDim.y <= MAX_GRID_Y)."""
    return [slice(b0, min(b0 + MAX_GRID_Y, batch)) for b0 in range(0, batch, MAX_GRID_Y)]


# Integer arguments that, like every tensor pointer, a typical launch finds
# divisible by 16 (Triton then specializes them, which enables 128-bit accesses).
_ALIGNED_INTS = ("n", "m_stride")


def kernel_config(kernel, dtype, constexprs, num_warps=NUM_WARPS, types=None):
    """One KERNEL_CONFIGS entry: a (kernel, constexprs, num_warps, signature)
    combination a launcher uses, in the form triton.compiler.ASTSource takes.

    Arguments named *_ptr are pointers to the input dtype unless `types` says
    otherwise; "{acc}" in a type stands for the compute dtype. Integer
    scalars are listed as i32 (what a launch with n < 2^31 specializes to).
    `attrs` is the specialization of the common launch (16-byte aligned
    tensors, n % 16 == 0: SD latents, images), the variant that runs hot.
    """
    acc = ACC_DTYPES[dtype]
    types = dict(types or {})
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name].format(acc=acc)
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        else:
            raise KeyError(f"{kernel.__name__}: no type for argument {name!r}")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*") or name in _ALIGNED_INTS}
    config = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
    return {
        "kernel": kernel,
        "name": kernel.__name__,
        "config": config,
        "dtype": dtype,
        "signature": signature,
        "constexprs": dict(constexprs),
        "attrs": attrs,
        "num_warps": num_warps,
    }


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------
@triton.jit
def _q_sample_fwd_kernel(
    x0_ptr,     # *T   (B, n) clean data x0, flat per sample
    noise_ptr,  # *T   (B, n) Gaussian noise, same layout as x0
    out_ptr,    # *T   (B, n) output x_t, same layout as x0
    t_ptr,      # *i64 (B,) timestep of each sample
    table_ptr,  # *f64 (T, 4) schedule table
    n,          # int  elements per sample
    BLOCK: tl.constexpr,  # elements per program
):
    """x_t = sqrt(ab_t) * x0 + sqrt(1 - ab_t) * noise  (Ho et al. 2020, eq. 4).
    VJP (the backward kernel): d x0 = sqrt(ab_t) g, d noise = sqrt(1 - ab_t) g.

    Coefficients: table columns kSqrtAlphaBar / kSqrtOneMinusAlphaBar of row
    t[b] (schedule_math.h: q_sample_coeffs), cast to A = fp32 (fp64 for fp64
    inputs); element math in A, stored as T.
    """
    ACC: tl.constexpr = tl.float64 if x0_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(1)
    t = tl.load(t_ptr + b)
    c_x0 = tl.load(table_ptr + t * 4 + 2).to(ACC)     # sqrt(ab)
    c_noise = tl.load(table_ptr + t * 4 + 3).to(ACC)  # sqrt(1 - ab)
    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    x0 = tl.load(x0_ptr + base + offs, mask=mask).to(ACC)
    z = tl.load(noise_ptr + base + offs, mask=mask).to(ACC)
    out = c_x0 * x0 + c_noise * z
    tl.store(out_ptr + base + offs, _to_out(out, out_ptr), mask=mask)


@triton.jit
def _q_sample_bwd_kernel(
    grad_out_ptr,    # *T   (B, n) dL/dx_t
    grad_x0_ptr,     # *T   (B, n) output dL/dx0, same layout
    grad_noise_ptr,  # *T   (B, n) output dL/dnoise, same layout
    t_ptr,           # *i64 (B,) timestep of each sample
    table_ptr,       # *f64 (T, 4) schedule table
    n,               # int  elements per sample
    BLOCK: tl.constexpr,  # elements per program
):
    """VJP of q_sample (x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise):
    d x0 = sqrt(ab_t) g, d noise = sqrt(1 - ab_t) g, g = dL/dx_t
    (schedule_math.h: q_sample_coeffs; coefficients cast to A as forward)."""
    ACC: tl.constexpr = tl.float64 if grad_out_ptr.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(1)
    t = tl.load(t_ptr + b)
    c_x0 = tl.load(table_ptr + t * 4 + 2).to(ACC)
    c_noise = tl.load(table_ptr + t * 4 + 3).to(ACC)
    start, offs, mask = _sample_block(n, BLOCK)
    base = b.to(tl.int64) * n + start
    g = tl.load(grad_out_ptr + base + offs, mask=mask).to(ACC)
    tl.store(grad_x0_ptr + base + offs, _to_out(c_x0 * g, grad_x0_ptr), mask=mask)
    tl.store(grad_noise_ptr + base + offs, _to_out(c_noise * g, grad_noise_ptr),
             mask=mask)


# ---------------------------------------------------------------------------
# Launchers (signatures of torch.ops.fastdiff.q_sample / _q_sample_bwd).
# ---------------------------------------------------------------------------
def q_sample_fwd(x0, noise, t, table):
    check_inputs(x0, table, t)
    out = torch.empty_like(x0)
    batch, n = per_sample(x0)
    if out.numel() == 0:
        return out
    for s in batch_slices(batch):
        grid = (triton.cdiv(n, BLOCK), s.stop - s.start)
        _q_sample_fwd_kernel[grid](x0[s], noise[s], out[s], t[s], table, n,
                                   BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def q_sample_bwd(grad_out, t, table):
    check_inputs(grad_out, table, t)
    grad_x0 = torch.empty_like(grad_out)
    grad_noise = torch.empty_like(grad_out)
    batch, n = per_sample(grad_out)
    if grad_out.numel() == 0:
        return grad_x0, grad_noise
    for s in batch_slices(batch):
        grid = (triton.cdiv(n, BLOCK), s.stop - s.start)
        _q_sample_bwd_kernel[grid](grad_out[s], grad_x0[s], grad_noise[s], t[s], table, n,
                                   BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad_x0, grad_noise


_TYPES = {"t_ptr": "*i64", "table_ptr": "*fp64", "n": "i32"}

KERNEL_CONFIGS = [
    kernel_config(kernel, dtype, {"BLOCK": BLOCK}, types=_TYPES)
    for kernel in (_q_sample_fwd_kernel, _q_sample_bwd_kernel)
    for dtype in CONFIG_DTYPES
]
