"""group_norm_silu as Triton kernels: GroupNorm followed by SiLU (or plain
GroupNorm), forward and backward, for contiguous (N, C, *) and channels-last
dense (C innermost) inputs.

Math: csrc/include/fastdiff/group_norm_math.h. x: (N, C, *), G groups of
Cg = C / G channels; each (n, g) is normalized over its M = Cg * HW elements
(HW = product of the spatial dims, 1 without any):
  mean, var = moments of the group (biased var),  rstd = 1 / sqrt(var + eps)
  a = scale x + shift,  scale = rstd w_c,  shift = b_c - mean rstd w_c
  y = a sigmoid(a)  (silu; y = a with silu=False),  w = 1 / b = 0 when None
Backward (recomputing a from x, mean and rstd; the forward saves only those):
  da = dy silu'(a),  silu'(a) = s (1 + a (1 - s)),  s = sigmoid(a)  (da = dy: no silu)
  ds_nc = sum_hw da,  dsx_nc = sum_hw da xhat,  xhat = (x - mean) rstd
  d b_c = sum_n ds_nc,  d w_c = sum_n dsx_nc
  A_ng = sum_{c in g} w_c ds_nc,  B_ng = sum_{c in g} w_c dsx_nc
  dx = scale da + c2 x + c3,  c2 = -rstd^2 B / M,  c3 = -c2 mean - rstd A / M
Element math in the compute type A (fp32; fp64 for fp64 inputs:
at::opmath_type), loads and stores in x's dtype T; weight, bias, mean, rstd
and the gradients of weight and bias are A.

Tiles. Each sample is seen as a (C, HW) matrix: contiguous NCHW has HW
innermost (element (c, p) at c HW + p), channels-last C innermost (p C + c);
contiguous inputs without spatial dims (HW == 1) take the channels-last path,
the same memory. The kernels that read x work on (BLOCK_C, BLOCK_HW) tiles of
TILE elements whose innermost axis is WIDE (64) elements wide, or NARROW (16)
when that pads the axis less (small or odd HW or C), so a group of any size is
processed in fixed-size blocks and never loaded whole: no shared memory beyond
the reductions' scratch, registers independent of the shape.

Statistics (two stages, deterministic, no atomics):
  stage 1 (_group_norm_moments_kernel), grid (channel blocks x chunks, N):
    a program takes one channel block and a chunk of `tiles_per_prog`
    consecutive HW tiles and writes, per channel, the chunk's mean (as an
    offset from the channel's pilot K_c = its first element, as the header)
    and M2 (sum of squared deviations from the chunk mean) into (N, P, C)
    partials, P = chunks per sample. Each tile's moments are exact two-pass
    ones (the tile is in registers: the mean of x - K_c, then the squared
    deviations from it); tiles are merged with Chan et al.'s update.
  stage 2 (_group_norm_stats_kernel), one program per (n, g): the group's
    P x Cg partials are merged about the group's first pilot K (parallel-axis
    form of Chan's merge): u = sum cnt (K_c - K + o_k) / M, mean = K + u,
    M2 = sum (M2_k + cnt (K_c - K + o_k - u)^2); two fixed-order passes, the
    second over cached data.
  Why this and not sums of x and x^2: those cancel when |mean| >> std
  (x = 1000 + randn keeps about one digit of var in fp32). The header's
  shifted sums about K_c still lose digits when K_c is far from the rest of
  the channel (an outlier first element); here M2 is always taken about the
  tile's own mean, so it never depends on the pilot, and the pilot only keeps
  the means that are merged small (no rounding of a mean of 1000 enters the
  deviations). var comes out to about an ulp of A for any mean (x = 1000 +
  randn in fp32: rstd within ~1e-7 relative), in one read of x.

  Splitting: a group is spread over many programs (its channel blocks and HW
  chunks) with the deterministic two-stage reduction above, so few (n, g)
  (e.g. N * G = 32 at 256 x 256) still fill the GPU: tiles_per_prog is 1 up
  to TARGET_PROGRAMS programs per sample and grows beyond that, or to keep
  P x Cg <= MAX_GROUP_PARTIALS (what a stage-2 program reads). It depends only
  on the per-sample shape (C, HW, G): the bits do not depend on the batch.

Forward: stage 1, stage 2, then _group_norm_silu_fwd_kernel (one tile per
program): y = act(scale x + shift), per-channel scale / shift from the (N, G)
mean, rstd and w, b.

Backward (deterministic, no atomics):
  _group_norm_silu_bwd_reduce_kernel (grid and chunks as stage 1): per
    (n, chunk, c) sums of da and da xhat -> (N, P, C) partials;
  _group_norm_bwd_coeffs_kernel, one program per (n, g): A and B as
    fixed-order sums of w_c times the group's partials -> c2, c3 (N, G);
  _group_norm_silu_bwd_kernel (one tile per program): dx;
  grad_bias / grad_weight: the partials summed over (N, P) by torch.sum
  (a fixed-order reduction: deterministic).
"""
import math

