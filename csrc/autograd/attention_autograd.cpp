// Autograd of fastdiff::attention in C++ (as group_norm_silu_autograd.cpp, and
// for the same reason: no Python on the per-layer path of a training step; no
// size or stride reads and no outputs marked non-differentiable, as explained there).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_common.h"

namespace fastdiff::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> attention_below_autograd(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastdiff::attention", "")
                       .typed<decltype(attention_below_autograd)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(q, k, v, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_op(const at::Tensor& grad_out, const at::Tensor& q,
                                                                const at::Tensor& k, const at::Tensor& v,
                                                                const at::Tensor& out, const at::Tensor& lse,
                                                                double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastdiff::_attention_bwd", "")
                       .typed<decltype(attention_bwd_op)>();
  return op.call(grad_out, q, k, v, out, lse, scale);
}

class Attention : public torch::autograd::Function<Attention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale) {
    auto [out, lse] = attention_below_autograd(q, k, v, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->set_materialize_grads(false);  // no zero tensor for lse's (ignored) gradient
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list s = ctx->get_saved_variables();
    check_first_order("attention", grad_out, s);
    auto [grad_q, grad_k, grad_v] = attention_bwd_op(grad_out, s[0], s[1], s[2], s[3], s[4],
                                                     ctx->saved_data["scale"].toDouble());
    return {grad_q, grad_k, grad_v, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale) {
  const variable_list out = Attention::apply(q, k, v, scale);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) {
  m.impl("attention", &attention_autograd);
}

}  // namespace fastdiff::autograd
