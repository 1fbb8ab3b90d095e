// diffusion_loss on the CPU: per-sample (min-SNR weighted) MSE against a
// target built in-kernel, and its VJP. Math: schedule_math.h (loss_coeffs).
// Forward: one pass over (model_output, x0, noise) producing per-(sample,
// chunk) partial sums, then a fixed-order sum per sample (deterministic).
#include <torch/library.h>

#include <vector>

#include "cpu_utils.h"
#include "fastdiff/op_checks.h"

namespace fastdiff::cpu {
namespace {

int64_t check_loss_args_cpu(const at::Tensor& model_output, const at::Tensor& x0,
                            const at::Tensor& noise, const at::Tensor& t, const at::Tensor& table,
                            int64_t prediction_type) {
  const int64_t n = check_loss_args(model_output, x0, noise, t, table, prediction_type);
  check_timesteps(t, "t", table, false);
  return n;
}

std::tuple<at::Tensor, at::Tensor> diffusion_loss_cpu(
    const at::Tensor& model_output,  // (B, ...) float
    const at::Tensor& x0,            // same layout
    const at::Tensor& noise,         // same layout
    const at::Tensor& t,             // (B,) int64
    const at::Tensor& table,         // (T, 4) float64
    int64_t prediction_type,         // PredictionType
    double snr_gamma,                // <= 0: unweighted
    double grad_scale) {             // != 0: also write grad_scale * d loss_b / d model_output
  const int64_t n = check_loss_args_cpu(model_output, x0, noise, t, table, prediction_type);
  const int64_t batch = model_output.size(0);
  const auto acc_type = at::toOpMathType(model_output.scalar_type());
  at::Tensor loss = at::empty({batch}, model_output.options().dtype(acc_type));
  const bool write_grad = grad_scale != 0.0;
  at::Tensor grad = write_grad ? at::empty_like(model_output) : at::empty({0}, model_output.options());
  if (batch == 0) return {loss, grad};
  const int64_t* t_ptr = t.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(),
                                  "diffusion_loss_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* tab = table.const_data_ptr<double>();
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.const_data_ptr<scalar_t>();
    scalar_t* grad_p = write_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t chunks = num_chunks(n);
    std::vector<acc_t> partial(batch * chunks, acc_t(0));
    parallel_over_chunks(batch, n, [&](int64_t b, int64_t begin, int64_t end) {
      const auto c64 = loss_coeffs(tab, t_ptr[b], int(prediction_type), snr_gamma);
      const auto c = c64.template to<acc_t>();
      const bool read_x0 = c.target_x0 != acc_t(0);
      const bool read_noise = c.target_noise != acc_t(0);
      // d loss_b / d m_i = 2 w_b / n (m_i - target_i), times grad_scale.
      const Vec grad_factor(acc_t(grad_scale * 2.0 * c64.weight / double(n)));
      const int64_t base = b * n;
      Vec acc(acc_t(0));
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec zero(acc_t(0));
        const Vec m = IO::load(m_p + base + i, len);
        const Vec xv = read_x0 ? IO::load(x0_p + base + i, len) : zero;
        const Vec nv = read_noise ? IO::load(noise_p + base + i, len) : zero;
        const Vec r = loss_residual(c, m, xv, nv);
        acc = at::vec::fmadd(r, r, acc);  // tail lanes load as 0 and add 0
        if (write_grad) IO::store(grad_p + base + i, grad_factor * r, len);
      });
      partial[b * chunks + begin / kChunk] = at::vec::vec_reduce_all<acc_t>(
          [](Vec& a, Vec& b) { return a + b; }, acc);
    });
    acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < batch; ++b) {
      acc_t sum = 0;
      for (int64_t k = 0; k < chunks; ++k) sum += partial[b * chunks + k];
      const auto c = loss_coeffs(tab, t_ptr[b], int(prediction_type), snr_gamma).template to<acc_t>();
      loss_p[b] = n == 0 ? acc_t(NAN) : c.weight * sum / acc_t(n);
    }
  });
  return {loss, grad};
}

at::Tensor diffusion_loss_bwd_cpu(const at::Tensor& grad_loss,     // (B,) opmath
                                  const at::Tensor& model_output,  // (B, ...)
                                  const at::Tensor& x0, const at::Tensor& noise,
                                  const at::Tensor& t, const at::Tensor& table,
                                  int64_t prediction_type, double snr_gamma) {
  const int64_t n = check_loss_args_cpu(model_output, x0, noise, t, table, prediction_type);
  check_grad_loss(grad_loss, model_output);
  const int64_t batch = model_output.size(0);
  at::Tensor grad_m = at::empty_like(model_output);
  if (model_output.numel() == 0) return grad_m;
  const int64_t* t_ptr = t.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(),
                                  "diffusion_loss_bwd_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* tab = table.const_data_ptr<double>();
    const acc_t* gl_p = grad_loss.const_data_ptr<acc_t>();
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.const_data_ptr<scalar_t>();
    scalar_t* gm_p = grad_m.mutable_data_ptr<scalar_t>();
    parallel_over_chunks(batch, n, [&](int64_t b, int64_t begin, int64_t end) {
      const auto c = loss_coeffs(tab, t_ptr[b], int(prediction_type), snr_gamma).template to<acc_t>();
      const bool read_x0 = c.target_x0 != acc_t(0);
      const bool read_noise = c.target_noise != acc_t(0);
      const Vec scale(acc_t(2) * c.weight * gl_p[b] / acc_t(n));
      const int64_t base = b * n;
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec zero(acc_t(0));
        const Vec m = IO::load(m_p + base + i, len);
        const Vec xv = read_x0 ? IO::load(x0_p + base + i, len) : zero;
        const Vec nv = read_noise ? IO::load(noise_p + base + i, len) : zero;
        IO::store(gm_p + base + i, scale * loss_residual(c, m, xv, nv), len);
      });
    });
  });
  return grad_m;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("diffusion_loss", &diffusion_loss_cpu);
  m.impl("_diffusion_loss_bwd", &diffusion_loss_bwd_cpu);
}

}  // namespace fastdiff::cpu
