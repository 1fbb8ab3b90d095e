"""fastdiff.vb_loss: improved DDPM's variational-bound term per sample, fused (one pass forward,
one pass backward), plus the elementwise pieces it is built from and the learned-range helper."""
from __future__ import annotations

import torch

from .. import reference
from .._backend import select
from .ddpm_step import posterior_mean
from ._common import (check_choice, check_schedule, check_tensor, op_namespace, opmath_dtype, register,
                      rescale_precomputed, same_layout, timesteps)

REDUCTIONS = ("none", "mean")


def vb_loss(model_mean, model_log_variance, x0, x_t, t, schedule, reduction="none", *, backend=None):
    """The VLB term L_t of each sample in bits per dim (improved DDPM's ``_vb_terms_bpd``).

    For t > 0: KL(q(x_{t-1} | x_t, x0) || N(model_mean, exp(model_log_variance))), the true
    posterior's mean and clipped log-variance computed in-kernel from the schedule; for t == 0:
    the decoder's negative log-likelihood of x0 (8-bit bins, ``discretized_gaussian_log_likelihood``).
    Both averaged over the non-batch dims and divided by log(2). ``reduction="none"`` gives
    the (B,) terms, "mean" their mean. Differentiable in every tensor input (the kernel writes
    the gradients of model_mean and model_log_variance; those of x0 and x_t follow from them).
    Accumulates in fp32 (fp64 for fp64 inputs); returns model_mean's dtype. Mixed input dtypes
    are promoted. For the hybrid loss, see ``learned_range``.
    """
    names = ("model_mean", "model_log_variance", "x0", "x_t")
    inputs = (model_mean, model_log_variance, x0, x_t)
    for x, name in zip(inputs, names):
        check_tensor(x, name)
    out_dtype = model_mean.dtype
    dtype = out_dtype
    for x in inputs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    inputs = tuple(x.to(dtype) for x in inputs)
    for x, name in zip(inputs[1:], names[1:]):
        check_tensor(x, name, like=inputs[0], like_name="model_mean")
    check_schedule(schedule)
    check_choice(reduction, "reduction", REDUCTIONS)
    batch = model_mean.shape[0]
    if batch == 0 and reduction == "mean":
        raise ValueError("vb_loss: empty batch (model_mean.shape[0] == 0) has no mean loss")
    name = select("vb_loss", model_mean.device, backend)
    t = timesteps(t, "t", batch, model_mean.device, schedule.num_timesteps, kernel_checks_range=name == "cpu")
    if name == "reference":
        loss = reference.vb_loss(*inputs, t, schedule)
    else:
        inputs = same_layout(*inputs)
        # The gradient is known in the forward: when it will be needed, the forward writes it
        # (scaled for the mean) and the backward only hands it out.
        grad_scale = 0.0
        if torch.is_grad_enabled() and (inputs[0].requires_grad or inputs[1].requires_grad):
            grad_scale = 1.0 / batch if reduction == "mean" else 1.0
        loss = op_namespace(name).vb_loss(*inputs, t, schedule.posterior_table(model_mean.device),
                                          grad_scale)[0]
    loss = loss.to(out_dtype)
    return loss.mean() if reduction == "mean" else loss


