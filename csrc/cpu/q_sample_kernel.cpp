// q_sample on the CPU: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, and its VJP.
// Math: csrc/include/fastdiff/schedule_math.h (q_sample_coeffs).
#include <torch/library.h>

#include "cpu_utils.h"
#include "fastdiff/op_checks.h"

namespace fastdiff::cpu {
namespace {

at::Tensor q_sample_cpu(const at::Tensor& x0,     // (B, ...) float
                        const at::Tensor& noise,  // same layout as x0
                        const at::Tensor& t,      // (B,) int64 timesteps
                        const at::Tensor& table) {  // (T, 4) schedule table
  check_q_sample_args(x0, "x0", &noise, t, table);
  const int64_t n = x0.size(0) == 0 ? 0 : x0.numel() / x0.size(0);
  check_timesteps(t, "t", table, false);
  at::Tensor out = at::empty_like(x0);
  if (x0.numel() == 0) return out;
  const int64_t* t_ptr = t.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* tab = table.const_data_ptr<double>();
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    parallel_over_chunks(x0.size(0), n, [&](int64_t b, int64_t begin, int64_t end) {
      const auto c = q_sample_coeffs(tab, t_ptr[b]).template to<acc_t>();
      const Vec a(c.x0), s(c.noise);
      const int64_t base = b * n;
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec v = a * IO::load(x0_p + base + i, len) + s * IO::load(noise_p + base + i, len);
        IO::store(out_p + base + i, v, len);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> q_sample_bwd_cpu(const at::Tensor& grad_out,  // (B, ...)
                                                    const at::Tensor& t,         // (B,) int64
                                                    const at::Tensor& table) {   // (T, 4)
  check_q_sample_args(grad_out, "grad_out", nullptr, t, table);
  const int64_t n = grad_out.size(0) == 0 ? 0 : grad_out.numel() / grad_out.size(0);
  check_timesteps(t, "t", table, false);
  at::Tensor grad_x0 = at::empty_like(grad_out);
  at::Tensor grad_noise = at::empty_like(grad_out);
  if (grad_out.numel() == 0) return {grad_x0, grad_noise};
  const int64_t* t_ptr = t.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "q_sample_bwd_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* tab = table.const_data_ptr<double>();
    const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gx_p = grad_x0.mutable_data_ptr<scalar_t>();
    scalar_t* gn_p = grad_noise.mutable_data_ptr<scalar_t>();
    parallel_over_chunks(grad_out.size(0), n, [&](int64_t b, int64_t begin, int64_t end) {
      const auto c = q_sample_coeffs(tab, t_ptr[b]).template to<acc_t>();
      const Vec a(c.x0), s(c.noise);
      const int64_t base = b * n;
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec g = IO::load(g_p + base + i, len);
        IO::store(gx_p + base + i, a * g, len);
        IO::store(gn_p + base + i, s * g, len);
      });
    });
  });
  return {grad_x0, grad_noise};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("_q_sample_bwd", &q_sample_bwd_cpu);
}

}  // namespace fastdiff::cpu
