// ddim_step on the CPU (DDIMScheduler.step, Song et al. 2021 eq. 12) and its
// VJP to model_output and sample. Math: schedule_math.h (ddim_*).
#include <torch/library.h>

#include "cpu_utils.h"
#include "fastdiff/op_checks.h"

namespace fastdiff::cpu {
namespace {

int64_t check_ddim_args_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                            const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& table,
                            int64_t prediction_type) {
  const int64_t n = check_ddim_args(model_output, sample, t, t_prev, table, prediction_type);
  check_timesteps(t, "t", table, false);
  check_timesteps(t_prev, "t_prev", table, true);
  return n;
}

at::Tensor ddim_step_cpu(const at::Tensor& model_output,          // (B, ...) like sample
                         const at::Tensor& sample,                // (B, ...) x_t
                         const c10::optional<at::Tensor>& noise,  // like sample; needed iff eta > 0
                         const at::Tensor& t,                     // (B,) int64
                         const at::Tensor& t_prev,                // (B,) int64, < 0: alpha_bar = 1
                         const at::Tensor& table,                 // (T, 4)
                         int64_t prediction_type, double eta, bool clip_sample,
                         double clip_sample_range, bool use_clipped_model_output) {
  const int64_t n = check_ddim_args_cpu(model_output, sample, t, t_prev, table, prediction_type);
  TORCH_CHECK(eta == 0.0 || noise.has_value(), "fastdiff: ddim_step needs noise when eta > 0");
  if (noise.has_value()) check_like(*noise, "noise", sample, "sample");
  at::Tensor out = at::empty_like(sample);
  if (sample.numel() == 0) return out;
  const int64_t* t_ptr = t.const_data_ptr<int64_t>();
  const int64_t* tp_ptr = t_prev.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(),
                                  "ddim_step_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* tab = table.const_data_ptr<double>();
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x_p = sample.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const acc_t range = acc_t(clip_sample_range);
    parallel_over_chunks(sample.size(0), n, [&](int64_t b, int64_t begin, int64_t end) {
      const auto c = ddim_coeffs(tab, t_ptr[b], tp_ptr[b], int(prediction_type), eta).template to<acc_t>();
      const bool read_noise = c.sigma != acc_t(0);
      const int64_t base = b * n;
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec x = IO::load(x_p + base + i, len);
        const Vec m = IO::load(m_p + base + i, len);
        const Vec z = read_noise ? IO::load(noise_p + base + i, len) : Vec(acc_t(0));
        IO::store(out_p + base + i,
                  ddim_element(c, clip_sample, range, use_clipped_model_output, x, m, z), len);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ddim_step_bwd_cpu(
    const at::Tensor& grad_out,  // (B, ...) like sample
    const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& t,
    const at::Tensor& t_prev, const at::Tensor& table, int64_t prediction_type, double eta,
    bool clip_sample, double clip_sample_range, bool use_clipped_model_output) {
  const int64_t n = check_ddim_args_cpu(model_output, sample, t, t_prev, table, prediction_type);
  check_like(grad_out, "grad_out", sample, "sample");
  at::Tensor grad_m = at::empty_like(model_output);
  at::Tensor grad_x = at::empty_like(sample);
  if (sample.numel() == 0) return {grad_m, grad_x};
  const int64_t* t_ptr = t.const_data_ptr<int64_t>();
  const int64_t* tp_ptr = t_prev.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(),
                                  "ddim_step_bwd_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const double* tab = table.const_data_ptr<double>();
    const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x_p = sample.const_data_ptr<scalar_t>();
    scalar_t* gm_p = grad_m.mutable_data_ptr<scalar_t>();
    scalar_t* gx_p = grad_x.mutable_data_ptr<scalar_t>();
    const acc_t range = acc_t(clip_sample_range);
    parallel_over_chunks(sample.size(0), n, [&](int64_t b, int64_t begin, int64_t end) {
      const auto c = ddim_coeffs(tab, t_ptr[b], tp_ptr[b], int(prediction_type), eta).template to<acc_t>();
      const int64_t base = b * n;
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec g = IO::load(g_p + base + i, len);
        const Vec x = IO::load(x_p + base + i, len);
        const Vec m = IO::load(m_p + base + i, len);
        const auto r = ddim_element_vjp(c, clip_sample, range, use_clipped_model_output, x, m, g);
        IO::store(gx_p + base + i, r.x, len);
        IO::store(gm_p + base + i, r.m, len);
      });
    });
  });
  return {grad_m, grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("ddim_step", &ddim_step_cpu);
  m.impl("_ddim_step_bwd", &ddim_step_bwd_cpu);
}

}  // namespace fastdiff::cpu
