// Autograd of fastdiff::group_norm_silu in C++ (torchvision's csrc/ops/autograd
// pattern): the op runs in every ResNet block of a U-Net / VAE, twice, and a
// Python autograd.Function costs ~0.1 ms per forward + backward, as much as the
// kernels at 16x16 feature maps (fastdiff/ops/group_norm_silu.py keeps the Python
// registration for the Triton namespace only).
//
// Nothing here reads a size or a stride (the backward kernels take grad_y in any
// layout): under torch.compile these tensors are fake with symbolic shapes, and a
// read would pin them. mean / rstd are not marked non-differentiable (compiled
// autograd refuses C++ nodes that mark outputs); their gradients are ignored.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_common.h"

namespace fastdiff::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_below_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t num_groups, double eps, bool silu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastdiff::group_norm_silu", "")
                       .typed<decltype(group_norm_silu_below_autograd)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, weight, bias, num_groups, eps, silu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_op(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastdiff::_group_norm_silu_bwd", "")
                       .typed<decltype(group_norm_silu_bwd_op)>();
  return op.call(grad_y, x, weight, bias, mean, rstd, num_groups, silu);
}

c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

class GroupNormSiLU : public torch::autograd::Function<GroupNormSiLU> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps, bool silu) {
    auto [y, mean, rstd] = group_norm_silu_below_autograd(x, weight, bias, num_groups, eps, silu);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["silu"] = silu;
    ctx->set_materialize_grads(false);  // no zero tensors for mean / rstd's (ignored) gradients
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    check_first_order("group_norm_silu", grad_y, saved);
    auto [grad_x, grad_w, grad_b] =
        group_norm_silu_bwd_op(grad_y, saved[0], maybe(saved[1]), maybe(saved[2]), saved[3], saved[4],
                               ctx->saved_data["num_groups"].toInt(), ctx->saved_data["silu"].toBool());
    return {grad_x, saved[1].defined() ? grad_w : at::Tensor(), saved[2].defined() ? grad_b : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_autograd(const at::Tensor& x,
                                                                          const c10::optional<at::Tensor>& weight,
                                                                          const c10::optional<at::Tensor>& bias,
                                                                          int64_t num_groups, double eps, bool silu) {
  const variable_list out = GroupNormSiLU::apply(x, weight, bias, num_groups, eps, silu);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) {
  m.impl("group_norm_silu", &group_norm_silu_autograd);
}

}  // namespace fastdiff::autograd
