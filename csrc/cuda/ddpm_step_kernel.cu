// ddpm_step on CUDA (DDPMScheduler.step / improved DDPM's p_sample; Ho et al.
// 2020 eq. 6-7, Nichol & Dhariwal 2021 eq. 15) and its VJP to model_output
// (incl. predicted-variance channels) and sample.
// Math: csrc/include/fastdiff/schedule_math.h (ddpm_coeffs, ddpm_element,
// ddpm_element_vjp); mirrors csrc/cpu/ddpm_step_kernel.cpp. Grid and packing:
// cuda_utils.cuh.
//
// Layout: sample, noise, out are B blocks of n elements; model_output is B
// blocks of m_stride = n elements, or 2n for learned variances (variance_type
// 4/5), the predicted-variance channels at offset n within each block.
#include <torch/library.h>

#include "cuda_utils.cuh"

namespace fastdiff::cuda {
namespace {

// Thread 0 of each block computes the sample's coefficients (checking t and
// t_prev; without noise there is no noise term: the step's mean) into shared
// memory: derived in float64 from the float64 table, then cast to acc_t once
// (as on the CPU).
// Not inlined: the IEEE division/sqrt/log slow paths stay out of the element
// loop's register allocation (inlined, ptxas spilled a register in two kernels).
template <typename acc_t>
__device__ __noinline__ void load_ddpm_coeffs(DdpmCoeffs<acc_t>& out, const double* table,
                                              int64_t t, int64_t t_prev, int64_t num_timesteps,
                                              int prediction_type, int variance_type,
                                              const void* noise) {
  check_timestep(t, num_timesteps, false);
  check_timestep(t_prev, num_timesteps, true);
  DdpmCoeffs<double> c = ddpm_coeffs(table, t, t_prev, prediction_type, variance_type);
  c.add_noise = c.add_noise && noise != nullptr;
  out = c.template to<acc_t>();
}

// One pack of kPack elements per thread. noise is read only where t[b] > 0,
// the variance channels only for learned variances where t[b] > 0.
template <typename scalar_t, bool kAligned, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
ddpm_step_fwd_kernel(const scalar_t* __restrict__ model_output,  // (B, m_stride) prediction
                     const scalar_t* __restrict__ sample,        // (B, n) x_t
                     const scalar_t* __restrict__ noise,         // (B, n) or null: no noise term
                     const int64_t* __restrict__ t,              // (B,) timesteps in [0, T)
                     const int64_t* __restrict__ t_prev,         // (B,) < 0: alpha_bar_prev = 1
                     const double* __restrict__ table,           // (T, 4) float64 schedule
                     scalar_t* __restrict__ out,                 // (B, n) x_{t_prev}
                     int64_t batch,                              // B
                     int64_t n,                                  // elements per sample
                     int64_t m_stride,                           // n, or 2n when learned
                     int64_t num_timesteps,                      // T
                     int prediction_type,                        // PredictionType
                     int variance_type,                          // VarianceType
                     bool clip_sample,                           // clamp x0 to +-range
                     acc_t clip_range) {                         // clip_sample_range
  constexpr int N = kPack<scalar_t>;
  __shared__ DdpmCoeffs<acc_t> coeffs;
  const bool learned = variance_type == kLearned || variance_type == kLearnedRange;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const bool active = i < n;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t off = b * n + i, m_off = b * m_stride + i;
    Packed<scalar_t, N> x_raw, m_raw;
    if (active) {  // issued before the coefficients are ready
      x_raw = load_raw<kAligned, N>(sample + off, n - i);
      m_raw = load_raw<kAligned, N>(model_output + m_off, n - i);
    }
    if (threadIdx.x == 0) {
      load_ddpm_coeffs(coeffs, table, t[b], t_prev[b], num_timesteps, prediction_type,
                       variance_type, noise);
    }
    __syncthreads();
    const DdpmCoeffs<acc_t> c = coeffs;
    if (active) {
      acc_t xv[N], mv[N], vv[N], zv[N], r[N];
      widen(x_raw, xv);
      widen(m_raw, mv);
      if (learned && c.add_noise) {
        load_pack<kAligned>(model_output + m_off + n, n - i, vv);
      } else {
        zero_pack(vv);
      }
      if (c.add_noise) {
        load_pack<kAligned>(noise + off, n - i, zv);
      } else {
        zero_pack(zv);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        r[j] = ddpm_element(c, variance_type, clip_sample, clip_range, xv[j], mv[j], vv[j],
                            zv[j]);
      }
      store_pack<kAligned>(out + off, n - i, r);
    }
    if (b + gridDim.y < batch) __syncthreads();  // coeffs is rewritten next
  }
}

template <typename scalar_t, bool kAligned, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
ddpm_step_bwd_kernel(const scalar_t* __restrict__ grad_out,      // (B, n) dL/dout
                     const scalar_t* __restrict__ model_output,  // (B, m_stride) prediction
                     const scalar_t* __restrict__ sample,        // (B, n) x_t
                     const scalar_t* __restrict__ noise,         // (B, n) or null: no noise term
                     const int64_t* __restrict__ t,              // (B,) timesteps in [0, T)
                     const int64_t* __restrict__ t_prev,         // (B,) < 0: alpha_bar_prev = 1
                     const double* __restrict__ table,           // (T, 4) float64 schedule
                     scalar_t* __restrict__ grad_m,              // (B, m_stride) dL/dmodel_output
                     scalar_t* __restrict__ grad_x,              // (B, n) dL/dsample
                     int64_t batch,                              // B
                     int64_t n,                                  // elements per sample
                     int64_t m_stride,                           // n, or 2n when learned
                     int64_t num_timesteps,                      // T
                     int prediction_type,                        // PredictionType
                     int variance_type,                          // VarianceType
                     bool clip_sample,                           // clamp x0 to +-range
                     acc_t clip_range) {                         // clip_sample_range
  constexpr int N = kPack<scalar_t>;
  __shared__ DdpmCoeffs<acc_t> coeffs;
  const bool learned = variance_type == kLearned || variance_type == kLearnedRange;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const bool active = i < n;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t off = b * n + i, m_off = b * m_stride + i;
    Packed<scalar_t, N> g_raw, x_raw, m_raw;
    if (active) {  // issued before the coefficients are ready
      g_raw = load_raw<kAligned, N>(grad_out + off, n - i);
      x_raw = load_raw<kAligned, N>(sample + off, n - i);
      m_raw = load_raw<kAligned, N>(model_output + m_off, n - i);
    }
    if (threadIdx.x == 0) {
      load_ddpm_coeffs(coeffs, table, t[b], t_prev[b], num_timesteps, prediction_type,
                       variance_type, noise);
    }
    __syncthreads();
    const DdpmCoeffs<acc_t> c = coeffs;
    if (active) {
      const bool var_grad = learned && c.add_noise;
      acc_t gv[N], xv[N], mv[N], vv[N], zv[N], gx[N], gm[N], gvar[N];
      widen(g_raw, gv);
      widen(x_raw, xv);
      widen(m_raw, mv);
      if (var_grad) {
        load_pack<kAligned>(model_output + m_off + n, n - i, vv);
        load_pack<kAligned>(noise + off, n - i, zv);
      } else {
        zero_pack(vv);
        zero_pack(zv);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const DdpmGrads<acc_t> r = ddpm_element_vjp(c, variance_type, clip_sample, clip_range,
                                                    xv[j], mv[j], vv[j], zv[j], gv[j]);
        gx[j] = r.x;
        gm[j] = r.m;
        gvar[j] = r.v;
      }
      store_pack<kAligned>(grad_x + off, n - i, gx);
      store_pack<kAligned>(grad_m + m_off, n - i, gm);
      if (learned) store_pack<kAligned>(grad_m + m_off + n, n - i, gvar);
    }
    if (b + gridDim.y < batch) __syncthreads();
  }
}

