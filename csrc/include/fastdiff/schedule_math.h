// Scalar math of the noise-schedule step, shared by the CPU and CUDA kernels.
//
// One formula, two backends: every per-sample coefficient and every
// per-element update below is compiled into both csrc/cpu/*_kernel.cpp and
// csrc/cuda/*_kernel.cu, so the CPU tests exercise exactly the math the GPU
// runs. The Triton kernels (kernels/*.py) restate the same formulas.
//
// Notation (Ho et al. 2020, DDPM; Song et al. 2021, DDIM; Nichol & Dhariwal
// 2021, improved DDPM): ab = alpha_bar_t = prod_{s<=t} (1 - beta_s),
// abp = alpha_bar at the previous timestep (1 when t_prev < 0).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTDIFF_HD __host__ __device__ __forceinline__
#else
#define FASTDIFF_HD inline
#endif

namespace fastdiff {

// Element-wise math used by the per-element formulas below. The formulas are
// templates on the value type V: a scalar (CUDA threads, CPU tails) or
// at::vec::Vectorized<float/double> (CPU kernels specialize ElementOps in
// csrc/cpu/cpu_utils.h). Coefficients are always scalars of type S.
template <typename V>
struct ElementOps {
  using scalar = V;  // the element type (a Vectorized's lanes)
#if defined(__CUDACC__) || defined(__HIPCC__)
  static FASTDIFF_HD V exp(V v) { return ::exp(v); }
  static FASTDIFF_HD V log(V v) { return ::log(v); }
  static FASTDIFF_HD V sqrt(V v) { return ::sqrt(v); }
  static FASTDIFF_HD V tanh(V v) { return ::tanh(v); }
  static FASTDIFF_HD V fma(V a, V b, V c) { return ::fma(a, b, c); }
#else
  static FASTDIFF_HD V exp(V v) { return std::exp(v); }
  static FASTDIFF_HD V log(V v) { return std::log(v); }
  static FASTDIFF_HD V sqrt(V v) { return std::sqrt(v); }
  static FASTDIFF_HD V tanh(V v) { return std::tanh(v); }
  static FASTDIFF_HD V fma(V a, V b, V c) { return std::fma(a, b, c); }
#endif
  // exp where ~20 ulp are enough (a sigmoid's exp(-a): the absolute error of
  // silu stays below 1e-7); the accurate exp here, a polynomial one on the CPU.
  static FASTDIFF_HD V exp_fast(V v) { return exp(v); }
  // Comparisons give a mask that select() consumes (a bool here, a lane mask
  // for Vectorized).
  static FASTDIFF_HD bool less(V a, V b) { return a < b; }
  static FASTDIFF_HD bool greater(V a, V b) { return a > b; }
  static FASTDIFF_HD V select(bool mask, V if_true, V if_false) { return mask ? if_true : if_false; }
  // torch.clamp_min: NaN stays NaN.
  static FASTDIFF_HD V clamp_min(V v, V lo) { return v < lo ? lo : v; }
  // torch.clamp semantics: NaN stays NaN.
  static FASTDIFF_HD V clamp(V v, V lo, V hi) { return v < lo ? lo : (v > hi ? hi : v); }
  // torch.clamp's VJP: the gradient passes strictly inside (lo, hi); at the bounds
  // and for NaN it is 0 (as torch 2.14's clamp_backward).
  static FASTDIFF_HD V pass_inside(V g, V v, V lo, V hi) {
    return (v > lo && v < hi) ? g : V(0);
  }
};

// Columns of the per-timestep table a NoiseSchedule uploads to the device,
// shape (T, kNumColumns), float64. Per-sample coefficients are derived from it
// in float64 (a handful of scalar ops per sample) and only then cast to the
// element math's type (.to<float>()): differences such as beta_t =
// (abp - ab) / abp cancel most digits in fp32. 1 - alpha_bar is its own column
// for the same reason (alpha_bar close to 1 at small t).
enum TableColumn : int {
  kAlphaBar = 0,
  kOneMinusAlphaBar = 1,
  kSqrtAlphaBar = 2,
  kSqrtOneMinusAlphaBar = 3,
  kNumColumns = 4,
};

// prediction_type codes (diffusers' names).
enum PredictionType : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };

