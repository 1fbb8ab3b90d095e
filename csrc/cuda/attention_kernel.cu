// attention on CUDA: out = softmax(scale q k^T) v, non-causal, never an Nq x Nk
// tensor, and its VJP. Math: csrc/include/fastdiff/attention_math.h
// (OnlineSoftmax, softmax_term, softmax_grad; Dao et al. 2022, FlashAttention,
// Alg. 1; Dao 2023, FlashAttention-2, Alg. 1-2); mirrors csrc/cpu/attention_kernel.cpp.
//
//   s_ij = scale q_i . k_j,  forward per query row, key blocks in order:
//     m' = max(m, max_j s_ij), c = exp(m - m'), l' = c l + sum_j exp(s_ij - m'),
//     o' = c o + sum_j exp(s_ij - m') v_j;  out_i = o / l, lse_i = m + log l.
//   backward, p recomputed from lse (Alg. 2 of FlashAttention-2):
//     delta_i = dO_i . out_i,  p_ij = exp(s_ij - lse_i),  dp_ij = dO_i . v_j,
//     ds_ij = p_ij (dp_ij - delta_i),
//     dv_j = sum_i p_ij dO_i,  dk_j = scale sum_i ds_ij q_i,  dq_i = scale sum_j ds_ij k_j.
//
// SIMT FMA math (no tensor-core mma): a portable, register-bounded first
// version; scores, statistics and accumulators in the accumulation type
// (float; double for double), fp16 / bf16 widened on load, so scores of 1e4
// cannot overflow.
//
// Work split: a row group of kLanes lanes of a warp owns one row (a query row
// in the forward and dQ kernels, a key row in the dK/dV kernel); each lane of
// the group holds a kSlice-element slice of that row's head dim in registers:
// 16-byte chunks dealt round-robin over the group's lanes,
//   d = kChunk * (lane_in_group + kLanes * t) + e,  t < kSlice / kChunk, e < kChunk,
// so a group reads one staged row of shared memory as consecutive 16-byte
// words (no bank conflicts; the warp's other groups read the same row: a
// broadcast). A dot product q_i . k_j is a partial sum over the lane's slice
// followed by an xor butterfly over the group's lanes: every lane ends with the
// bitwise-same sum (each step adds the same two values), so every lane holds
// the score, the probability and the update of its own slice, and no score
// tile is ever stored. The other operand streams through shared memory in
// tiles of kRows rows (widened to acc_t, zero-filled past N and D).
//
// Head dims are padded up to a bucket kDim (32, 48, 64, 96, 128, 160, 256;
// double: 32, 64, 128, 256): the padded elements are zero in every operand, so
// they add nothing to a dot product, and they are never stored. Keys past Nk
// get score -inf (probability 0); query rows past Nq compute on zeros and are
// not stored.
//
// Kernels (static shared memory, at most 33 KB; 1-D grids, row blocks of one
// (b, h) adjacent so they share k / v in L2):
//   attention_fwd_kernel         128 threads, one CTA per (b, h, block of query rows)
//   attention_bwd_delta_kernel   256 threads, one warp per query row: delta = dO . out
//   attention_bwd_dkdv_kernel    128 threads, one CTA per (b, h, block of key rows), all query tiles
//   attention_bwd_dq_kernel      128 threads, one CTA per (b, h, block of query rows), all key tiles
// Deterministic: each output element is summed by one thread in a fixed
// order (butterflies are fixed trees); no atomics.
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "cuda_utils.cuh"
#include "fastdiff/attention_math.h"

namespace fastdiff::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarpSize;  // threads per CTA, every attention kernel
// CTAs per SM the register allocation must allow (__launch_bounds__): caps a
// thread at 65536 / (3 * 128) = 168 registers, 12 warps per SM. Without it
// ptxas picks its own target per kernel (seen: 128 registers with spills).
constexpr int kAttnMinBlocks = 3;
constexpr int kDeltaThreads = 256;  // delta kernel: one warp per row
constexpr int kTileBytes = 16384;   // one staged tile (kRows x kDim acc_t); two per kernel

// (b, h, n) strides of a (B, H, N, D) operand in elements; the head dim is contiguous.
struct Strides {
  int64_t b, h, n;
};

// Rows of a staged tile: as many as fit kTileBytes, a multiple of 8 in [8, 64].
constexpr int tile_rows(int bytes_per_row) {
  const int r = kTileBytes / bytes_per_row;
  return r >= 64 ? 64 : (r < 8 ? 8 : r / 8 * 8);
}

