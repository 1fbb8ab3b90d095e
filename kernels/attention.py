"""attention as Triton kernels: softmax(scale q k^T) v, non-causal, no mask,
forward and backward, never storing the (Nq, Nk) scores (FlashAttention-2,
Dao 2023, Alg. 1 (forward) and Alg. 2 (backward), in the deterministic form:
one program owns each output block, no atomics).

Math: csrc/include/fastdiff/attention_math.h. Per query row i, with
s_ij = scale q_i . k_j (Dao et al. 2022, FlashAttention, Alg. 1; Dao 2023,
FlashAttention-2, Alg. 1-2):
  forward, key blocks visited in order, running max m and sum l:
    m' = max(m, max_j s_ij),  c = exp(m - m')   (c = 0 while m = -inf)
    l' = c l + sum_j exp(s_ij - m'),  o' = c o + sum_j exp(s_ij - m') v_j
  at the end o = o / l and lse_i = m + log l (the only statistic saved).
  backward, P recomputed blockwise from lse (no N x N tensor):
    p_ij = exp(s_ij - lse_i),  delta_i = dO_i . o_i
    dv_j += p_ij dO_i,  dp_ij = dO_i . v_j,  ds_ij = p_ij (dp_ij - delta_i)
    dq_i += scale ds_ij k_j,  dk_j += scale ds_ij q_i
The kernels take the exponentials base 2 with the scale folded into one
multiply, s2 = (scale log2 e) q.k: exp(s - m) = exp2(s2 - m2), m2 = m log2 e;
the lse they store is natural (lse = m2 ln 2 + log l), the backward turns it
back into lse2 = lse log2 e.

Precision. Every statistic and accumulator is in the accumulation type A
(fp32; fp64 for fp64 inputs): the scores come out of tl.dot in A (fp16 / bf16
tensor-core products accumulate in fp32), so scores up to 1e4 from fp16 / bf16
inputs cannot overflow after the max shift. The probability tiles are rounded
to the input type T before they meet v (p v) and q / k (ds q, ds k) in a dot,
as FlashAttention does. fp32 and fp64 inputs take IEEE dot products (no TF32:
fp32 results match the fp64 truth to ~1e-6, at FMA rather than tensor-core
speed); fp16 / bf16 take the tensor cores.

Layouts. q: (B, H, Nq, D), k / v: (B, H, Nk, D), head dim contiguous
(stride 1), the other strides free and passed to the kernels (q, k, v may be
views into one (B, N, 3, H, D) or (B, N, H, 3, D) qkv projection output).
out and the gradients are (B, H, N, D) views of (B, N, H, D) memory; lse and
delta are (B, H, Nq) contiguous in A. Head dims 1..MAX_HEAD_DIM are padded to
a power-of-two BLOCK_D >= 16 with masked loads (zeros), query / key tails are
masked (zeros for q / k / v / dO rows, -inf scores for missing keys, +inf lse
for missing queries, so their probabilities are exactly 0).

Kernels and grids (1-D grids, block index fastest, so the programs resident
together share one head's K / V (or Q / dO) in L2):
  _attention_fwd_kernel           one program per (b, h, query block)
  _attention_bwd_preprocess_kernel one program per (b, h, query block): delta
  _attention_bwd_dkdv_kernel      one program per (b, h, key block), looping
                                  over every query block: dk, dv
  _attention_bwd_dq_kernel        one program per (b, h, query block), looping
                                  over every key block: dq
Each gradient row is summed by one program in a fixed order: the backward is
deterministic (bitwise the same run after run), with no atomics and no
(Nq, Nk) or split-K scratch.

Block sizes (GPU; _blocks, GPU_BLOCKS): BLOCK_D = the next power of two
>= max(D, 16); per (element size, BLOCK_D) a (BLOCK_M, BLOCK_N, warps) for
each loop kernel. The forward and dq programs keep a (BLOCK_M, BLOCK_D) fp32
accumulator and their q (and dO) tile live across the loop, the dk / dv
program two (BLOCK_N, BLOCK_D) fp32 accumulators and its k and v tiles; the
loop tiles are software-pipelined through shared memory (Triton's default 3
stages). 16-bit inputs: 128 x 64 forward tiles (8 warps) up to D = 64 as
FlashAttention-2 uses, fewer rows as D grows to 256; fp32 (IEEE products, both
operands in registers) and fp64 take 16..64-row tiles. Every configuration
compiles for sm_80 and sm_90 with 0 spills and within sm_80's 163 KB of
shared memory (sm_90: 227 KB): KERNEL_CONFIGS, `fastdiff kernels`. The sizes
come from those compiles, not from timings (no GPU here).
The head dim D is a compile-time constant (HEAD_DIM): a kernel is compiled
per distinct D (U-Nets use a handful: 40, 64, 80, 160). Under
TRITON_INTERPRET=1 the tiles are INTERPRET_BLOCK (16) rows, so that small
test shapes still take several blocks and masked tails.
"""
import torch
import triton
import triton.language as tl

from .q_sample import CONFIG_DTYPES, TRITON_DTYPES, _INTERPRET, _cast, _to_out, kernel_config

