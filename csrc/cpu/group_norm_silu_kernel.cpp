// GroupNorm + SiLU on the CPU, forward and backward, for contiguous NC* and
// channels-last x. Math: csrc/include/fastdiff/group_norm_math.h.
//
// NC*: one task per (n, g). The group's channels are contiguous rows of HW
// elements: a statistics pass, then the write pass while the group is still
// in cache (a group of SD-UNet's (2, 320, 64, 64) / 32 is 160 KB), the second
// pass of one group in the same loop as the first pass of the next (below).
// Channels-last: the group's elements are strided. Where a slice of whole groups
// over all pixels fits the L2 (small maps: a U-Net's 16x16 and 8x8 levels), tasks
// are (n, slice), two passes each like NC*'s; otherwise tasks are (n, block of
// kPixels pixels) with vectors running over channels, and per-block channel sums
// are merged in block order. The arithmetic is the same whatever the split (thread
// count, L2 size, slices or blocks): results are bitwise reproducible. No atomics.
#include <ATen/ceil_div.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_utils.h"
#include "fastdiff/group_norm_math.h"
#include "fastdiff/op_checks.h"

namespace fastdiff::cpu {
namespace {

// Pixels per channels-last task (x C channels each).
constexpr int64_t kPixels = 256;

// Pixels per run of the channels-last slice kernels (channel_vectors_by_runs), which read
// their second pass from L2. The pixel-block forward goes pixel by pixel: runs of 4 there
// (several rows 2 KB and more apart streamed at once per thread) measured faster back to
// back but slower as soon as x comes from memory or L3. fp32, Zen 4, 2 threads, glibc
// memory kept, one process, the two loops interleaved, medians of 60 rounds, after a 64 MB
// write / right after that call, runs of 4 -> pixel by pixel: 1x512x64x64 0.828 -> 0.677 /
// 0.733 -> 0.584 ms, 2x320x64x64 1.146 -> 0.800 / 1.065 -> 0.733, 1x256x128x128 2.747 ->
// 1.640 / 2.609 -> 1.524. The backward's pixel blocks go pixel by pixel too: runs measured
// slower in its first pass at 64x64 maps, within noise in its second.
constexpr int kRun = 4;

// NC* prefetches this far ahead the streams pass 1 reads (x; dy in the backward) and those pass
// 2 writes (y; dx), the latter for writing. NC* full, fp32, Zen 4, glibc memory kept, warm caches,
// medians of 31-41 interleaved rounds, none -> 512 B on the reads: 2x1280x16x16 0.599 -> 0.551 ms,
// 1x512x64x64 2.050 -> 1.909, 128x128x32x32 18.34 -> 17.00 (the backward gains most; 256 B and
// 1024 B gained less); then on the writes too: 0.497 -> 0.477, 1.219 -> 1.187, 11.97 -> 11.78.
// Channels-last passes measured within noise with read prefetches, so they go without.
constexpr int64_t kPrefetchBytes = 512;

template <typename T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

template <typename T>
inline void prefetch_ahead_for_write(T* p) {
  __builtin_prefetch(reinterpret_cast<char*>(p) + kPrefetchBytes, 1);
}

// Tasks per thread at least: waking a thread costs microseconds, which a few thousand
// elements of exp and division (a U-Net's 8x8 and 4x4 maps) do not pay back.
constexpr int64_t kMinElementsPerThread = 8192;

inline int64_t task_grain(int64_t task_elements) {
  return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, task_elements));
}

template <typename Vec>
double lane_sum(const Vec& v) {
  using T = typename Vec::value_type;
  return double(at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, v));
}

// The affine fold of one channel: a = scale x + shift (derived in double).
struct Fold {
  double scale, shift;
};

inline Fold fold(double mean, double rstd, const double w, const double b) {
  return {rstd * w, b - mean * rstd * w};
}

template <typename acc_t>
double param(const acc_t* p, int64_t c, double absent) {
  return p ? double(p[c]) : absent;
}

// Backward coefficients of one (n, g) from its channels' (ds, dsx):
// dx = scale da + c2 x + c3.
struct DxCoeffs {
  double c2, c3;
};

template <typename acc_t>
DxCoeffs dx_coeffs(const double* ds, const double* dsx, const acc_t* w, int64_t first, int64_t channels,
                   double count, double mean, double rstd) {
  double a = 0, b = 0;
  for (int64_t k = 0; k < channels; ++k) {
    const double wc = param(w, first + k, 1.0);
    a += wc * ds[k];
    b += wc * dsx[k];
  }
  const double c2 = -rstd * rstd * b / count;
  return {c2, -c2 * mean - rstd * a / count};
}

// d weight = sum_n dsx, d bias = sum_n ds, in sample order.
template <typename acc_t>
void reduce_param_grads(const std::vector<double>& ds, const std::vector<double>& dsx, int64_t batch,
                        int64_t channels, at::Tensor& grad_w, at::Tensor& grad_b) {
  acc_t* gw = grad_w.numel() ? grad_w.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* gb = grad_b.numel() ? grad_b.mutable_data_ptr<acc_t>() : nullptr;
  for (int64_t c = 0; c < channels; ++c) {
    double sw = 0, sb = 0;
    for (int64_t n = 0; n < batch; ++n) {
      sw += dsx[n * channels + c];
      sb += ds[n * channels + c];
    }
    if (gw) gw[c] = acc_t(sw);
    if (gb) gb[c] = acc_t(sb);
  }
}