// The register and shared-memory geometry of head-dim bucket kDim.
template <typename acc_t, int kDim>
struct Geometry {
  static constexpr int kChunk = int(16 / sizeof(acc_t));  // elements per 16-byte word
  // Lanes per row: the slice of a lane is 12..24 floats (8..12 doubles).
  static constexpr int kLanes =
      (kDim <= 32 ? 2 : kDim <= 96 ? 4 : kDim <= 192 ? 8 : 16) * int(sizeof(acc_t) / 4);
  static constexpr int kSlice = kDim / kLanes;     // head-dim elements per lane
  static constexpr int kWords = kSlice / kChunk;   // 16-byte words per lane
  static constexpr int kGroups = kWarpSize / kLanes;  // rows of a warp at a time
  static constexpr int kRows = tile_rows(kDim * int(sizeof(acc_t)));  // rows of a staged tile
  // Rows a thread owns (kXRows) and rows of the streamed operand whose dot
  // products are in flight at once (kXChunk), per kernel: the forward holds two
  // slices per row (q, o), the dK/dV kernel four (k, v, dk, dv), the dQ kernel
  // three (q, dO, dq). Chosen so that every bucket and dtype compiles within the
  // kAttnMinBlocks register cap without spills (ptxas -v, sm_80 and sm_90).
  static constexpr int kSliceBytes = kSlice * int(sizeof(acc_t));  // 48..96
  static constexpr int kFwdRows = 2;
  static constexpr int kFwdChunk = 4;
  static constexpr int kDkdvRows = 1;
  static constexpr int kDkdvChunk = kSliceBytes <= 64 ? 4 : 2;
  static constexpr int kDqRows = 1;
  static constexpr int kDqChunk = kSliceBytes <= 64 ? 4 : 2;
  static_assert(kDim % kLanes == 0 && kSlice % kChunk == 0, "head-dim bucket / lane split");
  static_assert(kLanes >= 1 && kLanes <= kWarpSize && (kLanes & (kLanes - 1)) == 0, "lanes per row");
  static_assert(kRows % kFwdChunk == 0 && kRows % kDkdvChunk == 0 && kRows % kDqChunk == 0, "tile rows / chunks");
};

// Head-dim index of element (word t, element e) of the slice of lane `lane` of a group.
template <class G>
__device__ __forceinline__ int slice_dim(int lane, int t, int e) {
  return G::kChunk * (lane + G::kLanes * t) + e;
}

// The 16-byte word t of lane `lane`'s slice of a staged row.
template <class G, typename acc_t>
__device__ __forceinline__ Packed<acc_t, G::kChunk> slice_word(const acc_t* row, int lane, int t) {
  return *reinterpret_cast<const Packed<acc_t, G::kChunk>*>(row + slice_dim<G>(lane, t, 0));
}

// Sum over the kLanes lanes of an aligned group (xor butterfly; every lane gets
// the bitwise-same result).
template <int kLanes, typename T>
__device__ __forceinline__ T group_sum(T x) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename T>
__device__ __forceinline__ T max_of(T a, T b) {
  return b > a ? b : a;
}

// Orders the warp's shared-memory reads around it (__syncwarp is a memory
// barrier for the compiler too): an update phase re-reads its words of a
// staged row after the butterflies instead of keeping the dot-product phase's
// words live across them, which bounds the registers of a chunk.
__device__ __forceinline__ void reload_fence() {
  __syncwarp();
}

// x[0..kSlice) = the lane's slice of row n (zero when n is past the end or d >= D).
template <class G, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_slice(const scalar_t* __restrict__ base, int64_t stride_n, int64_t n,
                                           bool valid, int64_t head_dim, int lane, acc_t (&x)[G::kSlice]) {
#pragma unroll
  for (int t = 0; t < G::kWords; ++t) {
#pragma unroll
    for (int e = 0; e < G::kChunk; ++e) {
      const int d = slice_dim<G>(lane, t, e);
      x[t * G::kChunk + e] = valid && d < head_dim ? static_cast<acc_t>(base[n * stride_n + d]) : acc_t(0);
    }
  }
}

// Stores scale * x (the lane's slice of row n) as scalar_t, d < D only.
template <class G, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_slice(scalar_t* __restrict__ base, int64_t stride_n, int64_t n,
                                            int64_t head_dim, int lane, const acc_t (&x)[G::kSlice],
                                            acc_t scale) {
#pragma unroll
  for (int t = 0; t < G::kWords; ++t) {
#pragma unroll
    for (int e = 0; e < G::kChunk; ++e) {
      const int d = slice_dim<G>(lane, t, e);
      if (d < head_dim) base[n * stride_n + d] = static_cast<scalar_t>(x[t * G::kChunk + e] * scale);
    }
  }
}

