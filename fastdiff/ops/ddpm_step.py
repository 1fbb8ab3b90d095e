"""fastdiff.ddpm_step: one ancestral DDPM sampling step (DDPMScheduler.step)."""
from __future__ import annotations

import torch

from .. import reference
from .._backend import select
from ._common import (check_choice, check_schedule, check_tensor, match_layout, op_namespace,
                      randn_like_diffusers, register, same_layout, timesteps)

PREDICTION_TYPES = reference.PREDICTION_TYPES
VARIANCE_TYPES = reference.VARIANCE_TYPES
LEARNED = ("learned", "learned_range")


def ddpm_step(model_output, t, sample, schedule, noise=None, generator=None, prediction_type="epsilon",
              variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, *, t_prev=None,
              backend=None):
    """x_{t_prev} from x_t: ``DDPMScheduler.step(model_output, t, sample).prev_sample`` given the
    same noise (or the same generator), fused into one kernel.

    t: int or a (B,) integer tensor (per-sample timesteps). t_prev defaults to t - 1 (a full
    schedule); pass it for strided sampling (diffusers' t - T // num_inference_steps).
    Learned variance types take model_output with 2C channels (mean | variance), as
    improved DDPM's models output. For fixed_large_log and learned, diffusers 0.42 takes the
    square root of a log-variance (NaN); fastdiff uses std = exp(0.5 * log-variance) there,
    as improved DDPM does. Differentiable in model_output and sample (noise is a constant).
    """
    return _ddpm_step(model_output, t, sample, schedule, noise, generator, prediction_type, variance_type,
                      clip_sample, clip_sample_range, t_prev, backend, draw_noise=True)


def posterior_mean(model_output, t, sample, schedule, prediction_type="epsilon", *, backend=None):
    """The mean of p(x_{t-1} | x_t) (the posterior mean at the predicted x0, unclipped): the DDPM
    step without its noise, through the same fused kernel."""
    return _ddpm_step(model_output, t, sample, schedule, None, None, prediction_type, "fixed_small", False, 1.0,
                      None, backend, draw_noise=False)


def _ddpm_step(model_output, t, sample, schedule, noise, generator, prediction_type, variance_type, clip_sample,
               clip_sample_range, t_prev, backend, draw_noise):
    check_tensor(sample, "sample")
    check_tensor(model_output, "model_output")
    check_schedule(schedule)
    pred = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    var = check_choice(variance_type, "variance_type", VARIANCE_TYPES)
    if variance_type in LEARNED:
        expected = (sample.shape[0], 2 * sample.shape[1]) + tuple(sample.shape[2:]) if sample.dim() >= 2 else None
        if sample.dim() < 2 or tuple(model_output.shape) != expected:
            raise ValueError(f"variance_type={variance_type!r} needs model_output of shape {expected} "
                             f"(mean and variance channels), got {tuple(model_output.shape)}")
        if model_output.device != sample.device or model_output.dtype != sample.dtype:
            raise TypeError(f"model_output ({model_output.dtype}, {model_output.device}) must match sample "
                            f"({sample.dtype}, {sample.device})")
    else:
        check_tensor(model_output, "model_output", like=sample, like_name="sample")
    if not isinstance(clip_sample_range, (int, float)) or not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be a positive number, got {clip_sample_range!r}")
    batch, device = sample.shape[0], sample.device
    name = select("ddpm_step", device, backend)
    in_kernel = name == "cpu"
    t = timesteps(t, "t", batch, device, schedule.num_timesteps, kernel_checks_range=in_kernel)
    t_prev = t - 1 if t_prev is None else timesteps(t_prev, "t_prev", batch, device, schedule.num_timesteps,
                                                    allow_negative=True, kernel_checks_range=in_kernel)
    if noise is not None:
        check_tensor(noise, "noise", like=sample, like_name="sample")
    elif draw_noise and batch and bool((t > 0).any()):
        noise = randn_like_diffusers(sample.shape, generator, device, sample.dtype)
    if name == "reference":
        return reference.ddpm_step(model_output, t, sample, schedule, noise, prediction_type, variance_type,
                                   clip_sample, clip_sample_range, t_prev=t_prev)
    if variance_type in LEARNED:
        model_output, sample = model_output.contiguous(), sample.contiguous()
        noise = None if noise is None else noise.contiguous()
    else:
        model_output, sample, noise = same_layout(model_output, sample, noise)
    table = schedule.table(device)
    return op_namespace(name).ddpm_step(model_output, sample, noise, t, t_prev, table, pred, var,
                                        bool(clip_sample), float(clip_sample_range))


def _fake(model_output, sample, noise, t, t_prev, table, prediction_type, variance_type, clip, clip_range):
    return torch.empty_like(sample)


def _fake_bwd(grad_out, model_output, sample, noise, t, t_prev, table, prediction_type, variance_type, clip,
              clip_range):
    return torch.empty_like(model_output), torch.empty_like(sample)


def _setup_context(ctx, inputs, output):
    model_output, sample, noise, t, t_prev, table, *flags = inputs
    ctx.save_for_backward(model_output, sample, noise, t, t_prev, table)
    ctx.flags = flags


def _make_backward(bwd_op):
    def backward(ctx, grad):
        model_output, sample, noise, t, t_prev, table = ctx.saved_tensors
        grad_m, grad_x = bwd_op(match_layout(grad, sample), model_output, sample, noise, t, t_prev, table,
                                *ctx.flags)
        return (grad_m if ctx.needs_input_grad[0] else None, grad_x if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None, None)

    return backward


def _triton_fwd(model_output, sample, noise, t, t_prev, table, prediction_type, variance_type, clip, clip_range):
    from ..kernels import ddpm_step as k

    return k.ddpm_step_fwd(model_output, sample, noise, t, t_prev, table, prediction_type, variance_type, clip,
                           clip_range)


def _triton_bwd(grad_out, model_output, sample, noise, t, t_prev, table, prediction_type, variance_type, clip,
                clip_range):
    from ..kernels import ddpm_step as k

    return k.ddpm_step_bwd(grad_out, model_output, sample, noise, t, t_prev, table, prediction_type,
                           variance_type, clip, clip_range)


register("ddpm_step", "_ddpm_step_bwd", _fake, _fake_bwd, _setup_context, _make_backward, _triton_fwd, _triton_bwd)