# Head dims up to this are supported (attention_math.h kMaxHeadDim).
MAX_HEAD_DIM = 256
# Query / key rows per block under TRITON_INTERPRET=1 (CPU tests).
INTERPRET_BLOCK = 16
# Elements of the (rows, BLOCK_D) tiles of the delta preprocess kernel.
PRE_TILE = 4096

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)    # ln(2)

# GPU block sizes: {BLOCK_D: (fwd, dkdv, dq)} per element size, each a
# (BLOCK_M, BLOCK_N, num_warps), BLOCK_M the query rows and BLOCK_N the key
# rows of a tile. Chosen from compiles for sm_80 and sm_90 (KERNEL_CONFIGS;
# not timed: no GPU here): 0 spills, registers below 255 where a candidate
# allowed it, shared memory within sm_80's 163 KB with Triton's default 3
# pipeline stages. 16-bit inputs (tensor cores): 128 x 64 / 8 warps forward
# tiles up to D = 64 as FlashAttention-2, fewer key rows per step as the D-wide
# accumulators grow; the dk / dv program keeps 2 fp32 (BLOCK_N, D)
# accumulators and its k, v tiles, hence 32 query rows per step.
_BLOCKS_16BIT = {
    16: ((128, 64, 8), (32, 128, 8), (128, 32, 8)),
    32: ((128, 64, 8), (32, 128, 8), (128, 32, 8)),
    64: ((128, 64, 8), (32, 128, 8), (128, 32, 8)),
    128: ((128, 32, 8), (32, 64, 8), (64, 32, 8)),
    256: ((64, 32, 8), (32, 32, 8), (64, 32, 8)),
}
# fp32 (IEEE FMA products: both dot operands live in registers) takes
# smaller tiles.
_BLOCKS_FP32 = {
    16: ((64, 32, 4), (32, 64, 4), (64, 32, 4)),
    32: ((64, 32, 4), (32, 32, 4), (64, 32, 4)),
    64: ((32, 32, 4), (32, 32, 4), (32, 32, 4)),
    128: ((32, 16, 4), (16, 32, 4), (32, 16, 4)),
    256: ((16, 16, 4), (16, 16, 4), (16, 16, 4)),
}
# fp64 (not in KERNEL_CONFIGS, as for every fastdiff op; compiled for sm_80
# and sm_90 by hand, 0 spills): the fp32 tiles up to D = 64, 16 x 16 beyond
# (8-byte tiles), and at D = 256 FP64_WIDE_STAGES pipeline stages instead of
# 3: the dq kernel's would take 176 KB of shared memory, over sm_80's 163 KB.
_BLOCKS_FP64 = {**_BLOCKS_FP32, 128: ((16, 16, 4),) * 3, 256: ((16, 16, 4),) * 3}
FP64_WIDE_STAGES = 2
GPU_BLOCKS = {2: _BLOCKS_16BIT, 4: _BLOCKS_FP32, 8: _BLOCKS_FP64}
# Rows of the largest block, the preprocess kernel's PRE_TILE / 16 (offsets
# inside a block are int32: row strides must stay below 2^31 / MAX_BLOCK_ROWS).
MAX_BLOCK_ROWS = 256
PRE_WARPS = 4


# ---------------------------------------------------------------------------
# Device helpers.
# ---------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc):
    """acc + a b in acc's type A: tensor cores for fp16 / bf16 (fp32
    accumulation), IEEE products for fp32 / fp64 (no TF32). The interpreter
    multiplies bf16 (stored as uint16 there) as integers, so there bf16
    operands are widened to fp32 first (exact: a bf16 product fits in fp32)."""
    if _INTERPRET and a.dtype == tl.bfloat16:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32 or a.dtype == tl.float64:
        r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _program_coords(num_blocks, num_heads):
    """(block, b, h) of this program of a 1-D grid of num_blocks x H x B
    programs, the block index fastest."""
    pid = tl.program_id(0)
    blk = pid % num_blocks
    bh = pid // num_blocks
    return blk, bh // num_heads, bh % num_heads