// tile[r][d] = base[(n0 + r) * stride_n + d] widened, 0 for n0 + r >= n_end or
// d >= D. Threads take consecutive d (coalesced). The caller synchronizes.
template <int kRowsT, int kDim, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_tile(acc_t (*__restrict__ tile)[kDim], const scalar_t* __restrict__ base,
                                           int64_t stride_n, int64_t n0, int64_t n_end, int64_t head_dim) {
#pragma unroll 4
  for (int idx = threadIdx.x; idx < kRowsT * kDim; idx += kAttnThreads) {
    const int r = idx / kDim, d = idx - r * kDim;
    const int64_t n = n0 + r;
    tile[r][d] = n < n_end && d < head_dim ? static_cast<acc_t>(base[n * stride_n + d]) : acc_t(0);
  }
}

// ---------------------------------------------------------------------------
// Forward. CTA = (b, h, query block qb) with blockIdx.x = (b * H + h) * q_blocks + qb.
// Thread (warp w, group g, lane c of the group) owns query rows
//   i = qb * kBlockQ + (w * kFwdRows + r) * kGroups + g,  r < kFwdRows,
// and their slices of q (read once) and of the output accumulator o. Key tiles
// of kRows keys (k and v) are staged in shared memory in order; each tile is
// taken kFwdChunk keys at a time: the chunk's scores (a butterfly each),
// one OnlineSoftmax::advance per row to the chunk's max, then o += p v.
// ---------------------------------------------------------------------------
template <typename scalar_t, int kDim, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
attention_fwd_kernel(const scalar_t* __restrict__ q,  // (B, H, Nq, D), strides qs, head dim contiguous
                     const scalar_t* __restrict__ k,  // (B, H, Nk, D), strides ks
                     const scalar_t* __restrict__ v,  // (B, H, Nk, D), strides vs
                     scalar_t* __restrict__ out,      // (B, H, Nq, D) view of (B, Nq, H, D) memory, strides os
                     acc_t* __restrict__ lse,         // (B, H, Nq) contiguous: m + log l per row
                     Strides qs,                      // q's (b, h, n) strides
                     Strides ks,                      // k's (b, h, n) strides
                     Strides vs,                      // v's (b, h, n) strides
                     Strides os,                      // out's (b, h, n) strides
                     int64_t heads,                   // H
                     int64_t q_len,                   // Nq
                     int64_t kv_len,                  // Nk >= 1
                     int64_t head_dim,                // D <= kDim
                     int64_t q_blocks,                // ceil(Nq / kBlockQ)
                     acc_t scale) {                   // softmax scale
  using G = Geometry<acc_t, kDim>;
  constexpr int R = G::kFwdRows, S = G::kSlice, C = G::kChunk, KC = G::kFwdChunk;
  constexpr int kBlockQ = kAttnWarps * R * G::kGroups;
  __shared__ __align__(16) acc_t k_tile[G::kRows][kDim];
  __shared__ __align__(16) acc_t v_tile[G::kRows][kDim];

  const int64_t bh = blockIdx.x / q_blocks, qb = blockIdx.x - bh * q_blocks;
  const int64_t b = bh / heads, h = bh - b * heads;
  const int warp = int(threadIdx.x) / kWarpSize, lane_w = int(threadIdx.x) % kWarpSize;
  const int group = lane_w / G::kLanes, lane = lane_w % G::kLanes;

  int64_t row[R];
  acc_t qv[R][S], o[R][S];
  OnlineSoftmax<acc_t> st[R];
  const scalar_t* q_bh = q + b * qs.b + h * qs.h;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row[r] = qb * kBlockQ + (warp * R + r) * G::kGroups + group;
    load_slice<G>(q_bh, qs.n, row[r], row[r] < q_len, head_dim, lane, qv[r]);
#pragma unroll
    for (int s = 0; s < S; ++s) o[r][s] = acc_t(0);
  }

  const scalar_t* k_bh = k + b * ks.b + h * ks.h;
  const scalar_t* v_bh = v + b * vs.b + h * vs.h;
#pragma unroll 1
  for (int64_t j0 = 0; j0 < kv_len; j0 += G::kRows) {
    __syncthreads();  // the previous tile is consumed
    stage_tile<G::kRows>(k_tile, k_bh, ks.n, j0, kv_len, head_dim);
    stage_tile<G::kRows>(v_tile, v_bh, vs.n, j0, kv_len, head_dim);
    __syncthreads();
    const int n_valid = int(kv_len - j0 < G::kRows ? kv_len - j0 : G::kRows);
#pragma unroll 1
    for (int c0 = 0; c0 < n_valid; c0 += KC) {  // every chunk holds >= 1 valid key
      acc_t sc[R][KC];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int jj = 0; jj < KC; ++jj) sc[r][jj] = acc_t(0);
      }
