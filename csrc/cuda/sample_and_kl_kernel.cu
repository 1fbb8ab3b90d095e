// sample_and_kl on CUDA: z = mu + exp(lv / 2) eps and the per-sample KL to
// N(0, I), KL_b = sum_i (mu_i^2 + exp(lv_i) - 1 - lv_i) / 2, in one pass over
// (mean, logvar, noise), and its VJP in one pass.
// Math: csrc/include/fastdiff/gaussian_math.h (gaussian_sample_and_kl,
// gaussian_sample_and_kl_vjp); mirrors csrc/cpu/sample_and_kl_kernel.cpp.
// Grid and packing: cuda_utils.cuh.
//
// Forward, deterministic (no atomics): stage 1 writes one partial KL sum per
// (sample, chunk of kKlChunk elements) and, when noise is given, z; the chunk
// count depends only on n and each block reduces in a fixed order. Stage 2
// sums each sample's partials in chunk order (no scaling: KL_b is a sum).
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <tuple>

#include "cuda_utils.cuh"
#include "fastdiff/gaussian_math.h"

namespace fastdiff::cuda {
namespace {

// Elements per block of the forward reduction, for every dtype and GPU.
constexpr int64_t kKlChunk = 4096;

// Stage 1. Thread k of a block accumulates, in order, the packs at
// chunk_begin + (p * kThreads + k) * kPack for p = 0 .. kPacks - 1; the block
// then sums its threads with cub::BlockReduce (a fixed shuffle tree).
// kSample: noise is given, z = mu + std * eps is stored; otherwise eps = 0 and
// noise / z are unused. Lanes past n load mu = lv = 0, whose kl is
// (0 + 1 - 1 - 0) / 2 = 0 exactly, so they add nothing to the sum.
template <typename scalar_t, bool kAligned, bool kSample,
          typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
sample_and_kl_partial_kernel(const scalar_t* __restrict__ mean,    // (B, n) posterior mean
                             const scalar_t* __restrict__ logvar,  // (B, n) log-variance
                             const scalar_t* __restrict__ noise,   // (B, n) eps, kSample only
                             scalar_t* __restrict__ z,             // (B, n) sample, kSample only
                             acc_t* __restrict__ partial,          // (B, gridDim.x) KL sums
                             int64_t batch,                        // B
                             int64_t n) {                          // elements per sample
  constexpr int N = kPack<scalar_t>;
  constexpr int kPacks = int(kKlChunk / (kThreads * N));
  static_assert(kPacks * kThreads * N == kKlChunk, "kKlChunk must be whole packs");
  // Full unroll hoists every pack's loads; for double (kPacks = 8, a longer
  // exp) ptxas then spills at its 64-register choice, so unroll by 4 there.
  // The accumulation order is the same either way.
  constexpr int kUnroll = sizeof(acc_t) == 8 ? 4 : kPacks;
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  const int64_t chunk_begin = int64_t(blockIdx.x) * kKlChunk;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    acc_t acc = acc_t(0);
#pragma unroll kUnroll
    for (int p = 0; p < kPacks; ++p) {
      const int64_t i = chunk_begin + (int64_t(p) * kThreads + threadIdx.x) * N;
      if (i < n) {
        const int64_t off = b * n + i;
        acc_t mu[N], lv[N], eps[N];
        load_pack<kAligned>(mean + off, n - i, mu);
        load_pack<kAligned>(logvar + off, n - i, lv);
        if constexpr (kSample) {
          load_pack<kAligned>(noise + off, n - i, eps);
        } else {
          zero_pack(eps);
        }
        acc_t zv[N];
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const GaussianSample<acc_t> r = gaussian_sample_and_kl(mu[j], lv[j], eps[j]);
          zv[j] = r.z;
          acc = acc + r.kl;
        }
        if constexpr (kSample) store_pack<kAligned>(z + off, n - i, zv);
      }
    }
    const acc_t sum = BlockReduce(reduce_storage).Sum(acc);
    if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sum;
    if (b + gridDim.y < batch) __syncthreads();  // reduce_storage reused
  }
}

// Stage 2: one thread per sample sums its partials in chunk order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
sample_and_kl_finalize_kernel(const acc_t* __restrict__ partial,  // (B, chunks) stage-1 sums
                              acc_t* __restrict__ kl,             // (B,) per-sample KL
                              int64_t batch,                      // B
                              int64_t chunks) {                   // partials per sample
  const int64_t b = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  const acc_t* row = partial + b * chunks;
  acc_t sum = acc_t(0);
  for (int64_t k = 0; k < chunks; ++k) sum += row[k];
  kl[b] = sum;
}

// (d mu, d lv) = VJP of (z, kl) at (g_z, g_kl[b]), one pack per thread.
// g_z is read only when both grad_z and noise are given (else it is 0, and so
// is eps, which then only multiplies g_z).
template <typename scalar_t, bool kAligned, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
sample_and_kl_bwd_kernel(const scalar_t* __restrict__ grad_z,   // (B, n) dL/dz, or nullptr
                         const acc_t* __restrict__ grad_kl,     // (B,) dL/dkl_b
                         const scalar_t* __restrict__ mean,     // (B, n) posterior mean
                         const scalar_t* __restrict__ logvar,   // (B, n) log-variance
                         const scalar_t* __restrict__ noise,    // (B, n) eps, or nullptr
                         scalar_t* __restrict__ grad_mean,      // (B, n) dL/dmean
                         scalar_t* __restrict__ grad_logvar,    // (B, n) dL/dlogvar
                         int64_t batch,                         // B
                         int64_t n) {                           // elements per sample
  constexpr int N = kPack<scalar_t>;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * N;
  if (i >= n) return;  // no barriers below
  const bool read_z = grad_z != nullptr && noise != nullptr;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t off = b * n + i;
    const acc_t g_kl = grad_kl[b];
    acc_t mu[N], lv[N], eps[N], g_z[N];
    load_pack<kAligned>(mean + off, n - i, mu);
    load_pack<kAligned>(logvar + off, n - i, lv);
    if (read_z) {
      load_pack<kAligned>(noise + off, n - i, eps);
      load_pack<kAligned>(grad_z + off, n - i, g_z);
    } else {
      zero_pack(eps);
      zero_pack(g_z);
    }
    acc_t gmu[N], glv[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const GaussianGrads<acc_t> r = gaussian_sample_and_kl_vjp(mu[j], lv[j], eps[j], g_z[j], g_kl);
      gmu[j] = r.mu;
      glv[j] = r.lv;
    }
    store_pack<kAligned>(grad_mean + off, n - i, gmu);
    store_pack<kAligned>(grad_logvar + off, n - i, glv);
  }
}