// ---- NC* -------------------------------------------------------------------------------
//
// Both directions make two passes over each (n, g): forward, the statistics then the write;
// backward, da with its sums then dx. Pass 1 of the forward and pass 2 of the backward are
// bound by memory traffic, the other two by the SiLU's arithmetic (exp, division), and every
// group has the same cpg rows of hw elements. So where two groups fit in L2, pass 2 of group
// t - 1 runs in the same vector loop as pass 1 of group t, and the two overlap instead of
// taking turns; larger groups go one at a time.

// Calls step(t1, t2) to run pass 1 of t1 and pass 2 of t2 (-1: none) so that each task of
// [lo, hi) gets pass 1 before pass 2: skewed by one task, or task by task.
template <typename F>
void two_pass_tasks(int64_t lo, int64_t hi, bool skewed, const F& step) {
  if (lo >= hi) return;
  for (int64_t t = lo; t < hi + (skewed ? 1 : 0); ++t) {
    if (skewed) {
      step(t < hi ? t : -1, t > lo ? t - 1 : -1);
    } else {
      step(t, int64_t(-1));
      step(int64_t(-1), t);
    }
  }
}

// The per-core L2 the kernels plan for: FASTDIFF_CPU_L2_BYTES, else what the OS reports
// (VMs may report the host's), else 1 MB. It sets the work order only, never the results.
inline int64_t l2_cache_bytes() {
  static const int64_t l2 = [] {
    if (const char* e = std::getenv("FASTDIFF_CPU_L2_BYTES")) {
      const long long v = std::atoll(e);
      if (v > 0) return int64_t(v);
    }
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v > 0) return int64_t(v);
#endif
    return int64_t(1) << 20;
  }();
  return l2;
}

// Whether to skew: while two groups in flight (x, dy or y, and the fp32 da scratch) take at
// most twice the per-core L2 (measured on a Zen 4 with 1 MB of L2: pairs of 1.6 MB gain, pairs
// of 6 MB did not; on a Zen 3 with 512 KB, widening the rule to take in pairs of 1.5 MB
// measured within noise).
inline bool skew_groups(int64_t group_size, int64_t elem_bytes) {
  return 2 * group_size * (2 * elem_bytes + 4) <= 2 * l2_cache_bytes();
}

template <typename scalar_t>
void forward_nchw(const GroupNormArgs& a, const scalar_t* x, const at::opmath_type<scalar_t>* w,
                  const at::opmath_type<scalar_t>* b, double eps, bool silu, scalar_t* y,
                  at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t cpg = a.channels / a.groups, hw = a.hw;
  const bool skewed = skew_groups(cpg * hw, sizeof(scalar_t));
  at::parallel_for(0, a.batch * a.groups, task_grain(cpg * hw), [&](int64_t lo, int64_t hi) {
    const bool act = silu;  // locals, not captures (see parallel_over_pixel_blocks)
    std::vector<ChannelSums> sums(cpg);
    two_pass_tasks(lo, hi, skewed, [&](int64_t t1, int64_t t2) {
      const bool first = t1 >= 0, second = t2 >= 0;
      if (!first) t1 = t2;  // a valid task for the unused pointers
      if (!second) t2 = t1;
      const int64_t c01 = (t1 % a.groups) * cpg, base1 = (t1 / a.groups) * a.channels * hw;
      const int64_t c02 = (t2 % a.groups) * cpg, base2 = (t2 / a.groups) * a.channels * hw;
      // fold with the stored statistics, as the backward and the other kernels do
      const double mean2 = second ? double(mean_out[t2]) : 0.0, rstd2 = second ? double(rstd_out[t2]) : 0.0;
      for (int64_t k = 0; k < cpg; ++k) {
        // pass 1 (t1): shifted sums of the row about its first element, in the accumulation
        // type within kChunk elements, in double across chunks
        const scalar_t* x_row1 = x + base1 + (c01 + k) * hw;
        const acc_t pilot = acc_t(x_row1[0]);
        sums[k] = {double(pilot), 0.0, 0.0};
        // pass 2 (t2): y = silu(scale x + shift)
        const Fold f = fold(mean2, rstd2, param(w, c02 + k, 1.0), param(b, c02 + k, 0.0));
        const Vec scale(acc_t(f.scale)), shift(acc_t(f.shift));
        const scalar_t* x_row2 = x + base2 + (c02 + k) * hw;
        scalar_t* y_row = y + base2 + (c02 + k) * hw;
        for (int64_t begin = 0; begin < hw; begin += kChunk) {
          Vec s1(acc_t(0)), s2(acc_t(0));
          vector_steps<scalar_t>(begin, std::min(begin + kChunk, hw), [&](int64_t i, int64_t len) {
            if (first) {
              prefetch_ahead(x_row1 + i);  // the row, then the next rows of the group
              Vec d = IO::load(x_row1 + i, len) - Vec(pilot);
              if (len < IO::kSize) d = Vec::set(Vec(acc_t(0)), d, len);  // tail lanes add nothing
              s1 = s1 + d;
              s2 = at::vec::fmadd(d, d, s2);
            }
            if (second) {
              prefetch_ahead_for_write(y_row + i);
              IO::store(y_row + i, norm_act(IO::load(x_row2 + i, len), scale, shift, act), len);
            }
          });
          sums[k].sum1 += lane_sum(s1);
          sums[k].sum2 += lane_sum(s2);
        }
      }
      if (first) {
        const GroupStats st = group_moments(sums.data(), cpg, hw, eps);
        mean_out[t1] = acc_t(st.mean);
        rstd_out[t1] = acc_t(st.rstd);
      }
    });
  });
}