#pragma unroll
      for (int jj = 0; jj < KC; ++jj) {
#pragma unroll
        for (int t = 0; t < G::kWords; ++t) {
          const auto kw = slice_word<G>(k_tile[c0 + jj], lane, t);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int e = 0; e < C; ++e) sc[r][jj] += qv[r][t * C + e] * kw.val[e];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        acc_t m_new = st[r].m;
#pragma unroll
        for (int jj = 0; jj < KC; ++jj) {
          const acc_t s = group_sum<G::kLanes>(sc[r][jj]) * scale;
          sc[r][jj] = c0 + jj < n_valid ? s : neg_inf<acc_t>();
          m_new = max_of(m_new, sc[r][jj]);
        }
        const acc_t c = st[r].advance(m_new);  // finite: the chunk has a valid key
#pragma unroll
        for (int s = 0; s < S; ++s) o[r][s] *= c;
#pragma unroll
        for (int jj = 0; jj < KC; ++jj) {
          const acc_t p = softmax_term(sc[r][jj], st[r].m);  // 0 for a masked key
          st[r].l += p;
          sc[r][jj] = p;
        }
      }
#pragma unroll
      for (int jj = 0; jj < KC; ++jj) {
#pragma unroll
        for (int t = 0; t < G::kWords; ++t) {
          const auto vw = slice_word<G>(v_tile[c0 + jj], lane, t);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int e = 0; e < C; ++e) o[r][t * C + e] += sc[r][jj] * vw.val[e];
          }
        }
      }
    }
  }

  scalar_t* out_bh = out + b * os.b + h * os.h;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (row[r] < q_len) {
      store_slice<G>(out_bh, os.n, row[r], head_dim, lane, o[r], acc_t(1) / st[r].l);
      if (lane == 0) lse[bh * q_len + row[r]] = st[r].lse();
    }
  }
}

