// Scalar math of the Gaussian family, shared by the CPU and CUDA kernels
// (the Triton kernels in kernels/sample_and_kl.py restate it).
//
// VAE posterior q(z|x) = N(mu, diag(exp(lv))) (Kingma & Welling 2014):
//   std = exp(lv / 2),  z = mu + std * eps          (reparameterization)
//   kl_i = (mu^2 + exp(lv) - 1 - lv) / 2             (KL(q || N(0, I)) per element,
//                                                     summed per sample: diffusers'
//                                                     DiagonalGaussianDistribution.kl())
// VJP with upstream g_z (per element) and g_kl (per sample):
//   d mu = g_z + g_kl mu
//   d lv = g_z eps std / 2 + g_kl (exp(lv) - 1) / 2
// exp(lv) is computed as std * std: one exponential per element.
#pragma once

#include "fastdiff/schedule_math.h"  // FASTDIFF_HD, ElementOps

namespace fastdiff {

template <typename V>
struct GaussianSample {
  V z, kl;
};

template <typename V>
FASTDIFF_HD GaussianSample<V> gaussian_sample_and_kl(V mu, V lv, V eps) {
  using S = typename ElementOps<V>::scalar;
  const V std = ElementOps<V>::exp(V(S(0.5)) * lv);
  const V var = std * std;
  return {mu + std * eps, V(S(0.5)) * (mu * mu + var - V(S(1)) - lv)};
}

template <typename V>
struct GaussianGrads {
  V mu, lv;
};

template <typename V>
FASTDIFF_HD GaussianGrads<V> gaussian_sample_and_kl_vjp(V mu, V lv, V eps, V g_z, V g_kl) {
  using S = typename ElementOps<V>::scalar;
  const V half(S(0.5));
  const V std = ElementOps<V>::exp(half * lv);
  return {g_z + g_kl * mu, half * (g_z * eps * std + g_kl * (std * std - V(S(1))))};
}

}  // namespace fastdiff