template <typename scalar_t>
void backward_nchw(const GroupNormArgs& a, const scalar_t* dy, const scalar_t* x,
                   const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b,
                   const at::opmath_type<scalar_t>* mean_in, const at::opmath_type<scalar_t>* rstd_in, bool silu,
                   scalar_t* dx, std::vector<double>& ds, std::vector<double>& dsx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t cpg = a.channels / a.groups, hw = a.hw, group_size = cpg * hw;
  const bool skewed = skew_groups(group_size, sizeof(scalar_t));
  at::parallel_for(0, a.batch * a.groups, task_grain(group_size), [&](int64_t lo, int64_t hi) {
    // da of two groups, kept from pass 1 for pass 2 (no second sigmoid; cache-resident)
    std::unique_ptr<acc_t[]> da_buf(new acc_t[2 * group_size]);
    DxCoeffs coeffs[2] = {};  // of the task in each half of da_buf
    const bool act = silu;  // locals, not captures (see parallel_over_pixel_blocks)
    two_pass_tasks(lo, hi, skewed, [&](int64_t t1, int64_t t2) {
      const bool first = t1 >= 0, second = t2 >= 0;
      if (!first) t1 = t2;  // a valid task for the unused pointers
      if (!second) t2 = t1;
      const int64_t n1 = t1 / a.groups, c01 = (t1 % a.groups) * cpg, base1 = n1 * a.channels * hw;
      const int64_t c02 = (t2 % a.groups) * cpg, base2 = (t2 / a.groups) * a.channels * hw;
      const double mean1 = mean_in[t1], rstd1 = rstd_in[t1], rstd2 = rstd_in[t2];
      const Vec xhat_scale = Vec(acc_t(rstd1)), xhat_shift = Vec(acc_t(-mean1 * rstd1));
      const Vec c2(acc_t(coeffs[t2 & 1].c2)), c3(acc_t(coeffs[t2 & 1].c3));
      acc_t* da1 = da_buf.get() + (t1 & 1) * group_size;
      const acc_t* da2 = da_buf.get() + (t2 & 1) * group_size;
      for (int64_t k = 0; k < cpg; ++k) {
        // pass 1 (t1): da, and per-channel sums of da and da * xhat
        const Fold f = fold(mean1, rstd1, param(w, c01 + k, 1.0), param(b, c01 + k, 0.0));
        const Vec scale1(acc_t(f.scale)), shift1(acc_t(f.shift));
        const scalar_t* x_row1 = x + base1 + (c01 + k) * hw;
        const scalar_t* dy_row = dy + base1 + (c01 + k) * hw;
        acc_t* da_row1 = da1 + k * hw;
        // pass 2 (t2): dx = scale da + c2 x + c3 (x and da still in cache)
        const Vec scale2(acc_t(fold(0.0, rstd2, param(w, c02 + k, 1.0), 0.0).scale));
        const scalar_t* x_row2 = x + base2 + (c02 + k) * hw;
        scalar_t* dx_row = dx + base2 + (c02 + k) * hw;
        const acc_t* da_row2 = da2 + k * hw;
        double s_da = 0, s_dax = 0;
        for (int64_t begin = 0; begin < hw; begin += kChunk) {
          Vec s1(acc_t(0)), s2(acc_t(0));
          vector_steps<scalar_t>(begin, std::min(begin + kChunk, hw), [&](int64_t i, int64_t len) {
            if (first) {
              prefetch_ahead(x_row1 + i);
              prefetch_ahead(dy_row + i);
              const Vec xv = IO::load(x_row1 + i, len);
              // tail lanes load dy = 0, so da = 0 there
              const Vec da = norm_act_grad(xv, scale1, shift1, IO::load(dy_row + i, len), act);
              da.store(da_row1 + i, len);
              s1 = s1 + da;
              s2 = at::vec::fmadd(da, at::vec::fmadd(xv, xhat_scale, xhat_shift), s2);
            }
            if (second) {
              prefetch_ahead_for_write(dx_row + i);
              const Vec lin = at::vec::fmadd(c2, IO::load(x_row2 + i, len), c3);
              IO::store(dx_row + i, at::vec::fmadd(scale2, Vec::loadu(da_row2 + i, len), lin), len);
            }
          });
          s_da += lane_sum(s1);
          s_dax += lane_sum(s2);
        }
        if (first) {
          ds[n1 * a.channels + c01 + k] = s_da;
          dsx[n1 * a.channels + c01 + k] = s_dax;
        }
      }
      if (first) {
        coeffs[t1 & 1] = dx_coeffs(&ds[n1 * a.channels + c01], &dsx[n1 * a.channels + c01], w, c01, cpg,
                                   double(group_size), mean1, rstd1);
      }
    });
  });
}

// ---- channels-last ---------------------------------------------------------------------