import torch
import triton
import triton.language as tl

from .q_sample import (
    CONFIG_DTYPES,
    NUM_WARPS,
    TRITON_DTYPES,
    _div,
    _exp,
    _sqrt,
    _to_out,
    batch_slices,
    check_like,
    kernel_config,
)

# Elements per tile of the kernels that read x, and their warps: 8 elements
# per thread (16 per thread at 4 warps keeps ~150 registers live in the SiLU
# backward; 8 warps halves that, see KERNEL_CONFIGS).
TILE = 2048
TILE_WARPS = 8
# Widths of the innermost (contiguous) tile axis: HW for NCHW, C for
# channels-last. The wide one by default; the narrow one when it pads the
# axis less (HW or C small or not a multiple of 64).
WIDE = 64
NARROW = 16
# Stage 1 / backward reduce: programs aimed for per sample (tiles are grouped
# into chunks only beyond that), and the most partials (P x Cg) per group
# that the per-(n, g) kernels read (more chunks per program beyond that).
TARGET_PROGRAMS = 1024
MAX_GROUP_PARTIALS = 8192
# Partials read per step by the per-(n, g) kernels (stage 2, backward coefficients).
REDUCE_BLOCK = 2048


# ---------------------------------------------------------------------------
# Device helpers.
# ---------------------------------------------------------------------------
@triton.jit
def _tile_offsets(c, p, C, HW, CHANNELS_LAST: tl.constexpr):
    """(offsets, mask) of the (len(c), len(p)) tile of channels c x positions p
    inside a sample: c HW + p (NCHW) or p C + c (channels-last), int64."""
    if CHANNELS_LAST:
        offs = p.to(tl.int64)[None, :] * C + c[:, None]
    else:
        offs = c.to(tl.int64)[:, None] * HW + p[None, :]
    mask = (c < C)[:, None] & (p < HW)[None, :]
    return offs, mask


@triton.jit
def _tile_coords(C, num_cols, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr):
    """(channel block, column) of this program; column = HW tile or chunk.
    Neighbouring programs read neighbouring memory: along HW for NCHW, along
    the channel blocks for channels-last."""
    pid = tl.program_id(0)
    if CHANNELS_LAST:
        num_cb = tl.cdiv(C, BLOCK_C)
        cb = pid % num_cb
        col = pid // num_cb
    else:
        cb = pid // num_cols
        col = pid % num_cols
    return cb, col


@triton.jit
def _channel_affine(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, cmask, num_groups, cpg):
    """Per-channel (scale, shift, mean, rstd) of channels c of sample n:
    scale = rstd w_c, shift = b_c - mean scale (group_norm_math.h)."""
    stat = n.to(tl.int64) * num_groups + c // cpg
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + stat, mask=cmask, other=0.0)
    w = tl.load(w_ptr + c, mask=cmask, other=0.0)
    b = tl.load(b_ptr + c, mask=cmask, other=0.0)
    scale = rstd * w
    shift = b - mean * scale
    return scale, shift, mean, rstd


@triton.jit
def _sigmoid(a):
    """1 / (1 + exp(-a)), IEEE division and libdevice exp (group_norm_math.h)."""
    return _div(tl.full(a.shape, 1.0, a.dtype), 1.0 + _exp(-a))


@triton.jit
def _act(a, SILU: tl.constexpr):
    """y = silu(a) = a sigmoid(a), or a."""
    if SILU:
        y = a * _sigmoid(a)
    else:
        y = a
    return y


