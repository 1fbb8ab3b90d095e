// vb_loss on CUDA: the per-sample diffusion VLB term in bits per dim,
// loss_b = sum_i term_i / (n log 2), term_i the KL to the true posterior
// (t > 0) or the decoder NLL (t == 0), in one pass over (model_mean,
// model_log_variance, x0, x_t), and its VJP in one pass.
// Math: csrc/include/fastdiff/vlb_math.h (vlb_coeffs, vlb_kl, vlb_decoder_nll
// and their *_with_grad); mirrors csrc/cpu/vb_loss_kernel.cpp. Grid and
// packing: cuda_utils.cuh. Each sample runs only its own branch, chosen once
// per block (x_t is read only for the KL).
//
// Forward, deterministic (no atomics): stage 1 writes one partial sum of the
// terms per (sample, chunk of kVbChunk elements); the chunk count depends only
// on n and each block reduces in a fixed order. Stage 2 sums each sample's
// partials in chunk order and divides by n log 2 (in float64, as on the CPU).
//
// With grad_scale != 0 stage 1 also writes grad_scale * d loss_b / d
// (model_mean, model_log_variance) from the same exponentials (no second pass
// when the upstream gradient is known up to a scale); the backward kernel
// recomputes it from grad_loss.
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "cuda_utils.cuh"
#include "fastdiff/vlb_math.h"

