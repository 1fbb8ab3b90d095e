// Helpers shared by the CPU kernels: vector load/store in the accumulation
// type, the Vectorized specialization of the shared element math, and the
// (sample, chunk) parallel loop every schedule kernel uses.
//
// Each csrc/cpu/*_kernel.cpp is compiled once per CPU capability (DEFAULT,
// AVX2, AVX512) into its own extension module; fastdiff/_C_loader.py loads the
// one matching the running CPU, which registers the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "fastdiff/schedule_math.h"

namespace fastdiff {

namespace cpu {

// exp for float vectors where a few 1e-7 of relative error are enough (sigmoid,
// softmax): exp(v) = 2^t, t = v log2 e, split as t = n + r with n = floor(t) and
// r in [0, 1); 2^r by a degree-5 polynomial (relative-error minimax fit on
// [0, 1], 7.5e-8 before fp32 rounding), times 2^n. Rounding t costs a relative
// error of |v| 2^-24 ln 2, the same order as that of computing v itself. AVX-512
// needs neither a clamp nor a separate rounding: vreduceps gives r (0 for +-inf)
// and vscalefps multiplies by 2^floor(t) (0 below 2^-149, inf above FLT_MAX), so
// exp(-inf) = 0, exp(inf) = inf, NaN stays NaN.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
inline at::vec::Vectorized<float> exp2_fraction_poly(at::vec::Vectorized<float> r) {
  using V = at::vec::Vectorized<float>;
  V p = at::vec::fmadd(V(0.0018775767f), r, V(0.0089893397f));
  p = at::vec::fmadd(p, r, V(0.0558263175f));
  p = at::vec::fmadd(p, r, V(0.240153611f));
  p = at::vec::fmadd(p, r, V(0.693153083f));
  return at::vec::fmadd(p, r, V(0.99999994f));
}
#endif
#if defined(CPU_CAPABILITY_AVX512)
inline __m512 exp_poly(__m512 v) {
  const __m512 t = _mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f));
  const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // t - floor(t)
  return _mm512_scalef_ps(exp2_fraction_poly(r), t);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256 exp_poly(__m256 v) {
  // t in [-127, 128] (NaN kept: min/max return their second operand when one is NaN), so
  // that 2^n fits the exponent field: n = -127 gives 0 (exp(v) < 2^-126 flushed), n = 128 inf
  __m256 t = _mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f));
  t = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-127.f), t));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 p = exp2_fraction_poly(_mm256_sub_ps(t, n));
  const __m256i field = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(field));
}
#endif

}  // namespace cpu

template <typename T>
struct ElementOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using scalar = T;
  static V exp(V v) { return v.exp(); }
  // A polynomial exp for float only: double's exp_u20 is no more accurate than float's.
  static V exp_fast(V v) {
    if constexpr (!std::is_same_v<T, float>) {
      return v.exp();
    } else {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      return V(cpu::exp_poly(v));
#else
      return v.exp_u20();
#endif
    }
  }
  static V log(V v) { return v.log(); }
  static V tanh(V v) { return v.tanh(); }
  static V fma(V a, V b, V c) { return at::vec::fmadd(a, b, c); }
  static V less(V a, V b) { return a < b; }
  static V greater(V a, V b) { return a > b; }
  static V select(V mask, V if_true, V if_false) { return V::blendv(if_false, if_true, mask); }
  static V clamp_min(V v, V lo) { return at::vec::maximum(v, lo); }
  // maximum/minimum propagate NaN, as torch.clamp does.
  static V clamp(V v, V lo, V hi) { return at::vec::minimum(at::vec::maximum(v, lo), hi); }
  static V pass_inside(V g, V v, V lo, V hi) {
    return V::blendv(V(T(0)), g, (v > lo) & (v < hi));
  }
};

namespace cpu {

// Loads and stores of scalar_t memory as vectors of the accumulation type
// (float for half/bfloat16/float, double for double).
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();

  static Vec load(const scalar_t* p, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return n == kSize ? Vec::loadu(p) : Vec::loadu(p, n);
    } else {
      if (n == kSize) {
        Vec out;
        at::vec::load_to_float(p, out);
        return out;
      }
      acc_t buf[kSize] = {};
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
      return Vec::loadu(buf);
    }
  }

  static void store(scalar_t* p, const Vec& v, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (n == kSize) {
        v.store(p);
      } else {
        v.store(p, n);
      }
    } else {
      if (n == kSize) {
        at::vec::convert_from_float<scalar_t>(v, v).store(p, kSize);
        return;
      }
      acc_t buf[kSize];
      v.store(buf);
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
    }
  }
};

// Fixed work split: chunk boundaries depend only on the shape, never on the
// thread count, so per-chunk partial sums (and the losses built from them)
// are bitwise identical from run to run and machine to machine.
constexpr int64_t kChunk = 16384;

inline int64_t num_chunks(int64_t per_sample) {
  return per_sample == 0 ? 0 : (per_sample + kChunk - 1) / kChunk;
}

// Calls body(b, begin, end) for each (sample b, chunk [begin, end)) in parallel.
template <typename F>
void parallel_over_chunks(int64_t batch, int64_t per_sample, const F& body) {
  const int64_t chunks = num_chunks(per_sample);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / chunks;
      const int64_t begin = (task % chunks) * kChunk;
      const int64_t end = std::min(begin + kChunk, per_sample);
      body(b, begin, end);
    }
  });
}

// Calls f(offset, n) over [begin, end) in vector-sized steps plus one tail.
template <typename scalar_t, typename F>
inline void vector_steps(int64_t begin, int64_t end, const F& f) {
  constexpr int64_t kSize = VecIO<scalar_t>::kSize;
  int64_t i = begin;
  for (; i + kSize <= end; i += kSize) f(i, kSize);
  if (i < end) f(i, end - i);
}

// Timesteps index the table: out-of-range values are rejected before any read,
// as a ValueError in Python (the public API leaves this check to the CPU kernel).
// t_prev may be negative (alpha_bar_prev = 1).
inline void check_timesteps(const at::Tensor& t, const char* name, const at::Tensor& table,
                            bool allow_negative) {
  const int64_t* p = t.const_data_ptr<int64_t>();
  const int64_t num_timesteps = table.size(0);
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] < num_timesteps && (allow_negative || p[i] >= 0), name, " contains ",
                      p[i], " (at index ", i, "), outside [", allow_negative ? "-inf" : "0",
                      ", ", num_timesteps, ")");
  }
}

}  // namespace cpu
}  // namespace fastdiff