// Calls body(n, p0, p1) for each (sample n, pixel block [p0, p1)) in parallel.
//
// The bodies copy every pointer and size they use into locals first: the
// vector stores are may-alias stores, so a pointer read through the closure's captures
// would be reloaded after each of them (five extra loads per vector in the backward).
template <typename F>
void parallel_over_pixel_blocks(const GroupNormArgs& a, const F& body) {
  const int64_t blocks = (a.hw + kPixels - 1) / kPixels;
  const int64_t grain = task_grain(std::min(kPixels, a.hw) * a.channels);
  at::parallel_for(0, a.batch * blocks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t p0 = (task % blocks) * kPixels;
      body(task / blocks, task % blocks, p0, std::min(p0 + kPixels, a.hw));
    }
  });
}

// Calls f(c, len, p, run) for each channel vector [c, c + len) of the pixels [p, p + run),
// run a compile-time count (std::integral_constant): runs of kLength pixels, then one by one.
// A run loads a channel vector's parameters and running sums once for all its pixels, and
// adds each pixel in the pixel order, so the sums are those of a pixel-by-pixel loop.
template <int kLength, typename scalar_t, typename F>
inline void channel_vectors_by_runs(int64_t p0, int64_t p1, int64_t nch, const F& f) {
  int64_t p = p0;
  for (; p + kLength <= p1; p += kLength) {
    vector_steps<scalar_t>(0, nch,
                           [&](int64_t c, int64_t len) { f(c, len, p, std::integral_constant<int, kLength>{}); });
  }
  for (; p < p1; ++p) {
    vector_steps<scalar_t>(0, nch, [&](int64_t c, int64_t len) { f(c, len, p, std::integral_constant<int, 1>{}); });
  }
}

// The channels-last forward's steps over one channel vector [c, c + len) of a run of pixels
// [p, p + kLength), shared by the pixel-block and slice kernels (one arithmetic in both).
// Pass 1: adds x - x at pixel 0 to the chunk sums s1 and s2.
template <int kLength, typename scalar_t, typename acc_t>
inline void add_shifted_run(const scalar_t* xs, int64_t nch, int64_t c, int64_t len, int64_t p, acc_t* s1,
                            acc_t* s2) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const Vec pilot = IO::load(xs + c, len);
  Vec a1 = Vec::loadu(s1 + c, len), a2 = Vec::loadu(s2 + c, len);
  for (int j = 0; j < kLength; ++j) {
    const Vec d = IO::load(xs + (p + j) * nch + c, len) - pilot;
    a1 = a1 + d;
    a2 = at::vec::fmadd(d, d, a2);
  }
  a1.store(s1 + c, len);
  a2.store(s2 + c, len);
}

// Pass 2: y = act(scale x + shift).
template <int kLength, typename scalar_t, typename acc_t>
inline void write_run(const scalar_t* xs, scalar_t* ys, int64_t nch, int64_t c, int64_t len, int64_t p,
                      const acc_t* scale, const acc_t* shift, bool act) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const Vec sc = Vec::loadu(scale + c, len), sh = Vec::loadu(shift + c, len);
  for (int j = 0; j < kLength; ++j) {
    const int64_t off = (p + j) * nch + c;
    IO::store(ys + off, norm_act(IO::load(xs + off, len), sc, sh, act), len);
  }
}

// ---- channels-last slices --------------------------------------------------------------
//
// Where the shape allows, a channels-last task is (n, slice of whole groups over all pixels),
// like NC*'s (n, g): the slice's statistics and its write pass need nothing from other tasks,
// and pass 2 finds the slice still in L2 instead of refetching the sample from L3 or memory.
// The slice kernels keep the pixel-block kernels' arithmetic (sums in the accumulation type
// within kPixels pixels, in double across them, in the same order), so both give the same
// bits and the choice between them, which depends on the cache, never shows in the results.

// The share of L2 that rows of `width` bytes at a stride of `stride` bytes can occupy: with
// a power-of-two stride they map to a few of the sets only (C = 512 fp32: rows 2 KB apart
// reach 1 set in 32 of a 1 MB 8-way L2), and a slice that "fits" thrashes.
inline double strided_l2_share(int64_t width, int64_t stride, int64_t l2) {
  static const int64_t ways = [] {
#if defined(_SC_LEVEL2_CACHE_ASSOC)
    const long v = sysconf(_SC_LEVEL2_CACHE_ASSOC);
    if (v > 0) return int64_t(v);
#endif
    return int64_t(8);
  }();
  const int64_t set_period = std::max<int64_t>(64, l2 / ways);  // bytes before set indices repeat
  return std::min(1.0, double(width) / double(std::gcd(stride, set_period)));
}