namespace fastdiff::cuda {
namespace {

// Elements per block of the forward reduction, for every dtype and GPU.
constexpr int64_t kVbChunk = 4096;

// Thread 0 checks t[b] and reads the sample's posterior row (float64, cast to
// acc_t once, as on the CPU); the caller's barrier publishes it.
template <typename acc_t>
__device__ __forceinline__ void load_vlb_coeffs(VlbCoeffs<acc_t>& out, const double* posterior,
                                                int64_t t, int64_t num_timesteps) {
  check_timestep(t, num_timesteps, false);
  out = vlb_coeffs(posterior, t).template to<acc_t>();
}

// The terms of one pack and, kGrad, their VJP at upstream g. kDecoder selects
// the sample's branch at compile time (xt is unused for the decoder NLL).
template <bool kDecoder, bool kGrad, int N, typename acc_t>
__device__ __forceinline__ void vlb_pack(const VlbCoeffs<acc_t>& c, const acc_t (&m)[N],
                                         const acc_t (&lv)[N], const acc_t (&x0)[N],
                                         const acc_t (&xt)[N], acc_t g, acc_t (&term)[N],
                                         acc_t (&gm)[N], acc_t (&glv)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if constexpr (kGrad) {
      VlbTermAndGrads<acc_t> r;
      if constexpr (kDecoder) {
        r = vlb_decoder_nll_with_grad(m[j], lv[j], x0[j], g);
      } else {
        r = vlb_kl_with_grad(c, m[j], lv[j], x0[j], xt[j], g);
      }
      term[j] = r.value;
      gm[j] = r.m;
      glv[j] = r.lv;
    } else if constexpr (kDecoder) {
      term[j] = vlb_decoder_nll(m[j], lv[j], x0[j]);
    } else {
      term[j] = vlb_kl(c, m[j], lv[j], x0[j], xt[j]);
    }
  }
}

// Stage 1. Thread k of a block accumulates, in order, the packs at
// chunk_begin + (p * kThreads + k) * kPack for p = 0 .. kPacks - 1; the block
// then sums its threads with cub::BlockReduce (a fixed shuffle tree).
// Lanes past n (element-wise path) load zeros, whose term is not 0 (the KL at
// zeros is (var1 - 1 - lv1) / 2), so they are skipped.
// kWriteGrad: also store grad_factor * VJP, grad_factor = grad_scale / (n log 2)
// rounded to acc_t on the host; without it the grad pointers are unused.
template <typename scalar_t, bool kAligned, bool kWriteGrad,
          typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
vb_loss_partial_kernel(const scalar_t* __restrict__ model_mean,          // (B, n) model mean
                       const scalar_t* __restrict__ model_log_variance,  // (B, n) model log-var
                       const scalar_t* __restrict__ x0,                  // (B, n) clean data
                       const scalar_t* __restrict__ x_t,                 // (B, n) noised data
                       const int64_t* __restrict__ t,                    // (B,) timesteps
                       const double* __restrict__ posterior,             // (T, 4) float64
                       acc_t* __restrict__ partial,                      // (B, gridDim.x) sums
                       scalar_t* __restrict__ grad_mean,                 // (B, n) or unused
                       scalar_t* __restrict__ grad_log_variance,         // (B, n) or unused
                       int64_t batch,                                    // B
                       int64_t n,                                        // elements per sample
                       int64_t num_timesteps,                            // T
                       acc_t grad_factor) {                              // kWriteGrad only
  constexpr int N = kPack<scalar_t>;
  constexpr int kPacks = int(kVbChunk / (kThreads * N));
  static_assert(kPacks * kThreads * N == kVbChunk, "kVbChunk must be whole packs");
  // Full unroll hoists every pack's loads; for double (kPacks = 8, longer
  // exp / log / tanh) ptxas spilled in the aligned kernels at unroll 8, 4 and
  // 2, so double does not unroll. The accumulation order is the same either way.
  constexpr int kUnroll = sizeof(acc_t) == 8 ? 1 : kPacks;
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ VlbCoeffs<acc_t> coeffs;
  const int64_t chunk_begin = int64_t(blockIdx.x) * kVbChunk;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    if (threadIdx.x == 0) load_vlb_coeffs(coeffs, posterior, t[b], num_timesteps);
    __syncthreads();
    const VlbCoeffs<acc_t> c = coeffs;
    const auto chunk_sum = [&](auto decoder) {
      constexpr bool kDecoder = decltype(decoder)::value;
      acc_t acc = acc_t(0);
#pragma unroll kUnroll
      for (int p = 0; p < kPacks; ++p) {
        const int64_t i = chunk_begin + (int64_t(p) * kThreads + threadIdx.x) * N;
        if (i < n) {
          const int64_t off = b * n + i;
          acc_t m[N], lv[N], x[N], xt[N], term[N], gm[N], glv[N];
          load_pack<kAligned>(model_mean + off, n - i, m);
          load_pack<kAligned>(model_log_variance + off, n - i, lv);
          load_pack<kAligned>(x0 + off, n - i, x);
          if constexpr (kDecoder) {
            zero_pack(xt);
          } else {
            load_pack<kAligned>(x_t + off, n - i, xt);
          }
          vlb_pack<kDecoder, kWriteGrad>(c, m, lv, x, xt, grad_factor, term, gm, glv);
#pragma unroll
          for (int j = 0; j < N; ++j) {
            if (kAligned || j < n - i) acc = acc + term[j];
          }
          if constexpr (kWriteGrad) {
            store_pack<kAligned>(grad_mean + off, n - i, gm);
            store_pack<kAligned>(grad_log_variance + off, n - i, glv);
          }
        }
      }
      return acc;
    };
    const acc_t acc = c.decoder ? chunk_sum(std::true_type{}) : chunk_sum(std::false_type{});
    const acc_t sum = BlockReduce(reduce_storage).Sum(acc);
    if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sum;
    if (b + gridDim.y < batch) __syncthreads();  // coeffs, reduce_storage reused
  }
}

// Stage 2: one thread per sample sums its partials in chunk order;
// loss_b = sum / (n log 2) with denom = n log 2 in float64 (as on the CPU).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
vb_loss_finalize_kernel(const acc_t* __restrict__ partial,  // (B, chunks) stage-1 sums
                        acc_t* __restrict__ loss,           // (B,) per-sample loss
                        int64_t batch,                      // B
                        int64_t chunks,                     // partials per sample
                        double denom) {                     // n log 2
  const int64_t b = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  const acc_t* row = partial + b * chunks;
  acc_t sum = acc_t(0);
  for (int64_t k = 0; k < chunks; ++k) sum += row[k];
  loss[b] = acc_t(double(sum) / denom);
}

