// Scalar math of the diffusion VLB terms (improved DDPM, Nichol & Dhariwal
// 2021), shared by the CPU and CUDA kernels (kernels/vb_loss.py restates it).
//
// Per sample b with timestep t, the true posterior q(x_{t-1} | x_t, x_0) is
// N(c_x0 x0 + c_xt x_t, var1) with log-variance lv1 (clipped: t = 0 uses
// t = 1's variance). The model's Gaussian is N(m, exp(lv)) per element.
//   t > 0:  kl_i  = (-1 + lv - lv1 + var1 e + d^2 e) / 2,  d = mean1 - m, e = exp(-lv)
//           (losses.normal_kl with exp(lv1 - lv) written as var1 * exp(-lv):
//           one exponential per element)
//   t = 0:  nll_i = -log P(x0_i in its 8-bit bin | N(m, exp(lv)))
//           (losses.discretized_gaussian_log_likelihood: tanh approximation of
//           the normal CDF, edge bins at -1 / 1, clamp at 1e-12 before logs)
// The per-sample term is mean_i(term_i) / log(2), in bits per dim.
#pragma once

#include "fastdiff/schedule_math.h"  // FASTDIFF_HD, ElementOps

namespace fastdiff {

// Columns of NoiseSchedule.posterior_table(): (T, kNumPosteriorColumns) float64.
enum PosteriorColumn : int {
  kPosteriorCoefX0 = 0,      // posterior_mean_coef1
  kPosteriorCoefXt = 1,      // posterior_mean_coef2
  kPosteriorLogVar = 2,      // posterior_log_variance_clipped
  kPosteriorVar = 3,         // exp of the clipped log-variance
  kNumPosteriorColumns = 4,
};
static_assert(int(kNumPosteriorColumns) == int(kNumColumns),
              "the posterior table shares the schedule table's checks");

template <typename T>
struct VlbCoeffs {
  T c_x0, c_xt, lv1, var1;
  bool decoder;  // t == 0: the decoder NLL instead of the KL
  template <typename U>
  FASTDIFF_HD VlbCoeffs<U> to() const { return {U(c_x0), U(c_xt), U(lv1), U(var1), decoder}; }
};

template <typename T>
FASTDIFF_HD VlbCoeffs<T> vlb_coeffs(const T* posterior, int64_t t) {
  const T* row = posterior + t * kNumPosteriorColumns;
  return {row[kPosteriorCoefX0], row[kPosteriorCoefXt], row[kPosteriorLogVar], row[kPosteriorVar],
          t == 0};
}

// KL(N(mean1, var1) || N(m, exp(lv))) per element, and the same with its VJP
// in (m, lv) for upstream g (the value comes along: the forward that also
// writes the gradient needs both from one exponential).
template <typename S, typename V>
FASTDIFF_HD V vlb_kl(const VlbCoeffs<S>& c, V m, V lv, V x0, V xt) {
  const V d = V(c.c_x0) * x0 + V(c.c_xt) * xt - m;
  const V e = ElementOps<V>::exp(V(S(0)) - lv);
  return V(S(0.5)) * (V(S(-1)) + lv - V(c.lv1) + V(c.var1) * e + d * d * e);
}

template <typename V>
struct VlbTermAndGrads {
  V value, m, lv;
};

template <typename S, typename V>
FASTDIFF_HD VlbTermAndGrads<V> vlb_kl_with_grad(const VlbCoeffs<S>& c, V m, V lv, V x0, V xt, V g) {
  const V d = V(c.c_x0) * x0 + V(c.c_xt) * xt - m;
  const V e = ElementOps<V>::exp(V(S(0)) - lv);
  const V spread = V(c.var1) * e + d * d * e;  // (var1 + d^2) / exp(lv)
  return {V(S(0.5)) * (V(S(-1)) + lv - V(c.lv1) + spread), V(S(0)) - g * d * e,
          V(S(0.5)) * g * (V(S(1)) - spread)};
}

// The tanh approximation of the standard normal CDF and its derivative:
//   cdf(u) = (1 + tanh(k (u + a u^3))) / 2,  k = sqrt(2 / pi), a = 0.044715.
template <typename V>
struct CdfAndDensity {
  V cdf, pdf;
};

template <typename V>
FASTDIFF_HD CdfAndDensity<V> approx_normal_cdf(V u) {
  using S = typename ElementOps<V>::scalar;
  const V k(S(0.7978845608028654));  // sqrt(2 / pi)
  const V a(S(0.044715));
  const V half(S(0.5));
  const V th = ElementOps<V>::tanh(k * (u + a * u * u * u));
  return {half * (V(S(1)) + th), half * (V(S(1)) - th * th) * k * (V(S(1)) + V(S(3)) * a * u * u)};
}

// The decoder's log-likelihood pieces at one element: the bin probability
// (before the 1e-12 clamp) and its derivatives in u+ / u-, the bin's upper and
// lower edges in standard units.
template <typename V>
struct DecoderBin {
  V prob;          // cdf(u+) (bottom bin), 1 - cdf(u-) (top bin), or their difference
  V dprob_dplus;   // d prob / d u+
  V dprob_dminus;  // d prob / d u-
  V u_plus, u_minus, inv_std;
};

template <typename V>
FASTDIFF_HD DecoderBin<V> decoder_bin(V m, V lv, V x, bool with_grad) {
  using S = typename ElementOps<V>::scalar;
  const V zero(S(0));
  const V inv_std = ElementOps<V>::exp(V(S(-0.5)) * lv);
  const V centered = x - m;
  const V u_plus = inv_std * (centered + V(S(1.0 / 255.0)));
  const V u_minus = inv_std * (centered - V(S(1.0 / 255.0)));
  const auto plus = approx_normal_cdf(u_plus);
  const auto minus = approx_normal_cdf(u_minus);
  // x < -0.999: bottom bin (-inf, x + 1/255]; x > 0.999: top bin [x - 1/255, inf).
  const auto bottom = ElementOps<V>::less(x, V(S(-0.999)));
  const auto top = ElementOps<V>::greater(x, V(S(0.999)));
  DecoderBin<V> r;
  r.prob = ElementOps<V>::select(bottom, plus.cdf,
                                 ElementOps<V>::select(top, V(S(1)) - minus.cdf, plus.cdf - minus.cdf));
  if (with_grad) {
    r.dprob_dplus = ElementOps<V>::select(top, zero, plus.pdf);
    r.dprob_dminus = ElementOps<V>::select(bottom, zero, zero - minus.pdf);
  } else {
    r.dprob_dplus = r.dprob_dminus = zero;
  }
  r.u_plus = u_plus;
  r.u_minus = u_minus;
  r.inv_std = inv_std;
  return r;
}

constexpr double kLogProbFloor = 1e-12;

template <typename V>
FASTDIFF_HD V vlb_decoder_nll(V m, V lv, V x0) {
  using S = typename ElementOps<V>::scalar;
  const auto bin = decoder_bin(m, lv, x0, false);
  return V(S(0)) - ElementOps<V>::log(ElementOps<V>::clamp_min(bin.prob, V(S(kLogProbFloor))));
}

// nll and its VJP for upstream g, with u+- = (x - m +- 1/255) exp(-lv / 2):
//   d u / d m = -exp(-lv / 2),  d u / d lv = -u / 2; the clamp passes the
//   gradient only where prob > 1e-12 (torch.clamp_min's VJP).
template <typename V>
FASTDIFF_HD VlbTermAndGrads<V> vlb_decoder_nll_with_grad(V m, V lv, V x0, V g) {
  using S = typename ElementOps<V>::scalar;
  const auto bin = decoder_bin(m, lv, x0, true);
  const V zero(S(0));
  const V floor_p = V(S(kLogProbFloor));
  // d nll / d prob = -1 / prob where the clamp passes, 0 elsewhere (and for NaN).
  const V dprob = ElementOps<V>::select(ElementOps<V>::greater(bin.prob, floor_p), zero - g / bin.prob, zero);
  return {zero - ElementOps<V>::log(ElementOps<V>::clamp_min(bin.prob, floor_p)),
          zero - dprob * bin.inv_std * (bin.dprob_dplus + bin.dprob_dminus),
          V(S(-0.5)) * dprob * (bin.dprob_dplus * bin.u_plus + bin.dprob_dminus * bin.u_minus)};
}

}  // namespace fastdiff
