// Shared by the C++ autograd of the per-layer ops.
#pragma once

#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>

namespace fastdiff::autograd {

// The backward ops have no autograd of their own: a gradient taken with create_graph=True
// through them would be silently wrong beyond first order, so it is refused (the Python
// autograd of the other ops: fastdiff/ops/_common.py first_order_only).
inline void check_first_order(const char* op, const at::Tensor& grad, const torch::autograd::variable_list& saved) {
  if (!at::GradMode::is_enabled()) return;
  bool needs = grad.requires_grad();
  for (const auto& t : saved) needs = needs || (t.defined() && t.requires_grad());
  TORCH_CHECK(!needs, "fastdiff.", op, " has no double backward: its gradient was taken with create_graph=True and ",
              "would be wrong beyond first order; use backend=\"reference\" for higher-order gradients ",
              "(e.g. a gradient penalty)");
}

}  // namespace fastdiff::autograd