// variance_type codes of DDPMScheduler.
enum VarianceType : int {
  kFixedSmall = 0,
  kFixedSmallLog = 1,
  kFixedLarge = 2,
  kFixedLargeLog = 3,
  kLearned = 4,
  kLearnedRange = 5,
};

// diffusers clamps the posterior variance at 1e-20 before taking its log.
constexpr double kMinPosteriorVariance = 1e-20;

// alpha_bar and 1 - alpha_bar of the previous timestep; t_prev < 0 is the
// "alpha_bar = 1" convention (diffusers' set_alpha_to_one / DDPM's t = 0).
template <typename T>
struct PrevAlpha {
  T ab, one_minus_ab;
};

template <typename T>
FASTDIFF_HD PrevAlpha<T> prev_alpha(const T* table, int64_t t_prev) {
  if (t_prev < 0) return {T(1), T(0)};
  const T* row = table + t_prev * kNumColumns;
  return {row[kAlphaBar], row[kOneMinusAlphaBar]};
}

// ---------------------------------------------------------------------------
// q_sample: x_t = sqrt(ab) * x0 + sqrt(1 - ab) * noise.
// VJP: d x0 = sqrt(ab) * g, d noise = sqrt(1 - ab) * g.
// ---------------------------------------------------------------------------
template <typename T>
struct QSampleCoeffs {
  T x0, noise;
  template <typename U>
  FASTDIFF_HD QSampleCoeffs<U> to() const { return {U(x0), U(noise)}; }
};

template <typename T>
FASTDIFF_HD QSampleCoeffs<T> q_sample_coeffs(const T* table, int64_t t) {
  const T* row = table + t * kNumColumns;
  return {row[kSqrtAlphaBar], row[kSqrtOneMinusAlphaBar]};
}

// ---------------------------------------------------------------------------
// diffusion_loss: per sample b, L_b = w_b * mean_i (m_i - target_i)^2 with the
// target built in-kernel:
//   epsilon: target = noise; sample: target = x0;
//   v_prediction: target = sqrt(ab) * noise - sqrt(1 - ab) * x0.
// w_b = 1, or with min-SNR-gamma (Hang et al. 2023; diffusers'
// train_text_to_image): snr = ab / (1 - ab), w = min(snr, gamma), divided by
// snr for epsilon and by snr + 1 for v_prediction.
// VJP: d m_i = 2 (m_i - target_i) * w_b / N * dL_b.
// ---------------------------------------------------------------------------
template <typename T>
struct LossCoeffs {
  T target_noise;  // target = target_noise * noise + target_x0 * x0
  T target_x0;
  T weight;        // w_b
  template <typename U>
  FASTDIFF_HD LossCoeffs<U> to() const { return {U(target_noise), U(target_x0), U(weight)}; }
};

template <typename T>
FASTDIFF_HD LossCoeffs<T> loss_coeffs(const T* table, int64_t t, int prediction_type,
                                     T snr_gamma /* <= 0: no weighting */) {
  const T* row = table + t * kNumColumns;
  LossCoeffs<T> c;
  if (prediction_type == kEpsilon) {
    c.target_noise = T(1);
    c.target_x0 = T(0);
  } else if (prediction_type == kSample) {
    c.target_noise = T(0);
    c.target_x0 = T(1);
  } else {
    c.target_noise = row[kSqrtAlphaBar];
    c.target_x0 = -row[kSqrtOneMinusAlphaBar];
  }
  c.weight = T(1);
  if (snr_gamma > T(0)) {
    const T snr = row[kAlphaBar] / row[kOneMinusAlphaBar];
    T w = snr < snr_gamma ? snr : snr_gamma;
    if (prediction_type == kEpsilon) {
      w = w / snr;
    } else if (prediction_type == kVPrediction) {
      w = w / (snr + T(1));
    }
    c.weight = w;
  }
  return c;
}

// m - target. The epsilon/sample kernels never read the unused input, so
// either of x0 / noise may be a dummy when its coefficient is zero.
template <typename S, typename V>
FASTDIFF_HD V loss_residual(const LossCoeffs<S>& c, V m, V x0, V noise) {
  return m - (V(c.target_noise) * noise + V(c.target_x0) * x0);
}

