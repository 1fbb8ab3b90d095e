// ddim_step on CUDA (DDIMScheduler.step, Song et al. 2021 eq. 12) and its VJP
// to model_output and sample.
// Math: csrc/include/fastdiff/schedule_math.h (ddim_coeffs, ddim_element,
// ddim_element_vjp); mirrors csrc/cpu/ddim_step_kernel.cpp. Grid and packing:
// cuda_utils.cuh.
#include <torch/library.h>

#include "cuda_utils.cuh"

namespace fastdiff::cuda {
namespace {

// Thread 0 of each block computes the sample's coefficients (checking t,
// t_prev, and that noise exists where sigma != 0) into shared memory: derived
// in float64 from the float64 table, then cast to acc_t once (as on the CPU).
// Not inlined: the IEEE division/sqrt slow paths stay out of the element
// loop's register allocation (inlined, ptxas spilled a register in two kernels).
template <typename acc_t>
__device__ __noinline__ void load_ddim_coeffs(DdimCoeffs<acc_t>& out, const double* table,
                                              int64_t t, int64_t t_prev, int64_t num_timesteps,
                                              int prediction_type, double eta, const void* noise,
                                              bool noise_needed_if_sigma) {
  check_timestep(t, num_timesteps, false);
  check_timestep(t_prev, num_timesteps, true);
  const DdimCoeffs<acc_t> c =
      ddim_coeffs(table, t, t_prev, prediction_type, eta).template to<acc_t>();
  // The kernels read noise where the cast sigma != 0: check what they read.
  check_noise(noise, noise_needed_if_sigma && c.sigma != acc_t(0));
  out = c;
}

// One pack of kPack elements per thread; noise is read only where sigma != 0.
template <typename scalar_t, bool kAligned, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
ddim_step_fwd_kernel(const scalar_t* __restrict__ model_output,  // (B, n) prediction
                     const scalar_t* __restrict__ sample,        // (B, n) x_t
                     const scalar_t* __restrict__ noise,         // (B, n) or null when eta == 0
                     const int64_t* __restrict__ t,              // (B,) timesteps in [0, T)
                     const int64_t* __restrict__ t_prev,         // (B,) < 0: alpha_bar_prev = 1
                     const double* __restrict__ table,           // (T, 4) float64 schedule
                     scalar_t* __restrict__ out,                 // (B, n) x_{t_prev}
                     int64_t batch,                              // B
                     int64_t n,                                  // elements per sample
                     int64_t num_timesteps,                      // T
                     int prediction_type,                        // PredictionType
                     double eta,                                 // DDIM eta (0: deterministic)
                     bool clip_sample,                           // clamp x0 to +-range
                     acc_t clip_range,                           // clip_sample_range
                     bool use_clipped) {                         // use_clipped_model_output
  constexpr int N = kPack<scalar_t>;
  __shared__ DdimCoeffs<acc_t> coeffs;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const bool active = i < n;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t off = b * n + i;
    Packed<scalar_t, N> x_raw, m_raw;
    if (active) {  // issued before the coefficients are ready
      x_raw = load_raw<kAligned, N>(sample + off, n - i);
      m_raw = load_raw<kAligned, N>(model_output + off, n - i);
    }
    if (threadIdx.x == 0) {
      load_ddim_coeffs(coeffs, table, t[b], t_prev[b], num_timesteps, prediction_type, eta,
                       noise, true);
    }
    __syncthreads();
    const DdimCoeffs<acc_t> c = coeffs;
    if (active) {
      acc_t xv[N], mv[N], zv[N], r[N];
      widen(x_raw, xv);
      widen(m_raw, mv);
      if (c.sigma != acc_t(0)) {
        load_pack<kAligned>(noise + off, n - i, zv);
      } else {
        zero_pack(zv);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        r[j] = ddim_element(c, clip_sample, clip_range, use_clipped, xv[j], mv[j], zv[j]);
      }
      store_pack<kAligned>(out + off, n - i, r);
    }
    if (b + gridDim.y < batch) __syncthreads();  // coeffs is rewritten next
  }
}

template <typename scalar_t, bool kAligned, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
ddim_step_bwd_kernel(const scalar_t* __restrict__ grad_out,      // (B, n) dL/dout
                     const scalar_t* __restrict__ model_output,  // (B, n) prediction
                     const scalar_t* __restrict__ sample,        // (B, n) x_t
                     const int64_t* __restrict__ t,              // (B,) timesteps in [0, T)
                     const int64_t* __restrict__ t_prev,         // (B,) < 0: alpha_bar_prev = 1
                     const double* __restrict__ table,           // (T, 4) float64 schedule
                     scalar_t* __restrict__ grad_m,              // (B, n) dL/dmodel_output
                     scalar_t* __restrict__ grad_x,              // (B, n) dL/dsample
                     int64_t batch,                              // B
                     int64_t n,                                  // elements per sample
                     int64_t num_timesteps,                      // T
                     int prediction_type,                        // PredictionType
                     double eta,                                 // DDIM eta
                     bool clip_sample,                           // clamp x0 to +-range
                     acc_t clip_range,                           // clip_sample_range
                     bool use_clipped) {                         // use_clipped_model_output
  constexpr int N = kPack<scalar_t>;
  __shared__ DdimCoeffs<acc_t> coeffs;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const bool active = i < n;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t off = b * n + i;
    Packed<scalar_t, N> g_raw, x_raw, m_raw;
    if (active) {  // issued before the coefficients are ready
      g_raw = load_raw<kAligned, N>(grad_out + off, n - i);
      x_raw = load_raw<kAligned, N>(sample + off, n - i);
      m_raw = load_raw<kAligned, N>(model_output + off, n - i);
    }
    if (threadIdx.x == 0) {
      load_ddim_coeffs(coeffs, table, t[b], t_prev[b], num_timesteps, prediction_type, eta,
                       nullptr, false);  // the VJP does not involve noise
    }
    __syncthreads();
    const DdimCoeffs<acc_t> c = coeffs;
    if (active) {
      acc_t gv[N], xv[N], mv[N], gx[N], gm[N];
      widen(g_raw, gv);
      widen(x_raw, xv);
      widen(m_raw, mv);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const DdimGrads<acc_t> r =
            ddim_element_vjp(c, clip_sample, clip_range, use_clipped, xv[j], mv[j], gv[j]);
        gx[j] = r.x;
        gm[j] = r.m;
      }
      store_pack<kAligned>(grad_x + off, n - i, gx);
      store_pack<kAligned>(grad_m + off, n - i, gm);
    }
    if (b + gridDim.y < batch) __syncthreads();
  }
}