@triton.jit
def _act_grad(a, dy, SILU: tl.constexpr):
    """da = dy silu'(a) = dy s (1 + a (1 - s)), s = sigmoid(a); or dy."""
    if SILU:
        s = _sigmoid(a)
        da = dy * s * (1.0 + a * (1.0 - s))
    else:
        da = dy
    return da


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------
@triton.jit
def _group_norm_moments_kernel(
    x_ptr,           # *T   (N, C, HW) input, NCHW or channels-last (CHANNELS_LAST)
    pilot_ptr,       # *A   (N, C) output: each channel's pilot K_c = x[n, c, 0]
    poff_ptr,        # *A   (N, P, C) output: per-(chunk, channel) mean - K_c
    pm2_ptr,         # *A   (N, P, C) output: per-(chunk, channel) M2 = sum (x - mean)^2
    C,               # int  channels
    HW,              # int  spatial size (1 without spatial dims)
    tiles_per_prog,  # int  HW tiles per chunk
    num_chunks,      # int  P = cdiv(cdiv(HW, BLOCK_HW), tiles_per_prog)
    CHANNELS_LAST: tl.constexpr,  # C innermost
    BLOCK_C: tl.constexpr,        # channels per tile
    BLOCK_HW: tl.constexpr,       # positions per tile
):
    """Stage 1 of the statistics. Program (channel block, chunk) of sample n:
    for each channel, the moments of the chunk's HW positions. Per tile, the
    exact two-pass moments in registers about the channel's pilot K (its
    first element, as group_norm_math.h): m = sum (x - K) / cnt,
    q = sum (x - K - m)^2; the tiles are merged with Chan's update (running
    mean offset o, M2, count n):
      d = m - o,  o += d cnt / (n + cnt),  M2 += q + d^2 n cnt / (n + cnt).
    Written in A: o (the chunk mean as an offset from K, so stage 2 never
    sees the rounding of a large mean), M2, and K (by chunk 0)."""
    ACC: tl.constexpr = poff_ptr.dtype.element_ty
    n = tl.program_id(1)
    cb, chunk = _tile_coords(C, num_chunks, CHANNELS_LAST, BLOCK_C)
    x_ptr += n.to(tl.int64) * C * HW
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    hw0 = chunk * tiles_per_prog * BLOCK_HW
    pilot_offs, _ = _tile_offsets(c, tl.arange(0, 1), C, HW, CHANNELS_LAST)
    pilot = tl.load(x_ptr + pilot_offs, mask=cmask[:, None], other=0.0).to(ACC)
    off_mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    count = tl.full((), 0.0, ACC)
    num_tiles = tl.minimum(tiles_per_prog, tl.cdiv(HW - hw0, BLOCK_HW))
    for t in range(0, num_tiles):
        p0 = hw0 + t * BLOCK_HW
        p = p0 + tl.arange(0, BLOCK_HW)
        offs, mask = _tile_offsets(c, p, C, HW, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        cnt = tl.minimum(HW - p0, BLOCK_HW).to(ACC)
        d = tl.where(mask, x - pilot, 0.0)
        m = _div(tl.sum(d, axis=1), cnt)
        e = tl.where(mask, d - m[:, None], 0.0)
        q = tl.sum(e * e, axis=1)
        total = count + cnt
        delta = m - off_mean
        off_mean += delta * _div(cnt, total)
        m2 += q + delta * delta * _div(count * cnt, total)
        count = total
    dst = n.to(tl.int64) * num_chunks * C + chunk * C + c
    tl.store(poff_ptr + dst, off_mean, mask=cmask)
    tl.store(pm2_ptr + dst, m2, mask=cmask)
    tl.store(pilot_ptr + n.to(tl.int64) * C + c, pilot.reshape([BLOCK_C]),
             mask=cmask & (chunk == 0))


@triton.jit
def _group_norm_stats_kernel(
    pilot_ptr,   # *A   (N, C) channel pilots K_c from stage 1
    poff_ptr,    # *A   (N, P, C) chunk means - K_c from stage 1
    pm2_ptr,     # *A   (N, P, C) chunk M2 from stage 1
    mean_ptr,    # *A   (N, G) output: group mean
    rstd_ptr,    # *A   (N, G) output: 1 / sqrt(var + eps), biased var
    C,           # int  channels
    HW,          # int  spatial size
    chunk_hw,    # int  positions per chunk (the last may have fewer)
    num_chunks,  # int  P
    cpg,         # int  channels per group Cg
    eps_hi,      # f32  eps = eps_hi + eps_lo (the pair carries a double eps)
    eps_lo,      # f32
    REDUCE_BLOCK: tl.constexpr,  # partials read per step
):
    """Stage 2, program (g, n): merges the group's P x Cg chunk moments (entry
    k = p Cg + j: chunk p of channel c = g Cg + j, cnt_p = min(chunk_hw,
    HW - p chunk_hw) elements, mean K_c + o_pc), in A and in a fixed order,
    about K = K_{g Cg} (the group's first pilot), u_pc = (K_c - K) + o_pc:
      mean = K + u,  u = sum cnt_p u_pc / M
      M2   = sum (M2_pc + cnt_p (u_pc - u)^2),  var = M2 / M
    (the parallel-axis form of Chan's merge; the deviations u_pc - u never
    pass through a rounded mean)."""
    ACC: tl.constexpr = poff_ptr.dtype.element_ty
    g = tl.program_id(0)
    n = tl.program_id(1)
    pilots = pilot_ptr + n.to(tl.int64) * C + g * cpg
    base = n.to(tl.int64) * num_chunks * C + g * cpg
    num = num_chunks * cpg
    pilot = tl.load(pilots)
    acc = tl.zeros([REDUCE_BLOCK], dtype=ACC)
    for k0 in range(0, num, REDUCE_BLOCK):
        k = k0 + tl.arange(0, REDUCE_BLOCK)
        mask = k < num
        p = k // cpg
        j = k - p * cpg
        o = tl.load(poff_ptr + base + p.to(tl.int64) * C + j, mask=mask, other=0.0)
        u = (tl.load(pilots + j, mask=mask, other=0.0) - pilot) + o
        cnt = tl.minimum(chunk_hw, HW - p * chunk_hw).to(ACC)
        acc += tl.where(mask, cnt * u, 0.0)
    total = (tl.zeros((), dtype=ACC) + cpg) * HW  # M (cpg may be a constexpr 1)
    off_mean = _div(tl.sum(acc, axis=0), total)
    acc = tl.zeros([REDUCE_BLOCK], dtype=ACC)
    for k0 in range(0, num, REDUCE_BLOCK):
        k = k0 + tl.arange(0, REDUCE_BLOCK)
        mask = k < num
        p = k // cpg
        j = k - p * cpg
        offs = base + p.to(tl.int64) * C + j
        o = tl.load(poff_ptr + offs, mask=mask, other=0.0)
        q = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        u = (tl.load(pilots + j, mask=mask, other=0.0) - pilot) + o
        cnt = tl.minimum(chunk_hw, HW - p * chunk_hw).to(ACC)
        d = u - off_mean
        acc += tl.where(mask, q + cnt * d * d, 0.0)
    var = _div(tl.sum(acc, axis=0), total)
    eps = (tl.zeros((), dtype=ACC) + eps_hi) + eps_lo
    rstd = _div(tl.full((), 1.0, ACC), _sqrt(var + eps))
    dst = n.to(tl.int64) * tl.num_programs(0) + g
    tl.store(mean_ptr + dst, pilot + off_mean)
    tl.store(rstd_ptr + dst, rstd)


@triton.jit
def _group_norm_silu_fwd_kernel(
    x_ptr,       # *T   (N, C, HW) input, NCHW or channels-last
    y_ptr,       # *T   output, x's shape and layout
    w_ptr,       # *A   (C,) weight (ones when None)
    b_ptr,       # *A   (C,) bias (zeros when None)
    mean_ptr,    # *A   (N, G) group mean
    rstd_ptr,    # *A   (N, G) group rstd
    C,           # int  channels
    HW,          # int  spatial size
    num_groups,  # int  G
    cpg,         # int  channels per group
    CHANNELS_LAST: tl.constexpr,  # C innermost
    SILU: tl.constexpr,           # y = silu(a), else y = a
    BLOCK_C: tl.constexpr,        # channels per tile
    BLOCK_HW: tl.constexpr,       # positions per tile
):
    """Program (tile, n): y = act(scale x + shift) on one (BLOCK_C, BLOCK_HW)
    tile, scale = rstd w_c, shift = b_c - mean scale, in A, stored as T."""
    n = tl.program_id(1)
    cb, t = _tile_coords(C, tl.cdiv(HW, BLOCK_HW), CHANNELS_LAST, BLOCK_C)
    sample = n.to(tl.int64) * C * HW
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p = t * BLOCK_HW + tl.arange(0, BLOCK_HW)
    scale, shift, _, _ = _channel_affine(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, c < C,
                                         num_groups, cpg)
    offs, mask = _tile_offsets(c, p, C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(scale.dtype)
    y = _act(x * scale[:, None] + shift[:, None], SILU)
    tl.store(y_ptr + sample + offs, _to_out(y, y_ptr), mask=mask)


@triton.jit
def _group_norm_silu_bwd_reduce_kernel(
    grad_y_ptr,      # *T   (N, C, HW) dL/dy, x's layout
    x_ptr,           # *T   (N, C, HW) input
    w_ptr,           # *A   (C,) weight (ones when None)
    b_ptr,           # *A   (C,) bias (zeros when None)
    mean_ptr,        # *A   (N, G) group mean (forward)
    rstd_ptr,        # *A   (N, G) group rstd (forward)
    pds_ptr,         # *A   (N, P, C) output: partial sums of da
    pdsx_ptr,        # *A   (N, P, C) output: partial sums of da xhat
    C,               # int  channels
    HW,              # int  spatial size
    num_groups,      # int  G
    cpg,             # int  channels per group
    tiles_per_prog,  # int  HW tiles per chunk
    num_chunks,      # int  P
    CHANNELS_LAST: tl.constexpr,  # C innermost
    SILU: tl.constexpr,           # da = dy silu'(a), else da = dy
    BLOCK_C: tl.constexpr,        # channels per tile
    BLOCK_HW: tl.constexpr,       # positions per tile
):
    """Backward, first pass; program (channel block, chunk) of sample n, grid
    as stage 1: recomputes a = scale x + shift, da = dy silu'(a) and
    xhat = (x - mean) rstd, and writes per channel the chunk's sums of da and
    da xhat (per-lane accumulation over the tiles, then one tree sum)."""
    ACC: tl.constexpr = pds_ptr.dtype.element_ty
    n = tl.program_id(1)
    cb, chunk = _tile_coords(C, num_chunks, CHANNELS_LAST, BLOCK_C)
    sample = n.to(tl.int64) * C * HW
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    scale, shift, mean, rstd = _channel_affine(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, cmask,
                                               num_groups, cpg)
    hw0 = chunk * tiles_per_prog * BLOCK_HW
    num_tiles = tl.minimum(tiles_per_prog, tl.cdiv(HW - hw0, BLOCK_HW))
    ds = tl.zeros([BLOCK_C], dtype=ACC)
    dsx = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(0, num_tiles):
        p = hw0 + t * BLOCK_HW + tl.arange(0, BLOCK_HW)
        offs, mask = _tile_offsets(c, p, C, HW, CHANNELS_LAST)
        x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(grad_y_ptr + sample + offs, mask=mask, other=0.0).to(ACC)
        da = _act_grad(x * scale[:, None] + shift[:, None], dy, SILU)
        da = tl.where(mask, da, 0.0)
        ds += tl.sum(da, axis=1)
        dsx += tl.sum(da * ((x - mean[:, None]) * rstd[:, None]), axis=1)
    dst = n.to(tl.int64) * num_chunks * C + chunk * C + c
    tl.store(pds_ptr + dst, ds, mask=cmask)
    tl.store(pdsx_ptr + dst, dsx, mask=cmask)


@triton.jit
def _group_norm_bwd_coeffs_kernel(
    pds_ptr,     # *A   (N, P, C) partial sums of da
    pdsx_ptr,    # *A   (N, P, C) partial sums of da xhat
    w_ptr,       # *A   (C,) weight (ones when None)
    mean_ptr,    # *A   (N, G) group mean
    rstd_ptr,    # *A   (N, G) group rstd
    c2_ptr,      # *A   (N, G) output: dx coefficient of x
    c3_ptr,      # *A   (N, G) output: dx constant
    C,           # int  channels
    HW,          # int  spatial size
    num_chunks,  # int  P
    cpg,         # int  channels per group
    REDUCE_BLOCK: tl.constexpr,  # partials read per step
):
    """Program (g, n): A = sum_c w_c ds_nc and B = sum_c w_c dsx_nc as fixed-order
    sums over the group's P x Cg partials (entry k = p Cg + j as in stage 2),
    c2 = -rstd^2 B / M, c3 = -c2 mean - rstd A / M (group_norm_math.h)."""
    ACC: tl.constexpr = pds_ptr.dtype.element_ty
    g = tl.program_id(0)
    n = tl.program_id(1)
    base = n.to(tl.int64) * num_chunks * C + g * cpg
    num = num_chunks * cpg
    acc_a = tl.zeros([REDUCE_BLOCK], dtype=ACC)
    acc_b = tl.zeros([REDUCE_BLOCK], dtype=ACC)
    for k0 in range(0, num, REDUCE_BLOCK):
        k = k0 + tl.arange(0, REDUCE_BLOCK)
        mask = k < num
        p = k // cpg
        j = k - p * cpg
        offs = base + p.to(tl.int64) * C + j
        w = tl.load(w_ptr + g * cpg + j, mask=mask, other=0.0)
        acc_a += w * tl.load(pds_ptr + offs, mask=mask, other=0.0)
        acc_b += w * tl.load(pdsx_ptr + offs, mask=mask, other=0.0)
    stat = n.to(tl.int64) * tl.num_programs(0) + g
    mean = tl.load(mean_ptr + stat)
    rstd = tl.load(rstd_ptr + stat)
    total = (tl.zeros((), dtype=ACC) + cpg) * HW  # M (cpg may be a constexpr 1)
    c2 = -_div(rstd * rstd * tl.sum(acc_b, axis=0), total)
    c3 = -c2 * mean - _div(rstd * tl.sum(acc_a, axis=0), total)
    tl.store(c2_ptr + stat, c2)
    tl.store(c3_ptr + stat, c3)


@triton.jit
def _group_norm_silu_bwd_kernel(
    grad_y_ptr,  # *T   (N, C, HW) dL/dy, x's layout
    x_ptr,       # *T   (N, C, HW) input
    grad_x_ptr,  # *T   output dL/dx, x's layout
    w_ptr,       # *A   (C,) weight (ones when None)
    b_ptr,       # *A   (C,) bias (zeros when None)
    mean_ptr,    # *A   (N, G) group mean
    rstd_ptr,    # *A   (N, G) group rstd
    c2_ptr,      # *A   (N, G) dx coefficient of x
    c3_ptr,      # *A   (N, G) dx constant
    C,           # int  channels
    HW,          # int  spatial size
    num_groups,  # int  G
    cpg,         # int  channels per group
    CHANNELS_LAST: tl.constexpr,  # C innermost
    SILU: tl.constexpr,           # da = dy silu'(a), else da = dy
    BLOCK_C: tl.constexpr,        # channels per tile
    BLOCK_HW: tl.constexpr,       # positions per tile
):
    """Backward, last pass; program (tile, n): dx = scale da + c2 x + c3 with
    da = dy silu'(scale x + shift) recomputed, in A, stored as T."""
    n = tl.program_id(1)
    cb, t = _tile_coords(C, tl.cdiv(HW, BLOCK_HW), CHANNELS_LAST, BLOCK_C)
    sample = n.to(tl.int64) * C * HW
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p = t * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cmask = c < C
    scale, shift, _, _ = _channel_affine(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, cmask,
                                         num_groups, cpg)
    stat = n.to(tl.int64) * num_groups + c // cpg
    c2 = tl.load(c2_ptr + stat, mask=cmask, other=0.0)
    c3 = tl.load(c3_ptr + stat, mask=cmask, other=0.0)
    offs, mask = _tile_offsets(c, p, C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(scale.dtype)
    dy = tl.load(grad_y_ptr + sample + offs, mask=mask, other=0.0).to(scale.dtype)
    da = _act_grad(x * scale[:, None] + shift[:, None], dy, SILU)
    dx = scale[:, None] * da + c2[:, None] * x + c3[:, None]
    tl.store(grad_x_ptr + sample + offs, _to_out(dx, grad_x_ptr), mask=mask)


# ---------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------
def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(x):
    """True for channels-last (C innermost), False for contiguous NCHW;
    ValueError for anything else."""
    if x.is_contiguous():
        return False
    if ((x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))):
        return True
    raise ValueError(f"fastdiff triton: x must be contiguous or channels_last, got strides "
                     f"{x.stride()} for shape {tuple(x.shape)}")


def check_group_norm_args(x, weight, bias, num_groups):
    """Cheap contract checks (group_norm_math.h / op_checks.h
    check_group_norm_args); returns (A, N, C, HW, channels_last), where
    channels_last is the kernels' layout (also for contiguous x with HW == 1)."""
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"fastdiff triton: unsupported dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"fastdiff triton: group_norm_silu needs x of shape (N, C, *), "
                         f"got {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"fastdiff triton: num_groups = {num_groups} must divide the "
                         f"{channels} channels")
    channels_last = _layout(x)
    acc = _acc_dtype(x.dtype)
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None and (v.dim() != 1 or v.shape[0] != channels or not v.is_contiguous()
                              or v.dtype != acc or v.device != x.device):
            raise ValueError(f"fastdiff triton: {name} must be contiguous {acc} of shape "
                             f"({channels},) on {x.device}, got {v.dtype} {tuple(v.shape)} "
                             f"on {v.device}")
    hw = math.prod(x.shape[2:])
    return acc, batch, channels, hw, channels_last or hw == 1


def _inner_block(size):
    """Width of the tile's contiguous axis for an axis of `size` elements:
    WIDE unless NARROW pads it less."""
    return WIDE if triton.cdiv(size, WIDE) * WIDE <= triton.cdiv(size, NARROW) * NARROW else NARROW


def _tile_shape(channels, hw, channels_last):
    """(BLOCK_C, BLOCK_HW) of the kernels that read x."""
    if channels_last:
        block_c = _inner_block(channels)
        return block_c, TILE // block_c
    block_hw = _inner_block(hw)
    return TILE // block_hw, block_hw


def _chunks(channels, hw, cpg, block_c, block_hw):
    """(tiles_per_prog, P) of stage 1 / the backward reduce, from the sample's
    shape only: one tile per program up to TARGET_PROGRAMS programs per
    sample, more beyond that or to keep P x Cg <= MAX_GROUP_PARTIALS."""
    hw_tiles = triton.cdiv(hw, block_hw)
    per_sample = triton.cdiv(channels, block_c) * hw_tiles
    tiles = max(1, per_sample // TARGET_PROGRAMS, triton.cdiv(hw_tiles * cpg, MAX_GROUP_PARTIALS))
    return tiles, triton.cdiv(hw_tiles, tiles)


def _weight_bias(weight, bias, channels, acc, device):
    w = weight if weight is not None else torch.ones(channels, dtype=acc, device=device)
    b = bias if bias is not None else torch.zeros(channels, dtype=acc, device=device)
    return w, b


def _split_eps(eps):
    """eps as an (fp32, fp32) pair whose sum is eps to about 48 bits (Triton
    passes Python floats as fp32; the fp64 kernels add the pair in fp64)."""
    hi = float(torch.tensor(eps, dtype=torch.float32))
    return hi, float(eps - hi)


def group_norm_silu_fwd(x, weight, bias, num_groups, eps, silu):
    """(y, mean, rstd): y like x (shape, dtype, layout); mean, rstd (N, G) in A."""
    acc, batch, channels, hw, channels_last = check_group_norm_args(x, weight, bias, num_groups)
    if not eps > 0:
        raise ValueError(f"fastdiff triton: eps must be > 0, got {eps}")
    y = torch.empty_like(x)
    mean = torch.empty(batch, num_groups, dtype=acc, device=x.device)
    rstd = torch.empty(batch, num_groups, dtype=acc, device=x.device)
    if batch == 0:
        return y, mean, rstd
    if x.numel() == 0:  # empty groups: mean 0, var 0 (group_norm_math.h group_moments)
        return y, mean.zero_(), rstd.fill_(1.0 / math.sqrt(eps))
    w, b = _weight_bias(weight, bias, channels, acc, x.device)
    cpg = channels // num_groups
    block_c, block_hw = _tile_shape(channels, hw, channels_last)
    tiles, chunks = _chunks(channels, hw, cpg, block_c, block_hw)
    pilot = torch.empty(batch, channels, dtype=acc, device=x.device)
    poff = torch.empty(batch, chunks, channels, dtype=acc, device=x.device)
    pm2 = torch.empty_like(poff)
    eps_hi, eps_lo = _split_eps(eps)
    num_cb = triton.cdiv(channels, block_c)
    hw_tiles = triton.cdiv(hw, block_hw)
    tile = dict(CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_HW=block_hw,
                num_warps=TILE_WARPS)
    for s in batch_slices(batch):
        nb = s.stop - s.start
        _group_norm_moments_kernel[(num_cb * chunks, nb)](
            x[s], pilot[s], poff[s], pm2[s], channels, hw, tiles, chunks, **tile)
        _group_norm_stats_kernel[(num_groups, nb)](
            pilot[s], poff[s], pm2[s], mean[s], rstd[s], channels, hw, tiles * block_hw, chunks,
            cpg, eps_hi, eps_lo, REDUCE_BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
        _group_norm_silu_fwd_kernel[(num_cb * hw_tiles, nb)](
            x[s], y[s], w, b, mean[s], rstd[s], channels, hw, num_groups, cpg,
            SILU=bool(silu), **tile)
    return y, mean, rstd


def _check_bwd_args(grad_y, x, mean, rstd, acc, batch, num_groups):
    check_like(grad_y, "grad_y", x, "x")
    for name, v in (("mean", mean), ("rstd", rstd)):
        if (v.dtype != acc or v.shape != (batch, num_groups) or not v.is_contiguous()
                or v.device != x.device):
            raise ValueError(f"fastdiff triton: {name} must be contiguous {acc} of shape "
                             f"({batch}, {num_groups}) on {x.device}, got {v.dtype} "
                             f"{tuple(v.shape)} on {v.device}")


def group_norm_silu_bwd(grad_y, x, weight, bias, mean, rstd, num_groups, silu):
    """(grad_x, grad_weight, grad_bias): grad_x like x; grad_weight / grad_bias
    (C,) in A, or empty (0,) when weight / bias is None."""
    acc, batch, channels, hw, channels_last = check_group_norm_args(x, weight, bias, num_groups)
    _check_bwd_args(grad_y, x, mean, rstd, acc, batch, num_groups)
    grad_x = torch.empty_like(x)
    empty = torch.empty(0, dtype=acc, device=x.device)
    if x.numel() == 0:  # sums of nothing
        zeros = torch.zeros(channels, dtype=acc, device=x.device)
        return (grad_x, zeros if weight is not None else empty,
                zeros.clone() if bias is not None else empty)
    w, b = _weight_bias(weight, bias, channels, acc, x.device)
    cpg = channels // num_groups
    block_c, block_hw = _tile_shape(channels, hw, channels_last)
    tiles, chunks = _chunks(channels, hw, cpg, block_c, block_hw)
    pds = torch.empty(batch, chunks, channels, dtype=acc, device=x.device)
    pdsx = torch.empty_like(pds)
    c2 = torch.empty(batch, num_groups, dtype=acc, device=x.device)
    c3 = torch.empty_like(c2)
    num_cb = triton.cdiv(channels, block_c)
    hw_tiles = triton.cdiv(hw, block_hw)
    tile = dict(CHANNELS_LAST=channels_last, SILU=bool(silu), BLOCK_C=block_c,
                BLOCK_HW=block_hw, num_warps=TILE_WARPS)
    for s in batch_slices(batch):
        nb = s.stop - s.start
        _group_norm_silu_bwd_reduce_kernel[(num_cb * chunks, nb)](
            grad_y[s], x[s], w, b, mean[s], rstd[s], pds[s], pdsx[s], channels, hw,
            num_groups, cpg, tiles, chunks, **tile)
        _group_norm_bwd_coeffs_kernel[(num_groups, nb)](
            pds[s], pdsx[s], w, mean[s], rstd[s], c2[s], c3[s], channels, hw, chunks, cpg,
            REDUCE_BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)
        _group_norm_silu_bwd_kernel[(num_cb * hw_tiles, nb)](
            grad_y[s], x[s], grad_x[s], w, b, mean[s], rstd[s], c2[s], c3[s], channels,
            hw, num_groups, cpg, **tile)
    # d w_c = sum_n dsx_nc, d b_c = sum_n ds_nc: sums of the (N, P, C) partials
    # over (N, P), torch's fixed-order reduction (no atomics).
    grad_weight = pdsx.sum(dim=(0, 1)) if weight is not None else empty
    grad_bias = pds.sum(dim=(0, 1)) if bias is not None else empty
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------
# Configurations compiled by `fastdiff kernels`.
# ---------------------------------------------------------------------------
_TYPES = {name: "*{acc}" for name in (
    "pilot_ptr", "poff_ptr", "pm2_ptr", "mean_ptr", "rstd_ptr", "w_ptr", "b_ptr", "pds_ptr",
    "pdsx_ptr", "c2_ptr", "c3_ptr")}
_TYPES.update({name: "i32" for name in (
    "C", "HW", "tiles_per_prog", "num_chunks", "chunk_hw", "cpg", "num_groups")})
_TYPES.update(eps_hi="fp32", eps_lo="fp32")
# Integer arguments that the common launch (SD-like C = 320, HW = 64 x 64)
# finds divisible by 16, specialized as Triton does at launch.
_ALIGNED = ("C", "HW", "chunk_hw")


def _config(kernel, dtype, constexprs, num_warps=TILE_WARPS):
    cfg = kernel_config(kernel, dtype, constexprs, num_warps=num_warps, types=_TYPES)
    for i, name in enumerate(kernel.arg_names):
        if name in _ALIGNED:
            cfg["attrs"][(i,)] = [["tt.divisibility", 16]]
    return cfg


def _tile_constexprs():
    """Every (CHANNELS_LAST, BLOCK_C, BLOCK_HW) the launchers use: _tile_shape
    of an innermost axis that takes WIDE and of one that takes NARROW."""
    return [{"CHANNELS_LAST": channels_last, "BLOCK_C": block_c, "BLOCK_HW": block_hw}
            for channels_last in (False, True) for size in (WIDE, NARROW)
            for block_c, block_hw in [_tile_shape(size, size, channels_last)]]


KERNEL_CONFIGS = (
    [_config(_group_norm_moments_kernel, dtype, tile)
     for tile in _tile_constexprs() for dtype in CONFIG_DTYPES]
    + [_config(kernel, dtype, {"CHANNELS_LAST": tile["CHANNELS_LAST"], "SILU": silu,
                               "BLOCK_C": tile["BLOCK_C"], "BLOCK_HW": tile["BLOCK_HW"]})
       for kernel in (_group_norm_silu_fwd_kernel, _group_norm_silu_bwd_reduce_kernel,
                      _group_norm_silu_bwd_kernel)
       for tile in _tile_constexprs() for silu in (True, False) for dtype in CONFIG_DTYPES]
    # the per-(n, g) kernels read only A-typed buffers (fp32 for every dtype listed).
    + [_config(kernel, "fp32", {"REDUCE_BLOCK": REDUCE_BLOCK}, num_warps=NUM_WARPS)
       for kernel in (_group_norm_stats_kernel, _group_norm_bwd_coeffs_kernel)]
)
