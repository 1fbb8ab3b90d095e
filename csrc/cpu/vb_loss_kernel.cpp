// vb_loss on the CPU: the per-sample diffusion VLB term (KL to the true
// posterior for t > 0, decoder NLL for t == 0) in one pass over (model_mean,
// model_log_variance, x0, x_t), and its VJP in one pass. Math: vlb_math.h.
// Each sample runs only its own branch (the eager form computes both
// everywhere and selects). Per-sample sums: the fixed (sample, chunk) split
// of cpu_utils.h and a fixed-order second stage (deterministic).
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_utils.h"
#include "fastdiff/op_checks.h"
#include "fastdiff/vlb_math.h"

namespace fastdiff::cpu {
namespace {

int64_t check_vb_loss_args_cpu(const at::Tensor& model_mean, const at::Tensor& model_log_variance,
                               const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& t,
                               const at::Tensor& posterior) {
  const int64_t n = check_vb_loss_args(model_mean, model_log_variance, x0, x_t, t, posterior);
  check_timesteps(t, "t", posterior, false);
  return n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vb_loss_cpu(
    const at::Tensor& model_mean,          // (B, ...) float
    const at::Tensor& model_log_variance,  // same layout
    const at::Tensor& x0, const at::Tensor& x_t,
    const at::Tensor& t,                   // (B,) int64
    const at::Tensor& posterior,           // (T, 4) float64
    double grad_scale) {                   // != 0: also write grad_scale * d loss_b / d inputs
  const int64_t n = check_vb_loss_args_cpu(model_mean, model_log_variance, x0, x_t, t, posterior);
  const int64_t batch = model_mean.size(0);
  at::Tensor loss = at::empty({batch}, model_mean.options().dtype(at::toOpMathType(model_mean.scalar_type())));
  const bool write_grad = grad_scale != 0.0;
  at::Tensor grad_m = write_grad ? at::empty_like(model_mean) : at::empty({0}, model_mean.options());
  at::Tensor grad_lv = write_grad ? at::empty_like(model_mean) : at::empty({0}, model_mean.options());
  if (batch == 0) return {loss, grad_m, grad_lv};
  const int64_t* t_ptr = t.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_mean.scalar_type(), "vb_loss_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* post = posterior.const_data_ptr<double>();
    const scalar_t* m_p = model_mean.const_data_ptr<scalar_t>();
    const scalar_t* lv_p = model_log_variance.const_data_ptr<scalar_t>();
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* xt_p = x_t.const_data_ptr<scalar_t>();
    scalar_t* gm_p = write_grad ? grad_m.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* glv_p = write_grad ? grad_lv.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t chunks = num_chunks(n);
    std::vector<acc_t> partial(batch * chunks, acc_t(0));
    // d loss_b / d term_i = 1 / (n log 2)
    const Vec g(acc_t(grad_scale / (double(n) * M_LN2)));
    parallel_over_chunks(batch, n, [&](int64_t b, int64_t begin, int64_t end) {
      const auto c = vlb_coeffs(post, t_ptr[b]).template to<acc_t>();
      const int64_t base = b * n;
      const Vec zero(acc_t(0));
      Vec acc(zero);
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec m = IO::load(m_p + base + i, len);
        const Vec lv = IO::load(lv_p + base + i, len);
        const Vec x = IO::load(x0_p + base + i, len);
        Vec term;
        if (write_grad) {
          const auto r = c.decoder ? vlb_decoder_nll_with_grad(m, lv, x, g)
                                   : vlb_kl_with_grad(c, m, lv, x, IO::load(xt_p + base + i, len), g);
          IO::store(gm_p + base + i, r.m, len);
          IO::store(glv_p + base + i, r.lv, len);
          term = r.value;
        } else {
          term = c.decoder ? vlb_decoder_nll(m, lv, x) : vlb_kl(c, m, lv, x, IO::load(xt_p + base + i, len));
        }
        // tail lanes hold the term of zeros, which is not zero: keep the first len
        acc = acc + (len == IO::kSize ? term : Vec::set(zero, term, len));
      });
      partial[b * chunks + begin / kChunk] =
          at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, acc);
    });
    acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < batch; ++b) {
      acc_t sum = 0;
      for (int64_t k = 0; k < chunks; ++k) sum += partial[b * chunks + k];
      loss_p[b] = n == 0 ? acc_t(NAN) : acc_t(double(sum) / (double(n) * M_LN2));
    }
  });
  return {loss, grad_m, grad_lv};
}

std::tuple<at::Tensor, at::Tensor> vb_loss_bwd_cpu(
    const at::Tensor& grad_loss,  // (B,) opmath
    const at::Tensor& model_mean, const at::Tensor& model_log_variance, const at::Tensor& x0,
    const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& posterior) {
  const int64_t n = check_vb_loss_args_cpu(model_mean, model_log_variance, x0, x_t, t, posterior);
  check_grad_loss(grad_loss, model_mean);
  at::Tensor grad_m = at::empty_like(model_mean);
  at::Tensor grad_lv = at::empty_like(model_mean);
  if (model_mean.numel() == 0) return {grad_m, grad_lv};
  const int64_t* t_ptr = t.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_mean.scalar_type(), "vb_loss_bwd_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* post = posterior.const_data_ptr<double>();
    const acc_t* gl_p = grad_loss.const_data_ptr<acc_t>();
    const scalar_t* m_p = model_mean.const_data_ptr<scalar_t>();
    const scalar_t* lv_p = model_log_variance.const_data_ptr<scalar_t>();
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* xt_p = x_t.const_data_ptr<scalar_t>();
    scalar_t* gm_p = grad_m.mutable_data_ptr<scalar_t>();
    scalar_t* glv_p = grad_lv.mutable_data_ptr<scalar_t>();
    parallel_over_chunks(model_mean.size(0), n, [&](int64_t b, int64_t begin, int64_t end) {
      const auto c = vlb_coeffs(post, t_ptr[b]).template to<acc_t>();
      const Vec g(acc_t(double(gl_p[b]) / (double(n) * M_LN2)));
      const int64_t base = b * n;
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec m = IO::load(m_p + base + i, len);
        const Vec lv = IO::load(lv_p + base + i, len);
        const Vec x = IO::load(x0_p + base + i, len);
        const auto r = c.decoder ? vlb_decoder_nll_with_grad(m, lv, x, g)
                                 : vlb_kl_with_grad(c, m, lv, x, IO::load(xt_p + base + i, len), g);
        IO::store(gm_p + base + i, r.m, len);
        IO::store(glv_p + base + i, r.lv, len);
      });
    });
  });
  return {grad_m, grad_lv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("vb_loss", &vb_loss_cpu);
  m.impl("_vb_loss_bwd", &vb_loss_bwd_cpu);
}

}  // namespace fastdiff::cpu
