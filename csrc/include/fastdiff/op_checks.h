// Host-side argument checks shared by the CPU and CUDA entry points. The
// Python layer (fastdiff/ops) validates user input with readable messages and
// normalizes layouts; these checks guard the C++ contract when the ops are
// called directly through torch.ops.fastdiff.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "fastdiff/attention_math.h"
#include "fastdiff/schedule_math.h"

namespace fastdiff {

// Every per-sample tensor is B blocks of numel / B elements, batch outermost
// and dense: contiguous NCHW and channels_last both qualify.
inline int64_t per_sample_numel(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 1, "fastdiff: ", name, " must have a batch dimension, got shape ",
              x.sizes());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fastdiff: ", name,
              " must be dense (call .contiguous()), got strides ", x.strides());
  const int64_t batch = x.size(0);
  const int64_t n = batch == 0 ? 0 : x.numel() / batch;
  TORCH_CHECK(batch <= 1 || n == 0 || x.stride(0) == n, "fastdiff: ", name,
              " must have its batch dimension outermost in memory, got strides ", x.strides());
  return n;
}

// Same element order in memory: strides equal on every dim of size != 1 (the
// stride of a size-1 dim is arbitrary: (B, 1, H, W) contiguous and
// channels_last are the same memory).
inline bool same_memory_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Same shape, dtype and device (any strides).
inline void check_same_meta(const at::Tensor& x, const char* name, const at::Tensor& ref,
                            const char* ref_name) {
  TORCH_CHECK(x.sizes() == ref.sizes(), "fastdiff: ", name, " shape ", x.sizes(),
              " does not match ", ref_name, " shape ", ref.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "fastdiff: ", name, " dtype ",
              x.scalar_type(), " differs from ", ref_name, " dtype ", ref.scalar_type());
  TORCH_CHECK(x.device() == ref.device(), "fastdiff: ", name, " is on ", x.device(), " but ",
              ref_name, " is on ", ref.device());
}

inline void check_like(const at::Tensor& x, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_same_meta(x, name, ref, ref_name);
  TORCH_CHECK(same_memory_order(x, ref), "fastdiff: ", name, " strides ", x.strides(),
              " lay out memory differently from ", ref_name, " strides ", ref.strides());
}

// A backward's upstream gradient in ref's memory order: as it is when it already is, else
// a copy (never a dtype or device conversion: those are errors). Autograd hands over
// whatever strides the consumer produced (stride-0 expanded from .sum(), transposed);
// normalizing here, on real tensors, keeps the C++ autograd free of stride reads, which
// would pin symbolic sizes under torch.compile.
inline at::Tensor in_layout_of(const at::Tensor& grad, const char* name, const at::Tensor& ref,
                               const char* ref_name) {
  check_same_meta(grad, name, ref, ref_name);
  if (grad.is_non_overlapping_and_dense() && same_memory_order(grad, ref)) return grad;
  return at::empty_like(ref).copy_(grad);
}

// t / t_prev: int64 (B,); table: (T, kNumColumns) contiguous float64.
inline void check_schedule(const at::Tensor& ref, const at::Tensor& t, const char* t_name,
                           const at::Tensor& table) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == ref.size(0),
              "fastdiff: ", t_name, " must be int64 of shape (", ref.size(0), "), got ",
              t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastdiff: ", t_name, " must be contiguous");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == kNumColumns && table.is_contiguous(),
              "fastdiff: schedule table must be contiguous (T, ", int(kNumColumns), "), got ",
              table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kDouble, "fastdiff: schedule table must be float64, got ",
              table.scalar_type());
  TORCH_CHECK(t.device() == ref.device() && table.device() == ref.device(), "fastdiff: ",
              t_name, " (", t.device(), ") and the schedule table (", table.device(),
              ") must be on the inputs' device ", ref.device());
}

inline void check_floating(const at::Tensor& x, const char* name) {
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "fastdiff: ", name, " must be float32/float64/float16/bfloat16, got ", s);
}