// ---------------------------------------------------------------------------
// Backward 1: delta_i = dO_i . out_i (out as stored, in scalar_t), one warp per
// row (b, h, i) = row index (b * H + h) * Nq + i; lanes over d, a fixed
// butterfly.
// ---------------------------------------------------------------------------
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kDeltaThreads)
attention_bwd_delta_kernel(const scalar_t* __restrict__ grad_out,  // (B, H, Nq, D), strides gs
                           const scalar_t* __restrict__ out,       // (B, H, Nq, D), strides os
                           acc_t* __restrict__ delta,              // (B, H, Nq) contiguous
                           Strides gs,                             // grad_out's (b, h, n) strides
                           Strides os,                             // out's (b, h, n) strides
                           int64_t heads,                          // H
                           int64_t q_len,                          // Nq
                           int64_t head_dim,                       // D
                           int64_t rows) {                         // B * H * Nq
  const int64_t row = int64_t(blockIdx.x) * (kDeltaThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warps; no block barrier below
  const int lane = int(threadIdx.x) % kWarpSize;
  const int64_t bh = row / q_len, i = row - bh * q_len, b = bh / heads, h = bh - b * heads;
  const scalar_t* g = grad_out + b * gs.b + h * gs.h + i * gs.n;
  const scalar_t* o = out + b * os.b + h * os.h + i * os.n;
  acc_t sum = acc_t(0);
  for (int d = lane; d < head_dim; d += kWarpSize) sum += static_cast<acc_t>(g[d]) * static_cast<acc_t>(o[d]);
  sum = group_sum<kWarpSize>(sum);
  if (lane == 0) delta[row] = sum;
}

// ---------------------------------------------------------------------------
// Backward 2: dK, dV. CTA = (b, h, key block kb), blockIdx.x = (b * H + h) *
// k_blocks + kb. Thread (warp w, group g, lane c) owns key rows
//   j = kb * kBlockK + (w * kDkdvRows + r) * kGroups + g
// and their slices of k, v (read once) and of the accumulators dk, dv. Query
// tiles (q, dO, lse, delta) are staged in order; per query i (kDkdvChunk at a
// time): s = q_i . k_j and dp = dO_i . v_j (butterflies), p = exp(scale s -
// lse_i), ds = p (dp - delta_i), dv_j += p dO_i, dk_j += ds q_i; dk is scaled
// once at the end.
// ---------------------------------------------------------------------------
template <typename scalar_t, int kDim, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
attention_bwd_dkdv_kernel(const scalar_t* __restrict__ grad_out,  // (B, H, Nq, D), strides gs
                          const scalar_t* __restrict__ q,         // (B, H, Nq, D), strides qs
                          const scalar_t* __restrict__ k,         // (B, H, Nk, D), strides ks
                          const scalar_t* __restrict__ v,         // (B, H, Nk, D), strides vs
                          const acc_t* __restrict__ lse,          // (B, H, Nq) contiguous, the forward's
                          const acc_t* __restrict__ delta,        // (B, H, Nq) contiguous, kernel 1's
                          scalar_t* __restrict__ grad_k,          // (B, H, Nk, D) view of (B, Nk, H, D), strides dks
                          scalar_t* __restrict__ grad_v,          // (B, H, Nk, D) view of (B, Nk, H, D), strides dvs
                          Strides gs,                             // grad_out's (b, h, n) strides
                          Strides qs,                             // q's (b, h, n) strides
                          Strides ks,                             // k's (b, h, n) strides
                          Strides vs,                             // v's (b, h, n) strides
                          Strides dks,                            // grad_k's (b, h, n) strides
                          Strides dvs,                            // grad_v's (b, h, n) strides
                          int64_t heads,                          // H
                          int64_t q_len,                          // Nq >= 1
                          int64_t kv_len,                         // Nk
                          int64_t head_dim,                       // D <= kDim
                          int64_t k_blocks,                       // ceil(Nk / kBlockK)
                          acc_t scale) {                          // softmax scale
  using G = Geometry<acc_t, kDim>;
  constexpr int R = G::kDkdvRows, S = G::kSlice, C = G::kChunk, QC = G::kDkdvChunk;
  constexpr int kBlockK = kAttnWarps * R * G::kGroups;
  __shared__ __align__(16) acc_t q_tile[G::kRows][kDim];
  __shared__ __align__(16) acc_t g_tile[G::kRows][kDim];
  __shared__ acc_t lse_tile[G::kRows];
  __shared__ acc_t delta_tile[G::kRows];

  const int64_t bh = blockIdx.x / k_blocks, kb = blockIdx.x - bh * k_blocks;
  const int64_t b = bh / heads, h = bh - b * heads;
  const int warp = int(threadIdx.x) / kWarpSize, lane_w = int(threadIdx.x) % kWarpSize;
  const int group = lane_w / G::kLanes, lane = lane_w % G::kLanes;

  int64_t row[R];
  acc_t kv[R][S], vv[R][S], dk[R][S], dv[R][S];
  const scalar_t* k_bh = k + b * ks.b + h * ks.h;
  const scalar_t* v_bh = v + b * vs.b + h * vs.h;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row[r] = kb * kBlockK + (warp * R + r) * G::kGroups + group;
    load_slice<G>(k_bh, ks.n, row[r], row[r] < kv_len, head_dim, lane, kv[r]);
    load_slice<G>(v_bh, vs.n, row[r], row[r] < kv_len, head_dim, lane, vv[r]);
#pragma unroll
    for (int s = 0; s < S; ++s) dk[r][s] = dv[r][s] = acc_t(0);
  }

  const scalar_t* q_bh = q + b * qs.b + h * qs.h;
  const scalar_t* g_bh = grad_out + b * gs.b + h * gs.h;
  const acc_t* lse_bh = lse + bh * q_len;
  const acc_t* delta_bh = delta + bh * q_len;
#pragma unroll 1
  for (int64_t i0 = 0; i0 < q_len; i0 += G::kRows) {
    __syncthreads();  // the previous tile is consumed
    stage_tile<G::kRows>(q_tile, q_bh, qs.n, i0, q_len, head_dim);
    stage_tile<G::kRows>(g_tile, g_bh, gs.n, i0, q_len, head_dim);
    for (int r = threadIdx.x; r < G::kRows; r += kAttnThreads) {
      const bool valid = i0 + r < q_len;
      lse_tile[r] = valid ? lse_bh[i0 + r] : acc_t(0);
      delta_tile[r] = valid ? delta_bh[i0 + r] : acc_t(0);
    }
    __syncthreads();
    const int n_valid = int(q_len - i0 < G::kRows ? q_len - i0 : G::kRows);
#pragma unroll 1
    for (int c0 = 0; c0 < n_valid; c0 += QC) {
      acc_t sc[R][QC], dp[R][QC];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int ii = 0; ii < QC; ++ii) sc[r][ii] = dp[r][ii] = acc_t(0);
      }
#pragma unroll
      for (int ii = 0; ii < QC; ++ii) {
#pragma unroll
        for (int t = 0; t < G::kWords; ++t) {
          const auto qw = slice_word<G>(q_tile[c0 + ii], lane, t);
          const auto gw = slice_word<G>(g_tile[c0 + ii], lane, t);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int e = 0; e < C; ++e) {
              sc[r][ii] += kv[r][t * C + e] * qw.val[e];
              dp[r][ii] += vv[r][t * C + e] * gw.val[e];
            }
          }
        }
      }
#pragma unroll
      for (int ii = 0; ii < QC; ++ii) {
        const acc_t m = lse_tile[c0 + ii], dl = delta_tile[c0 + ii];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const acc_t s = group_sum<G::kLanes>(sc[r][ii]) * scale;
          const acc_t dpv = group_sum<G::kLanes>(dp[r][ii]);
          const acc_t p = c0 + ii < n_valid ? softmax_term(s, m) : acc_t(0);
          sc[r][ii] = p;
          dp[r][ii] = softmax_grad(p, dpv, dl);
        }
      }
      reload_fence();