// The shared checks; the range of t / t_prev is checked on the device (thread 0
// of each block).
StepArgs check_ddpm_args_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                              const c10::optional<at::Tensor>& noise, const at::Tensor& t,
                              const at::Tensor& t_prev, const at::Tensor& table,
                              int64_t prediction_type, int64_t variance_type) {
  check_cuda({{&sample, "sample"}});
  return check_ddpm_args(model_output, sample, noise, t, t_prev, table, prediction_type,
                         variance_type);
}

at::Tensor ddpm_step_cuda(const at::Tensor& model_output,          // (B, C|2C, ...)
                          const at::Tensor& sample,                // (B, C, ...) x_t
                          const c10::optional<at::Tensor>& noise,  // like sample; None: the mean
                          const at::Tensor& t,                     // (B,) int64
                          const at::Tensor& t_prev,                // (B,) int64, < 0: alpha_bar = 1
                          const at::Tensor& table,                 // (T, 4)
                          int64_t prediction_type, int64_t variance_type, bool clip_sample,
                          double clip_sample_range) {
  const StepArgs a = check_ddpm_args_cuda(model_output, sample, noise, t, t_prev, table,
                                     prediction_type, variance_type);
  at::Tensor out = at::empty_like(sample);
  if (sample.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(sample.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = sample.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(),
                                  "ddpm_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x_p = sample.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const dim3 grid = sample_grid(at::ceil_div<int64_t>(a.n, kThreads * kPack<scalar_t>), batch);
    dispatch_aligned(can_use_packs<scalar_t>(a.n, {m_p, x_p, noise_p, out_p}), [&](auto aligned) {
      ddpm_step_fwd_kernel<scalar_t, decltype(aligned)::value><<<grid, kThreads, 0, stream>>>(
          m_p, x_p, noise_p, t.const_data_ptr<int64_t>(), t_prev.const_data_ptr<int64_t>(),
          table.const_data_ptr<double>(), out_p, batch, a.n, a.m_stride, table.size(0),
          int(prediction_type), int(variance_type), clip_sample, acc_t(clip_sample_range));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_bwd_cuda(
    const at::Tensor& grad_out,              // (B, C, ...) like sample
    const at::Tensor& model_output,          // (B, C|2C, ...)
    const at::Tensor& sample,                // (B, C, ...) x_t
    const c10::optional<at::Tensor>& noise,  // like sample; None: the mean
    const at::Tensor& t,                     // (B,) int64
    const at::Tensor& t_prev,                // (B,) int64, < 0: alpha_bar = 1
    const at::Tensor& table,                 // (T, 4)
    int64_t prediction_type, int64_t variance_type, bool clip_sample,
    double clip_sample_range) {
  const StepArgs a = check_ddpm_args_cuda(model_output, sample, noise, t, t_prev, table,
                                     prediction_type, variance_type);
  check_cuda({{&grad_out, "grad_out"}});
  check_like(grad_out, "grad_out", sample, "sample");
  at::Tensor grad_m = at::empty_like(model_output);
  at::Tensor grad_x = at::empty_like(sample);
  if (sample.numel() == 0) return {grad_m, grad_x};
  const c10::cuda::CUDAGuard guard(sample.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = sample.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(),
                                  "ddpm_step_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x_p = sample.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gm_p = grad_m.mutable_data_ptr<scalar_t>();
    scalar_t* gx_p = grad_x.mutable_data_ptr<scalar_t>();
    const dim3 grid = sample_grid(at::ceil_div<int64_t>(a.n, kThreads * kPack<scalar_t>), batch);
    const bool aligned = can_use_packs<scalar_t>(a.n, {g_p, m_p, x_p, noise_p, gm_p, gx_p});
    dispatch_aligned(aligned, [&](auto al) {
      ddpm_step_bwd_kernel<scalar_t, decltype(al)::value><<<grid, kThreads, 0, stream>>>(
          g_p, m_p, x_p, noise_p, t.const_data_ptr<int64_t>(), t_prev.const_data_ptr<int64_t>(),
          table.const_data_ptr<double>(), gm_p, gx_p, batch, a.n, a.m_stride, table.size(0),
          int(prediction_type), int(variance_type), clip_sample, acc_t(clip_sample_range));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_m, grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("_ddpm_step_bwd", &ddpm_step_bwd_cuda);
}

}  // namespace fastdiff::cuda