inline void check_codes(int64_t prediction_type, int64_t variance_type) {
  TORCH_CHECK(prediction_type >= kEpsilon && prediction_type <= kVPrediction,
              "fastdiff: invalid prediction_type code ", prediction_type);
  TORCH_CHECK(variance_type >= kFixedSmall && variance_type <= kLearnedRange,
              "fastdiff: invalid variance_type code ", variance_type);
}

inline bool is_learned(int64_t variance_type) {
  return variance_type == kLearned || variance_type == kLearnedRange;
}

// model_output of a step: same layout as sample, or (B, 2C, ...) contiguous
// with the predicted variance in the second half of the channels.
inline void check_step_model_output(const at::Tensor& model_output, const at::Tensor& sample,
                                    int64_t variance_type) {
  if (is_learned(variance_type)) {
    TORCH_CHECK(sample.dim() >= 2 && model_output.dim() == sample.dim() &&
                    model_output.size(0) == sample.size(0) &&
                    model_output.size(1) == 2 * sample.size(1) &&
                    model_output.sizes().slice(2) == sample.sizes().slice(2),
                "fastdiff: learned variance needs model_output of shape (B, 2C, ...) for "
                "sample ", sample.sizes(), ", got ", model_output.sizes());
    TORCH_CHECK(model_output.is_contiguous() && sample.is_contiguous(),
                "fastdiff: learned variance needs contiguous model_output and sample");
    TORCH_CHECK(model_output.scalar_type() == sample.scalar_type() &&
                    model_output.device() == sample.device(),
                "fastdiff: model_output and sample must share dtype and device");
  } else {
    check_like(model_output, "model_output", sample, "sample");
  }
}

// -- per-op argument checks shared by the CPU and CUDA entry points ----------------
// Device-agnostic: every tensor is on the reference tensor's device (check_like /
// check_schedule). Data-dependent checks (the range of t, noise where t > 0) are
// the backend's: a loop on the CPU, thread 0 of each block on the GPU.

inline void check_q_sample_args(const at::Tensor& x, const char* name, const at::Tensor* noise,
                                const at::Tensor& t, const at::Tensor& table) {
  check_floating(x, name);
  per_sample_numel(x, name);
  if (noise != nullptr) check_like(*noise, "noise", x, name);
  check_schedule(x, t, "t", table);
}

inline int64_t check_loss_args(const at::Tensor& model_output, const at::Tensor& x0,
                               const at::Tensor& noise, const at::Tensor& t,
                               const at::Tensor& table, int64_t prediction_type) {
  check_floating(model_output, "model_output");
  const int64_t n = per_sample_numel(model_output, "model_output");
  check_like(x0, "x0", model_output, "model_output");
  check_like(noise, "noise", model_output, "model_output");
  check_schedule(model_output, t, "t", table);
  check_codes(prediction_type, kFixedSmall);
  return n;
}

// A per-sample upstream gradient (grad_loss, grad_kl): contiguous (B,) in the
// accumulation type, as the forward returns it.
inline void check_grad_loss(const at::Tensor& grad_loss, const at::Tensor& model_output,
                            const char* name = "grad_loss") {
  const auto acc = at::toOpMathType(model_output.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == model_output.size(0) &&
                  grad_loss.scalar_type() == acc && grad_loss.is_contiguous() &&
                  grad_loss.device() == model_output.device(),
              "fastdiff: ", name, " must be a contiguous ", acc, " tensor of shape (",
              model_output.size(0), ") on ", model_output.device(), ", got ",
              grad_loss.scalar_type(), " ", grad_loss.sizes(), " on ", grad_loss.device());
}

struct StepArgs {
  int64_t n;         // elements per sample of `sample`
  int64_t m_stride;  // elements per sample of model_output (n, or 2n when learned)
};