// Returns (z, kl): z like mean (an empty (0,) tensor when noise is None) and
// kl (B,) in opmath, the per-sample sum of the elementwise KL.
std::tuple<at::Tensor, at::Tensor> sample_and_kl_cuda(
    const at::Tensor& mean,                    // (B, ...) float
    const at::Tensor& logvar,                  // like mean
    const c10::optional<at::Tensor>& noise) {  // like mean; None: KL only
  check_cuda({{&mean, "mean"}});
  const int64_t n = check_gaussian_args(mean, logvar, noise);
  const int64_t batch = mean.size(0);
  const bool sample = noise.has_value();
  at::Tensor z = sample ? at::empty_like(mean) : at::empty({0}, mean.options());
  at::Tensor kl = at::empty({batch}, mean.options().dtype(at::toOpMathType(mean.scalar_type())));
  if (batch == 0) return {z, kl};
  if (n == 0) return {z, kl.zero_()};  // sum over no elements, as on the CPU
  const c10::cuda::CUDAGuard guard(mean.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunks = at::ceil_div(n, kKlChunk);
  at::Tensor partial = at::empty({batch, chunks}, kl.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mean.scalar_type(),
                                  "sample_and_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* mu_p = mean.const_data_ptr<scalar_t>();
    const scalar_t* lv_p = logvar.const_data_ptr<scalar_t>();
    const scalar_t* eps_p = sample ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* z_p = sample ? z.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* partial_p = partial.mutable_data_ptr<acc_t>();
    const dim3 grid = sample_grid(chunks, batch);
    // eps_p / z_p are nullptr (ignored by can_use_packs) without noise.
    dispatch_aligned(can_use_packs<scalar_t>(n, {mu_p, lv_p, eps_p, z_p}), [&](auto aligned) {
      constexpr bool kAligned = decltype(aligned)::value;
      const auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(mu_p, lv_p, eps_p, z_p, partial_p, batch, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (sample) {
        launch(sample_and_kl_partial_kernel<scalar_t, kAligned, true>);
      } else {
        launch(sample_and_kl_partial_kernel<scalar_t, kAligned, false>);
      }
    });
    sample_and_kl_finalize_kernel<acc_t>
        <<<unsigned(at::ceil_div<int64_t>(batch, kThreads)), kThreads, 0, stream>>>(
            partial_p, kl.mutable_data_ptr<acc_t>(), batch, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {z, kl};
}

// Returns (grad_mean, grad_logvar), both like mean.
std::tuple<at::Tensor, at::Tensor> sample_and_kl_bwd_cuda(
    const c10::optional<at::Tensor>& grad_z,   // like mean, or None (z unused)
    const at::Tensor& grad_kl,                 // (B,) opmath
    const at::Tensor& mean,                    // (B, ...) float
    const at::Tensor& logvar,                  // like mean
    const c10::optional<at::Tensor>& noise) {  // like mean, or None
  check_cuda({{&mean, "mean"}});
  const int64_t n = check_gaussian_args(mean, logvar, noise);
  check_gaussian_grads(grad_z, grad_kl, mean, noise);
  const int64_t batch = mean.size(0);
  at::Tensor grad_mu = at::empty_like(mean);
  at::Tensor grad_lv = at::empty_like(mean);
  if (mean.numel() == 0) return {grad_mu, grad_lv};
  const c10::cuda::CUDAGuard guard(mean.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mean.scalar_type(),
                                  "sample_and_kl_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gz_p = grad_z.has_value() ? grad_z->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mu_p = mean.const_data_ptr<scalar_t>();
    const scalar_t* lv_p = logvar.const_data_ptr<scalar_t>();
    const scalar_t* eps_p = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gmu_p = grad_mu.mutable_data_ptr<scalar_t>();
    scalar_t* glv_p = grad_lv.mutable_data_ptr<scalar_t>();
    const dim3 grid = sample_grid(at::ceil_div<int64_t>(n, kThreads * kPack<scalar_t>), batch);
    dispatch_aligned(can_use_packs<scalar_t>(n, {gz_p, mu_p, lv_p, eps_p, gmu_p, glv_p}),
                     [&](auto aligned) {
      sample_and_kl_bwd_kernel<scalar_t, decltype(aligned)::value>
          <<<grid, kThreads, 0, stream>>>(gz_p, grad_kl.const_data_ptr<acc_t>(), mu_p, lv_p,
                                          eps_p, gmu_p, glv_p, batch, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_mu, grad_lv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("sample_and_kl", &sample_and_kl_cuda);
  m.impl("_sample_and_kl_bwd", &sample_and_kl_bwd_cuda);
}

}  // namespace fastdiff::cuda
