// ddpm_step on the CPU (DDPMScheduler.step / improved DDPM's p_sample) and its
// VJP to model_output (incl. predicted-variance channels) and sample.
// Math: schedule_math.h (ddpm_coeffs, ddpm_element, ddpm_element_vjp).
#include <torch/library.h>

#include "cpu_utils.h"
#include "fastdiff/op_checks.h"

namespace fastdiff::cpu {
namespace {

// The shared checks plus the data-dependent ones (range of t, noise where t > 0).
StepArgs check_ddpm_args_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                             const c10::optional<at::Tensor>& noise, const at::Tensor& t,
                             const at::Tensor& t_prev, const at::Tensor& table,
                             int64_t prediction_type, int64_t variance_type) {
  const StepArgs a = check_ddpm_args(model_output, sample, noise, t, t_prev, table,
                                     prediction_type, variance_type);
  check_timesteps(t, "t", table, false);
  check_timesteps(t_prev, "t_prev", table, true);
  return a;
}

at::Tensor ddpm_step_cpu(const at::Tensor& model_output,           // (B, C|2C, ...)
                         const at::Tensor& sample,                 // (B, C, ...) x_t
                         const c10::optional<at::Tensor>& noise,   // like sample; None: the mean (no noise term)
                         const at::Tensor& t,                      // (B,) int64
                         const at::Tensor& t_prev,                 // (B,) int64, < 0: alpha_bar = 1
                         const at::Tensor& table,                  // (T, 4)
                         int64_t prediction_type, int64_t variance_type, bool clip_sample,
                         double clip_sample_range) {
  const StepArgs a = check_ddpm_args_cpu(model_output, sample, noise, t, t_prev, table,
                                         prediction_type, variance_type);
  at::Tensor out = at::empty_like(sample);
  if (sample.numel() == 0) return out;
  const int64_t* t_ptr = t.const_data_ptr<int64_t>();
  const int64_t* tp_ptr = t_prev.const_data_ptr<int64_t>();
  const bool learned = is_learned(variance_type);
  const int vt = int(variance_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(),
                                  "ddpm_step_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* tab = table.const_data_ptr<double>();
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x_p = sample.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const acc_t range = acc_t(clip_sample_range);
    parallel_over_chunks(sample.size(0), a.n, [&](int64_t b, int64_t begin, int64_t end) {
      auto c = ddpm_coeffs(tab, t_ptr[b], tp_ptr[b], int(prediction_type), vt).template to<acc_t>();
      c.add_noise = c.add_noise && noise_p != nullptr;
      const int64_t base = b * a.n, m_base = b * a.m_stride;
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec zero(acc_t(0));
        const Vec x = IO::load(x_p + base + i, len);
        const Vec m = IO::load(m_p + m_base + i, len);
        const Vec v = (learned && c.add_noise) ? IO::load(m_p + m_base + a.n + i, len) : zero;
        const Vec z = c.add_noise ? IO::load(noise_p + base + i, len) : zero;
        IO::store(out_p + base + i, ddpm_element(c, vt, clip_sample, range, x, m, v, z), len);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_bwd_cpu(
    const at::Tensor& grad_out,  // (B, C, ...) like sample
    const at::Tensor& model_output, const at::Tensor& sample,
    const c10::optional<at::Tensor>& noise, const at::Tensor& t, const at::Tensor& t_prev,
    const at::Tensor& table, int64_t prediction_type, int64_t variance_type, bool clip_sample,
    double clip_sample_range) {
  const StepArgs a = check_ddpm_args_cpu(model_output, sample, noise, t, t_prev, table,
                                         prediction_type, variance_type);
  check_like(grad_out, "grad_out", sample, "sample");
  at::Tensor grad_m = at::empty_like(model_output);
  at::Tensor grad_x = at::empty_like(sample);
  if (sample.numel() == 0) return {grad_m, grad_x};
  const int64_t* t_ptr = t.const_data_ptr<int64_t>();
  const int64_t* tp_ptr = t_prev.const_data_ptr<int64_t>();
  const bool learned = is_learned(variance_type);
  const int vt = int(variance_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(),
                                  "ddpm_step_bwd_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* tab = table.const_data_ptr<double>();
    const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x_p = sample.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gm_p = grad_m.mutable_data_ptr<scalar_t>();
    scalar_t* gx_p = grad_x.mutable_data_ptr<scalar_t>();
    const acc_t range = acc_t(clip_sample_range);
    parallel_over_chunks(sample.size(0), a.n, [&](int64_t b, int64_t begin, int64_t end) {
      auto c = ddpm_coeffs(tab, t_ptr[b], tp_ptr[b], int(prediction_type), vt).template to<acc_t>();
      c.add_noise = c.add_noise && noise_p != nullptr;
      const int64_t base = b * a.n, m_base = b * a.m_stride;
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec zero(acc_t(0));
        const Vec g = IO::load(g_p + base + i, len);
        const Vec x = IO::load(x_p + base + i, len);
        const Vec m = IO::load(m_p + m_base + i, len);
        const bool var_grad = learned && c.add_noise;
        const Vec v = var_grad ? IO::load(m_p + m_base + a.n + i, len) : zero;
        const Vec z = var_grad ? IO::load(noise_p + base + i, len) : zero;
        const auto r = ddpm_element_vjp(c, vt, clip_sample, range, x, m, v, z, g);
        IO::store(gx_p + base + i, r.x, len);
        IO::store(gm_p + m_base + i, r.m, len);
        if (learned) IO::store(gm_p + m_base + a.n + i, r.v, len);
      });
    });
  });
  return {grad_m, grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("_ddpm_step_bwd", &ddpm_step_bwd_cpu);
}

}  // namespace fastdiff::cpu
