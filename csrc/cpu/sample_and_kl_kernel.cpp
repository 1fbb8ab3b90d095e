// sample_and_kl on the CPU: z = mu + exp(lv / 2) eps and the per-sample KL to
// N(0, I) in one pass over (mean, logvar, noise), and its VJP in one pass.
// Math: csrc/include/fastdiff/gaussian_math.h. Per-sample sums use the fixed
// (sample, chunk) split of cpu_utils.h and a fixed-order second stage.
#include <torch/library.h>

#include <vector>

#include "cpu_utils.h"
#include "fastdiff/gaussian_math.h"
#include "fastdiff/op_checks.h"

namespace fastdiff::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sample_and_kl_cpu(
    const at::Tensor& mean,                  // (B, ...) float
    const at::Tensor& logvar,                // like mean
    const c10::optional<at::Tensor>& noise) {  // like mean; None: KL only
  const int64_t n = check_gaussian_args(mean, logvar, noise);
  const int64_t batch = mean.size(0);
  at::Tensor z = noise.has_value() ? at::empty_like(mean) : at::empty({0}, mean.options());
  at::Tensor kl = at::empty({batch}, mean.options().dtype(at::toOpMathType(mean.scalar_type())));
  if (batch == 0) return {z, kl};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mean.scalar_type(), "sample_and_kl_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const scalar_t* mu_p = mean.const_data_ptr<scalar_t>();
    const scalar_t* lv_p = logvar.const_data_ptr<scalar_t>();
    const scalar_t* eps_p = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* z_p = noise.has_value() ? z.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t chunks = num_chunks(n);
    std::vector<acc_t> partial(batch * chunks, acc_t(0));
    parallel_over_chunks(batch, n, [&](int64_t b, int64_t begin, int64_t end) {
      const int64_t base = b * n;
      Vec acc(acc_t(0));
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec mu = IO::load(mu_p + base + i, len);
        const Vec lv = IO::load(lv_p + base + i, len);
        const Vec eps = eps_p ? IO::load(eps_p + base + i, len) : Vec(acc_t(0));
        const auto r = gaussian_sample_and_kl(mu, lv, eps);
        if (z_p) IO::store(z_p + base + i, r.z, len);
        // tail lanes load mu = lv = 0: kl = (0 + 1 - 1 - 0) / 2 = 0 exactly
        acc = acc + r.kl;
      });
      partial[b * chunks + begin / kChunk] =
          at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, acc);
    });
    acc_t* kl_p = kl.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < batch; ++b) {
      acc_t sum = 0;
      for (int64_t k = 0; k < chunks; ++k) sum += partial[b * chunks + k];
      kl_p[b] = sum;
    }
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> sample_and_kl_bwd_cpu(
    const c10::optional<at::Tensor>& grad_z,  // like mean, or None (z unused)
    const at::Tensor& grad_kl,                // (B,) opmath
    const at::Tensor& mean, const at::Tensor& logvar, const c10::optional<at::Tensor>& noise) {
  const int64_t n = check_gaussian_args(mean, logvar, noise);
  check_gaussian_grads(grad_z, grad_kl, mean, noise);
  at::Tensor grad_mu = at::empty_like(mean);
  at::Tensor grad_lv = at::empty_like(mean);
  if (mean.numel() == 0) return {grad_mu, grad_lv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mean.scalar_type(), "sample_and_kl_bwd_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const scalar_t* gz_p = grad_z.has_value() ? grad_z->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* gkl_p = grad_kl.const_data_ptr<acc_t>();
    const scalar_t* mu_p = mean.const_data_ptr<scalar_t>();
    const scalar_t* lv_p = logvar.const_data_ptr<scalar_t>();
    const scalar_t* eps_p = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gmu_p = grad_mu.mutable_data_ptr<scalar_t>();
    scalar_t* glv_p = grad_lv.mutable_data_ptr<scalar_t>();
    parallel_over_chunks(mean.size(0), n, [&](int64_t b, int64_t begin, int64_t end) {
      const int64_t base = b * n;
      const Vec g_kl(gkl_p[b]);
      const bool read_z = gz_p != nullptr && eps_p != nullptr;
      vector_steps<scalar_t>(begin, end, [&](int64_t i, int64_t len) {
        const Vec zero(acc_t(0));
        const Vec mu = IO::load(mu_p + base + i, len);
        const Vec lv = IO::load(lv_p + base + i, len);
        const Vec eps = read_z ? IO::load(eps_p + base + i, len) : zero;
        const Vec g_z = read_z ? IO::load(gz_p + base + i, len) : zero;
        const auto r = gaussian_sample_and_kl_vjp(mu, lv, eps, g_z, g_kl);
        IO::store(gmu_p + base + i, r.mu, len);
        IO::store(glv_p + base + i, r.lv, len);
      });
    });
  });
  return {grad_mu, grad_lv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("sample_and_kl", &sample_and_kl_cpu);
  m.impl("_sample_and_kl_bwd", &sample_and_kl_bwd_cpu);
}

}  // namespace fastdiff::cpu