// ---------------------------------------------------------------------------
// Predicted x0 (and epsilon) as affine functions of (sample x, model output m):
//   epsilon:      x0 = (x - sqrt(1-ab) m) / sqrt(ab)      eps = m
//   sample:       x0 = m                                  eps = (x - sqrt(ab) m) / sqrt(1-ab)
//   v_prediction: x0 = sqrt(ab) x - sqrt(1-ab) m          eps = sqrt(ab) m + sqrt(1-ab) x
// ---------------------------------------------------------------------------
template <typename T>
struct Affine {
  T x, m;  // value = x * sample + m * model_output
  template <typename U>
  FASTDIFF_HD Affine<U> to() const { return {U(x), U(m)}; }
};

template <typename T>
FASTDIFF_HD void predictor_coeffs(const T* row, int prediction_type, Affine<T>& x0,
                                  Affine<T>& eps) {
  const T sa = row[kSqrtAlphaBar];
  const T s1 = row[kSqrtOneMinusAlphaBar];
  if (prediction_type == kEpsilon) {
    x0 = {T(1) / sa, -s1 / sa};
    eps = {T(0), T(1)};
  } else if (prediction_type == kSample) {
    x0 = {T(0), T(1)};
    eps = {T(1) / s1, -sa / s1};
  } else {
    x0 = {sa, -s1};
    eps = {s1, sa};
  }
}

// ---------------------------------------------------------------------------
// ddpm_step (DDPMScheduler.step, improved DDPM's p_sample):
//   x0 = clip(x0_hat(x, m));  mean = c_x0 * x0 + c_x * x
//   c_x0 = sqrt(abp) beta_t / (1 - ab),  c_x = sqrt(alpha_t) (1 - abp) / (1 - ab)
//   with alpha_t = ab / abp, beta_t = 1 - alpha_t;
//   out = mean + std * noise  (std = 0 where t == 0).
// std by variance_type, var = max((1 - abp) / (1 - ab) * beta_t, 1e-20):
//   fixed_small / fixed_small_log: sqrt(var);  fixed_large / fixed_large_log:
//   sqrt(beta_t);  learned: exp(0.5 v);  learned_range: exp(0.5 (f log beta_t +
//   (1 - f) log var)), f = (v + 1) / 2, v the predicted-variance channels.
// VJP: g_x0 = c_x0 g [|x0_hat| < r when clipping];
//   d x = c_x g + x0.x g_x0;  d m = x0.m g_x0;
//   d v = g noise * d std / d v (0.5 std, times (log beta_t - log var) / 2 for
//   learned_range).
// ---------------------------------------------------------------------------
template <typename T>
struct DdpmCoeffs {
  Affine<T> x0;    // x0_hat = x0.x * sample + x0.m * model_output
  T mean_x0;       // c_x0
  T mean_x;        // c_x
  T std;           // fixed std (variance types 0..3); 0 where t == 0
  T log_var_min;   // log var          (learned_range)
  T log_var_max;   // log beta_t       (learned_range)
  bool add_noise;  // t > 0
  template <typename U>
  FASTDIFF_HD DdpmCoeffs<U> to() const {
    return {x0.template to<U>(), U(mean_x0), U(mean_x), U(std), U(log_var_min), U(log_var_max), add_noise};
  }
};

