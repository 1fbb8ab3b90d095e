// group_norm_silu on CUDA: y = silu(GroupNorm(x)) (or the GroupNorm alone) and
// its backward, for contiguous NC* and channels-last (C innermost) x; y and
// grad_x keep x's layout. Math: csrc/include/fastdiff/group_norm_math.h
// (norm_act, norm_act_grad, ChannelSums + group_moments); mirrors
// csrc/cpu/group_norm_silu_kernel.cpp. Packing: cuda_utils.cuh.
//
// No kernel holds a whole group: a group of (N, 128, 256, 256) / 32 is 262144
// elements, and N * G can be far below the SM count. Forward:
//   1. partial kernel: per-(n, chunk, c) sums of (x - pilot) and (x - pilot)^2
//      in acc_t, the pilot being the channel's first element x[n, c, pixel 0]
//      (the same value for every chunk of the channel). NC*: one warp per
//      (row (n, c), chunk of kRowChunk elements). Channels-last: one block per
//      (n, tile of pixels, tile of channels), threads over channel packs x
//      pixel rows, the rows merged through shared memory in row order.
//   2. stats kernel, one block per (n, g): each channel's chunks summed in
//      double (lanes over chunks, a fixed cub::WarpReduce tree), then
//      group_moments over the group's channels (thread 0) -> mean, rstd, and
//      the per-(n, c) fold scale = rstd w, shift = b - mean rstd w (in double,
//      from the acc_t-rounded mean / rstd the backward will see).
//   3. apply kernel: y = norm_act(x, scale, shift), one pack per thread over
//      all elements.
// Backward:
//   0. fold kernel: per-(n, c) scale, shift and xhat = rstd x - mean rstd.
//   1. partial kernel (as forward 1): per-(n, chunk, c) sums of da and da xhat,
//      da = norm_act_grad(x, scale, shift, dy).
//   2. coefficient kernel, one block per (n, g): ds_nc, dsx_nc in double (as
//      forward 2, written to an (N, C) scratch), then A = sum w ds,
//      B = sum w dsx over the group's channels (lanes over channels, fixed
//      tree) -> c2, c3 expanded per (n, c).
//   3. param kernel: d bias_c = sum_n ds_nc, d weight_c = sum_n dsx_nc, one
//      thread per channel summing samples in order (double).
//   4. apply kernel: dx = scale da + c2 x + c3.
// Deterministic: every split (chunks, tiles, thread maps) depends only on the
// shape and dtype, never on the GPU, and every sum runs in a fixed order. No
// atomics.
#include <torch/library.h>

#include <cub/warp/warp_reduce.cuh>

#include <cmath>
#include <tuple>

#include "cuda_utils.cuh"
#include "fastdiff/group_norm_math.h"

namespace fastdiff::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
// NC*: packs per lane of a warp's chunk of a row.
constexpr int kLanePacks = 4;
// Channels-last: pixels per thread of a tile, at most; fewer (down to 1) when
// that leaves fewer than kTargetBlocks blocks (small HW or N).
constexpr int kMaxPixelIters = 16;
constexpr int64_t kTargetBlocks = 1024;

// Elements of a row per warp chunk (512 float, 1024 half/bfloat16, 256 double).
template <typename scalar_t>
constexpr int64_t kRowChunk = int64_t(kWarp) * kLanePacks * kPack<scalar_t>;

// Rows of the per-(n, c) coefficient table (each N * C acc_t): the forward
// uses kScale and kShift, the backward all six.
enum TableRow : int64_t { kScale = 0, kShift, kXhatScale, kXhatShift, kC2, kC3, kBwdRows };

// a / b for indices; 32-bit when every index fits (index32 is uniform).
__device__ __forceinline__ int64_t div_index(int64_t a, int64_t b, bool index32) {
  return index32 ? int64_t(uint32_t(a) / uint32_t(b)) : a / b;
}

// Row n * C + c of the coefficient table for element e of x.
template <bool kChannelsLast>
__device__ __forceinline__ int64_t table_index(int64_t e, int64_t channels, int64_t hw,
                                               bool index32) {
  if constexpr (kChannelsLast) {
    const int64_t q = div_index(e, channels, index32);  // n * hw + pixel
    return div_index(q, hw, index32) * channels + (e - q * channels);
  } else {
    return div_index(e, hw, index32);
  }
}