#pragma unroll
      for (int ii = 0; ii < QC; ++ii) {
#pragma unroll
        for (int t = 0; t < G::kWords; ++t) {
          const auto qw = slice_word<G>(q_tile[c0 + ii], lane, t);
          const auto gw = slice_word<G>(g_tile[c0 + ii], lane, t);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int e = 0; e < C; ++e) {
              dv[r][t * C + e] += sc[r][ii] * gw.val[e];
              dk[r][t * C + e] += dp[r][ii] * qw.val[e];
            }
          }
        }
      }
    }
  }

  scalar_t* dk_bh = grad_k + b * dks.b + h * dks.h;
  scalar_t* dv_bh = grad_v + b * dvs.b + h * dvs.h;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (row[r] < kv_len) {
      store_slice<G>(dk_bh, dks.n, row[r], head_dim, lane, dk[r], scale);
      store_slice<G>(dv_bh, dvs.n, row[r], head_dim, lane, dv[r], acc_t(1));
    }
  }
}

// ---------------------------------------------------------------------------
// Backward 3: dQ. CTA = (b, h, query block qb), blockIdx.x = (b * H + h) *
// q_blocks + qb. Thread owns query rows i = qb * kBlockQ + (w * kDqRows + r) *
// kGroups + g and their slices of q, dO (read once) and of the accumulator dq,
// plus lse_i and delta_i. Key tiles (k, v) are staged in order; per key j
// (kDqChunk at a time): s = q_i . k_j, dp = dO_i . v_j, p = exp(scale s -
// lse_i), ds = p (dp - delta_i), dq_i += ds k_j; dq is scaled once at the end.
// ---------------------------------------------------------------------------
template <typename scalar_t, int kDim, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinBlocks)
attention_bwd_dq_kernel(const scalar_t* __restrict__ grad_out,  // (B, H, Nq, D), strides gs
                        const scalar_t* __restrict__ q,         // (B, H, Nq, D), strides qs
                        const scalar_t* __restrict__ k,         // (B, H, Nk, D), strides ks
                        const scalar_t* __restrict__ v,         // (B, H, Nk, D), strides vs
                        const acc_t* __restrict__ lse,          // (B, H, Nq) contiguous, the forward's
                        const acc_t* __restrict__ delta,        // (B, H, Nq) contiguous, kernel 1's
                        scalar_t* __restrict__ grad_q,          // (B, H, Nq, D) view of (B, Nq, H, D), strides dqs
                        Strides gs,                             // grad_out's (b, h, n) strides
                        Strides qs,                             // q's (b, h, n) strides
                        Strides ks,                             // k's (b, h, n) strides
                        Strides vs,                             // v's (b, h, n) strides
                        Strides dqs,                            // grad_q's (b, h, n) strides
                        int64_t heads,                          // H
                        int64_t q_len,                          // Nq
                        int64_t kv_len,                         // Nk >= 1
                        int64_t head_dim,                       // D <= kDim
                        int64_t q_blocks,                       // ceil(Nq / kBlockQ)
                        acc_t scale) {                          // softmax scale
  using G = Geometry<acc_t, kDim>;
  constexpr int R = G::kDqRows, S = G::kSlice, C = G::kChunk, KC = G::kDqChunk;
  constexpr int kBlockQ = kAttnWarps * R * G::kGroups;
  __shared__ __align__(16) acc_t k_tile[G::kRows][kDim];
  __shared__ __align__(16) acc_t v_tile[G::kRows][kDim];

  const int64_t bh = blockIdx.x / q_blocks, qb = blockIdx.x - bh * q_blocks;
  const int64_t b = bh / heads, h = bh - b * heads;
  const int warp = int(threadIdx.x) / kWarpSize, lane_w = int(threadIdx.x) % kWarpSize;
  const int group = lane_w / G::kLanes, lane = lane_w % G::kLanes;

  int64_t row[R];
  acc_t qv[R][S], gv[R][S], dq[R][S], m[R], dl[R];
  const scalar_t* q_bh = q + b * qs.b + h * qs.h;
  const scalar_t* g_bh = grad_out + b * gs.b + h * gs.h;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row[r] = qb * kBlockQ + (warp * R + r) * G::kGroups + group;
    const bool valid = row[r] < q_len;
    load_slice<G>(q_bh, qs.n, row[r], valid, head_dim, lane, qv[r]);
    load_slice<G>(g_bh, gs.n, row[r], valid, head_dim, lane, gv[r]);
    m[r] = valid ? lse[bh * q_len + row[r]] : acc_t(0);     // invalid rows: q = dO = 0, delta = 0
    dl[r] = valid ? delta[bh * q_len + row[r]] : acc_t(0);  // so ds = 0, never stored
#pragma unroll
    for (int s = 0; s < S; ++s) dq[r][s] = acc_t(0);
  }

  const scalar_t* k_bh = k + b * ks.b + h * ks.h;
  const scalar_t* v_bh = v + b * vs.b + h * vs.h;
