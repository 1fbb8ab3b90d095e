// attention on the CPU: flash-style tiles (math: attention_math.h), never an
// Nq x Nk tensor. The tile products go to the BLAS torch links (MKL's
// sgemm_/dgemm_, called from inside the parallel region so each call runs on
// its own thread); the online softmax between them is vectorized here.
//
// Forward: one task per (b, h, block of kFwdBlockQ query rows); key blocks of
// kFwdBlockK in order: S = scale Q K^T, running max / sum per row, O = O c + P V.
// Backward: one task per (b, h), query blocks in order, key blocks inside:
// P from lse, dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dQ += scale dS K,
// dK += scale dS^T Q. Each (b, h) is summed by one thread in a fixed order:
// deterministic, no atomics. fp16 / bf16 inputs are taken to fp32 once (O(N D)
// copies) and every product accumulates in fp32.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_utils.h"
#include "fastdiff/attention_math.h"
#include "fastdiff/op_checks.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace fastdiff::cpu {
namespace {

// Tiles (query rows x keys), picked by timing against SDPA here (2-core EPYC,
// fp32, N = 4096, D = 40 / 64): the forward's 64 x 1024 score tile (256 KB)
// stays in L2 between the two products that use it; the backward keeps two
// tiles (P and dS) of 128 x 256 plus its dQ block.
constexpr int64_t kFwdBlockQ = 64;
constexpr int64_t kFwdBlockK = 1024;
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockK = 256;

// Row-major C (m x n) = alpha op(A) op(B) + beta C, op(X) = X^T when trans_x.
// The column-major BLAS computes the transpose: C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  }
}

// A (B, H, N, D) operand as the kernels read it: acc_t elements, row stride ld.
// It holds the tensor it points into (a converted copy for fp16 / bf16).
template <typename acc_t>
struct Operand {
  at::Tensor keep;
  const acc_t* data;
  int64_t sb, sh, ld;
  const acc_t* rows(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * ld; }
};

// x in the accumulation type (a copy only for fp16 / bf16), with a row stride
// BLAS accepts (>= D; a broadcast row stride is made dense).
template <typename acc_t>
Operand<acc_t> operand(const at::Tensor& x) {
  constexpr auto acc = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor y = x.scalar_type() == acc ? x : x.to(acc);
  if (y.size(2) > 1 && y.stride(2) < y.size(3)) y = y.contiguous();
  if (y.size(3) > 1 && y.stride(3) != 1) y = y.contiguous();
  const int64_t ld = std::max<int64_t>(y.size(2) > 1 ? y.stride(2) : y.size(3), std::max<int64_t>(y.size(3), 1));
  return {y, y.const_data_ptr<acc_t>(), y.stride(0), y.stride(1), ld};
}

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename acc_t>
acc_t row_max(const acc_t* row, int64_t n) {
  return at::vec::reduce_all<acc_t>([](const Vec<acc_t>& a, const Vec<acc_t>& b) { return at::vec::maximum(a, b); },
                                    row, n);
}

// row[j] = exp(row[j] - m) in place; returns the sum.
template <typename acc_t>
acc_t exp_row(acc_t* row, int64_t n, acc_t m) {
  const Vec<acc_t> vm(m);
  Vec<acc_t> vsum(acc_t(0));
  int64_t j = 0;
  for (; j + Vec<acc_t>::size() <= n; j += Vec<acc_t>::size()) {
    const Vec<acc_t> p = softmax_term(Vec<acc_t>::loadu(row + j), vm);
    p.store(row + j);
    vsum += p;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](const Vec<acc_t>& a, const Vec<acc_t>& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    row[j] = softmax_term(row[j], m);
    sum += row[j];
  }
  return sum;
}

template <typename acc_t>
void scale_row(acc_t* row, int64_t n, acc_t c) {
  at::vec::map([c](Vec<acc_t> x) { return x * Vec<acc_t>(c); }, row, row, n);
}