@triton.jit
def _head_base(ptr, b, h, stride_b, stride_h):
    """ptr advanced to head (b, h), in int64."""
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _hint(stride_b, stride_h, stride_n, VEC: tl.constexpr):
    """The (batch, head, row) strides of one tensor, visibly multiples of VEC
    (the launcher checked that they are): with 16-byte aligned pointers every
    tile row then starts 16-byte aligned and loads / stores are 128-bit
    vectors (and cp.async-pipelined) even where Triton's launch specialization
    (divisibility by 16 elements) does not see it, e.g. a head stride of
    D = 40 halves. (stride // VEC) * VEC: the multiply by a constant is what
    the compiler's alignment analysis reads; tl.multiple_of on a kernel
    argument is lost (it annotates the defining op, and an argument has none).
    Without it every load was scalar: 240 registers against 158 for the
    64 x 64 fp16 forward on sm_80 (D = 64, strides not specialized)."""
    if VEC > 1:
        stride_b = (stride_b // VEC) * VEC
        stride_h = (stride_h // VEC) * VEC
        stride_n = (stride_n // VEC) * VEC
    return stride_b, stride_h, stride_n


@triton.jit
def _wide(x):
    """x as an int64 scalar (x may be a constexpr: Triton passes a 1 as one)."""
    return tl.zeros((), dtype=tl.int64) + x


@triton.jit
def _scales(scale_hi, scale_lo, ACC: tl.constexpr):
    """(scale, scale log2 e) in A from the fp32 pair scale = hi + lo (the pair
    carries a double scale for fp64; in fp32 it is hi)."""
    scale = (tl.zeros((), dtype=ACC) + scale_hi) + scale_lo
    return scale, scale * LOG2E


# ---------------------------------------------------------------------------
# Kernels.
#
# Tiles are addressed as a scalar int64 block base (head base + first row x
# row stride, advanced by BLOCK x row stride per loop step) plus int32 offsets
# inside the block (row x row stride + d): pointer tensors carried across the
# loops would hold two registers per element. The head dim is a constexpr
# (HEAD_DIM): its mask is then known at compile time, so a D that is a
# multiple of 8 keeps 16-byte vector loads and the loop tiles are pipelined
# through shared memory (cp.async); with a runtime D mask the loads turn into
# predicated scalar ones (measured on a 64 x 64 fp16 forward for sm_80: 255
# registers and no pipelining, against 177). Alignment: see _hint.
# ---------------------------------------------------------------------------
@triton.jit
def _attention_fwd_kernel(
    q_ptr,       # *T   (B, H, Nq, D) queries, head dim contiguous
    k_ptr,       # *T   (B, H, Nk, D) keys, head dim contiguous
    v_ptr,       # *T   (B, H, Nk, D) values, head dim contiguous
    out_ptr,     # *T   (B, H, Nq, D) output, (B, Nq, H, D) memory
    lse_ptr,     # *A   (B, H, Nq) output, contiguous: natural log-sum-exp of the scores
    stride_qb,   # int  q strides: batch,
    stride_qh,   # int  head,
    stride_qn,   # int  query row
    stride_kb,   # int  k strides: batch,
    stride_kh,   # int  head,
    stride_kn,   # int  key row
    stride_vb,   # int  v strides: batch,
    stride_vh,   # int  head,
    stride_vn,   # int  key row
    stride_ob,   # int  out strides: batch,
    stride_oh,   # int  head,
    stride_on,   # int  query row
    num_heads,   # int  H
    Nq,          # int  queries per head
    Nk,          # int  keys per head (>= 1)
    scale_hi,    # f32  scale = scale_hi + scale_lo (softmax scale, e.g. D^-1/2)
    scale_lo,    # f32
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_M: tl.constexpr,   # query rows per program
    BLOCK_N: tl.constexpr,   # key rows per loop step
    BLOCK_D: tl.constexpr,   # D padded to a power of two >= 16
    VEC: tl.constexpr,       # every stride is a multiple of VEC (16 bytes; 1: unknown)
):
    """Forward of FlashAttention-2 (Dao 2023, Alg. 1), program (query block, h, b):
      s2_ij = (scale log2 e) q_i . k_j,  for each key block in order:
        m2' = max(m2, max_j s2_ij),  c = exp2(m2 - m2')  (0 while m2 = -inf)
        l' = c l + sum_j exp2(s2_ij - m2'),  o' = c o + sum_j exp2(s2_ij - m2') v_j
      out_i = o_i / l_i,  lse_i = m2_i ln 2 + log l_i  (= log sum_j exp(s_ij)).
    VJP (the backward kernels): with p_ij = exp(s_ij - lse_i), delta_i = dO_i . out_i,
      dv_j = sum_i p_ij dO_i,  ds_ij = p_ij (dO_i . v_j - delta_i),
      dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i.
    Statistics and o in A; p rounded to T for the p v product."""
    stride_qb, stride_qh, stride_qn = _hint(stride_qb, stride_qh, stride_qn, VEC)
    stride_kb, stride_kh, stride_kn = _hint(stride_kb, stride_kh, stride_kn, VEC)
    stride_vb, stride_vh, stride_vn = _hint(stride_vb, stride_vh, stride_vn, VEC)
    stride_ob, stride_oh, stride_on = _hint(stride_ob, stride_oh, stride_on, VEC)
    T: tl.constexpr = q_ptr.dtype.element_ty
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    num_m = tl.cdiv(Nq, BLOCK_M)
    mb, b, h = _program_coords(num_m, num_heads)
    _, qk_scale = _scales(scale_hi, scale_lo, ACC)

    m0 = mb * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = (m0 + offs_m) < Nq
    d_mask = offs_d < HEAD_DIM
    md_mask = m_mask[:, None] & d_mask[None, :]

    q_base = _head_base(q_ptr, b, h, stride_qb, stride_qh) + m0.to(tl.int64) * stride_qn
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=md_mask, other=0.0)
    # k^T tiles (BLOCK_D, BLOCK_N) and v tiles (BLOCK_N, BLOCK_D), one key block per step.
    k_base = _head_base(k_ptr, b, h, stride_kb, stride_kh)
    v_base = _head_base(v_ptr, b, h, stride_vb, stride_vh)
    kt_offs = offs_n[None, :] * stride_kn + offs_d[:, None]
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :]
    k_step = _wide(stride_kn) * BLOCK_N
    v_step = _wide(stride_vn) * BLOCK_N

    m2 = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for n0 in range(0, Nk, BLOCK_N):
        n_mask = (n0 + offs_n) < Nk
        kt = tl.load(k_base + kt_offs, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        v = tl.load(v_base + v_offs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        # missing keys: score -inf (bias), so their probability is exactly 0
        bias = tl.where(n_mask, 0.0, float("-inf")).to(ACC)
        s2 = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)) * qk_scale + bias[None, :]
        m2_new = tl.maximum(m2, tl.max(s2, axis=1))  # finite: every block has a key
        c = tl.exp2(m2 - m2_new)                      # exp2(-inf) = 0 on the first block
        p = tl.exp2(s2 - m2_new[:, None])
        l = l * c + tl.sum(p, axis=1)
        acc = _dot(_cast(p, T), v, acc * c[:, None])
        m2 = m2_new
        k_base += k_step
        v_base += v_step

    out = acc / l[:, None]
    out_base = _head_base(out_ptr, b, h, stride_ob, stride_oh) + m0.to(tl.int64) * stride_on
    tl.store(out_base + offs_m[:, None] * stride_on + offs_d[None, :], _to_out(out, out_ptr),
             mask=md_mask)
    lse = m2 * LN2 + tl.log(l)
    row = (b.to(tl.int64) * num_heads + h) * Nq + m0
    tl.store(lse_ptr + row + offs_m, lse, mask=m_mask)


@triton.jit
def _attention_bwd_preprocess_kernel(
    out_ptr,     # *T   (B, H, Nq, D) forward output
    do_ptr,      # *T   (B, H, Nq, D) dL/dout, head dim contiguous
    delta_ptr,   # *A   (B, H, Nq) output, contiguous: delta_i = dO_i . o_i
    stride_ob,   # int  out strides: batch,
    stride_oh,   # int  head,
    stride_on,   # int  query row
    stride_db,   # int  dO strides: batch,
    stride_dh,   # int  head,
    stride_dn,   # int  query row
    num_heads,   # int  H
    Nq,          # int  queries per head
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_M: tl.constexpr,   # query rows per program
    BLOCK_D: tl.constexpr,   # D padded to a power of two >= 16
    VEC: tl.constexpr,       # every stride is a multiple of VEC (16 bytes; 1: unknown)
):
    """delta_i = sum_d dO_id o_id in A (FlashAttention-2, Dao 2023, Alg. 2
    line 4: D_i = rowsum(dO o)), the row term of the softmax VJP:
    sum_j p_ij dp_ij = dO_i . sum_j p_ij v_j = dO_i . o_i."""
    stride_ob, stride_oh, stride_on = _hint(stride_ob, stride_oh, stride_on, VEC)
    stride_db, stride_dh, stride_dn = _hint(stride_db, stride_dh, stride_dn, VEC)
    ACC: tl.constexpr = delta_ptr.dtype.element_ty
    num_m = tl.cdiv(Nq, BLOCK_M)
    mb, b, h = _program_coords(num_m, num_heads)
    m0 = mb * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = (m0 + offs_m) < Nq
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_base = _head_base(out_ptr, b, h, stride_ob, stride_oh) + m0.to(tl.int64) * stride_on
    do_base = _head_base(do_ptr, b, h, stride_db, stride_dh) + m0.to(tl.int64) * stride_dn
    o = tl.load(o_base + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dn + offs_d[None, :], mask=mask, other=0.0)
    row = (b.to(tl.int64) * num_heads + h) * Nq + m0
    tl.store(delta_ptr + row + offs_m, tl.sum(o.to(ACC) * do.to(ACC), axis=1), mask=m_mask)


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr,       # *T   (B, H, Nq, D) queries
    k_ptr,       # *T   (B, H, Nk, D) keys
    v_ptr,       # *T   (B, H, Nk, D) values
    do_ptr,      # *T   (B, H, Nq, D) dL/dout
    lse_ptr,     # *A   (B, H, Nq) forward log-sum-exp (natural), contiguous
    delta_ptr,   # *A   (B, H, Nq) dO . o from the preprocess kernel, contiguous
    dk_ptr,      # *T   (B, H, Nk, D) output dL/dk, (B, Nk, H, D) memory
    dv_ptr,      # *T   (B, H, Nk, D) output dL/dv, (B, Nk, H, D) memory
    stride_qb,   # int  q strides: batch,
    stride_qh,   # int  head,
    stride_qn,   # int  query row
    stride_kb,   # int  k strides: batch,
    stride_kh,   # int  head,
    stride_kn,   # int  key row
    stride_vb,   # int  v strides: batch,
    stride_vh,   # int  head,
    stride_vn,   # int  key row
    stride_db,   # int  dO strides: batch,
    stride_dh,   # int  head,
    stride_dn,   # int  query row
    stride_gb,   # int  dk / dv strides (one layout): batch,
    stride_gh,   # int  head,
    stride_gn,   # int  key row
    num_heads,   # int  H
    Nq,          # int  queries per head
    Nk,          # int  keys per head
    scale_hi,    # f32  scale = scale_hi + scale_lo
    scale_lo,    # f32
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_M: tl.constexpr,   # query rows per loop step
    BLOCK_N: tl.constexpr,   # key rows per program
    BLOCK_D: tl.constexpr,   # D padded to a power of two >= 16
    VEC: tl.constexpr,       # every stride is a multiple of VEC (16 bytes; 1: unknown)
):
    """dk, dv of one key block (FlashAttention-2, Dao 2023, Alg. 2: the outer
    loop over key blocks, dq left to _attention_bwd_dq_kernel instead of
    atomics), program (key block, h, b), every query block in order:
      p_ij = exp2(s2_ij - lse2_i),  s2 = (scale log2 e) q.k,  lse2 = lse log2 e
      dv_j = sum_i p_ij dO_i,  dp_ij = dO_i . v_j,  ds_ij = p_ij (dp_ij - delta_i)
      dk_j = scale sum_i ds_ij q_i
    computed transposed (p^T, ds^T: key rows by query columns), q and dO loaded
    as (BLOCK_D, BLOCK_M) tiles. Sums in A; p^T, ds^T rounded to T for their
    dots. One program owns each dk / dv row: deterministic, no atomics."""
    stride_qb, stride_qh, stride_qn = _hint(stride_qb, stride_qh, stride_qn, VEC)
    stride_kb, stride_kh, stride_kn = _hint(stride_kb, stride_kh, stride_kn, VEC)
    stride_vb, stride_vh, stride_vn = _hint(stride_vb, stride_vh, stride_vn, VEC)
    stride_db, stride_dh, stride_dn = _hint(stride_db, stride_dh, stride_dn, VEC)
    stride_gb, stride_gh, stride_gn = _hint(stride_gb, stride_gh, stride_gn, VEC)
    T: tl.constexpr = q_ptr.dtype.element_ty
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    num_n = tl.cdiv(Nk, BLOCK_N)
    nb, b, h = _program_coords(num_n, num_heads)
    scale, qk_scale = _scales(scale_hi, scale_lo, ACC)

    n0 = nb * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = (n0 + offs_n) < Nk
    d_mask = offs_d < HEAD_DIM
    nd_mask = n_mask[:, None] & d_mask[None, :]

    k_base = _head_base(k_ptr, b, h, stride_kb, stride_kh) + n0.to(tl.int64) * stride_kn
    v_base = _head_base(v_ptr, b, h, stride_vb, stride_vh) + n0.to(tl.int64) * stride_vn
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=nd_mask, other=0.0)
    # missing keys (rows of this block past Nk): score -inf, p = 0 (never stored either)
    bias = tl.where(n_mask, 0.0, float("-inf")).to(ACC)

    # q^T / dO^T tiles (BLOCK_D, BLOCK_M), one query block per step.
    q_base = _head_base(q_ptr, b, h, stride_qb, stride_qh)
    do_base = _head_base(do_ptr, b, h, stride_db, stride_dh)
    qt_offs = offs_m[None, :] * stride_qn + offs_d[:, None]
    dot_offs = offs_m[None, :] * stride_dn + offs_d[:, None]
    q_step = _wide(stride_qn) * BLOCK_M
    do_step = _wide(stride_dn) * BLOCK_M
    row = (b.to(tl.int64) * num_heads + h) * Nq

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for m0 in range(0, Nq, BLOCK_M):
        m_mask = (m0 + offs_m) < Nq
        dm_mask = d_mask[:, None] & m_mask[None, :]
        qt = tl.load(q_base + qt_offs, mask=dm_mask, other=0.0)
        dot_ = tl.load(do_base + dot_offs, mask=dm_mask, other=0.0)
        # missing queries: lse = +inf, so p = 0 in their columns
        lse2 = tl.load(lse_ptr + row + m0 + offs_m, mask=m_mask, other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + row + m0 + offs_m, mask=m_mask, other=0.0)
        s2t = _dot(k, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)) * qk_scale + bias[:, None]
        pt = tl.exp2(s2t - lse2[None, :])
        dv = _dot(_cast(pt, T), tl.trans(dot_), dv)
        dpt = _dot(v, dot_, tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC))
        dst = pt * (dpt - delta[None, :])
        dk = _dot(_cast(dst, T), tl.trans(qt), dk)
        q_base += q_step
        do_base += do_step

    g_offs = n0.to(tl.int64) * stride_gn + offs_n[:, None] * stride_gn + offs_d[None, :]
    tl.store(_head_base(dk_ptr, b, h, stride_gb, stride_gh) + g_offs,
             _to_out(dk * scale, dk_ptr), mask=nd_mask)
    tl.store(_head_base(dv_ptr, b, h, stride_gb, stride_gh) + g_offs,
             _to_out(dv, dv_ptr), mask=nd_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr,       # *T   (B, H, Nq, D) queries
    k_ptr,       # *T   (B, H, Nk, D) keys
    v_ptr,       # *T   (B, H, Nk, D) values
    do_ptr,      # *T   (B, H, Nq, D) dL/dout
    lse_ptr,     # *A   (B, H, Nq) forward log-sum-exp (natural), contiguous
    delta_ptr,   # *A   (B, H, Nq) dO . o from the preprocess kernel, contiguous
    dq_ptr,      # *T   (B, H, Nq, D) output dL/dq, (B, Nq, H, D) memory
    stride_qb,   # int  q strides: batch,
    stride_qh,   # int  head,
    stride_qn,   # int  query row
    stride_kb,   # int  k strides: batch,
    stride_kh,   # int  head,
    stride_kn,   # int  key row
    stride_vb,   # int  v strides: batch,
    stride_vh,   # int  head,
    stride_vn,   # int  key row
    stride_db,   # int  dO strides: batch,
    stride_dh,   # int  head,
    stride_dn,   # int  query row
    stride_gb,   # int  dq strides: batch,
    stride_gh,   # int  head,
    stride_gn,   # int  query row
    num_heads,   # int  H
    Nq,          # int  queries per head
    Nk,          # int  keys per head
    scale_hi,    # f32  scale = scale_hi + scale_lo
    scale_lo,    # f32
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_M: tl.constexpr,   # query rows per program
    BLOCK_N: tl.constexpr,   # key rows per loop step
    BLOCK_D: tl.constexpr,   # D padded to a power of two >= 16
    VEC: tl.constexpr,       # every stride is a multiple of VEC (16 bytes; 1: unknown)
):
    """dq of one query block (FlashAttention-2, Dao 2023, Alg. 2, dq computed
    by its own pass over the key blocks instead of atomics), program
    (query block, h, b), every key block in order:
      p_ij = exp2(s2_ij - lse2_i),  dp_ij = dO_i . v_j,  ds_ij = p_ij (dp_ij - delta_i)
      dq_i = scale sum_j ds_ij k_j
    Sums in A; ds rounded to T for its dot. One program owns each dq row:
    deterministic, no atomics."""
    stride_qb, stride_qh, stride_qn = _hint(stride_qb, stride_qh, stride_qn, VEC)
    stride_kb, stride_kh, stride_kn = _hint(stride_kb, stride_kh, stride_kn, VEC)
    stride_vb, stride_vh, stride_vn = _hint(stride_vb, stride_vh, stride_vn, VEC)
    stride_db, stride_dh, stride_dn = _hint(stride_db, stride_dh, stride_dn, VEC)
    stride_gb, stride_gh, stride_gn = _hint(stride_gb, stride_gh, stride_gn, VEC)
    T: tl.constexpr = q_ptr.dtype.element_ty
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    num_m = tl.cdiv(Nq, BLOCK_M)
    mb, b, h = _program_coords(num_m, num_heads)
    scale, qk_scale = _scales(scale_hi, scale_lo, ACC)

    m0 = mb * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = (m0 + offs_m) < Nq
    d_mask = offs_d < HEAD_DIM
    md_mask = m_mask[:, None] & d_mask[None, :]

    q_base = _head_base(q_ptr, b, h, stride_qb, stride_qh) + m0.to(tl.int64) * stride_qn
    do_base = _head_base(do_ptr, b, h, stride_db, stride_dh) + m0.to(tl.int64) * stride_dn
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dn + offs_d[None, :], mask=md_mask,
                 other=0.0)
    row = (b.to(tl.int64) * num_heads + h) * Nq + m0
    lse2 = tl.load(lse_ptr + row + offs_m, mask=m_mask, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + row + offs_m, mask=m_mask, other=0.0)

    # k^T / v^T tiles (BLOCK_D, BLOCK_N), one key block per step.
    k_base = _head_base(k_ptr, b, h, stride_kb, stride_kh)
    v_base = _head_base(v_ptr, b, h, stride_vb, stride_vh)
    kt_offs = offs_n[None, :] * stride_kn + offs_d[:, None]
    vt_offs = offs_n[None, :] * stride_vn + offs_d[:, None]
    k_step = _wide(stride_kn) * BLOCK_N
    v_step = _wide(stride_vn) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for n0 in range(0, Nk, BLOCK_N):
        n_mask = (n0 + offs_n) < Nk
        dn_mask = d_mask[:, None] & n_mask[None, :]
        kt = tl.load(k_base + kt_offs, mask=dn_mask, other=0.0)
        vt = tl.load(v_base + vt_offs, mask=dn_mask, other=0.0)
        # missing keys: score -inf, p = 0 (exp2(0 - lse2) could overflow to inf
        # for a very negative lse, and inf * 0 would poison dq)
        bias = tl.where(n_mask, 0.0, float("-inf")).to(ACC)
        s2 = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)) * qk_scale + bias[None, :]
        p = tl.exp2(s2 - lse2[:, None])
        dp = _dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC))
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, T), tl.trans(kt), dq)
        k_base += k_step
        v_base += v_step

    dq_base = _head_base(dq_ptr, b, h, stride_gb, stride_gh) + m0.to(tl.int64) * stride_gn
    tl.store(dq_base + offs_m[:, None] * stride_gn + offs_d[None, :],
             _to_out(dq * scale, dq_ptr), mask=md_mask)


