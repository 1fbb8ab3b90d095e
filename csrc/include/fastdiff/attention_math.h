// Math of flash-style attention, shared by the CPU and CUDA kernels
// (kernels/attention.py restates it).
//
// Per query row i, with s_ij = scale q_i . k_j (Dao et al. 2022, FlashAttention,
// Alg. 1; Dao 2023, FlashAttention-2, Alg. 1-2):
//   forward, key blocks visited in order, running max m and sum l:
//     m' = max(m, max_j s_ij),  c = exp(m - m')   (c = 0 while m = -inf)
//     l' = c l + sum_j exp(s_ij - m'),  o' = c o + sum_j exp(s_ij - m') v_j
//   at the end o = o / l and lse_i = m + log l (the only statistic saved).
//   backward, P recomputed blockwise from lse (no N x N tensor):
//     p_ij = exp(s_ij - lse_i),  delta_i = dO_i . o_i
//     dv_j += p_ij dO_i,  dp_ij = dO_i . v_j,  ds_ij = p_ij (dp_ij - delta_i)
//     dq_i += scale ds_ij k_j,  dk_j += scale ds_ij q_i
// All statistics in the accumulation type (float; double for double inputs):
// scores up to 1e4 from fp16/bf16 inputs cannot overflow after the max shift.
#pragma once

#include <limits>

#include "fastdiff/schedule_math.h"  // FASTDIFF_HD, ElementOps

namespace fastdiff {

// Head dims up to this are supported (U-Nets use 32..160; flash-attention's limit).
constexpr int kMaxHeadDim = 256;

template <typename S>
FASTDIFF_HD S neg_inf() {
  return -std::numeric_limits<S>::infinity();
}

// exp(s - m): an unnormalized probability (forward, against the running max)
// or a normalized one (backward, m = lse). s - m <= 0, a probability's relative
// error of a few ulp is invisible next to the tile products' rounding: the fast
// exp (a polynomial on the CPU vectors, the accurate one elsewhere).
template <typename V>
FASTDIFF_HD V softmax_term(V s, V m) {
  return ElementOps<V>::exp_fast(s - m);
}

// The factor that moves sums taken against the old running max onto the new one.
template <typename S>
FASTDIFF_HD S online_rescale(S m_old, S m_new) {
  return m_old == neg_inf<S>() ? S(0) : ElementOps<S>::exp(m_old - m_new);
}

// The running (max, sum) state of one query row.
template <typename S>
struct OnlineSoftmax {
  S m = neg_inf<S>();
  S l = S(0);

  // Moves the state to the new max m_new (>= m); returns the factor the row's
  // output accumulator must be multiplied by.
  FASTDIFF_HD S advance(S m_new) {
    const S c = online_rescale(m, m_new);
    l *= c;
    m = m_new;
    return c;
  }
  FASTDIFF_HD S lse() const { return m + ElementOps<S>::log(l); }
};

// d s_ij from p_ij, dp_ij = dO_i . v_j and delta_i = dO_i . o_i (the softmax VJP).
template <typename V>
FASTDIFF_HD V softmax_grad(V p, V dp, V delta) {
  return p * (dp - delta);
}

}  // namespace fastdiff
