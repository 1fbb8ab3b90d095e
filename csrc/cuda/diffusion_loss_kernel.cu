// diffusion_loss on CUDA: per-sample (min-SNR weighted) MSE against a target
// built in-kernel, L_b = w_b / n * sum_i (m_i - target_i)^2, and its VJP
// d m_i = 2 w_b / n * dL_b * (m_i - target_i).
// Math: csrc/include/fastdiff/schedule_math.h (loss_coeffs, loss_residual);
// mirrors csrc/cpu/diffusion_loss_kernel.cpp. Grid and packing: cuda_utils.cuh.
//
// Forward, deterministic (no atomics): stage 1 writes one partial sum of the
// squared residual per (sample, chunk of kLossChunk elements); the chunk count
// depends only on n and each block reduces in a fixed order. Stage 2 sums each
// sample's partials in chunk order and applies w_b / n.
//
// With grad_scale != 0 stage 1 also writes grad_m = grad_scale * 2 w_b / n *
// (m - target) from the residuals it already has (MSE's gradient is known in
// the forward), so the autograd backward only rescales it; the separate
// backward kernel below remains the fallback.
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <tuple>

#include "cuda_utils.cuh"

namespace fastdiff::cuda {
namespace {

// Elements per block of the forward reduction, for every dtype and GPU.
constexpr int64_t kLossChunk = 4096;

// Stage 1. Thread k of a block accumulates, in order, the packs at
// chunk_begin + (p * kThreads + k) * kPack for p = 0 .. kPacks - 1; the block
// then sums its threads with cub::BlockReduce (a fixed shuffle tree).
// kWriteGrad: also store grad_m = grad_scale * 2 w_b / n * residual, the factor
// computed once per sample by thread 0 (in float64, rounded to acc_t, as on
// the CPU); residuals and products are acc_t. Without it grad_m and
// grad_scale are unused and the kernel is the plain loss reduction.
template <typename scalar_t, bool kAligned, bool kWriteGrad,
          typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
diffusion_loss_partial_kernel(const scalar_t* __restrict__ model_output,  // (B, n) prediction
                              const scalar_t* __restrict__ x0,            // (B, n) clean data
                              const scalar_t* __restrict__ noise,         // (B, n) noise
                              const int64_t* __restrict__ t,              // (B,) timesteps
                              const double* __restrict__ table,           // (T, 4) float64
                              acc_t* __restrict__ partial,                // (B, gridDim.x) sums
                              scalar_t* __restrict__ grad_m,              // (B, n) or unused
                              int64_t batch,                              // B
                              int64_t n,                                  // elements per sample
                              int64_t num_timesteps,                      // T
                              int prediction_type,                        // PredictionType
                              double snr_gamma,                           // <= 0: unweighted
                              double grad_scale) {                        // kWriteGrad only
  constexpr int N = kPack<scalar_t>;
  constexpr int kPacks = int(kLossChunk / (kThreads * N));
  static_assert(kPacks * kThreads * N == kLossChunk, "kLossChunk must be whole packs");
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ LossCoeffs<acc_t> coeffs;
  __shared__ acc_t grad_factor;  // kWriteGrad only (dropped otherwise)
  const int64_t chunk_begin = int64_t(blockIdx.x) * kLossChunk;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    // model_output is always read: its loads are issued before the coefficients are ready.
    Packed<scalar_t, N> m_raw[kPacks];
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int64_t i = chunk_begin + (int64_t(p) * kThreads + threadIdx.x) * N;
      if (i < n) m_raw[p] = load_raw<kAligned, N>(model_output + b * n + i, n - i);
    }
    if (threadIdx.x == 0) {
      check_timestep(t[b], num_timesteps, false);
      const LossCoeffs<double> c64 = loss_coeffs(table, t[b], prediction_type, snr_gamma);
      coeffs = c64.template to<acc_t>();
      if constexpr (kWriteGrad) {  // in float64, then rounded once (as on the CPU)
        grad_factor = acc_t(grad_scale * 2.0 * c64.weight / double(n));
      }
    }
    __syncthreads();
    const LossCoeffs<acc_t> c = coeffs;
    // As on the CPU: an input whose target coefficient is 0 is never read.
    const bool read_x0 = c.target_x0 != acc_t(0);
    const bool read_noise = c.target_noise != acc_t(0);
    acc_t acc = acc_t(0);
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int64_t i = chunk_begin + (int64_t(p) * kThreads + threadIdx.x) * N;
      if (i < n) {
        const int64_t off = b * n + i;
        acc_t mv[N], xv[N], zv[N];
        widen(m_raw[p], mv);
        if (read_x0) {
          load_pack<kAligned>(x0 + off, n - i, xv);
        } else {
          zero_pack(xv);
        }
        if (read_noise) {
          load_pack<kAligned>(noise + off, n - i, zv);
        } else {
          zero_pack(zv);
        }
        acc_t r[N];
#pragma unroll
        for (int j = 0; j < N; ++j) {
          r[j] = loss_residual(c, mv[j], xv[j], zv[j]);  // 0 past n
          acc = r[j] * r[j] + acc;
        }
        if constexpr (kWriteGrad) {
          const acc_t s = grad_factor;
#pragma unroll
          for (int j = 0; j < N; ++j) r[j] = s * r[j];
          store_pack<kAligned>(grad_m + off, n - i, r);
        }
      }
    }
    const acc_t sum = BlockReduce(reduce_storage).Sum(acc);
    if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sum;
    if (b + gridDim.y < batch) __syncthreads();  // coeffs, grad_factor, reduce_storage reused
  }
}