// Adds one element to the partial sums: forward (k0 = pilot) d = x - pilot,
// s1 += d, s2 += d^2; backward (k0..k3 = scale, shift, xhat scale, xhat shift)
// da = norm_act_grad(x, ...), s1 += da, s2 += da xhat.
template <bool kBackward, typename acc_t>
__device__ __forceinline__ void accumulate(acc_t x, acc_t dy, acc_t k0, acc_t k1, acc_t k2,
                                           acc_t k3, bool silu, acc_t& s1, acc_t& s2) {
  if constexpr (kBackward) {
    const acc_t da = norm_act_grad(x, k0, k1, dy, silu);
    s1 += da;
    s2 += da * (x * k2 + k3);
  } else {
    const acc_t d = x - k0;
    s1 += d;
    s2 += d * d;
  }
}

// Partial sums, NC*. Warp w of the grid takes task (row, chunk) = (w / chunks,
// w % chunks) of the rows * chunks tasks; lane l accumulates the packs at
// chunk * kRowChunk + (p * 32 + l) * kPack, p = 0 .. kLanePacks - 1, in order,
// then the warp sums its lanes (cub::WarpReduce: a fixed shuffle tree).
// partial: (N, chunks, 2, C) acc_t, [.., 0, c] = s1 and [.., 1, c] = s2.
template <typename scalar_t, bool kAligned, bool kBackward,
          typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
group_norm_rows_partial_kernel(const scalar_t* __restrict__ x,   // (N, C, HW)
                               const scalar_t* __restrict__ dy,  // like x, kBackward only
                               const acc_t* __restrict__ table,  // (kBwdRows, N * C), kBackward
                               acc_t* __restrict__ partial,      // (N, chunks, 2, C)
                               int64_t rows,                     // N * C
                               int64_t channels,                 // C
                               int64_t hw,                       // elements per row
                               int64_t chunks,                   // chunks per row
                               bool silu) {
  constexpr int N = kPack<scalar_t>;
  using WarpReduce = cub::WarpReduce<acc_t>;
  __shared__ typename WarpReduce::TempStorage reduce_storage[2][kWarps];
  const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
  const int64_t task = int64_t(blockIdx.x) * kWarps + warp;
  if (task >= rows * chunks) return;  // whole warps; no block barriers below
  const int64_t row = task / chunks, chunk = task - row * chunks;
  const scalar_t* xr = x + row * hw;
  acc_t k0, k1 = acc_t(0), k2 = acc_t(0), k3 = acc_t(0);
  if constexpr (kBackward) {
    k0 = table[kScale * rows + row];
    k1 = table[kShift * rows + row];
    k2 = table[kXhatScale * rows + row];
    k3 = table[kXhatShift * rows + row];
  } else {
    k0 = static_cast<acc_t>(xr[0]);  // the pilot
  }
  acc_t s1 = acc_t(0), s2 = acc_t(0);
#pragma unroll
  for (int p = 0; p < kLanePacks; ++p) {
    const int64_t i = chunk * kRowChunk<scalar_t> + (int64_t(p) * kWarp + lane) * N;
    if (i < hw) {
      acc_t xv[N], gv[N];
      load_pack<kAligned>(xr + i, hw - i, xv);
      if constexpr (kBackward) {
        load_pack<kAligned>(dy + row * hw + i, hw - i, gv);
      } else {
        zero_pack(gv);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (kAligned || j < hw - i) accumulate<kBackward>(xv[j], gv[j], k0, k1, k2, k3, silu, s1, s2);
      }
    }
  }
  const acc_t t1 = WarpReduce(reduce_storage[0][warp]).Sum(s1);
  const acc_t t2 = WarpReduce(reduce_storage[1][warp]).Sum(s2);
  if (lane == 0) {
    const int64_t n = row / channels, c = row - n * channels;
    acc_t* out = partial + (n * chunks + chunk) * 2 * channels + c;
    out[0] = t1;
    out[channels] = t2;
  }
}

// Partial sums, channels-last. Block (n * tiles + tile, channel tile): thread
// (ty, tx) = (threadIdx / TX, threadIdx % TX), TX = 1 << tx_log2 threads over
// channel packs, TY = kThreads / TX over pixels. The thread accumulates its
// channel pack at pixels tile * TY * iters + it * TY + ty, it = 0 .. iters - 1,
// in order; the block then sums the TY rows in row order through shared
// memory. partial: (N, tiles, 2, C) as in the NC* kernel.
template <typename scalar_t, bool kAligned, bool kBackward,
          typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