inline StepArgs check_ddpm_args(const at::Tensor& model_output, const at::Tensor& sample,
                                const c10::optional<at::Tensor>& noise, const at::Tensor& t,
                                const at::Tensor& t_prev, const at::Tensor& table,
                                int64_t prediction_type, int64_t variance_type) {
  check_codes(prediction_type, variance_type);
  check_floating(sample, "sample");
  const int64_t n = per_sample_numel(sample, "sample");
  check_step_model_output(model_output, sample, variance_type);
  if (noise.has_value()) check_like(*noise, "noise", sample, "sample");
  check_schedule(sample, t, "t", table);
  check_schedule(sample, t_prev, "t_prev", table);
  const int64_t batch = sample.size(0);
  return {n, batch == 0 ? 0 : model_output.numel() / batch};
}

inline int64_t check_ddim_args(const at::Tensor& model_output, const at::Tensor& sample,
                               const at::Tensor& t, const at::Tensor& t_prev,
                               const at::Tensor& table, int64_t prediction_type) {
  check_codes(prediction_type, kFixedSmall);
  check_floating(sample, "sample");
  const int64_t n = per_sample_numel(sample, "sample");
  check_like(model_output, "model_output", sample, "sample");
  check_schedule(sample, t, "t", table);
  check_schedule(sample, t_prev, "t_prev", table);
  return n;
}

// mean, logvar, noise: one layout, floating point; returns elements per sample.
inline int64_t check_gaussian_args(const at::Tensor& mean, const at::Tensor& logvar,
                                   const c10::optional<at::Tensor>& noise) {
  check_floating(mean, "mean");
  const int64_t n = per_sample_numel(mean, "mean");
  check_like(logvar, "logvar", mean, "mean");
  if (noise.has_value()) check_like(*noise, "noise", mean, "mean");
  return n;
}

inline void check_gaussian_grads(const c10::optional<at::Tensor>& grad_z,
                                 const at::Tensor& grad_kl, const at::Tensor& mean,
                                 const c10::optional<at::Tensor>& noise) {
  if (grad_z.has_value()) {
    TORCH_CHECK(noise.has_value(), "fastdiff: grad_z given without the noise that made z");
    check_like(*grad_z, "grad_z", mean, "mean");
  }
  check_grad_loss(grad_kl, mean, "grad_kl");
}

// vb_loss: model_mean, model_log_variance, x0, x_t in one layout; t (B,) and the
// posterior table (T, 4) float64. Returns elements per sample.
inline int64_t check_vb_loss_args(const at::Tensor& model_mean, const at::Tensor& model_log_variance,
                                  const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& t,
                                  const at::Tensor& posterior) {
  check_floating(model_mean, "model_mean");
  const int64_t n = per_sample_numel(model_mean, "model_mean");
  check_like(model_log_variance, "model_log_variance", model_mean, "model_mean");
  check_like(x0, "x0", model_mean, "model_mean");
  check_like(x_t, "x_t", model_mean, "model_mean");
  check_schedule(model_mean, t, "t", posterior);
  return n;
}

// group_norm_silu: the shape and layout of x and the (C,) affine parameters.
struct GroupNormArgs {
  int64_t batch, channels, hw, groups;
  bool channels_last;  // C innermost (else contiguous NC*)
};

inline GroupNormArgs check_group_norm_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                           const c10::optional<at::Tensor>& bias, int64_t num_groups,
                                           double eps) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 2, "fastdiff: group_norm_silu needs x of shape (N, C, *), got ", x.sizes());
  const int64_t channels = x.size(1);
  TORCH_CHECK(num_groups > 0 && channels % num_groups == 0, "fastdiff: num_groups = ", num_groups,
              " must divide the ", channels, " channels");
  TORCH_CHECK(eps > 0, "fastdiff: eps must be > 0, got ", eps);
  const bool contiguous = x.is_contiguous();
  const bool channels_last = !contiguous && ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                                             (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
  TORCH_CHECK(contiguous || channels_last, "fastdiff: x must be contiguous or channels_last, got strides ",
              x.strides());
  const auto acc = at::toOpMathType(x.scalar_type());
  for (const auto* p : {&weight, &bias}) {
    if (!p->has_value()) continue;
    const at::Tensor& v = p->value();
    TORCH_CHECK(v.dim() == 1 && v.size(0) == channels && v.is_contiguous() && v.scalar_type() == acc &&
                    v.device() == x.device(),
                "fastdiff: weight and bias must be contiguous ", acc, " of shape (", channels, ") on ",
                x.device(), ", got ", v.scalar_type(), " ", v.sizes(), " on ", v.device());
  }
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  return {x.size(0), channels, spatial, num_groups, channels_last};
}