// Groups per slice task, or 0 for the pixel-block kernels: the largest count whose rows
// (`strided` tensors of elem_bytes, the slice's x, dy, y or dx) fit their share of the L2
// and, with `scratch_bytes` per element of contiguous scratch, the whole L2, preferring
// counts that give every thread a task. Backward, fp32, Zen 4 (1 MB 8-way L2), pixel blocks
// -> slices, medians of 31 interleaved rounds: 2x1280x16x16 in slices of 6 groups (960-byte
// rows) 0.43 -> 0.29 ms; but in slices of 1 group (160-byte rows) 0.58 -> 0.71, 4x512x32x32 in
// slices of 4 (256-byte rows, 1/8 of the sets) 0.70 -> 1.13 and 1x512x64x64 in slices of 1
// (64-byte rows) 1.4 -> 3.6: those the rule leaves to the pixel blocks.
inline int64_t nhwc_slice_groups(const GroupNormArgs& a, int64_t elem_bytes, int64_t strided,
                                 int64_t scratch_bytes) {
  const int64_t cpg = a.channels / a.groups, l2 = l2_cache_bytes();
  const int64_t stride = a.channels * elem_bytes, threads = at::get_num_threads();
  int64_t best = 0;
  for (int64_t k = a.groups; k >= 1; --k) {
    const int64_t width = k * cpg * elem_bytes;
    const double rows = double(a.hw) * double(width) * double(strided);
    const double scratch = double(a.hw) * double(k * cpg) * double(scratch_bytes);
    if (rows > strided_l2_share(width, stride, l2) * double(l2) || rows + scratch > double(l2)) continue;
    if (best == 0) best = k;
    if (a.batch * at::ceil_div(a.groups, k) >= threads) {
      best = k;
      break;
    }
  }
  // as many slices, evened out (32 groups in slices of 25 -> of 16); narrower rows still fit
  return best == 0 ? 0 : at::ceil_div(a.groups, at::ceil_div(a.groups, best));
}

// A buffer of at least `count` elements, kept by the thread from call to call: the slices'
// scratch is at most the L2's size, and a fresh one each call costs page faults.
template <typename T>
T* thread_scratch(int64_t count) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < count) buf.resize(count);
  return buf.data();
}

// One slice task: sample n, groups [g0, g1), channels [c0, c0 + width); sample_offset is the
// offset of the slice's pixel 0 in x.
struct Slice {
  int64_t n, g0, g1, c0, width, sample_offset;
};

// Calls body(slice) for each slice of slice_groups groups of each sample, in parallel.
template <typename F>
void parallel_over_slices(const GroupNormArgs& a, int64_t slice_groups, const F& body) {
  const int64_t slices = at::ceil_div(a.groups, slice_groups), cpg = a.channels / a.groups;
  const int64_t grain = task_grain(a.hw * slice_groups * cpg);
  at::parallel_for(0, a.batch * slices, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t n = task / slices, g0 = (task % slices) * slice_groups;
      const int64_t g1 = std::min(g0 + slice_groups, a.groups);
      body(Slice{n, g0, g1, g0 * cpg, (g1 - g0) * cpg, n * a.hw * a.channels + g0 * cpg});
    }
  });
}

template <typename scalar_t>
void forward_nhwc_slices(const GroupNormArgs& a, int64_t slice_groups, const scalar_t* x,
                         const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b, double eps,
                         bool silu, scalar_t* y, at::opmath_type<scalar_t>* mean_out,
                         at::opmath_type<scalar_t>* rstd_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t width_max = slice_groups * (a.channels / a.groups);
  parallel_over_slices(a, slice_groups, [&](const Slice& t) {
    const int64_t nch = a.channels, G = a.groups, cpg = nch / G, hw = a.hw;  // locals (see parallel_over_pixel_blocks)
    const int64_t n = t.n, g0 = t.g0, g1 = t.g1, c0 = t.c0, width = t.width;
    const bool act = silu;
    const scalar_t* xs = x + t.sample_offset;
    scalar_t* ys = y + t.sample_offset;
    // per-channel chunk sums, then scale and shift
    acc_t* s1 = thread_scratch<acc_t>(4 * width_max);
    acc_t *s2 = s1 + width, *sc = s2 + width, *sh = sc + width;
    ChannelSums* sums = thread_scratch<ChannelSums>(width_max);
    for (int64_t k = 0; k < width; ++k) sums[k] = {double(acc_t(xs[k])), 0.0, 0.0};
    // pass 1: shifted sums about pixel 0, as forward_nhwc's
    for (int64_t p0 = 0; p0 < hw; p0 += kPixels) {
      std::fill(s1, s1 + 2 * width, acc_t(0));
      channel_vectors_by_runs<kRun, scalar_t>(p0, std::min(p0 + kPixels, hw), width,
                                              [&](int64_t c, int64_t len, int64_t p, auto run) {
        add_shifted_run<decltype(run)::value>(xs, nch, c, len, p, s1, s2);
      });
      for (int64_t k = 0; k < width; ++k) {
        sums[k].sum1 += s1[k];
        sums[k].sum2 += s2[k];
      }
    }
    for (int64_t g = g0; g < g1; ++g) {
      const GroupStats st = group_moments(&sums[(g - g0) * cpg], cpg, hw, eps);
      mean_out[n * G + g] = acc_t(st.mean);
      rstd_out[n * G + g] = acc_t(st.rstd);
    }
    for (int64_t k = 0; k < width; ++k) {
      const int64_t ng = n * G + g0 + k / cpg;
      const Fold f = fold(double(mean_out[ng]), double(rstd_out[ng]), param(w, c0 + k, 1.0), param(b, c0 + k, 0.0));
      sc[k] = acc_t(f.scale);
      sh[k] = acc_t(f.shift);
    }
    // pass 2: y = silu(scale x + shift)
    channel_vectors_by_runs<kRun, scalar_t>(0, hw, width, [&](int64_t c, int64_t len, int64_t p, auto run) {
      write_run<decltype(run)::value>(xs, ys, nch, c, len, p, sc, sh, act);
    });
  });
}

