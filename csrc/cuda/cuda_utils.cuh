// Helpers shared by the CUDA kernels (the counterpart of csrc/cpu/cpu_utils.h):
// host checks for CUDA tensors, the (chunk, sample) launch grid, and packed
// loads/stores of scalar_t memory as registers of the accumulation type.
//
// Work split: a CUDA block handles one chunk of one sample (grid.x over the n
// elements of a sample, grid.y over the batch), so the per-sample coefficients
// of schedule_math.h are computed once per block, by thread 0, into shared
// memory (in float64 from the float64 schedule table, then cast to acc_t). Each thread handles packs of kPack<scalar_t> consecutive elements
// (16 bytes). When every pointer is 16-byte aligned and n is a multiple of the
// pack, a pack is one vector load; otherwise the same elements are loaded one
// by one with a bound check, so the element-to-thread map (and with it the
// order of any reduction) does not depend on the alignment.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "fastdiff/op_checks.h"
#include "fastdiff/schedule_math.h"

namespace fastdiff::cuda {

constexpr int kThreads = 256;          // threads per block, every kernel
constexpr int64_t kMaxGridY = 65535;   // CUDA's limit on gridDim.y; larger batches loop

// Elements per pack: 16 bytes of scalar_t (4 float, 8 half/bfloat16, 2 double).
template <typename scalar_t>
constexpr int kPack = int(16 / sizeof(scalar_t));

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T val[N];
};

// Loads p[0..N) as raw scalar_t. kAligned: one 16-byte load (the host
// guarantees alignment and a full pack); otherwise element-wise, elements at
// or past `valid` read as 0. Kernels keep raw packs (4 registers) live across
// the coefficient barrier and widen them to acc_t after it.
template <bool kAligned, int N, typename scalar_t>
__device__ __forceinline__ Packed<scalar_t, N> load_raw(const scalar_t* __restrict__ p,
                                                        int64_t valid) {
  if constexpr (kAligned) {
    return *reinterpret_cast<const Packed<scalar_t, N>*>(p);
  } else {
    Packed<scalar_t, N> v;
#pragma unroll
    for (int j = 0; j < N; ++j) v.val[j] = j < valid ? p[j] : scalar_t(0);
    return v;
  }
}

template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void widen(const Packed<scalar_t, N>& v, acc_t (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = static_cast<acc_t>(v.val[j]);
}

// load_raw + widen.
template <bool kAligned, int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pack(const scalar_t* __restrict__ p, int64_t valid,
                                          acc_t (&out)[N]) {
  widen(load_raw<kAligned, N>(p, valid), out);
}

template <int N, typename acc_t>
__device__ __forceinline__ void zero_pack(acc_t (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = acc_t(0);
}

// Stores acc_t registers to p[0..N) (or p[0..valid) when not aligned), cast to scalar_t.
template <bool kAligned, int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ p, int64_t valid,
                                           const acc_t (&in)[N]) {
  if constexpr (kAligned) {
    Packed<scalar_t, N> v;
#pragma unroll
    for (int j = 0; j < N; ++j) v.val[j] = static_cast<scalar_t>(in[j]);
    *reinterpret_cast<Packed<scalar_t, N>*>(p) = v;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (j < valid) p[j] = static_cast<scalar_t>(in[j]);
    }
  }
}

// Thread 0 checks a timestep before the table is read. The Python layer
// validates t (a host check here would synchronize); this guards direct calls
// through torch.ops.fastdiff. __trap() rather than CUDA_KERNEL_ASSERT: the
// assert's call to __assert_fail costs a stack frame and, in the reduction
// kernel, register spills around the call.
__device__ __forceinline__ void check_timestep(int64_t t, int64_t num_timesteps,
                                               bool allow_negative) {
  if (!(t < num_timesteps && (allow_negative || t >= 0))) __trap();
}

// ddpm_step / ddim_step read noise only where it is needed; a missing noise
// tensor there is a caller bug (the CPU kernels reject it on the host).
__device__ __forceinline__ void check_noise(const void* noise, bool needed) {
  if (needed && noise == nullptr) __trap();
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------

inline void check_cuda(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  for (const auto& [x, name] : tensors) {
    TORCH_CHECK(x->is_cuda(), "fastdiff: ", name, " must be a CUDA tensor, got ", x->device());
  }
}

// True when every pointer is 16-byte aligned and each per-sample block (and
// the variance half of a learned model_output) starts on a pack boundary.
template <typename scalar_t>
bool can_use_packs(int64_t n, std::initializer_list<const void*> ptrs) {
  if (n % kPack<scalar_t> != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Grid of `blocks_per_sample` x batch blocks (batch capped at kMaxGridY; the
// kernels loop over the rest).
inline dim3 sample_grid(int64_t blocks_per_sample, int64_t batch) {
  TORCH_CHECK(blocks_per_sample <= int64_t(INT32_MAX), "fastdiff: ", blocks_per_sample,
              " blocks per sample exceed the CUDA grid limit");
  return dim3(unsigned(blocks_per_sample), unsigned(std::min(batch, kMaxGridY)), 1);
}

// Calls f(std::integral_constant<bool, aligned>) so kernels are instantiated
// for the packed and the element-wise path.
template <typename F>
void dispatch_aligned(bool aligned, const F& f) {
  if (aligned) {
    f(std::integral_constant<bool, true>{});
  } else {
    f(std::integral_constant<bool, false>{});
  }
}

}  // namespace fastdiff::cuda