# ---------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------
def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _blocks(head_dim, dtype, interpret=None):
    """{"fwd" / "dkdv" / "dq": (BLOCK_M, BLOCK_N, num_warps)} and BLOCK_D for
    head dim D and the input dtype (GPU_BLOCKS; INTERPRET_BLOCK interpreted)."""
    block_d = _block_d(head_dim)
    if _INTERPRET if interpret is None else interpret:
        small = (INTERPRET_BLOCK, INTERPRET_BLOCK, 4)
        return {"fwd": small, "dkdv": small, "dq": small}, block_d
    fwd, dkdv, dq = GPU_BLOCKS[dtype.itemsize][block_d]
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}, block_d


def _num_stages(dtype, block_d):
    """Software-pipeline stages of the loop kernels: Triton's default (3, what
    KERNEL_CONFIGS compiles) but for fp64 at BLOCK_D = 256."""
    return FP64_WIDE_STAGES if dtype == torch.float64 and block_d == 256 else 3


def _pre_block_m(block_d):
    return PRE_TILE // block_d


def _bnhd(b, h, n, d, like):
    """An empty (B, H, N, D) tensor stored as (B, N, H, D) memory."""
    return torch.empty(b, n, h, d, dtype=like.dtype, device=like.device).permute(0, 2, 1, 3)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_scale(scale):
    """scale as an (fp32, fp32) pair whose sum is scale to about 48 bits
    (Triton passes Python floats as fp32; the fp64 kernels add the pair in fp64)."""
    scale = float(scale)
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(scale - hi)


