"""fastdiff.ddim_step: one DDIM sampling step (DDIMScheduler.step)."""
from __future__ import annotations

import torch

from .. import reference
from .._backend import select
from ._common import (check_choice, check_schedule, check_tensor, match_layout, op_namespace,
                      randn_like_diffusers, register, same_layout, timesteps)

PREDICTION_TYPES = reference.PREDICTION_TYPES


def ddim_step(model_output, t, t_prev, sample, schedule, eta=0.0, noise=None, generator=None,
              prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0,
              use_clipped_model_output=False, *, backend=None):
    """x_{t_prev} from x_t: ``DDIMScheduler.step(model_output, t, sample, eta).prev_sample``
    (with set_alpha_to_one: t_prev < 0 means alpha_bar_prev = 1), fused into one kernel.

    t, t_prev: ints or (B,) integer tensors. Noise is drawn (or taken) only when eta > 0.
    Differentiable in model_output and sample.
    """
    check_tensor(sample, "sample")
    check_tensor(model_output, "model_output", like=sample, like_name="sample")
    check_schedule(schedule)
    pred = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ValueError(f"eta must be a non-negative number, got {eta!r}")
    if not isinstance(clip_sample_range, (int, float)) or not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be a positive number, got {clip_sample_range!r}")
    batch, device = sample.shape[0], sample.device
    name = select("ddim_step", device, backend)
    in_kernel = name == "cpu"
    t = timesteps(t, "t", batch, device, schedule.num_timesteps, kernel_checks_range=in_kernel)
    t_prev = timesteps(t_prev, "t_prev", batch, device, schedule.num_timesteps, allow_negative=True,
                       kernel_checks_range=in_kernel)
    if eta > 0:
        if noise is None:
            noise = randn_like_diffusers(sample.shape, generator, device, sample.dtype)
        check_tensor(noise, "noise", like=sample, like_name="sample")
    else:
        noise = None
    if name == "reference":
        return reference.ddim_step(model_output, t, t_prev, sample, schedule, eta, noise, prediction_type,
                                   clip_sample, clip_sample_range, use_clipped_model_output)
    model_output, sample, noise = same_layout(model_output, sample, noise)
    table = schedule.table(device)
    return op_namespace(name).ddim_step(model_output, sample, noise, t, t_prev, table, pred, float(eta),
                                        bool(clip_sample), float(clip_sample_range),
                                        bool(use_clipped_model_output))


def _fake(model_output, sample, noise, t, t_prev, table, prediction_type, eta, clip, clip_range, use_clipped):
    return torch.empty_like(sample)


def _fake_bwd(grad_out, model_output, sample, t, t_prev, table, prediction_type, eta, clip, clip_range,
              use_clipped):
    return torch.empty_like(model_output), torch.empty_like(sample)


def _setup_context(ctx, inputs, output):
    model_output, sample, noise, t, t_prev, table, *flags = inputs
    ctx.save_for_backward(model_output, sample, t, t_prev, table)
    ctx.flags = flags


def _make_backward(bwd_op):
    def backward(ctx, grad):
        model_output, sample, t, t_prev, table = ctx.saved_tensors
        grad_m, grad_x = bwd_op(match_layout(grad, sample), model_output, sample, t, t_prev, table, *ctx.flags)
        return (grad_m if ctx.needs_input_grad[0] else None, grad_x if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None, None, None)

    return backward


def _triton_fwd(model_output, sample, noise, t, t_prev, table, prediction_type, eta, clip, clip_range, use_clipped):
    from ..kernels import ddim_step as k

    return k.ddim_step_fwd(model_output, sample, noise, t, t_prev, table, prediction_type, eta, clip, clip_range,
                           use_clipped)


def _triton_bwd(grad_out, model_output, sample, t, t_prev, table, prediction_type, eta, clip, clip_range,
                use_clipped):
    from ..kernels import ddim_step as k

    return k.ddim_step_bwd(grad_out, model_output, sample, t, t_prev, table, prediction_type, eta, clip,
                           clip_range, use_clipped)


register("ddim_step", "_ddim_step_bwd", _fake, _fake_bwd, _setup_context, _make_backward, _triton_fwd, _triton_bwd)