#pragma unroll 1
  for (int64_t j0 = 0; j0 < kv_len; j0 += G::kRows) {
    __syncthreads();  // the previous tile is consumed
    stage_tile<G::kRows>(k_tile, k_bh, ks.n, j0, kv_len, head_dim);
    stage_tile<G::kRows>(v_tile, v_bh, vs.n, j0, kv_len, head_dim);
    __syncthreads();
    const int n_valid = int(kv_len - j0 < G::kRows ? kv_len - j0 : G::kRows);
#pragma unroll 1
    for (int c0 = 0; c0 < n_valid; c0 += KC) {
      acc_t sc[R][KC], dp[R][KC];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int jj = 0; jj < KC; ++jj) sc[r][jj] = dp[r][jj] = acc_t(0);
      }
#pragma unroll
      for (int jj = 0; jj < KC; ++jj) {
#pragma unroll
        for (int t = 0; t < G::kWords; ++t) {
          const auto kw = slice_word<G>(k_tile[c0 + jj], lane, t);
          const auto vw = slice_word<G>(v_tile[c0 + jj], lane, t);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int e = 0; e < C; ++e) {
              sc[r][jj] += qv[r][t * C + e] * kw.val[e];
              dp[r][jj] += gv[r][t * C + e] * vw.val[e];
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int jj = 0; jj < KC; ++jj) {
          const acc_t s = group_sum<G::kLanes>(sc[r][jj]) * scale;
          const acc_t dpv = group_sum<G::kLanes>(dp[r][jj]);
          const acc_t p = c0 + jj < n_valid ? softmax_term(s, m[r]) : acc_t(0);
          sc[r][jj] = softmax_grad(p, dpv, dl[r]);  // ds
        }
      }
      reload_fence();
#pragma unroll
      for (int jj = 0; jj < KC; ++jj) {
#pragma unroll
        for (int t = 0; t < G::kWords; ++t) {
          const auto kw = slice_word<G>(k_tile[c0 + jj], lane, t);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int e = 0; e < C; ++e) dq[r][t * C + e] += sc[r][jj] * kw.val[e];
          }
        }
      }
    }
  }

  scalar_t* dq_bh = grad_q + b * dqs.b + h * dqs.h;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (row[r] < q_len) store_slice<G>(dq_bh, dqs.n, row[r], head_dim, lane, dq[r], scale);
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------

Strides strides_of(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2)};
}

// CTAs of one launch: B * H * blocks, one grid dimension.
unsigned attention_grid(int64_t bh, int64_t blocks, const char* what) {
  const int64_t n = bh * blocks;
  TORCH_CHECK(n <= int64_t(INT32_MAX), "fastdiff: attention: ", n, " ", what,
              " blocks exceed the CUDA grid limit");
  return unsigned(n);
}

// Calls f(std::integral_constant<int, kDim>) for the smallest head-dim bucket
// >= head_dim (double: fewer buckets, fewer instantiations).
template <typename scalar_t, typename F>
void dispatch_head_dim(int64_t head_dim, const F& f) {
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "fastdiff: attention: head dim ", head_dim,
              " outside [1, ", kMaxHeadDim, "]");
  static_assert(kMaxHeadDim == 256, "the largest bucket must cover kMaxHeadDim");
  if constexpr (std::is_same_v<scalar_t, double>) {
    if (head_dim <= 32) {
      f(std::integral_constant<int, 32>{});
    } else if (head_dim <= 64) {
      f(std::integral_constant<int, 64>{});
    } else if (head_dim <= 128) {
      f(std::integral_constant<int, 128>{});
    } else {
      f(std::integral_constant<int, 256>{});
    }
  } else {
    if (head_dim <= 32) {
      f(std::integral_constant<int, 32>{});
    } else if (head_dim <= 48) {
      f(std::integral_constant<int, 48>{});
    } else if (head_dim <= 64) {
      f(std::integral_constant<int, 64>{});
    } else if (head_dim <= 96) {
      f(std::integral_constant<int, 96>{});
    } else if (head_dim <= 128) {
      f(std::integral_constant<int, 128>{});
    } else if (head_dim <= 160) {
      f(std::integral_constant<int, 160>{});
    } else {
      f(std::integral_constant<int, 256>{});
    }
  }
}