def _check_head(x, name, ref=None, ref_name=""):
    """4-D (B, H, N, D), head dim contiguous; matching ref's dtype, device, B, H, D."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"fastdiff triton: {name} must be a 4-D (B, H, N, D) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.stride(3) != 1 and x.shape[3] > 1 and x.numel() > 0:
        raise ValueError(f"fastdiff triton: {name} must have a contiguous head dim "
                         f"(stride(3) == 1), got strides {x.stride()}")
    if x.shape[2] > 1 and x.stride(2) * MAX_BLOCK_ROWS >= 2**31:
        raise ValueError(f"fastdiff triton: {name} row stride {x.stride(2)} is too large (offsets "
                         f"inside a block of {MAX_BLOCK_ROWS} rows are int32)")
    if ref is not None:
        if x.dtype != ref.dtype:
            raise TypeError(f"fastdiff triton: {name} dtype {x.dtype} does not match {ref_name} "
                            f"dtype {ref.dtype}")
        if x.device != ref.device:
            raise ValueError(f"fastdiff triton: {name} is on {x.device} but {ref_name} is on "
                             f"{ref.device}")
        if (x.shape[0], x.shape[1], x.shape[3]) != (ref.shape[0], ref.shape[1], ref.shape[3]):
            raise ValueError(f"fastdiff triton: {name} of shape {tuple(x.shape)} does not match "
                             f"{ref_name} of shape {tuple(ref.shape)} in B, H or D")


def _check_qkv(q, k, v):
    _check_head(q, "q")
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"fastdiff triton: attention does not support dtype {q.dtype}")
    _check_head(k, "k", q, "q")
    _check_head(v, "v", q, "q")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"fastdiff triton: v has {v.shape[2]} rows but k has {k.shape[2]}")
    if k.shape[2] < 1:
        raise ValueError(f"fastdiff triton: attention needs Nk >= 1 keys, got k of shape "
                         f"{tuple(k.shape)}")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"fastdiff triton: head dim D = {q.shape[3]} is outside "
                         f"[1, {MAX_HEAD_DIM}] (MAX_HEAD_DIM)")
    if q.shape[1] * q.shape[3] * MAX_BLOCK_ROWS >= 2**31:  # the row stride H D of out / grads
        raise ValueError(f"fastdiff triton: H D = {q.shape[1] * q.shape[3]} is too large "
                         f"(offsets inside a block of {MAX_BLOCK_ROWS} rows are int32)")


def _s(x):
    """(batch, head, row) strides of a (B, H, N, D) tensor; 0 for a dim of size 1
    (its stride is arbitrary and only ever multiplied by index 0)."""
    return tuple(st if size > 1 else 0 for size, st in zip(x.shape[:3], x.stride()[:3]))


def _vec(*tensors):
    """VEC of the kernels: the elements in 16 bytes when every tensor starts
    16-byte aligned and all its (batch, head, row) strides are multiples of
    that, else 1 (no alignment promised)."""
    vec = 16 // tensors[0].element_size()
    ok = all(t.data_ptr() % 16 == 0 and all(st % vec == 0 for st in _s(t)) for t in tensors)
    return vec if ok else 1


def attention_fwd(q, k, v, scale):
    """(out, lse) = (softmax(scale q k^T) v, log sum_j exp(scale q k_j^T)).
    q: (B, H, Nq, D), k / v: (B, H, Nk, D), one dtype, head dim contiguous,
    other strides free. out: (B, H, Nq, D) in q's dtype, (B, Nq, H, D) memory;
    lse: (B, H, Nq) contiguous in A (fp32; fp64 for fp64)."""
    _check_qkv(q, k, v)
    batch, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    out = _bnhd(batch, heads, nq, head_dim, q)
    lse = torch.empty(batch, heads, nq, dtype=_acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    blocks, block_d = _blocks(head_dim, q.dtype)
    block_m, block_n, warps = blocks["fwd"]
    _attention_fwd_kernel[(triton.cdiv(nq, block_m) * heads * batch,)](
        q, k, v, out, lse, *_s(q), *_s(k), *_s(v), *_s(out), heads, nq, nk,
        *_split_scale(scale), HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, VEC=_vec(q, k, v, out), num_warps=warps,
        num_stages=_num_stages(q.dtype, block_d))
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, scale):
    """(grad_q, grad_k, grad_v) of attention_fwd, deterministic (no atomics).
    grad_out / out: (B, H, Nq, D) like q, head dim contiguous, any other
    strides; lse: attention_fwd's (B, H, Nq) contiguous A. The gradients are
    (B, H, N, D) in q's dtype, (B, N, H, D) memory."""
    _check_qkv(q, k, v)
    _check_head(grad_out, "grad_out", q, "q")
    _check_head(out, "out", q, "q")
    batch, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    for x, name in ((grad_out, "grad_out"), (out, "out")):
        if x.shape != q.shape:
            raise ValueError(f"fastdiff triton: {name} of shape {tuple(x.shape)} must match q "
                             f"of shape {tuple(q.shape)}")
    acc = _acc_dtype(q.dtype)
    if (lse.dtype != acc or lse.shape != q.shape[:3] or lse.device != q.device
            or not lse.is_contiguous()):
        raise ValueError(f"fastdiff triton: lse must be contiguous {acc} of shape "
                         f"{tuple(q.shape[:3])} on {q.device}, got {lse.dtype} "
                         f"{tuple(lse.shape)} on {lse.device}")
    grad_q = _bnhd(batch, heads, nq, head_dim, q)
    grad_k = _bnhd(batch, heads, nk, head_dim, q)
    grad_v = _bnhd(batch, heads, nk, head_dim, q)
    if grad_q.numel() == 0:  # no queries: nothing flows to k and v
        return grad_q, grad_k.zero_(), grad_v.zero_()
    blocks, block_d = _blocks(head_dim, q.dtype)
    scale_pair = _split_scale(scale)
    stages = _num_stages(q.dtype, block_d)
    delta = torch.empty(batch, heads, nq, dtype=acc, device=q.device)
    pre_m = _pre_block_m(block_d)
    _attention_bwd_preprocess_kernel[(triton.cdiv(nq, pre_m) * heads * batch,)](
        out, grad_out, delta, *_s(out), *_s(grad_out), heads, nq, HEAD_DIM=head_dim,
        BLOCK_M=pre_m, BLOCK_D=block_d, VEC=_vec(out, grad_out), num_warps=PRE_WARPS)
    strides = (*_s(q), *_s(k), *_s(v), *_s(grad_out))
    block_m, block_n, warps = blocks["dkdv"]
    _attention_bwd_dkdv_kernel[(triton.cdiv(nk, block_n) * heads * batch,)](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, *strides, *_s(grad_k), heads, nq, nk,
        *scale_pair, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        VEC=_vec(q, k, v, grad_out, grad_k, grad_v), num_warps=warps, num_stages=stages)
    block_m, block_n, warps = blocks["dq"]
    _attention_bwd_dq_kernel[(triton.cdiv(nq, block_m) * heads * batch,)](
        q, k, v, grad_out, lse, delta, grad_q, *strides, *_s(grad_q), heads, nq, nk,
        *scale_pair, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        VEC=_vec(q, k, v, grad_out, grad_q), num_warps=warps, num_stages=stages)
    return grad_q, grad_k, grad_v