template <typename T>
FASTDIFF_HD DdpmCoeffs<T> ddpm_coeffs(const T* table, int64_t t, int64_t t_prev,
                                     int prediction_type, int variance_type) {
  using M = ElementOps<T>;
  const T* row = table + t * kNumColumns;
  const PrevAlpha<T> prev = prev_alpha(table, t_prev);
  const T ab = row[kAlphaBar];
  const T one_minus_ab = row[kOneMinusAlphaBar];
  const T alpha_t = ab / prev.ab;
  // beta_t = 1 - ab / abp = ((1 - ab) - (1 - abp)) / abp, without cancellation.
  const T beta_t = (one_minus_ab - prev.one_minus_ab) / prev.ab;
  DdpmCoeffs<T> c;
  Affine<T> eps_unused;
  predictor_coeffs(row, prediction_type, c.x0, eps_unused);
  c.mean_x0 = M::sqrt(prev.ab) * beta_t / one_minus_ab;
  c.mean_x = M::sqrt(alpha_t) * prev.one_minus_ab / one_minus_ab;
  T var = prev.one_minus_ab / one_minus_ab * beta_t;
  if (var < T(kMinPosteriorVariance)) var = T(kMinPosteriorVariance);
  c.log_var_min = M::log(var);
  c.log_var_max = M::log(beta_t);
  c.add_noise = t > 0;
  if (variance_type == kFixedSmall || variance_type == kFixedSmallLog) {
    c.std = M::sqrt(var);
  } else if (variance_type == kFixedLarge || variance_type == kFixedLargeLog) {
    c.std = M::sqrt(beta_t);
  } else {
    c.std = T(0);  // per element, from the predicted variance
  }
  if (!c.add_noise) c.std = T(0);
  return c;
}

// std of a learned variance: v is the predicted (log-)variance channel.
template <typename S, typename V>
FASTDIFF_HD V ddpm_learned_std(const DdpmCoeffs<S>& c, int variance_type, V v) {
  if (variance_type == kLearned) return ElementOps<V>::exp(V(S(0.5)) * v);
  const V f = (v + V(S(1))) * V(S(0.5));
  return ElementOps<V>::exp(V(S(0.5)) *
                            (f * V(c.log_var_max) + (V(S(1)) - f) * V(c.log_var_min)));
}

// Per-element forward of ddpm_step; v is read only for learned variances.
template <typename S, typename V>
FASTDIFF_HD V ddpm_element(const DdpmCoeffs<S>& c, int variance_type, bool clip, S clip_range,
                           V x, V m, V v, V noise) {
  V x0 = V(c.x0.x) * x + V(c.x0.m) * m;
  if (clip) x0 = ElementOps<V>::clamp(x0, V(-clip_range), V(clip_range));
  V out = V(c.mean_x0) * x0 + V(c.mean_x) * x;
  if (c.add_noise) {
    if (variance_type == kLearned || variance_type == kLearnedRange) {
      out = out + ddpm_learned_std(c, variance_type, v) * noise;
    } else {
      out = out + V(c.std) * noise;
    }
  }
  return out;
}

template <typename V>
struct DdpmGrads {
  V x, m, v;
};

template <typename S, typename V>
FASTDIFF_HD DdpmGrads<V> ddpm_element_vjp(const DdpmCoeffs<S>& c, int variance_type, bool clip,
                                          S clip_range, V x, V m, V v, V noise, V g) {
  V g_x0 = V(c.mean_x0) * g;
  if (clip) {
    const V x0 = V(c.x0.x) * x + V(c.x0.m) * m;
    g_x0 = ElementOps<V>::pass_inside(g_x0, x0, V(-clip_range), V(clip_range));
  }
  DdpmGrads<V> r;
  r.x = V(c.mean_x) * g + V(c.x0.x) * g_x0;
  r.m = V(c.x0.m) * g_x0;
  r.v = V(S(0));
  if (c.add_noise && (variance_type == kLearned || variance_type == kLearnedRange)) {
    const V std = ddpm_learned_std(c, variance_type, v);
    // d std / d v: 0.5 std (learned); 0.5 std (log beta - log var) / 2 (learned_range)
    const S dlog = variance_type == kLearned ? S(0.5)
                                             : S(0.25) * (c.log_var_max - c.log_var_min);
    r.v = g * noise * std * V(dlog);
  }
  return r;
}