template <typename scalar_t>
void backward_nhwc_slices(const GroupNormArgs& a, int64_t slice_groups, const scalar_t* dy, const scalar_t* x,
                          const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b,
                          const at::opmath_type<scalar_t>* mean_in, const at::opmath_type<scalar_t>* rstd_in,
                          bool silu, scalar_t* dx, std::vector<double>& ds, std::vector<double>& dsx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t width_max = slice_groups * (a.channels / a.groups);
  parallel_over_slices(a, slice_groups, [&](const Slice& t) {
    const int64_t nch = a.channels, G = a.groups, cpg = nch / G, hw = a.hw;  // locals (see parallel_over_pixel_blocks)
    const int64_t n = t.n, g0 = t.g0, g1 = t.g1, c0 = t.c0, width = t.width;
    const bool act = silu;
    const scalar_t* xs = x + t.sample_offset;
    const scalar_t* dys = dy + t.sample_offset;
    scalar_t* dxs = dx + t.sample_offset;
    double* ds_n = ds.data() + n * nch + c0;
    double* dsx_n = dsx.data() + n * nch + c0;
    // per-channel chunk sums, folds, xhat = x rstd - mean rstd, and dx's c2 and c3; then da
    // of the slice, pixel-major, kept from pass 1 for pass 2 (no second sigmoid)
    acc_t* s1 = thread_scratch<acc_t>(8 * width_max + hw * width_max);
    acc_t *s2 = s1 + width, *sc = s2 + width, *sh = sc + width;
    acc_t *xsc = sh + width, *xsh = xsc + width, *c2 = xsh + width, *c3 = c2 + width, *da_s = c3 + width;
    for (int64_t k = 0; k < width; ++k) {
      const int64_t ng = n * G + g0 + k / cpg;
      const double mean = mean_in[ng], rstd = rstd_in[ng];
      const Fold f = fold(mean, rstd, param(w, c0 + k, 1.0), param(b, c0 + k, 0.0));
      sc[k] = acc_t(f.scale);
      sh[k] = acc_t(f.shift);
      xsc[k] = acc_t(rstd);
      xsh[k] = acc_t(-mean * rstd);
      ds_n[k] = 0;
      dsx_n[k] = 0;
    }
    // pass 1: da and its per-channel sums ds and dsx
    for (int64_t p0 = 0; p0 < hw; p0 += kPixels) {
      std::fill(s1, s1 + 2 * width, acc_t(0));
      channel_vectors_by_runs<kRun, scalar_t>(p0, std::min(p0 + kPixels, hw), width,
                                              [&](int64_t c, int64_t len, int64_t p, auto run) {
        const Vec scv = Vec::loadu(sc + c, len), shv = Vec::loadu(sh + c, len);
        const Vec xscv = Vec::loadu(xsc + c, len), xshv = Vec::loadu(xsh + c, len);
        Vec a1 = Vec::loadu(s1 + c, len), a2 = Vec::loadu(s2 + c, len);
        for (int j = 0; j < decltype(run)::value; ++j) {
          const int64_t off = (p + j) * nch + c;
          const Vec xv = IO::load(xs + off, len);
          const Vec da = norm_act_grad(xv, scv, shv, IO::load(dys + off, len), act);
          da.store(da_s + (p + j) * width + c, len);
          a1 = a1 + da;
          a2 = at::vec::fmadd(da, at::vec::fmadd(xv, xscv, xshv), a2);
        }
        a1.store(s1 + c, len);
        a2.store(s2 + c, len);
      });
      for (int64_t k = 0; k < width; ++k) {
        ds_n[k] += s1[k];
        dsx_n[k] += s2[k];
      }
    }
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t k0 = (g - g0) * cpg;
      const DxCoeffs k2 = dx_coeffs(ds_n + k0, dsx_n + k0, w, c0 + k0, cpg, double(cpg * hw),
                                    double(mean_in[n * G + g]), double(rstd_in[n * G + g]));
      std::fill(c2 + k0, c2 + k0 + cpg, acc_t(k2.c2));
      std::fill(c3 + k0, c3 + k0 + cpg, acc_t(k2.c3));
    }
    // pass 2: dx = scale da + c2 x + c3
    channel_vectors_by_runs<kRun, scalar_t>(0, hw, width, [&](int64_t c, int64_t len, int64_t p, auto run) {
      const Vec scv = Vec::loadu(sc + c, len), c2v = Vec::loadu(c2 + c, len), c3v = Vec::loadu(c3 + c, len);
      for (int j = 0; j < decltype(run)::value; ++j) {
        const int64_t off = (p + j) * nch + c;
        const Vec lin = at::vec::fmadd(c2v, IO::load(xs + off, len), c3v);
        IO::store(dxs + off, at::vec::fmadd(scv, Vec::loadu(da_s + (p + j) * width + c, len), lin), len);
      }
    });
  });
}