// Returns (out, lse): out (B, H, Nq, D) over (B, Nq, H, D) memory, lse (B, H, Nq)
// in the accumulation type.
std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q,  // (B, H, Nq, D)
                                                  const at::Tensor& k,  // (B, H, Nk, D)
                                                  const at::Tensor& v,  // (B, H, Nk, D)
                                                  double scale) {       // softmax scale, 1 / sqrt(D) usually
  check_cuda({{&q, "q"}, {&k, "k"}, {&v, "v"}});
  const AttentionArgs a = check_attention_args(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = attention_output_like(q);
  at::Tensor lse = at::empty({a.batch, a.heads, a.q_len}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_head_dim<scalar_t>(a.head_dim, [&](auto dim) {
      constexpr int kDim = decltype(dim)::value;
      using G = Geometry<acc_t, kDim>;
      constexpr int64_t kBlockQ = kAttnWarps * G::kFwdRows * G::kGroups;
      const int64_t q_blocks = at::ceil_div(a.q_len, kBlockQ);
      attention_fwd_kernel<scalar_t, kDim>
          <<<attention_grid(a.batch * a.heads, q_blocks, "query"), kAttnThreads, 0, stream>>>(
              q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
              out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(), strides_of(q), strides_of(k),
              strides_of(v), strides_of(out), a.heads, a.q_len, a.kv_len, a.head_dim, q_blocks,
              static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

// Returns (grad_q, grad_k, grad_v), each (B, H, N, D) over (B, N, H, D) memory.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in,  // (B, H, Nq, D), any strides (copied if the head dim's is not 1)
    const at::Tensor& q,         // (B, H, Nq, D)
    const at::Tensor& k,         // (B, H, Nk, D)
    const at::Tensor& v,         // (B, H, Nk, D)
    const at::Tensor& out,       // the forward's, (B, H, Nq, D)
    const at::Tensor& lse,       // the forward's, (B, H, Nq) contiguous accumulation type
    double scale) {              // the forward's softmax scale
  check_cuda({{&grad_out_in, "grad_out"}, {&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}, {&lse, "lse"}});
  const AttentionArgs a = check_attention_args(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor grad_out = head_dim_contiguous(grad_out_in);
  check_attention_saved(grad_out, out, lse, q);
  at::Tensor grad_q = attention_output_like(q);
  at::Tensor grad_k = attention_output_like(k);
  at::Tensor grad_v = attention_output_like(v);
  if (a.batch * a.heads == 0) return {grad_q, grad_k, grad_v};
  if (a.q_len == 0) {  // no query: nothing flows to k and v
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor delta = at::empty({a.batch, a.heads, a.q_len}, lse.options());
    const int64_t rows = a.batch * a.heads * a.q_len;
    const int64_t bh = a.batch * a.heads;
    const scalar_t* go_p = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* q_p = q.const_data_ptr<scalar_t>();
    const scalar_t* k_p = k.const_data_ptr<scalar_t>();
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();
    acc_t* delta_p = delta.mutable_data_ptr<acc_t>();
    attention_bwd_delta_kernel<scalar_t>
        <<<attention_grid(at::ceil_div<int64_t>(rows, kDeltaThreads / kWarpSize), 1, "delta"), kDeltaThreads, 0,
           stream>>>(go_p, out.const_data_ptr<scalar_t>(), delta_p, strides_of(grad_out), strides_of(out), a.heads,
                     a.q_len, a.head_dim, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_head_dim<scalar_t>(a.head_dim, [&](auto dim) {
      constexpr int kDim = decltype(dim)::value;
      using G = Geometry<acc_t, kDim>;
      constexpr int64_t kBlockK = kAttnWarps * G::kDkdvRows * G::kGroups;
      constexpr int64_t kBlockQ = kAttnWarps * G::kDqRows * G::kGroups;
      const acc_t sc = static_cast<acc_t>(scale);
      if (a.kv_len > 0) {
        const int64_t k_blocks = at::ceil_div(a.kv_len, kBlockK);
        attention_bwd_dkdv_kernel<scalar_t, kDim>
            <<<attention_grid(bh, k_blocks, "key"), kAttnThreads, 0, stream>>>(
                go_p, q_p, k_p, v_p, lse_p, delta_p, grad_k.mutable_data_ptr<scalar_t>(),
                grad_v.mutable_data_ptr<scalar_t>(), strides_of(grad_out), strides_of(q), strides_of(k),
                strides_of(v), strides_of(grad_k), strides_of(grad_v), a.heads, a.q_len, a.kv_len, a.head_dim,
                k_blocks, sc);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const int64_t q_blocks = at::ceil_div(a.q_len, kBlockQ);
      attention_bwd_dq_kernel<scalar_t, kDim>
          <<<attention_grid(bh, q_blocks, "query"), kAttnThreads, 0, stream>>>(
              go_p, q_p, k_p, v_p, lse_p, delta_p, grad_q.mutable_data_ptr<scalar_t>(), strides_of(grad_out),
              strides_of(q), strides_of(k), strides_of(v), strides_of(grad_q), a.heads, a.q_len, a.kv_len,
              a.head_dim, q_blocks, sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("_attention_bwd", &attention_bwd_cuda);
}

}  // namespace fastdiff::cuda