// The shared checks; the range of t / t_prev is checked on the device.
int64_t check_ddim_args_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                             const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& table,
                             int64_t prediction_type) {
  check_cuda({{&sample, "sample"}});
  return check_ddim_args(model_output, sample, t, t_prev, table, prediction_type);
}

at::Tensor ddim_step_cuda(const at::Tensor& model_output,          // (B, ...) like sample
                          const at::Tensor& sample,                // (B, ...) x_t
                          const c10::optional<at::Tensor>& noise,  // like sample; needed if eta > 0
                          const at::Tensor& t,                     // (B,) int64
                          const at::Tensor& t_prev,                // (B,) int64, < 0: alpha_bar = 1
                          const at::Tensor& table,                 // (T, 4)
                          int64_t prediction_type, double eta, bool clip_sample,
                          double clip_sample_range, bool use_clipped_model_output) {
  const int64_t n = check_ddim_args_cuda(model_output, sample, t, t_prev, table, prediction_type);
  TORCH_CHECK(eta == 0.0 || noise.has_value(), "fastdiff: ddim_step needs noise when eta > 0");
  if (noise.has_value()) {
    check_cuda({{&*noise, "noise"}});
    check_like(*noise, "noise", sample, "sample");
  }
  at::Tensor out = at::empty_like(sample);
  if (sample.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(sample.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = sample.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(),
                                  "ddim_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x_p = sample.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const dim3 grid = sample_grid(at::ceil_div<int64_t>(n, kThreads * kPack<scalar_t>), batch);
    dispatch_aligned(can_use_packs<scalar_t>(n, {m_p, x_p, noise_p, out_p}), [&](auto aligned) {
      ddim_step_fwd_kernel<scalar_t, decltype(aligned)::value><<<grid, kThreads, 0, stream>>>(
          m_p, x_p, noise_p, t.const_data_ptr<int64_t>(), t_prev.const_data_ptr<int64_t>(),
          table.const_data_ptr<double>(), out_p, batch, n, table.size(0), int(prediction_type),
          eta, clip_sample, acc_t(clip_sample_range), use_clipped_model_output);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ddim_step_bwd_cuda(
    const at::Tensor& grad_out,      // (B, ...) like sample
    const at::Tensor& model_output,  // (B, ...) like sample
    const at::Tensor& sample,        // (B, ...) x_t
    const at::Tensor& t,             // (B,) int64
    const at::Tensor& t_prev,        // (B,) int64, < 0: alpha_bar = 1
    const at::Tensor& table,         // (T, 4)
    int64_t prediction_type, double eta, bool clip_sample, double clip_sample_range,
    bool use_clipped_model_output) {
  const int64_t n = check_ddim_args_cuda(model_output, sample, t, t_prev, table, prediction_type);
  check_cuda({{&grad_out, "grad_out"}});
  check_like(grad_out, "grad_out", sample, "sample");
  at::Tensor grad_m = at::empty_like(model_output);
  at::Tensor grad_x = at::empty_like(sample);
  if (sample.numel() == 0) return {grad_m, grad_x};
  const c10::cuda::CUDAGuard guard(sample.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = sample.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(),
                                  "ddim_step_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x_p = sample.const_data_ptr<scalar_t>();
    scalar_t* gm_p = grad_m.mutable_data_ptr<scalar_t>();
    scalar_t* gx_p = grad_x.mutable_data_ptr<scalar_t>();
    const dim3 grid = sample_grid(at::ceil_div<int64_t>(n, kThreads * kPack<scalar_t>), batch);
    dispatch_aligned(can_use_packs<scalar_t>(n, {g_p, m_p, x_p, gm_p, gx_p}), [&](auto aligned) {
      ddim_step_bwd_kernel<scalar_t, decltype(aligned)::value><<<grid, kThreads, 0, stream>>>(
          g_p, m_p, x_p, t.const_data_ptr<int64_t>(), t_prev.const_data_ptr<int64_t>(),
          table.const_data_ptr<double>(), gm_p, gx_p, batch, n, table.size(0),
          int(prediction_type), eta, clip_sample, acc_t(clip_sample_range),
          use_clipped_model_output);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_m, grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("ddim_step", &ddim_step_cuda);
  m.impl("_ddim_step_bwd", &ddim_step_bwd_cuda);
}

}  // namespace fastdiff::cuda