template <typename scalar_t>
void forward_nhwc(const GroupNormArgs& a, const scalar_t* x, const at::opmath_type<scalar_t>* w,
                  const at::opmath_type<scalar_t>* b, double eps, bool silu, scalar_t* y,
                  at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  if (const int64_t k = nhwc_slice_groups(a, sizeof(scalar_t), 2, 0); k > 0) {
    return forward_nhwc_slices(a, k, x, w, b, eps, silu, y, mean_out, rstd_out);
  }
  const int64_t C = a.channels, cpg = C / a.groups;
  const int64_t blocks = (a.hw + kPixels - 1) / kPixels;
  // pass 1: per-(n, block, c) shifted sums about the sample's pixel 0
  std::vector<acc_t> part(a.batch * blocks * C * 2);
  parallel_over_pixel_blocks(a, [&](int64_t n, int64_t blk, int64_t p0, int64_t p1) {
    const int64_t nch = C;  // locals, not captures (see parallel_over_pixel_blocks)
    const scalar_t* xs = x + n * a.hw * nch;
    acc_t* s1 = &part[((n * blocks + blk) * 2) * nch];
    acc_t* s2 = s1 + nch;
    std::fill(s1, s1 + 2 * nch, acc_t(0));
    // pixel-major: x streams in memory order; the 2C sums stay in L1
    channel_vectors_by_runs<1, scalar_t>(p0, p1, nch, [&](int64_t c, int64_t len, int64_t p, auto run) {
      add_shifted_run<decltype(run)::value>(xs, nch, c, len, p, s1, s2);
    });
  });
  std::vector<ChannelSums> sums(C);
  for (int64_t n = 0; n < a.batch; ++n) {
    const scalar_t* xs = x + n * a.hw * C;
    for (int64_t c = 0; c < C; ++c) {
      sums[c] = {double(acc_t(xs[c])), 0.0, 0.0};
      for (int64_t blk = 0; blk < blocks; ++blk) {
        sums[c].sum1 += part[((n * blocks + blk) * 2) * C + c];
        sums[c].sum2 += part[((n * blocks + blk) * 2 + 1) * C + c];
      }
    }
    for (int64_t g = 0; g < a.groups; ++g) {
      const GroupStats st = group_moments(&sums[g * cpg], cpg, a.hw, eps);
      mean_out[n * a.groups + g] = acc_t(st.mean);
      rstd_out[n * a.groups + g] = acc_t(st.rstd);
    }
  }
  // pass 2: normalize + activation, per-channel folds of sample n
  std::vector<acc_t> scale(a.batch * C), shift(a.batch * C);
  for (int64_t n = 0; n < a.batch; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * a.groups + c / cpg;
      const Fold f = fold(double(mean_out[ng]), double(rstd_out[ng]), param(w, c, 1.0), param(b, c, 0.0));
      scale[n * C + c] = acc_t(f.scale);
      shift[n * C + c] = acc_t(f.shift);
    }
  }
  parallel_over_pixel_blocks(a, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
    const int64_t nch = C;
    const bool act = silu;
    const acc_t* sc_n = scale.data() + n * nch;
    const acc_t* sh_n = shift.data() + n * nch;
    const scalar_t* xs = x + n * a.hw * nch;
    scalar_t* ys = y + n * a.hw * nch;
    channel_vectors_by_runs<1, scalar_t>(p0, p1, nch, [&](int64_t c, int64_t len, int64_t p, auto run) {
      write_run<decltype(run)::value>(xs, ys, nch, c, len, p, sc_n, sh_n, act);
    });
  });
}