// The (N, G) statistics a backward takes: the forward's.
inline void check_group_stats(const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& x,
                              const GroupNormArgs& a) {
  const auto acc = at::toOpMathType(x.scalar_type());
  for (const auto* p : {&mean, &rstd}) {
    TORCH_CHECK(p->dim() == 2 && p->size(0) == a.batch && p->size(1) == a.groups && p->is_contiguous() &&
                    p->scalar_type() == acc && p->device() == x.device(),
                "fastdiff: mean and rstd must be contiguous ", acc, " of shape (", a.batch, ", ", a.groups,
                "), got ", p->scalar_type(), " ", p->sizes());
  }
}

// Attention (attention_math.h): q (B, H, Nq, D), k / v (B, H, Nk, D), same dtype and
// device, head dim contiguous, 1 <= D <= kMaxHeadDim, Nk >= 1 (when Nq >= 1).
struct AttentionArgs {
  int64_t batch, heads, q_len, kv_len, head_dim;
};

// x with stride 1 along the head dim (other strides as they are): a copy only when needed.
inline at::Tensor head_dim_contiguous(const at::Tensor& x) {
  return x.dim() == 4 && x.size(3) > 1 && x.stride(3) != 1 ? x.contiguous() : x;
}

inline void check_head_dim_contiguous(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "fastdiff: attention needs ", name, " of shape (B, H, N, D), got ", x.sizes());
  TORCH_CHECK(x.size(3) <= 1 || x.stride(3) == 1 || x.numel() == 0, "fastdiff: ", name,
              " must have a contiguous head dim (stride 1), got strides ", x.strides());
}

inline AttentionArgs check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_floating(q, "q");
  check_head_dim_contiguous(q, "q");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"}}) {
    check_head_dim_contiguous(t, name);
    TORCH_CHECK(t.scalar_type() == q.scalar_type() && t.device() == q.device(), "fastdiff: ", name,
                " must match q's dtype and device, got ", t.scalar_type(), " on ", t.device());
    TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(3) == q.size(3), "fastdiff: ", name,
                " of shape ", t.sizes(), " does not match q of shape ", q.sizes(), " in B, H or D");
  }
  TORCH_CHECK(v.size(2) == k.size(2), "fastdiff: v of shape ", v.sizes(), " and k of shape ", k.sizes(),
              " differ in length");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "fastdiff: head dim ", q.size(3), " outside [1, ",
              kMaxHeadDim, "]");
  TORCH_CHECK(k.size(2) >= 1 || q.size(2) == 0 || q.size(0) * q.size(1) == 0,
              "fastdiff: attention needs at least one key, got k of shape ", k.sizes());
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

// out, grad_q, grad_k, grad_v: (B, H, N, D) views of (B, N, H, D) memory.
inline at::Tensor attention_output_like(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options()).permute({0, 2, 1, 3});
}

// The backward's saved tensors: the forward's (out in its layout, lse contiguous accumulation type).
inline void check_attention_saved(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& q) {
  check_head_dim_contiguous(grad_out, "grad_out");
  check_head_dim_contiguous(out, "out");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    TORCH_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type() && t.device() == q.device(),
                "fastdiff: ", name, " must match q (", q.sizes(), " ", q.scalar_type(), "), got ", t.sizes(), " ",
                t.scalar_type());
  }
  const auto acc = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
                  lse.is_contiguous() && lse.scalar_type() == acc && lse.device() == q.device(),
              "fastdiff: lse must be contiguous ", acc, " of shape (", q.size(0), ", ", q.size(1), ", ", q.size(2),
              "), got ", lse.scalar_type(), " ", lse.sizes());
}

}  // namespace fastdiff
