"""fastdiff.q_sample: forward noising x_t ~ q(x_t | x_0) (DDPMScheduler.add_noise)."""
from __future__ import annotations

import torch

from .. import reference
from .._backend import select
from ._common import check_schedule, check_tensor, dense, op_namespace, register, same_layout, timesteps


def q_sample(x0, t, noise, schedule, *, backend=None):
    """x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise, t of shape (B,).

    Differentiable in x0 and noise. Equals diffusers' ``DDPMScheduler.add_noise(x0, noise, t)``
    (fastdiff computes the coefficients in fp32 for fp16/bf16 inputs).
    """
    check_tensor(x0, "x0")
    check_tensor(noise, "noise", like=x0, like_name="x0")
    check_schedule(schedule)
    name = select("q_sample", x0.device, backend)
    t = timesteps(t, "t", x0.shape[0], x0.device, schedule.num_timesteps, kernel_checks_range=name == "cpu")
    if name == "reference":
        return reference.q_sample(x0, t, noise, schedule)
    x0, noise = same_layout(x0, noise)
    table = schedule.table(x0.device)
    return op_namespace(name).q_sample(x0, noise, t, table)


def _fake(x0, noise, t, table):
    return torch.empty_like(x0)


def _fake_bwd(grad_out, t, table):
    return torch.empty_like(grad_out), torch.empty_like(grad_out)


def _setup_context(ctx, inputs, output):
    _, _, t, table = inputs
    ctx.save_for_backward(t, table)


def _make_backward(bwd_op):
    def backward(ctx, grad):
        t, table = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None
        grad_x0, grad_noise = bwd_op(dense(grad), t, table)
        return (grad_x0 if ctx.needs_input_grad[0] else None,
                grad_noise if ctx.needs_input_grad[1] else None, None, None)

    return backward


def _triton_fwd(x0, noise, t, table):
    from ..kernels import q_sample as k

    return k.q_sample_fwd(x0, noise, t, table)


def _triton_bwd(grad_out, t, table):
    from ..kernels import q_sample as k

    return k.q_sample_bwd(grad_out, t, table)


register("q_sample", "_q_sample_bwd", _fake, _fake_bwd, _setup_context, _make_backward, _triton_fwd, _triton_bwd)