// Stage 2: one thread per sample sums its partials in chunk order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
diffusion_loss_finalize_kernel(const acc_t* __restrict__ partial,  // (B, chunks) stage-1 sums
                               const int64_t* __restrict__ t,      // (B,) timesteps
                               const double* __restrict__ table,   // (T, 4) float64 schedule
                               acc_t* __restrict__ loss,           // (B,) per-sample loss
                               int64_t batch,                      // B
                               int64_t chunks,                     // partials per sample
                               int64_t n,                          // elements per sample (> 0)
                               int prediction_type,                // PredictionType
                               double snr_gamma) {                 // <= 0: unweighted
  const int64_t b = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  const acc_t* row = partial + b * chunks;
  acc_t sum = acc_t(0);
  for (int64_t k = 0; k < chunks; ++k) sum += row[k];
  const LossCoeffs<acc_t> c =
      loss_coeffs(table, t[b], prediction_type, snr_gamma).template to<acc_t>();
  loss[b] = c.weight * sum / acc_t(n);
}

// grad_m = 2 w_b dL_b / n * (m - target), one pack per thread.
template <typename scalar_t, bool kAligned, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
diffusion_loss_bwd_kernel(const acc_t* __restrict__ grad_loss,        // (B,) dL/dloss_b
                          const scalar_t* __restrict__ model_output,  // (B, n) prediction
                          const scalar_t* __restrict__ x0,            // (B, n) clean data
                          const scalar_t* __restrict__ noise,         // (B, n) noise
                          const int64_t* __restrict__ t,              // (B,) timesteps
                          const double* __restrict__ table,           // (T, 4) float64
                          scalar_t* __restrict__ grad_m,              // (B, n) dL/dmodel_output
                          int64_t batch,                              // B
                          int64_t n,                                  // elements per sample
                          int64_t num_timesteps,                      // T
                          int prediction_type,                        // PredictionType
                          double snr_gamma) {                         // <= 0: unweighted
  constexpr int N = kPack<scalar_t>;
  __shared__ LossCoeffs<acc_t> coeffs;
  __shared__ acc_t scale;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const bool active = i < n;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t off = b * n + i;
    Packed<scalar_t, N> m_raw;
    if (active) m_raw = load_raw<kAligned, N>(model_output + off, n - i);
    if (threadIdx.x == 0) {
      check_timestep(t[b], num_timesteps, false);
      const LossCoeffs<acc_t> cb =
          loss_coeffs(table, t[b], prediction_type, snr_gamma).template to<acc_t>();
      coeffs = cb;
      scale = acc_t(2) * cb.weight * grad_loss[b] / acc_t(n);
    }
    __syncthreads();
    const LossCoeffs<acc_t> c = coeffs;
    const acc_t s = scale;
    if (active) {
      acc_t mv[N], xv[N], zv[N], r[N];
      widen(m_raw, mv);
      if (c.target_x0 != acc_t(0)) {
        load_pack<kAligned>(x0 + off, n - i, xv);
      } else {
        zero_pack(xv);
      }
      if (c.target_noise != acc_t(0)) {
        load_pack<kAligned>(noise + off, n - i, zv);
      } else {
        zero_pack(zv);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) r[j] = s * loss_residual(c, mv[j], xv[j], zv[j]);
      store_pack<kAligned>(grad_m + off, n - i, r);
    }
    if (b + gridDim.y < batch) __syncthreads();
  }
}

// The shared checks; the range of t is checked on the device (thread 0 of each block).
int64_t check_loss_args_cuda(const at::Tensor& model_output, const at::Tensor& x0,
                             const at::Tensor& noise, const at::Tensor& t, const at::Tensor& table,
                             int64_t prediction_type) {
  check_cuda({{&model_output, "model_output"}});
  return check_loss_args(model_output, x0, noise, t, table, prediction_type);
}