// ---------------------------------------------------------------------------
// ddim_step (DDIMScheduler.step, Song et al. 2021 eq. 12):
//   x0 = x0_hat(x, m), eps = eps_hat(x, m); x0c = clip(x0) when clipping;
//   with use_clipped_model_output: eps = (x - sqrt(ab) x0c) / sqrt(1 - ab);
//   sigma = eta sqrt((1 - abp) / (1 - ab) (1 - ab / abp));
//   out = sqrt(abp) x0c + sqrt(max(1 - abp - sigma^2, 0)) eps + sigma noise.
// VJP through the same affine maps and the clip mask.
// ---------------------------------------------------------------------------
template <typename T>
struct DdimCoeffs {
  Affine<T> x0;
  Affine<T> eps;
  T sqrt_ab;  // for use_clipped_model_output
  T inv_sqrt_one_minus_ab;
  T out_x0;   // sqrt(abp)
  T out_eps;  // sqrt(1 - abp - sigma^2)
  T sigma;
  template <typename U>
  FASTDIFF_HD DdimCoeffs<U> to() const {
    return {x0.template to<U>(), eps.template to<U>(), U(sqrt_ab), U(inv_sqrt_one_minus_ab), U(out_x0),
            U(out_eps), U(sigma)};
  }
};

template <typename T>
FASTDIFF_HD DdimCoeffs<T> ddim_coeffs(const T* table, int64_t t, int64_t t_prev,
                                     int prediction_type, T eta) {
  using M = ElementOps<T>;
  const T* row = table + t * kNumColumns;
  const PrevAlpha<T> prev = prev_alpha(table, t_prev);
  DdimCoeffs<T> c;
  predictor_coeffs(row, prediction_type, c.x0, c.eps);
  c.sqrt_ab = row[kSqrtAlphaBar];
  c.inv_sqrt_one_minus_ab = T(1) / row[kSqrtOneMinusAlphaBar];
  const T one_minus_ab = row[kOneMinusAlphaBar];
  // 1 - ab / abp = ((1 - ab) - (1 - abp)) / abp
  const T var = prev.one_minus_ab / one_minus_ab *
                ((one_minus_ab - prev.one_minus_ab) / prev.ab);
  c.sigma = eta * M::sqrt(var > T(0) ? var : T(0));
  c.out_x0 = M::sqrt(prev.ab);
  const T dir = prev.one_minus_ab - c.sigma * c.sigma;
  c.out_eps = M::sqrt(dir > T(0) ? dir : T(0));
  return c;
}

template <typename S, typename V>
FASTDIFF_HD V ddim_element(const DdimCoeffs<S>& c, bool clip, S clip_range, bool use_clipped,
                           V x, V m, V noise) {
  V x0 = V(c.x0.x) * x + V(c.x0.m) * m;
  V eps = V(c.eps.x) * x + V(c.eps.m) * m;
  if (clip) x0 = ElementOps<V>::clamp(x0, V(-clip_range), V(clip_range));
  if (use_clipped) eps = (x - V(c.sqrt_ab) * x0) * V(c.inv_sqrt_one_minus_ab);
  V out = V(c.out_x0) * x0 + V(c.out_eps) * eps;
  if (c.sigma != S(0)) out = out + V(c.sigma) * noise;
  return out;
}

template <typename V>
struct DdimGrads {
  V x, m;
};

template <typename S, typename V>
FASTDIFF_HD DdimGrads<V> ddim_element_vjp(const DdimCoeffs<S>& c, bool clip, S clip_range,
                                          bool use_clipped, V x, V m, V g) {
  V g_x0 = V(c.out_x0) * g;  // gradient reaching the (clipped) x0
  V g_eps = V(c.out_eps) * g;
  V g_x = V(S(0));
  if (use_clipped) {
    // eps = (x - sqrt(ab) x0c) / sqrt(1 - ab): eps no longer depends on eps_hat.
    g_x = g_eps * V(c.inv_sqrt_one_minus_ab);
    g_x0 = g_x0 - g_eps * V(c.sqrt_ab * c.inv_sqrt_one_minus_ab);
    g_eps = V(S(0));
  }
  if (clip) {
    const V x0 = V(c.x0.x) * x + V(c.x0.m) * m;
    g_x0 = ElementOps<V>::pass_inside(g_x0, x0, V(-clip_range), V(clip_range));
  }
  DdimGrads<V> r;
  r.x = g_x + V(c.x0.x) * g_x0 + V(c.eps.x) * g_eps;
  r.m = V(c.x0.m) * g_x0 + V(c.eps.m) * g_eps;
  return r;
}

}  // namespace fastdiff