// (grad_mean, grad_log_variance) = grad_loss[b] / (n log 2) * d term_i / d (m, lv),
// one pack per thread; the factor is computed by thread 0 in float64 and
// rounded to acc_t (as on the CPU).
template <typename scalar_t, bool kAligned, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
vb_loss_bwd_kernel(const acc_t* __restrict__ grad_loss,               // (B,) dL/dloss_b
                   const scalar_t* __restrict__ model_mean,           // (B, n) model mean
                   const scalar_t* __restrict__ model_log_variance,   // (B, n) model log-var
                   const scalar_t* __restrict__ x0,                   // (B, n) clean data
                   const scalar_t* __restrict__ x_t,                  // (B, n) noised data
                   const int64_t* __restrict__ t,                     // (B,) timesteps
                   const double* __restrict__ posterior,              // (T, 4) float64
                   scalar_t* __restrict__ grad_mean,                  // (B, n) dL/dmodel_mean
                   scalar_t* __restrict__ grad_log_variance,          // (B, n) dL/dlog-var
                   int64_t batch,                                     // B
                   int64_t n,                                         // elements per sample
                   int64_t num_timesteps,                             // T
                   double denom) {                                    // n log 2
  constexpr int N = kPack<scalar_t>;
  __shared__ VlbCoeffs<acc_t> coeffs;
  __shared__ acc_t scale;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  const bool active = i < n;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t off = b * n + i;
    Packed<scalar_t, N> m_raw, lv_raw, x_raw;
    if (active) {  // issued before the coefficients are ready
      m_raw = load_raw<kAligned, N>(model_mean + off, n - i);
      lv_raw = load_raw<kAligned, N>(model_log_variance + off, n - i);
      x_raw = load_raw<kAligned, N>(x0 + off, n - i);
    }
    if (threadIdx.x == 0) {
      load_vlb_coeffs(coeffs, posterior, t[b], num_timesteps);
      scale = acc_t(double(grad_loss[b]) / denom);
    }
    __syncthreads();
    const VlbCoeffs<acc_t> c = coeffs;
    const acc_t g = scale;
    if (active) {
      acc_t m[N], lv[N], x[N], xt[N], term[N], gm[N], glv[N];
      widen(m_raw, m);
      widen(lv_raw, lv);
      widen(x_raw, x);
      if (c.decoder) {
        zero_pack(xt);
        vlb_pack<true, true>(c, m, lv, x, xt, g, term, gm, glv);
      } else {
        load_pack<kAligned>(x_t + off, n - i, xt);
        vlb_pack<false, true>(c, m, lv, x, xt, g, term, gm, glv);
      }
      store_pack<kAligned>(grad_mean + off, n - i, gm);
      store_pack<kAligned>(grad_log_variance + off, n - i, glv);
    }
    if (b + gridDim.y < batch) __syncthreads();  // coeffs, scale rewritten next
  }
}

// The shared checks; the range of t is checked on the device (thread 0 of each block).
int64_t check_vb_loss_args_cuda(const at::Tensor& model_mean,
                                const at::Tensor& model_log_variance, const at::Tensor& x0,
                                const at::Tensor& x_t, const at::Tensor& t,
                                const at::Tensor& posterior) {
  check_cuda({{&model_mean, "model_mean"}});
  return check_vb_loss_args(model_mean, model_log_variance, x0, x_t, t, posterior);
}