// Returns (loss (B,) in opmath, grad_m): grad_m = grad_scale * d loss_b / d model_output
// (model_output's dtype and layout) when grad_scale != 0, else an empty (0,) tensor.
std::tuple<at::Tensor, at::Tensor> diffusion_loss_cuda(
    const at::Tensor& model_output,  // (B, ...) float
    const at::Tensor& x0,            // same layout
    const at::Tensor& noise,         // same layout
    const at::Tensor& t,             // (B,) int64
    const at::Tensor& table,         // (T, 4)
    int64_t prediction_type,         // PredictionType
    double snr_gamma,                // <= 0: unweighted
    double grad_scale) {             // 0: no gradient
  const int64_t n = check_loss_args_cuda(model_output, x0, noise, t, table, prediction_type);
  const int64_t batch = model_output.size(0);
  const auto acc_type = at::toOpMathType(model_output.scalar_type());
  const bool write_grad = grad_scale != 0.0;
  at::Tensor loss = at::empty({batch}, model_output.options().dtype(acc_type));
  at::Tensor grad_m =
      write_grad ? at::empty_like(model_output) : at::empty({0}, model_output.options());
  if (batch == 0) return {loss, grad_m};
  if (n == 0) return {loss.fill_(NAN), grad_m};  // mean over no elements, as on the CPU
  const c10::cuda::CUDAGuard guard(model_output.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunks = at::ceil_div(n, kLossChunk);
  at::Tensor partial = at::empty({batch, chunks}, loss.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(),
                                  "diffusion_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.const_data_ptr<scalar_t>();
    const int64_t* t_p = t.const_data_ptr<int64_t>();
    const double* tab = table.const_data_ptr<double>();
    acc_t* partial_p = partial.mutable_data_ptr<acc_t>();
    scalar_t* gm_p = write_grad ? grad_m.mutable_data_ptr<scalar_t>() : nullptr;
    const dim3 grid = sample_grid(chunks, batch);
    // gm_p is nullptr (ignored by can_use_packs) when no gradient is written.
    dispatch_aligned(can_use_packs<scalar_t>(n, {m_p, x0_p, noise_p, gm_p}), [&](auto aligned) {
      constexpr bool kAligned = decltype(aligned)::value;
      const auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(m_p, x0_p, noise_p, t_p, tab, partial_p, gm_p,
                                              batch, n, table.size(0), int(prediction_type),
                                              snr_gamma, grad_scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (write_grad) {
        launch(diffusion_loss_partial_kernel<scalar_t, kAligned, true>);
      } else {
        launch(diffusion_loss_partial_kernel<scalar_t, kAligned, false>);
      }
    });
    diffusion_loss_finalize_kernel<acc_t>
        <<<unsigned(at::ceil_div<int64_t>(batch, kThreads)), kThreads, 0, stream>>>(
            partial_p, t_p, tab, loss.mutable_data_ptr<acc_t>(), batch, chunks, n,
            int(prediction_type), snr_gamma);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad_m};
}

at::Tensor diffusion_loss_bwd_cuda(const at::Tensor& grad_loss,     // (B,) opmath
                                   const at::Tensor& model_output,  // (B, ...)
                                   const at::Tensor& x0,            // same layout
                                   const at::Tensor& noise,         // same layout
                                   const at::Tensor& t,             // (B,) int64
                                   const at::Tensor& table,         // (T, 4)
                                   int64_t prediction_type,         // PredictionType
                                   double snr_gamma) {              // <= 0: unweighted
  const int64_t n = check_loss_args_cuda(model_output, x0, noise, t, table, prediction_type);
  check_grad_loss(grad_loss, model_output);
  const int64_t batch = model_output.size(0);
  at::Tensor grad_m = at::empty_like(model_output);
  if (model_output.numel() == 0) return grad_m;
  const c10::cuda::CUDAGuard guard(model_output.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(),
                                  "diffusion_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m_p = model_output.const_data_ptr<scalar_t>();
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise.const_data_ptr<scalar_t>();
    scalar_t* gm_p = grad_m.mutable_data_ptr<scalar_t>();
    const dim3 grid = sample_grid(at::ceil_div<int64_t>(n, kThreads * kPack<scalar_t>), batch);
    dispatch_aligned(can_use_packs<scalar_t>(n, {m_p, x0_p, noise_p, gm_p}), [&](auto aligned) {
      diffusion_loss_bwd_kernel<scalar_t, decltype(aligned)::value>
          <<<grid, kThreads, 0, stream>>>(grad_loss.const_data_ptr<acc_t>(), m_p, x0_p, noise_p,
                                          t.const_data_ptr<int64_t>(),
                                          table.const_data_ptr<double>(), gm_p, batch, n,
                                          table.size(0), int(prediction_type), snr_gamma);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_m;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("diffusion_loss", &diffusion_loss_cuda);
  m.impl("_diffusion_loss_bwd", &diffusion_loss_bwd_cuda);
}

}  // namespace fastdiff::cuda