def learned_range(model_output, x_t, t, schedule, prediction_type="epsilon", *, backend=None):
    """(model_mean, model_log_variance) of p(x_{t-1} | x_t) for a network with learned-range
    variance (improved DDPM): ``model_output`` is (B, 2C, ...), the prediction | v in [-1, 1].

    model_mean is the posterior mean at the predicted x0 (the DDPM step's fused kernel, without
    noise or clipping) computed from the *detached* prediction: the stop-gradient of the hybrid
    loss. model_log_variance = (v + 1) / 2 log(beta_t) + (1 - v) / 2 (clipped posterior
    log-variance), differentiable in v. The hybrid loss L_simple + lambda L_vlb is then::

        eps = model_output.chunk(2, dim=1)[0]
        mean, log_variance = fastdiff.learned_range(model_output, x_t, t, schedule)
        vlb = fastdiff.vb_loss(mean, log_variance, x0, x_t, t, schedule, reduction="mean")
        loss = fastdiff.diffusion_loss(eps, x0, noise, t, schedule) + lambda_ * schedule.num_timesteps * vlb

    (lambda_ = 0.001 in the paper: improved-diffusion's RESCALED_MSE, vb * T / 1000).
    """
    check_tensor(model_output, "model_output", min_dim=2)
    check_tensor(x_t, "x_t", min_dim=2)
    expected = (x_t.shape[0], 2 * x_t.shape[1]) + tuple(x_t.shape[2:])
    if tuple(model_output.shape) != expected:
        raise ValueError(f"model_output must have shape {expected} (prediction and variance channels for x_t "
                         f"of shape {tuple(x_t.shape)}), got {tuple(model_output.shape)}")
    check_schedule(schedule)
    prediction, v = model_output.chunk(2, dim=1)
    mean = posterior_mean(prediction.detach(), t, x_t, schedule, prediction_type, backend=backend)
    t = timesteps(t, "t", x_t.shape[0], x_t.device, schedule.num_timesteps)
    return mean, reference.learned_range(v, t, schedule)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise with broadcasting
    (improved-diffusion's normal_kl). An elementwise output has nothing to fuse across: this is
    the eager formula; the fused per-sample VLB is ``vb_loss``."""
    return reference.normal_kl(mean1, logvar1, mean2, logvar2)


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Elementwise log-likelihood of 8-bit data x in [-1, 1] under N(means, exp(log_scales)^2)
    (improved-diffusion's function of the same name: edge bins at -1 and 1, probabilities
    clamped at 1e-12 before the logs). Eager, as normal_kl; fused inside ``vb_loss``."""
    check_tensor(x, "x")
    check_tensor(means, "means", like=x, like_name="x")
    check_tensor(log_scales, "log_scales", like=x, like_name="x")
    return reference.discretized_gaussian_log_likelihood(x, means, log_scales)


def _fake(model_mean, model_log_variance, x0, x_t, t, posterior, grad_scale):
    loss = model_mean.new_empty((model_mean.shape[0],), dtype=opmath_dtype(model_mean.dtype))
    if grad_scale != 0:
        return loss, torch.empty_like(model_mean), torch.empty_like(model_mean)
    return loss, model_mean.new_empty((0,)), model_mean.new_empty((0,))


def _fake_bwd(grad_loss, model_mean, model_log_variance, x0, x_t, t, posterior):
    return torch.empty_like(model_mean), torch.empty_like(model_mean)


def _setup_context(ctx, inputs, output):
    model_mean, model_log_variance, x0, x_t, t, posterior, grad_scale = inputs
    ctx.save_for_backward(model_mean, model_log_variance, x0, x_t, t, posterior)
    ctx.grad_scale = grad_scale
    ctx.set_materialize_grads(False)  # the gradient buffers (outputs 2, 3) get no gradient
    # detach(): keeping the op's own outputs on ctx would make a reference cycle.
    ctx.precomputed = (output[1].detach(), output[2].detach()) if grad_scale != 0 else None


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, _grad_of_grad_mean, _grad_of_grad_log_variance):
        if grad_loss is None:
            return (None,) * 7
        model_mean, model_log_variance, x0, x_t, t, posterior = ctx.saved_tensors
        # The forward's gradients are handed out once; a second backward (retain_graph)
        # recomputes them with the backward kernel.
        grads, ctx.precomputed = ctx.precomputed, None
        if grads is not None:
            grad_m, grad_lv = rescale_precomputed(grads, grad_loss, ctx.grad_scale)
        else:
            grad_m, grad_lv = bwd_op(grad_loss.contiguous(), model_mean, model_log_variance, x0, x_t, t,
                                     posterior)
        # The term depends on x0 and x_t through d = c_x0 x0 + c_xt x_t - m (t > 0) and through
        # x0 - m (t == 0): their gradients are -grad_m times (c_x0, c_xt), or (1, 0) at t == 0.
        grad_x0 = grad_xt = None
        shape = (-1,) + (1,) * (model_mean.dim() - 1)
        decoder = (t == 0).view(shape)
        if ctx.needs_input_grad[2]:
            c_x0 = torch.where(decoder, 1.0, posterior[t, 0].view(shape))
            grad_x0 = (-grad_m * c_x0.to(grad_m.dtype))
        if ctx.needs_input_grad[3]:
            c_xt = torch.where(decoder, 0.0, posterior[t, 1].view(shape))
            grad_xt = (-grad_m * c_xt.to(grad_m.dtype))
        return (grad_m if ctx.needs_input_grad[0] else None, grad_lv if ctx.needs_input_grad[1] else None,
                grad_x0, grad_xt, None, None, None)

    return backward


def _triton_fwd(model_mean, model_log_variance, x0, x_t, t, posterior, grad_scale):
    from ..kernels import vb_loss as k

    return k.vb_loss_fwd(model_mean, model_log_variance, x0, x_t, t, posterior, grad_scale)


def _triton_bwd(grad_loss, model_mean, model_log_variance, x0, x_t, t, posterior):
    from ..kernels import vb_loss as k

    return k.vb_loss_bwd(grad_loss, model_mean, model_log_variance, x0, x_t, t, posterior)


register("vb_loss", "_vb_loss_bwd", _fake, _fake_bwd, _setup_context, _make_backward, _triton_fwd, _triton_bwd)