template <typename scalar_t>
void attention_fwd_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                        const AttentionArgs& a, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operand<acc_t> q = operand<acc_t>(q_in);
  const Operand<acc_t> k = operand<acc_t>(k_in);
  const Operand<acc_t> v = operand<acc_t>(v_in);
  const int64_t D = a.head_dim, Nq = a.q_len, Nk = a.kv_len, H = a.heads;
  const int64_t q_blocks = (Nq + kFwdBlockQ - 1) / kFwdBlockQ;
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, a.batch * H * q_blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> scores(kFwdBlockQ * std::min(kFwdBlockK, Nk));
    std::vector<acc_t> acc(kFwdBlockQ * D);
    std::vector<OnlineSoftmax<acc_t>> rows(kFwdBlockQ);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bh = task / q_blocks, b = bh / H, h = bh % H;
      const int64_t i0 = (task % q_blocks) * kFwdBlockQ, mq = std::min(kFwdBlockQ, Nq - i0);
      std::fill(rows.begin(), rows.end(), OnlineSoftmax<acc_t>());
      for (int64_t j0 = 0; j0 < Nk; j0 += kFwdBlockK) {
        const int64_t nk = std::min(kFwdBlockK, Nk - j0);
        gemm<acc_t>(false, true, mq, nk, D, sc, q.rows(b, h, i0), q.ld, k.rows(b, h, j0), k.ld, acc_t(0),
                    scores.data(), nk);
        for (int64_t r = 0; r < mq; ++r) {
          acc_t* row = scores.data() + r * nk;
          const acc_t c = rows[r].advance(std::max(rows[r].m, row_max(row, nk)));
          rows[r].l += exp_row(row, nk, rows[r].m);
          if (j0 > 0) scale_row(acc.data() + r * D, D, c);
        }
        gemm<acc_t>(false, false, mq, D, nk, acc_t(1), scores.data(), nk, v.rows(b, h, j0), v.ld,
                    acc_t(j0 > 0 ? 1 : 0), acc.data(), D);
      }
      for (int64_t r = 0; r < mq; ++r) {
        const acc_t inv_l = acc_t(1) / rows[r].l;
        const acc_t* src = acc.data() + r * D;
        scalar_t* dst = out_p + ((b * Nq + i0 + r) * H + h) * D;  // (B, Nq, H, D) memory
        vector_steps<scalar_t>(0, D, [&](int64_t i, int64_t n) {
          VecIO<scalar_t>::store(dst + i, Vec<acc_t>::loadu(src + i, n) * Vec<acc_t>(inv_l), n);
        });
        lse_p[bh * Nq + i0 + r] = rows[r].lse();
      }
    }
  });
}

// Rows of a (B, N, H, D)-memory result in scalar_t from acc_t rows (ld D).
template <typename scalar_t, typename acc_t>
void store_rows(scalar_t* dst_base, const acc_t* src, int64_t b, int64_t h, int64_t n0, int64_t count,
                const AttentionArgs& a, int64_t N) {
  const int64_t D = a.head_dim;
  for (int64_t r = 0; r < count; ++r) {
    scalar_t* dst = dst_base + ((b * N + n0 + r) * a.heads + h) * D;
    vector_steps<scalar_t>(0, D, [&](int64_t i, int64_t n) {
      VecIO<scalar_t>::store(dst + i, Vec<acc_t>::loadu(src + r * D + i, n), n);
    });
  }
}

