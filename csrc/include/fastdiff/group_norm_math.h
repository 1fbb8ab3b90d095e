// Math of the fused GroupNorm + SiLU, shared by the CPU and CUDA kernels
// (kernels/group_norm_silu.py restates it).
//
// x: (N, C, *), G groups of C / G channels; each (n, g) is normalized over its
// M = (C / G) * HW elements (HW = product of the spatial dims):
//   xhat = (x - mean_ng) rstd_ng,  rstd_ng = 1 / sqrt(var_ng + eps)  (biased var)
//   a    = w_c xhat + b_c = scale x + shift,  scale = rstd w_c,  shift = b_c - mean rstd w_c
//   y    = silu(a) = a sigmoid(a)     (or y = a without the activation)
// Statistics: each channel's moments are taken about a pilot value (the
// channel's first element) so that fp32 sums of (x - K) and (x - K)^2 do not
// cancel when |mean| >> std; channels are then merged into their group in
// double with Chan et al.'s pairwise update (group_moments below).
// Backward, with da = dy silu'(a) and per-(n, c) sums ds = sum da,
// dsx = sum da xhat (over HW):
//   d b_c = sum_n ds_nc,  d w_c = sum_n dsx_nc              (fixed order: deterministic)
//   A_ng = sum_{c in g} w_c ds_nc,  B_ng = sum_{c in g} w_c dsx_nc
//   dx = rstd (w_c da - A / M - xhat B / M) = scale da + c2 x + c3,
//   c2 = -rstd^2 B / M,  c3 = -c2 mean - rstd A / M        (per (n, g))
#pragma once

#include "fastdiff/schedule_math.h"  // FASTDIFF_HD, ElementOps

namespace fastdiff {

template <typename V>
FASTDIFF_HD V sigmoid(V a) {
  using S = typename ElementOps<V>::scalar;
  return V(S(1)) / (V(S(1)) + ElementOps<V>::exp_fast(V(S(0)) - a));
}

// y = silu(a) = a / (1 + exp(-a)) at a = scale x + shift (or y = a).
template <typename V>
FASTDIFF_HD V norm_act(V x, V scale, V shift, bool silu) {
  using S = typename ElementOps<V>::scalar;
  const V a = ElementOps<V>::fma(x, scale, shift);
  return silu ? a / (V(S(1)) + ElementOps<V>::exp_fast(V(S(0)) - a)) : a;
}

// da = dy * d y / d a = dy s (1 + a (1 - s)), s = sigmoid(a), at a = scale x + shift.
template <typename V>
FASTDIFF_HD V norm_act_grad(V x, V scale, V shift, V dy, bool silu) {
  using S = typename ElementOps<V>::scalar;
  if (!silu) return dy;
  const V a = ElementOps<V>::fma(x, scale, shift);
  const V s = sigmoid(a);
  return dy * s * ElementOps<V>::fma(a, V(S(1)) - s, V(S(1)));
}

// Moments of one channel: count elements, sum1 = sum (x - pilot), sum2 =
// sum (x - pilot)^2 (accumulated by the kernel), in double.
struct ChannelSums {
  double pilot, sum1, sum2;
};

struct GroupStats {
  double mean, rstd;
};

// Merges the channels [first, first + channels) of one (n, g) into the
// group's mean and rstd. Every channel has the same count, so Chan's pairwise
// update reduces to a closed form: the group mean is the mean of the channel
// means and M2 = sum M2_c + count sum (mean_c - mean)^2, taken about that mean
// (two passes over the channel means, no chain of dependent divisions).
FASTDIFF_HD GroupStats group_moments(const ChannelSums* sums, int64_t channels, int64_t count,
                                     double eps) {
  if (channels <= 0 || count <= 0) {
#if defined(__CUDACC__) || defined(__HIPCC__)
    return {0.0, ::rsqrt(eps)};
#else
    return {0.0, 1.0 / std::sqrt(eps)};
#endif
  }
  const double nc = double(count), inv_nc = 1.0 / nc;
  double sum_means = 0;
  for (int64_t c = 0; c < channels; ++c) sum_means += sums[c].pilot + sums[c].sum1 * inv_nc;
  const double mean = sum_means / double(channels);
  double m2_within = 0, m2_between = 0;
  for (int64_t c = 0; c < channels; ++c) {
    const double m2_c = sums[c].sum2 - sums[c].sum1 * sums[c].sum1 * inv_nc;
    m2_within += m2_c > 0 ? m2_c : 0;
    const double delta = sums[c].pilot + sums[c].sum1 * inv_nc - mean;
    m2_between += delta * delta;
  }
  const double var = (m2_within + nc * m2_between) / (nc * double(channels));
#if defined(__CUDACC__) || defined(__HIPCC__)
  return {mean, ::rsqrt(var + eps)};
#else
  return {mean, 1.0 / std::sqrt(var + eps)};
#endif
}

}  // namespace fastdiff