# ---------------------------------------------------------------------------
# Configurations compiled by `fastdiff kernels`.
# ---------------------------------------------------------------------------
_STRIDES = [f"stride_{t}{a}" for t in "qkvodg" for a in "bhn"]
_TYPES = {name: "i32" for name in _STRIDES + ["num_heads", "Nq", "Nk"]}
_TYPES.update(lse_ptr="*{acc}", delta_ptr="*{acc}", scale_hi="fp32", scale_lo="fp32")
_CONFIG_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config(kernel, dtype, constexprs, num_warps, aligned):
    """One KERNEL_CONFIGS entry. aligned: D = BLOCK_D, 16-byte aligned tensors
    and strides (VEC = 16 bytes, the common launch; the strides themselves are
    not marked divisible by 16 elements, as with D = 40 halves); else an odd D
    (BLOCK_D / 2 + 1: scalar loads, no pipelining) with VEC = 1 and nothing
    known about alignment, the worst case."""
    vec = 16 // (_CONFIG_TORCH[dtype].itemsize) if aligned else 1
    cfg = kernel_config(kernel, dtype, {**constexprs, "VEC": vec}, num_warps=num_warps,
                        types=_TYPES)
    if not aligned:
        cfg["attrs"] = {}
    return cfg


def _configs():
    """Every (kernel, dtype, BLOCK_D) the launchers use on a GPU, at D = BLOCK_D
    and at an odd D of the same BLOCK_D (D = 9 for BLOCK_D = 16)."""
    out = []
    for dtype in CONFIG_DTYPES:
        for block_d in (16, 32, 64, 128, 256):
            blocks, _ = _blocks(block_d, _CONFIG_TORCH[dtype], interpret=False)
            for head_dim in (block_d, block_d // 2 + 1):
                aligned = head_dim == block_d
                dims = {"HEAD_DIM": head_dim, "BLOCK_D": block_d}
                pre = {"BLOCK_M": _pre_block_m(block_d), **dims}
                out.append(_config(_attention_bwd_preprocess_kernel, dtype, pre, PRE_WARPS,
                                   aligned))
                for kernel, (block_m, block_n, warps) in (
                        (_attention_fwd_kernel, blocks["fwd"]),
                        (_attention_bwd_dkdv_kernel, blocks["dkdv"]),
                        (_attention_bwd_dq_kernel, blocks["dq"])):
                    out.append(_config(kernel, dtype, {"BLOCK_M": block_m, "BLOCK_N": block_n,
                                                       **dims}, warps, aligned))
    return out


KERNEL_CONFIGS = _configs()