template <typename scalar_t>
void attention_bwd_impl(const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
                        const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse, double scale,
                        const AttentionArgs& a, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operand<acc_t> q = operand<acc_t>(q_in);
  const Operand<acc_t> k = operand<acc_t>(k_in);
  const Operand<acc_t> v = operand<acc_t>(v_in);
  const Operand<acc_t> dout = operand<acc_t>(grad_out_in);
  const int64_t D = a.head_dim, Nq = a.q_len, Nk = a.kv_len, H = a.heads;
  const scalar_t* out_p = out.const_data_ptr<scalar_t>();
  const int64_t o_sb = out.stride(0), o_sh = out.stride(1), o_sn = out.stride(2);
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  scalar_t* gq_p = grad_q.mutable_data_ptr<scalar_t>();
  scalar_t* gk_p = grad_k.mutable_data_ptr<scalar_t>();
  scalar_t* gv_p = grad_v.mutable_data_ptr<scalar_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, a.batch * H, 1, [&](int64_t lo, int64_t hi) {
    const int64_t tile = kBwdBlockQ * std::min(kBwdBlockK, Nk);
    std::vector<acc_t> p(tile), ds(tile), dq(kBwdBlockQ * D), dk(Nk * D), dv(Nk * D), delta(kBwdBlockQ);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      for (int64_t i0 = 0; i0 < Nq; i0 += kBwdBlockQ) {
        const int64_t mq = std::min(kBwdBlockQ, Nq - i0);
        const acc_t* lse_rows = lse_p + bh * Nq + i0;
        const acc_t* do_rows = dout.rows(b, h, i0);
        for (int64_t r = 0; r < mq; ++r) {  // delta_i = dO_i . O_i
          const scalar_t* o_row = out_p + b * o_sb + h * o_sh + (i0 + r) * o_sn;
          const acc_t* g_row = do_rows + r * dout.ld;
          Vec<acc_t> sum(acc_t(0));
          vector_steps<scalar_t>(0, D, [&](int64_t i, int64_t n) {
            sum += VecIO<scalar_t>::load(o_row + i, n) * Vec<acc_t>::loadu(g_row + i, n);
          });
          delta[r] = at::vec::vec_reduce_all<acc_t>([](const Vec<acc_t>& x, const Vec<acc_t>& y) { return x + y; },
                                                     sum);
        }
        for (int64_t j0 = 0; j0 < Nk; j0 += kBwdBlockK) {
          const int64_t nk = std::min(kBwdBlockK, Nk - j0);
          gemm<acc_t>(false, true, mq, nk, D, sc, q.rows(b, h, i0), q.ld, k.rows(b, h, j0), k.ld, acc_t(0),
                      p.data(), nk);
          for (int64_t r = 0; r < mq; ++r) {
            acc_t* row = p.data() + r * nk;
            const Vec<acc_t> m(lse_rows[r]);
            at::vec::map([&m](Vec<acc_t> s) { return softmax_term(s, m); }, row, row, nk);
          }
          gemm<acc_t>(true, false, nk, D, mq, acc_t(1), p.data(), nk, do_rows, dout.ld, acc_t(1),
                      dv.data() + j0 * D, D);
          gemm<acc_t>(false, true, mq, nk, D, acc_t(1), do_rows, dout.ld, v.rows(b, h, j0), v.ld, acc_t(0),
                      ds.data(), nk);
          for (int64_t r = 0; r < mq; ++r) {
            const Vec<acc_t> dl(delta[r]);
            at::vec::map2([&dl](Vec<acc_t> pp, Vec<acc_t> dp) { return softmax_grad(pp, dp, dl); },
                          ds.data() + r * nk, p.data() + r * nk, ds.data() + r * nk, nk);
          }
          gemm<acc_t>(false, false, mq, D, nk, sc, ds.data(), nk, k.rows(b, h, j0), k.ld, acc_t(j0 > 0 ? 1 : 0),
                      dq.data(), D);
          gemm<acc_t>(true, false, nk, D, mq, sc, ds.data(), nk, q.rows(b, h, i0), q.ld, acc_t(1),
                      dk.data() + j0 * D, D);
        }
        store_rows(gq_p, dq.data(), b, h, i0, mq, a, Nq);
      }
      store_rows(gk_p, dk.data(), b, h, 0, Nk, a, Nk);
      store_rows(gv_p, dv.data(), b, h, 0, Nk, a, Nk);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q,  // (B, H, Nq, D)
                                                 const at::Tensor& k,  // (B, H, Nk, D)
                                                 const at::Tensor& v,  // (B, H, Nk, D)
                                                 double scale) {       // softmax scale, 1 / sqrt(D) usually
  const AttentionArgs a = check_attention_args(q, k, v);
  at::Tensor out = attention_output_like(q);
  at::Tensor lse = at::empty({a.batch, a.heads, a.q_len}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_cpu", [&] {
    attention_fwd_impl<scalar_t>(q, k, v, scale, a, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out_in,  // (B, H, Nq, D), any strides (copied if the head dim's is not 1)
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out,       // the forward's, (B, Nq, H, D) memory
    const at::Tensor& lse,       // (B, H, Nq) accumulation type
    double scale) {
  const AttentionArgs a = check_attention_args(q, k, v);
  const at::Tensor grad_out = head_dim_contiguous(grad_out_in);
  check_attention_saved(grad_out, out, lse, q);
  at::Tensor grad_q = attention_output_like(q);
  at::Tensor grad_k = attention_output_like(k);
  at::Tensor grad_v = attention_output_like(v);
  if (a.batch * a.heads == 0 || a.head_dim == 0) return {grad_q, grad_k, grad_v};
  if (a.q_len == 0) {  // no query: nothing flows to k and v
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    attention_bwd_impl<scalar_t>(grad_out, q, k, v, out, lse, scale, a, grad_q, grad_k, grad_v);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("_attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastdiff::cpu
