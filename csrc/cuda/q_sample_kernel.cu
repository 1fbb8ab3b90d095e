// q_sample on CUDA: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, and its VJP
// (d x0 = sqrt(ab_t) g, d noise = sqrt(1 - ab_t) g). Ho et al. 2020, eq. 4.
// Math: csrc/include/fastdiff/schedule_math.h (q_sample_coeffs); mirrors
// csrc/cpu/q_sample_kernel.cpp. Grid and packing: cuda_utils.cuh.
#include <torch/library.h>

#include "cuda_utils.cuh"

namespace fastdiff::cuda {
namespace {

// One pack of kPack elements per thread; block (x, y) covers elements
// [x * kThreads * kPack, ...) of sample y (and y + gridDim.y, ...).
template <typename scalar_t, bool kAligned, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
q_sample_fwd_kernel(const scalar_t* __restrict__ x0,     // (B, n) clean data
                    const scalar_t* __restrict__ noise,  // (B, n) Gaussian noise
                    const int64_t* __restrict__ t,       // (B,) timesteps in [0, T)
                    const double* __restrict__ table,    // (T, 4) float64 schedule table
                    scalar_t* __restrict__ out,          // (B, n) x_t
                    int64_t batch,                       // B
                    int64_t n,                           // elements per sample
                    int64_t num_timesteps) {             // T
  constexpr int N = kPack<scalar_t>;
  __shared__ QSampleCoeffs<acc_t> coeffs;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const bool active = i < n;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t off = b * n + i;
    Packed<scalar_t, N> x_raw, z_raw;
    if (active) {  // issued before the coefficients are ready
      x_raw = load_raw<kAligned, N>(x0 + off, n - i);
      z_raw = load_raw<kAligned, N>(noise + off, n - i);
    }
    if (threadIdx.x == 0) {
      check_timestep(t[b], num_timesteps, false);
      coeffs = q_sample_coeffs(table, t[b]).template to<acc_t>();
    }
    __syncthreads();
    const QSampleCoeffs<acc_t> c = coeffs;
    if (active) {
      acc_t xv[N], zv[N], r[N];
      widen(x_raw, xv);
      widen(z_raw, zv);
#pragma unroll
      for (int j = 0; j < N; ++j) r[j] = c.x0 * xv[j] + c.noise * zv[j];
      store_pack<kAligned>(out + off, n - i, r);
    }
    if (b + gridDim.y < batch) __syncthreads();  // coeffs is rewritten next
  }
}

template <typename scalar_t, bool kAligned, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
q_sample_bwd_kernel(const scalar_t* __restrict__ grad_out,  // (B, n) dL/dx_t
                    const int64_t* __restrict__ t,          // (B,) timesteps in [0, T)
                    const double* __restrict__ table,       // (T, 4) float64 schedule table
                    scalar_t* __restrict__ grad_x0,         // (B, n) dL/dx0
                    scalar_t* __restrict__ grad_noise,      // (B, n) dL/dnoise
                    int64_t batch,                          // B
                    int64_t n,                              // elements per sample
                    int64_t num_timesteps) {                // T
  constexpr int N = kPack<scalar_t>;
  __shared__ QSampleCoeffs<acc_t> coeffs;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const bool active = i < n;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t off = b * n + i;
    Packed<scalar_t, N> g_raw;
    if (active) g_raw = load_raw<kAligned, N>(grad_out + off, n - i);
    if (threadIdx.x == 0) {
      check_timestep(t[b], num_timesteps, false);
      coeffs = q_sample_coeffs(table, t[b]).template to<acc_t>();
    }
    __syncthreads();
    const QSampleCoeffs<acc_t> c = coeffs;
    if (active) {
      acc_t g[N], gx[N], gn[N];
      widen(g_raw, g);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        gx[j] = c.x0 * g[j];
        gn[j] = c.noise * g[j];
      }
      store_pack<kAligned>(grad_x0 + off, n - i, gx);
      store_pack<kAligned>(grad_noise + off, n - i, gn);
    }
    if (b + gridDim.y < batch) __syncthreads();
  }
}

at::Tensor q_sample_cuda(const at::Tensor& x0,       // (B, ...) float
                         const at::Tensor& noise,    // same layout as x0
                         const at::Tensor& t,        // (B,) int64 timesteps
                         const at::Tensor& table) {  // (T, 4) float64 schedule table
  check_cuda({{&x0, "x0"}});
  check_q_sample_args(x0, "x0", &noise, t, table);
  const int64_t n = x0.size(0) == 0 ? 0 : x0.numel() / x0.size(0);
  at::Tensor out = at::empty_like(x0);
  if (x0.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x0.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = x0.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cuda", [&] {
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const dim3 grid = sample_grid(at::ceil_div<int64_t>(n, kThreads * kPack<scalar_t>), batch);
    dispatch_aligned(can_use_packs<scalar_t>(n, {x0_p, noise_p, out_p}), [&](auto aligned) {
      q_sample_fwd_kernel<scalar_t, decltype(aligned)::value><<<grid, kThreads, 0, stream>>>(
          x0_p, noise_p, t.const_data_ptr<int64_t>(), table.const_data_ptr<double>(), out_p,
          batch, n, table.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> q_sample_bwd_cuda(const at::Tensor& grad_out,  // (B, ...)
                                                     const at::Tensor& t,         // (B,) int64
                                                     const at::Tensor& table) {   // (T, 4)
  check_cuda({{&grad_out, "grad_out"}});
  check_q_sample_args(grad_out, "grad_out", nullptr, t, table);
  const int64_t n = grad_out.size(0) == 0 ? 0 : grad_out.numel() / grad_out.size(0);
  at::Tensor grad_x0 = at::empty_like(grad_out);
  at::Tensor grad_noise = at::empty_like(grad_out);
  if (grad_out.numel() == 0) return {grad_x0, grad_noise};
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = grad_out.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "q_sample_bwd_cuda", [&] {
    const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gx_p = grad_x0.mutable_data_ptr<scalar_t>();
    scalar_t* gn_p = grad_noise.mutable_data_ptr<scalar_t>();
    const dim3 grid = sample_grid(at::ceil_div<int64_t>(n, kThreads * kPack<scalar_t>), batch);
    dispatch_aligned(can_use_packs<scalar_t>(n, {g_p, gx_p, gn_p}), [&](auto aligned) {
      q_sample_bwd_kernel<scalar_t, decltype(aligned)::value><<<grid, kThreads, 0, stream>>>(
          g_p, t.const_data_ptr<int64_t>(), table.const_data_ptr<double>(), gx_p, gn_p, batch,
          n, table.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x0, grad_noise};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("_q_sample_bwd", &q_sample_bwd_cuda);
}

}  // namespace fastdiff::cuda