template <typename scalar_t>
void backward_nhwc(const GroupNormArgs& a, const scalar_t* dy, const scalar_t* x,
                   const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b,
                   const at::opmath_type<scalar_t>* mean_in, const at::opmath_type<scalar_t>* rstd_in, bool silu,
                   scalar_t* dx, std::vector<double>& ds, std::vector<double>& dsx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  if (const int64_t k = nhwc_slice_groups(a, sizeof(scalar_t), 3, sizeof(at::opmath_type<scalar_t>)); k > 0) {
    return backward_nhwc_slices(a, k, dy, x, w, b, mean_in, rstd_in, silu, dx, ds, dsx);
  }
  const int64_t C = a.channels, cpg = C / a.groups;
  const int64_t blocks = (a.hw + kPixels - 1) / kPixels;
  // fp32 / fp64: pass 1 parks da in dx (exact) and pass 2 reads it back instead of a
  // second sigmoid (the whole sample does not stay in cache here, unlike NC*'s group)
  constexpr bool kKeepDa = std::is_same_v<scalar_t, acc_t>;
  // per-(n, c) folds and xhat = x rstd - mean rstd
  std::vector<acc_t> scale(a.batch * C), shift(a.batch * C), xs_scale(a.batch * C), xs_shift(a.batch * C);
  for (int64_t n = 0; n < a.batch; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * a.groups + c / cpg;
      const double mean = mean_in[ng], rstd = rstd_in[ng];
      const Fold f = fold(mean, rstd, param(w, c, 1.0), param(b, c, 0.0));
      scale[n * C + c] = acc_t(f.scale);
      shift[n * C + c] = acc_t(f.shift);
      xs_scale[n * C + c] = acc_t(rstd);
      xs_shift[n * C + c] = acc_t(-mean * rstd);
    }
  }
  // pass 1: per-(n, block, c) sums of da and da * xhat
  std::vector<acc_t> part(a.batch * blocks * C * 2);
  parallel_over_pixel_blocks(a, [&](int64_t n, int64_t blk, int64_t p0, int64_t p1) {
    const int64_t nch = C;
    const bool act = silu;
    const acc_t *sc_n = scale.data() + n * nch, *sh_n = shift.data() + n * nch;
    const acc_t *xsc_n = xs_scale.data() + n * nch, *xsh_n = xs_shift.data() + n * nch;
    const scalar_t* xs = x + n * a.hw * nch;
    const scalar_t* dys = dy + n * a.hw * nch;
    scalar_t* dxs = dx + n * a.hw * nch;
    acc_t* s1 = &part[((n * blocks + blk) * 2) * nch];
    acc_t* s2 = s1 + nch;
    std::fill(s1, s1 + 2 * nch, acc_t(0));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t off = p * nch;
      vector_steps<scalar_t>(0, nch, [&](int64_t c, int64_t len) {
        const Vec xv = IO::load(xs + off + c, len);
        const Vec da = norm_act_grad(xv, Vec::loadu(sc_n + c, len), Vec::loadu(sh_n + c, len),
                                     IO::load(dys + off + c, len), act);
        if constexpr (kKeepDa) IO::store(dxs + off + c, da, len);
        const Vec xhat = at::vec::fmadd(xv, Vec::loadu(xsc_n + c, len), Vec::loadu(xsh_n + c, len));
        (Vec::loadu(s1 + c, len) + da).store(s1 + c, len);
        at::vec::fmadd(da, xhat, Vec::loadu(s2 + c, len)).store(s2 + c, len);
      });
    }
  });
  std::vector<acc_t> c2(a.batch * C), c3(a.batch * C);
  for (int64_t n = 0; n < a.batch; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        s1 += part[((n * blocks + blk) * 2) * C + c];
        s2 += part[((n * blocks + blk) * 2 + 1) * C + c];
      }
      ds[n * C + c] = s1;
      dsx[n * C + c] = s2;
    }
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t ng = n * a.groups + g, c0 = g * cpg;
      const DxCoeffs k2 = dx_coeffs(&ds[n * C + c0], &dsx[n * C + c0], w, c0, cpg, double(cpg * a.hw),
                                    double(mean_in[ng]), double(rstd_in[ng]));
      std::fill(&c2[n * C + c0], &c2[n * C + c0] + cpg, acc_t(k2.c2));
      std::fill(&c3[n * C + c0], &c3[n * C + c0] + cpg, acc_t(k2.c3));
    }
  }
  // pass 2: dx = scale da + c2 x + c3
  parallel_over_pixel_blocks(a, [&](int64_t n, int64_t, int64_t p0, int64_t p1) {
    const int64_t nch = C;
    const bool act = silu;
    const acc_t *sc_n = scale.data() + n * nch, *sh_n = shift.data() + n * nch;
    const acc_t *c2_n = c2.data() + n * nch, *c3_n = c3.data() + n * nch;
    const scalar_t* xs = x + n * a.hw * nch;
    const scalar_t* dys = dy + n * a.hw * nch;
    scalar_t* dxs = dx + n * a.hw * nch;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t off = p * nch;
      vector_steps<scalar_t>(0, nch, [&](int64_t c, int64_t len) {
        const Vec sc = Vec::loadu(sc_n + c, len);
        const Vec xv = IO::load(xs + off + c, len);
        const Vec da = kKeepDa ? IO::load(dxs + off + c, len)
                               : norm_act_grad(xv, sc, Vec::loadu(sh_n + c, len), IO::load(dys + off + c, len), act);
        const Vec lin = at::vec::fmadd(Vec::loadu(c2_n + c, len), xv, Vec::loadu(c3_n + c, len));
        IO::store(dxs + off + c, at::vec::fmadd(sc, da, lin), len);
      });
    }
  });
}

// ---- entry points ----------------------------------------------------------------------

template <typename T>
const T* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, bool silu) {
  const GroupNormArgs a = check_group_norm_args(x, weight, bias, num_groups, eps);
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({a.batch, a.groups}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({a.batch, a.groups}, x.options().dtype(acc));
  if (x.numel() == 0) {
    mean.fill_(NAN);  // the statistics of an empty group, as torch's group_norm gives
    rstd.fill_(NAN);
    return {y, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto run = a.channels_last ? forward_nhwc<scalar_t> : forward_nchw<scalar_t>;
    run(a, x.const_data_ptr<scalar_t>(), optional_ptr<acc_t>(weight), optional_ptr<acc_t>(bias), eps, silu,
        y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>());
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  const GroupNormArgs a = check_group_norm_args(x, weight, bias, num_groups, 1.0);
  check_group_stats(mean, rstd, x, a);
  const at::Tensor grad_y = in_layout_of(grad_y_in, "grad_y", x, "x");
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor grad_x = at::empty_like(x);
  // every entry is written below (reduce_param_grads), but for an empty x
  at::Tensor grad_w = at::empty({weight.has_value() ? a.channels : 0}, x.options().dtype(acc));
  at::Tensor grad_b = at::empty({bias.has_value() ? a.channels : 0}, x.options().dtype(acc));
  if (x.numel() == 0) return {grad_x, grad_w.zero_(), grad_b.zero_()};
  std::vector<double> ds(a.batch * a.channels), dsx(a.batch * a.channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto run = a.channels_last ? backward_nhwc<scalar_t> : backward_nchw<scalar_t>;
    run(a, grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), optional_ptr<acc_t>(weight),
        optional_ptr<acc_t>(bias), mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), silu,
        grad_x.mutable_data_ptr<scalar_t>(), ds, dsx);
    reduce_param_grads<acc_t>(ds, dsx, a.batch, a.channels, grad_w, grad_b);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("_group_norm_silu_bwd", &group_norm_silu_bwd_cpu);
}

}  // namespace fastdiff::cpu