// Returns (loss (B,) in opmath, grad_mean, grad_log_variance): the grads are
// grad_scale * d loss_b / d input (the input's dtype and layout) when
// grad_scale != 0, else empty (0,) tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> vb_loss_cuda(
    const at::Tensor& model_mean,          // (B, ...) float
    const at::Tensor& model_log_variance,  // same layout
    const at::Tensor& x0,                  // same layout
    const at::Tensor& x_t,                 // same layout
    const at::Tensor& t,                   // (B,) int64
    const at::Tensor& posterior,           // (T, 4) float64
    double grad_scale) {                   // 0: no gradient
  const int64_t n = check_vb_loss_args_cuda(model_mean, model_log_variance, x0, x_t, t, posterior);
  const int64_t batch = model_mean.size(0);
  const bool write_grad = grad_scale != 0.0;
  at::Tensor loss = at::empty(
      {batch}, model_mean.options().dtype(at::toOpMathType(model_mean.scalar_type())));
  at::Tensor grad_m =
      write_grad ? at::empty_like(model_mean) : at::empty({0}, model_mean.options());
  at::Tensor grad_lv =
      write_grad ? at::empty_like(model_mean) : at::empty({0}, model_mean.options());
  if (batch == 0) return {loss, grad_m, grad_lv};
  if (n == 0) return {loss.fill_(NAN), grad_m, grad_lv};  // mean over no elements, as on the CPU
  const c10::cuda::CUDAGuard guard(model_mean.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunks = at::ceil_div(n, kVbChunk);
  at::Tensor partial = at::empty({batch, chunks}, loss.options());
  const double denom = double(n) * M_LN2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_mean.scalar_type(),
                                  "vb_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m_p = model_mean.const_data_ptr<scalar_t>();
    const scalar_t* lv_p = model_log_variance.const_data_ptr<scalar_t>();
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* xt_p = x_t.const_data_ptr<scalar_t>();
    const int64_t* t_p = t.const_data_ptr<int64_t>();
    const double* post = posterior.const_data_ptr<double>();
    acc_t* partial_p = partial.mutable_data_ptr<acc_t>();
    scalar_t* gm_p = write_grad ? grad_m.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* glv_p = write_grad ? grad_lv.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t grad_factor = acc_t(grad_scale / denom);
    const dim3 grid = sample_grid(chunks, batch);
    // gm_p / glv_p are nullptr (ignored by can_use_packs) when no gradient is written.
    dispatch_aligned(can_use_packs<scalar_t>(n, {m_p, lv_p, x0_p, xt_p, gm_p, glv_p}),
                     [&](auto aligned) {
      constexpr bool kAligned = decltype(aligned)::value;
      const auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(m_p, lv_p, x0_p, xt_p, t_p, post, partial_p, gm_p,
                                              glv_p, batch, n, posterior.size(0), grad_factor);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (write_grad) {
        launch(vb_loss_partial_kernel<scalar_t, kAligned, true>);
      } else {
        launch(vb_loss_partial_kernel<scalar_t, kAligned, false>);
      }
    });
    vb_loss_finalize_kernel<acc_t>
        <<<unsigned(at::ceil_div<int64_t>(batch, kThreads)), kThreads, 0, stream>>>(
            partial_p, loss.mutable_data_ptr<acc_t>(), batch, chunks, denom);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad_m, grad_lv};
}

// Returns (grad_mean, grad_log_variance), both like model_mean.
std::tuple<at::Tensor, at::Tensor> vb_loss_bwd_cuda(
    const at::Tensor& grad_loss,           // (B,) opmath
    const at::Tensor& model_mean,          // (B, ...) float
    const at::Tensor& model_log_variance,  // same layout
    const at::Tensor& x0,                  // same layout
    const at::Tensor& x_t,                 // same layout
    const at::Tensor& t,                   // (B,) int64
    const at::Tensor& posterior) {         // (T, 4) float64
  const int64_t n = check_vb_loss_args_cuda(model_mean, model_log_variance, x0, x_t, t, posterior);
  check_grad_loss(grad_loss, model_mean);
  const int64_t batch = model_mean.size(0);
  at::Tensor grad_m = at::empty_like(model_mean);
  at::Tensor grad_lv = at::empty_like(model_mean);
  if (model_mean.numel() == 0) return {grad_m, grad_lv};
  const c10::cuda::CUDAGuard guard(model_mean.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_mean.scalar_type(),
                                  "vb_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m_p = model_mean.const_data_ptr<scalar_t>();
    const scalar_t* lv_p = model_log_variance.const_data_ptr<scalar_t>();
    const scalar_t* x0_p = x0.const_data_ptr<scalar_t>();
    const scalar_t* xt_p = x_t.const_data_ptr<scalar_t>();
    scalar_t* gm_p = grad_m.mutable_data_ptr<scalar_t>();
    scalar_t* glv_p = grad_lv.mutable_data_ptr<scalar_t>();
    const dim3 grid = sample_grid(at::ceil_div<int64_t>(n, kThreads * kPack<scalar_t>), batch);
    dispatch_aligned(can_use_packs<scalar_t>(n, {m_p, lv_p, x0_p, xt_p, gm_p, glv_p}),
                     [&](auto aligned) {
      vb_loss_bwd_kernel<scalar_t, decltype(aligned)::value><<<grid, kThreads, 0, stream>>>(
          grad_loss.const_data_ptr<acc_t>(), m_p, lv_p, x0_p, xt_p, t.const_data_ptr<int64_t>(),
          posterior.const_data_ptr<double>(), gm_p, glv_p, batch, n, posterior.size(0),
          double(n) * M_LN2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_m, grad_lv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("vb_loss", &vb_loss_cuda);
  m.impl("_vb_loss_bwd", &vb_loss_bwd_cuda);
}

}  // namespace fastdiff::cuda