group_norm_cl_partial_kernel(const scalar_t* __restrict__ x,   // (N, HW, C)
                             const scalar_t* __restrict__ dy,  // like x, kBackward only
                             const acc_t* __restrict__ table,  // (kBwdRows, N * C), kBackward
                             acc_t* __restrict__ partial,      // (N, tiles, 2, C)
                             int64_t batch,                    // N
                             int64_t channels,                 // C
                             int64_t hw,                       // pixels per sample
                             int64_t tiles,                    // pixel tiles per sample
                             int tx_log2,                      // log2 TX
                             int iters,                        // pixels per thread of a tile
                             bool silu) {
  constexpr int N = kPack<scalar_t>;
  __shared__ acc_t rows_sums[2][kThreads * N];
  const int tx_count = 1 << tx_log2;
  const int ty_count = kThreads >> tx_log2;
  const int tx = int(threadIdx.x) & (tx_count - 1), ty = int(threadIdx.x) >> tx_log2;
  const int width = tx_count * N;  // channels of the block
  const int64_t n = blockIdx.x / tiles, tile = blockIdx.x - n * tiles;
  const int64_t c = int64_t(blockIdx.y) * width + int64_t(tx) * N;
  acc_t s1[N], s2[N];
  zero_pack(s1);
  zero_pack(s2);
  if (c < channels) {
    const int64_t valid = channels - c;
    const scalar_t* xs = x + n * hw * channels + c;
    acc_t k0[N], k1[N], k2[N], k3[N];
    if constexpr (kBackward) {
      const int64_t nc = batch * channels, idx = n * channels + c;
      load_pack<kAligned>(table + kScale * nc + idx, valid, k0);
      load_pack<kAligned>(table + kShift * nc + idx, valid, k1);
      load_pack<kAligned>(table + kXhatScale * nc + idx, valid, k2);
      load_pack<kAligned>(table + kXhatShift * nc + idx, valid, k3);
    } else {
      load_pack<kAligned>(xs, valid, k0);  // the pilots: pixel 0
      zero_pack(k1);
      zero_pack(k2);
      zero_pack(k3);
    }
    const int64_t p0 = tile * ty_count * iters + ty;
#pragma unroll 4
    for (int it = 0; it < iters; ++it) {
      const int64_t p = p0 + int64_t(it) * ty_count;
      if (p < hw) {
        acc_t xv[N], gv[N];
        load_pack<kAligned>(xs + p * channels, valid, xv);
        if constexpr (kBackward) {
          load_pack<kAligned>(dy + n * hw * channels + c + p * channels, valid, gv);
        } else {
          zero_pack(gv);
        }
#pragma unroll
        for (int j = 0; j < N; ++j) {
          if (kAligned || j < valid) {
            accumulate<kBackward>(xv[j], gv[j], k0[j], k1[j], k2[j], k3[j], silu, s1[j], s2[j]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    rows_sums[0][threadIdx.x * N + j] = s1[j];  // [ty][tx * N + j]
    rows_sums[1][threadIdx.x * N + j] = s2[j];
  }
  __syncthreads();
  for (int v = threadIdx.x; v < 2 * width; v += kThreads) {
    const int which = v / width, e = v - which * width;
    const int64_t ch = int64_t(blockIdx.y) * width + e;
    if (ch < channels) {
      acc_t t = acc_t(0);
      for (int r = 0; r < ty_count; ++r) t += rows_sums[which][r * width + e];
      partial[((n * tiles + tile) * 2 + which) * channels + ch] = t;
    }
  }
}

// Sums channel c's chunk partials (which = 0: s1, 1: s2) of sample n in
// double: lane l takes chunks l, l + 32, ..., then a fixed shuffle tree; the
// result is valid in lane 0.
template <typename acc_t>
__device__ __forceinline__ void chunk_sums(const acc_t* __restrict__ partial, int64_t n, int64_t c,
                                           int64_t channels, int64_t chunks, int lane,
                                           typename cub::WarpReduce<double>::TempStorage* storage,
                                           double& t1, double& t2) {
  double s1 = 0, s2 = 0;
#pragma unroll 4
  for (int64_t k = lane; k < chunks; k += kWarp) {
    const acc_t* p = partial + (n * chunks + k) * 2 * channels + c;
    s1 += double(p[0]);
    s2 += double(p[channels]);
  }
  t1 = cub::WarpReduce<double>(storage[0]).Sum(s1);
  t2 = cub::WarpReduce<double>(storage[1]).Sum(s2);
  __syncwarp();  // storage reused by the caller's next channel
}

// Forward statistics, one block per (n, g): warp w merges the chunks of the
// group's channels w, w + 8, ... into ChannelSums (a global (N, C) scratch,
// published to thread 0 by the barrier), thread 0 runs group_moments, then
// the block writes the group's per-channel folds.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
group_norm_stats_kernel(const scalar_t* __restrict__ x,       // x, for the pilots
                        const acc_t* __restrict__ partial,    // (N, chunks, 2, C)
                        ChannelSums* sums,                    // (N, C) scratch
                        const acc_t* __restrict__ weight,     // (C,) or nullptr (w = 1)
                        const acc_t* __restrict__ bias,       // (C,) or nullptr (b = 0)
                        acc_t* __restrict__ mean_out,         // (N, G)
                        acc_t* __restrict__ rstd_out,         // (N, G)
                        acc_t* __restrict__ table,            // (2, N * C): scale, shift
                        int64_t batch, int64_t channels, int64_t groups, int64_t hw,
                        int64_t chunks,
                        int64_t pilot_stride,                 // between channels' pilots
                        double eps) {
  using WarpReduce = cub::WarpReduce<double>;
  __shared__ typename WarpReduce::TempStorage reduce_storage[kWarps][2];
  __shared__ double stats[2];
  const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
  const int64_t ng = blockIdx.x, n = ng / groups, g = ng - n * groups;
  const int64_t cpg = channels / groups, c0 = g * cpg;
  for (int64_t k = warp; k < cpg; k += kWarps) {
    const int64_t c = c0 + k;
    double t1, t2;
    chunk_sums(partial, n, c, channels, chunks, lane, reduce_storage[warp], t1, t2);
    if (lane == 0) {
      const acc_t pilot = static_cast<acc_t>(x[n * channels * hw + c * pilot_stride]);
      sums[n * channels + c] = ChannelSums{double(pilot), t1, t2};
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const GroupStats st = group_moments(sums + n * channels + c0, cpg, hw, eps);
    const acc_t mean = acc_t(st.mean), rstd = acc_t(st.rstd);
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
    stats[0] = double(mean);
    stats[1] = double(rstd);
  }
  __syncthreads();
  const double mean = stats[0], rstd = stats[1];
  const int64_t nc = batch * channels;
  for (int64_t k = threadIdx.x; k < cpg; k += kThreads) {
    const int64_t c = c0 + k;
    const double w = weight ? double(weight[c]) : 1.0, b = bias ? double(bias[c]) : 0.0;
    table[kScale * nc + n * channels + c] = acc_t(rstd * w);
    table[kShift * nc + n * channels + c] = acc_t(b - mean * rstd * w);
  }
}

// Backward folds, one thread per (n, c): scale, shift and xhat = x rstd - mean rstd.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
group_norm_bwd_fold_kernel(const acc_t* __restrict__ weight,  // (C,) or nullptr
                           const acc_t* __restrict__ bias,    // (C,) or nullptr
                           const acc_t* __restrict__ mean,    // (N, G)
                           const acc_t* __restrict__ rstd,    // (N, G)
                           acc_t* __restrict__ table,         // (kBwdRows, N * C)
                           int64_t batch, int64_t channels, int64_t groups) {
  const int64_t nc = batch * channels;
  const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= nc) return;
  const int64_t n = idx / channels, c = idx - n * channels;
  const int64_t ng = n * groups + c / (channels / groups);
  const double m = double(mean[ng]), r = double(rstd[ng]);
  const double w = weight ? double(weight[c]) : 1.0, b = bias ? double(bias[c]) : 0.0;
  table[kScale * nc + idx] = acc_t(r * w);
  table[kShift * nc + idx] = acc_t(b - m * r * w);
  table[kXhatScale * nc + idx] = acc_t(r);
  table[kXhatShift * nc + idx] = acc_t(-m * r);
}

// Backward coefficients, one block per (n, g): (ds, dsx) per channel from the
// chunk partials (as the stats kernel) into dsums, then warp 0 sums
// A = sum w ds and B = sum w dsx over the group (lanes over channels, a fixed
// tree) and the block writes c2, c3 for each of the group's channels.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
group_norm_bwd_coef_kernel(const acc_t* __restrict__ partial,  // (N, chunks, 2, C)
                           const acc_t* __restrict__ weight,   // (C,) or nullptr
                           const acc_t* __restrict__ mean,     // (N, G)
                           const acc_t* __restrict__ rstd,     // (N, G)
                           double* dsums,                      // (2, N, C): ds, dsx
                           acc_t* __restrict__ table,          // (kBwdRows, N * C)
                           int64_t batch, int64_t channels, int64_t groups, int64_t hw,
                           int64_t chunks) {
  using WarpReduce = cub::WarpReduce<double>;
  __shared__ typename WarpReduce::TempStorage reduce_storage[kWarps][2];
  __shared__ double coef[2];
  const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
  const int64_t ng = blockIdx.x, n = ng / groups, g = ng - n * groups;
  const int64_t cpg = channels / groups, c0 = g * cpg;
  const int64_t nc = batch * channels;
  for (int64_t k = warp; k < cpg; k += kWarps) {
    const int64_t c = c0 + k;
    double t1, t2;
    chunk_sums(partial, n, c, channels, chunks, lane, reduce_storage[warp], t1, t2);
    if (lane == 0) {
      dsums[n * channels + c] = t1;
      dsums[nc + n * channels + c] = t2;
    }
  }
  __syncthreads();
  if (warp == 0) {
    double a = 0, b = 0;
    for (int64_t k = lane; k < cpg; k += kWarp) {
      const int64_t c = c0 + k;
      const double w = weight ? double(weight[c]) : 1.0;
      a += w * dsums[n * channels + c];
      b += w * dsums[nc + n * channels + c];
    }
    a = WarpReduce(reduce_storage[0][0]).Sum(a);
    b = WarpReduce(reduce_storage[0][1]).Sum(b);
    if (lane == 0) {
      const double count = double(cpg) * double(hw);
      const double m = double(mean[ng]), r = double(rstd[ng]);
      const double c2 = -r * r * b / count;
      coef[0] = c2;
      coef[1] = -c2 * m - r * a / count;
    }
  }
  __syncthreads();
  const acc_t c2 = acc_t(coef[0]), c3 = acc_t(coef[1]);
  for (int64_t k = threadIdx.x; k < cpg; k += kThreads) {
    table[kC2 * nc + n * channels + c0 + k] = c2;
    table[kC3 * nc + n * channels + c0 + k] = c3;
  }
}

// d bias_c = sum_n ds_nc, d weight_c = sum_n dsx_nc, one thread per channel,
// samples in order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
group_norm_param_grad_kernel(const double* __restrict__ dsums,  // (2, N, C): ds, dsx
                             acc_t* __restrict__ grad_weight,   // (C,) or nullptr
                             acc_t* __restrict__ grad_bias,     // (C,) or nullptr
                             int64_t batch, int64_t channels) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= channels) return;
  const int64_t nc = batch * channels;
  double sb = 0, sw = 0;
  for (int64_t n = 0; n < batch; ++n) {
    sb += dsums[n * channels + c];
    sw += dsums[nc + n * channels + c];
  }
  if (grad_weight) grad_weight[c] = acc_t(sw);
  if (grad_bias) grad_bias[c] = acc_t(sb);
}

// Elementwise pass, one pack of kPack elements per thread over x in memory
// order. Forward: out = norm_act(x, scale, shift); backward: out = dx =
// scale da + c2 x + c3. kAligned: the pack lies in one row (NC*: HW % kPack
// == 0) or one pixel (channels-last: C % kPack == 0), so one table row (NC*)
// or kPack consecutive ones (channels-last) serve it.
template <typename scalar_t, bool kAligned, bool kChannelsLast, bool kBackward,
          typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
group_norm_apply_kernel(const scalar_t* __restrict__ x,   // x in its layout
                        const scalar_t* __restrict__ dy,  // like x, kBackward only
                        const acc_t* __restrict__ table,  // (rows, N * C)
                        scalar_t* __restrict__ out,       // like x: y or grad_x
                        int64_t numel,
                        int64_t nc,                       // N * C
                        int64_t channels, int64_t hw,
                        bool index32,                     // numel < 2^32
                        bool silu) {
  constexpr int N = kPack<scalar_t>;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  if (i >= numel) return;
  acc_t xv[N], gv[N], sc[N], sh[N], k2[N], k3[N];
  load_pack<kAligned>(x + i, numel - i, xv);
  if constexpr (kBackward) {
    load_pack<kAligned>(dy + i, numel - i, gv);
  } else {
    zero_pack(gv);
  }
  if constexpr (kAligned && !kChannelsLast) {
    const int64_t r = table_index<false>(i, channels, hw, index32);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      sc[j] = table[kScale * nc + r];
      sh[j] = table[kShift * nc + r];
      k2[j] = kBackward ? table[kC2 * nc + r] : acc_t(0);
      k3[j] = kBackward ? table[kC3 * nc + r] : acc_t(0);
    }
  } else if constexpr (kAligned) {
    const int64_t r = table_index<true>(i, channels, hw, index32);
    load_pack<true>(table + kScale * nc + r, N, sc);
    load_pack<true>(table + kShift * nc + r, N, sh);
    if constexpr (kBackward) {
      load_pack<true>(table + kC2 * nc + r, N, k2);
      load_pack<true>(table + kC3 * nc + r, N, k3);
    } else {
      zero_pack(k2);
      zero_pack(k3);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t r = i + j < numel ? table_index<kChannelsLast>(i + j, channels, hw, index32) : 0;
      sc[j] = table[kScale * nc + r];
      sh[j] = table[kShift * nc + r];
      k2[j] = kBackward ? table[kC2 * nc + r] : acc_t(0);
      k3[j] = kBackward ? table[kC3 * nc + r] : acc_t(0);
    }
  }
  acc_t res[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if constexpr (kBackward) {
      const acc_t da = norm_act_grad(xv[j], sc[j], sh[j], gv[j], silu);
      res[j] = sc[j] * da + (k2[j] * xv[j] + k3[j]);
    } else {
      res[j] = norm_act(xv[j], sc[j], sh[j], silu);
    }
  }
  store_pack<kAligned>(out + i, numel - i, res);
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------

unsigned grid_blocks(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "fastdiff: group_norm_silu: ", blocks, " ", what,
              " blocks exceed the CUDA grid limit");
  return unsigned(blocks);
}

// How the partial kernels split x: `chunks` partials per (n, c) in both layouts.
struct Split {
  int64_t chunks;         // NC*: chunks per row; channels-last: pixel tiles per sample
  int tx_log2 = 0;        // channels-last: log2 of the threads over channel packs
  int iters = 0;          // channels-last: pixels per thread of a tile
  int64_t channel_tiles = 0;
};

template <typename scalar_t>
Split make_split(const GroupNormArgs& a) {
  Split s{};
  if (!a.channels_last) {
    s.chunks = at::ceil_div(a.hw, kRowChunk<scalar_t>);
    return s;
  }
  const int64_t packs = at::ceil_div<int64_t>(a.channels, kPack<scalar_t>);
  while ((int64_t(1) << s.tx_log2) < packs && s.tx_log2 < 5) ++s.tx_log2;
  const int64_t tx = int64_t(1) << s.tx_log2, ty = kThreads / tx;
  s.channel_tiles = at::ceil_div(packs, tx);
  TORCH_CHECK(s.channel_tiles <= kMaxGridY, "fastdiff: group_norm_silu: ", a.channels,
              " channels exceed the CUDA grid limit");
  // The largest tile that still gives kTargetBlocks blocks (shape-only choice).
  s.iters = kMaxPixelIters;
  while (s.iters > 1 &&
         a.batch * at::ceil_div<int64_t>(a.hw, ty * s.iters) * s.channel_tiles < kTargetBlocks) {
    s.iters /= 2;
  }
  s.chunks = at::ceil_div<int64_t>(a.hw, ty * s.iters);
  return s;
}

// Launches the partial kernel of the layout: forward (dy, table nullptr) or backward.
template <bool kBackward, typename scalar_t, typename acc_t>
void launch_partial(const GroupNormArgs& a, const Split& s, const scalar_t* x, const scalar_t* dy,
                    const acc_t* table, acc_t* partial, bool silu, cudaStream_t stream) {
  if (!a.channels_last) {
    const int64_t rows = a.batch * a.channels;
    const unsigned blocks = grid_blocks(at::ceil_div<int64_t>(rows * s.chunks, kWarps), "partial");
    dispatch_aligned(can_use_packs<scalar_t>(a.hw, {x, dy}), [&](auto aligned) {
      group_norm_rows_partial_kernel<scalar_t, decltype(aligned)::value, kBackward>
          <<<blocks, kThreads, 0, stream>>>(x, dy, table, partial, rows, a.channels, a.hw, s.chunks,
                                            silu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    const dim3 grid(grid_blocks(a.batch * s.chunks, "partial"), unsigned(s.channel_tiles), 1);
    dispatch_aligned(can_use_packs<scalar_t>(a.channels, {x, dy}), [&](auto aligned) {
      group_norm_cl_partial_kernel<scalar_t, decltype(aligned)::value, kBackward>
          <<<grid, kThreads, 0, stream>>>(x, dy, table, partial, a.batch, a.channels, a.hw,
                                          s.chunks, s.tx_log2, s.iters, silu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

// Launches the elementwise pass (forward: dy nullptr).
template <bool kBackward, typename scalar_t, typename acc_t>
void launch_apply(const GroupNormArgs& a, int64_t numel, const scalar_t* x, const scalar_t* dy,
                  const acc_t* table, scalar_t* out, bool silu, cudaStream_t stream) {
  const unsigned blocks =
      grid_blocks(at::ceil_div<int64_t>(numel, int64_t(kThreads) * kPack<scalar_t>), "apply");
  const bool index32 = numel <= int64_t(UINT32_MAX);
  const int64_t nc = a.batch * a.channels;
  const bool aligned = can_use_packs<scalar_t>(a.channels_last ? a.channels : a.hw, {x, dy, out});
  const auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(x, dy, table, out, numel, nc, a.channels, a.hw, index32,
                                            silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_aligned(aligned, [&](auto al) {
    constexpr bool kAligned = decltype(al)::value;
    if (a.channels_last) {
      launch(group_norm_apply_kernel<scalar_t, kAligned, true, kBackward>);
    } else {
      launch(group_norm_apply_kernel<scalar_t, kAligned, false, kBackward>);
    }
  });
}

template <typename T>
const T* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// Returns (y, mean, rstd): y like x, mean / rstd (N, G) in the accumulation type.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(
    const at::Tensor& x,                      // (N, C, *) contiguous or channels-last
    const c10::optional<at::Tensor>& weight,  // (C,) acc type, or None
    const c10::optional<at::Tensor>& bias,    // (C,) acc type, or None
    int64_t num_groups, double eps, bool silu) {
  check_cuda({{&x, "x"}});
  const GroupNormArgs a = check_group_norm_args(x, weight, bias, num_groups, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({a.batch, a.groups}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({a.batch, a.groups}, x.options().dtype(acc));
  if (x.numel() == 0) {
    if (mean.numel() != 0) {  // the statistics of an empty group, as torch's group_norm gives
      mean.fill_(NAN);
      rstd.fill_(NAN);
    }
    return {y, mean, rstd};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Split s = make_split<scalar_t>(a);
    const int64_t nc = a.batch * a.channels;
    const auto acc_opts = x.options().dtype(acc);
    at::Tensor partial = at::empty({a.batch, s.chunks, 2, a.channels}, acc_opts);
    at::Tensor sums = at::empty({nc, 3}, x.options().dtype(at::kDouble));
    at::Tensor table = at::empty({2, nc}, acc_opts);
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    acc_t* partial_p = partial.mutable_data_ptr<acc_t>();
    acc_t* table_p = table.mutable_data_ptr<acc_t>();
    launch_partial<false>(a, s, x_p, static_cast<const scalar_t*>(nullptr),
                          static_cast<const acc_t*>(nullptr), partial_p, silu, stream);
    static_assert(sizeof(ChannelSums) == 3 * sizeof(double), "ChannelSums layout");
    group_norm_stats_kernel<scalar_t>
        <<<grid_blocks(a.batch * a.groups, "stats"), kThreads, 0, stream>>>(
            x_p, partial_p, reinterpret_cast<ChannelSums*>(sums.mutable_data_ptr<double>()),
            optional_ptr<acc_t>(weight), optional_ptr<acc_t>(bias), mean.mutable_data_ptr<acc_t>(),
            rstd.mutable_data_ptr<acc_t>(), table_p, a.batch, a.channels, a.groups, a.hw, s.chunks,
            a.channels_last ? int64_t(1) : a.hw, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_apply<false>(a, x.numel(), x_p, static_cast<const scalar_t*>(nullptr), table_p,
                        y.mutable_data_ptr<scalar_t>(), silu, stream);
  });
  return {y, mean, rstd};
}

// Returns (grad_x, grad_weight, grad_bias): grad_x like x; grad_weight / grad_bias
// (C,) in the accumulation type, empty (0,) when weight / bias is None.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cuda(
    const at::Tensor& grad_y_in,              // x's shape, any strides (copied to x's layout if they differ)
    const at::Tensor& x,                      // (N, C, *) contiguous or channels-last
    const c10::optional<at::Tensor>& weight,  // (C,) acc type, or None
    const c10::optional<at::Tensor>& bias,    // (C,) acc type, or None
    const at::Tensor& mean,                   // (N, G) acc type, the forward's
    const at::Tensor& rstd,                   // (N, G) acc type, the forward's
    int64_t num_groups, bool silu) {
  check_cuda({{&x, "x"}});
  const GroupNormArgs a = check_group_norm_args(x, weight, bias, num_groups, 1.0);
  check_group_stats(mean, rstd, x, a);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad_y = in_layout_of(grad_y_in, "grad_y", x, "x");
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_w = at::empty({weight.has_value() ? a.channels : 0}, x.options().dtype(acc));
  at::Tensor grad_b = at::empty({bias.has_value() ? a.channels : 0}, x.options().dtype(acc));
  if (x.numel() == 0) {  // sums over no elements
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Split s = make_split<scalar_t>(a);
    const int64_t nc = a.batch * a.channels;
    const auto acc_opts = x.options().dtype(acc);
    at::Tensor partial = at::empty({a.batch, s.chunks, 2, a.channels}, acc_opts);
    at::Tensor dsums = at::empty({2, nc}, x.options().dtype(at::kDouble));
    at::Tensor table = at::empty({int64_t(kBwdRows), nc}, acc_opts);
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_p = grad_y.const_data_ptr<scalar_t>();
    const acc_t* w_p = optional_ptr<acc_t>(weight);
    const acc_t* mean_p = mean.const_data_ptr<acc_t>();
    const acc_t* rstd_p = rstd.const_data_ptr<acc_t>();
    acc_t* partial_p = partial.mutable_data_ptr<acc_t>();
    acc_t* table_p = table.mutable_data_ptr<acc_t>();
    double* dsums_p = dsums.mutable_data_ptr<double>();
    group_norm_bwd_fold_kernel<acc_t>
        <<<grid_blocks(at::ceil_div<int64_t>(nc, kThreads), "fold"), kThreads, 0, stream>>>(
            w_p, optional_ptr<acc_t>(bias), mean_p, rstd_p, table_p, a.batch, a.channels, a.groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_partial<true>(a, s, x_p, dy_p, static_cast<const acc_t*>(table_p), partial_p, silu,
                         stream);
    group_norm_bwd_coef_kernel<acc_t>
        <<<grid_blocks(a.batch * a.groups, "coefficient"), kThreads, 0, stream>>>(
            partial_p, w_p, mean_p, rstd_p, dsums_p, table_p, a.batch, a.channels, a.groups, a.hw,
            s.chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (weight.has_value() || bias.has_value()) {
      group_norm_param_grad_kernel<acc_t>
          <<<grid_blocks(at::ceil_div<int64_t>(a.channels, kThreads), "param"), kThreads, 0,
             stream>>>(dsums_p, weight.has_value() ? grad_w.mutable_data_ptr<acc_t>() : nullptr,
                       bias.has_value() ? grad_b.mutable_data_ptr<acc_t>() : nullptr, a.batch,
                       a.channels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_apply<true>(a, x.numel(), x_p, dy_p, static_cast<const acc_t*>(table_p),
                       grad_x.mutable_data_ptr<scalar_t>(), silu, stream);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("_group_norm_silu_bwd", &group_norm_silu_bwd_cuda);
}

}  // namespace fastdiff::cuda
