"""fastdiff.diffusion_loss: the diffusion training loss with the target built in-kernel."""
from __future__ import annotations

import torch

from .. import reference
from .._backend import select
from ._common import (check_choice, check_schedule, check_tensor, op_namespace, opmath_dtype, register,
                      rescale_precomputed, same_layout, timesteps)

PREDICTION_TYPES = reference.PREDICTION_TYPES
REDUCTIONS = ("mean", "none")


def diffusion_loss(model_output, x0, noise, t, schedule, prediction_type="epsilon", snr_gamma=None,
                   reduction="mean", *, backend=None):
    """MSE between ``model_output`` and the training target, per sample or averaged.

    target: ``noise`` (epsilon), ``x0`` (sample) or ``sqrt(ab) noise - sqrt(1-ab) x0``
    (v_prediction), never materialized. ``snr_gamma`` applies min-SNR-gamma weights per
    sample as diffusers' training examples do. ``reduction="none"`` gives the (B,) per-sample
    losses (each the mean over its elements, times its weight); "mean" their mean. The loss is
    accumulated in fp32 (fp64 for fp64 inputs) and returned in model_output's dtype.
    Mixed dtypes (a bf16 model output against fp32 x0/noise under autocast) are promoted.
    """
    check_tensor(model_output, "model_output")
    check_tensor(x0, "x0")
    check_tensor(noise, "noise")
    out_dtype = model_output.dtype
    dtype = torch.promote_types(model_output.dtype, torch.promote_types(x0.dtype, noise.dtype))
    model_output, x0, noise = model_output.to(dtype), x0.to(dtype), noise.to(dtype)
    check_tensor(x0, "x0", like=model_output, like_name="model_output")
    check_tensor(noise, "noise", like=model_output, like_name="model_output")
    check_schedule(schedule)
    pred = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
    check_choice(reduction, "reduction", REDUCTIONS)
    if snr_gamma is not None and (not isinstance(snr_gamma, (int, float)) or isinstance(snr_gamma, bool)
                                  or not snr_gamma > 0):
        raise ValueError(f"snr_gamma must be a positive number or None, got {snr_gamma!r}")
    batch = model_output.shape[0]
    if batch == 0 and reduction == "mean":
        raise ValueError("diffusion_loss: empty batch (model_output.shape[0] == 0) has no mean loss")
    name = select("diffusion_loss", model_output.device, backend)
    t = timesteps(t, "t", batch, model_output.device, schedule.num_timesteps, kernel_checks_range=name == "cpu")
    if name == "reference":
        loss = reference.diffusion_loss(model_output, x0, noise, t, schedule, prediction_type, snr_gamma, "none")
    else:
        model_output, x0, noise = same_layout(model_output, x0, noise)
        table = schedule.table(model_output.device)
        # The MSE's gradient is known in the forward: when it will be needed, the forward
        # pass writes it too (scaled for the mean) and the backward only rescales it.
        grad_scale = 0.0
        if torch.is_grad_enabled() and model_output.requires_grad:
            grad_scale = 1.0 / batch if reduction == "mean" else 1.0
        loss, _ = op_namespace(name).diffusion_loss(model_output, x0, noise, t, table, pred,
                                                    float(snr_gamma or 0.0), grad_scale)
    loss = loss.to(out_dtype)
    return loss.mean() if reduction == "mean" else loss


def _fake(model_output, x0, noise, t, table, prediction_type, snr_gamma, grad_scale):
    loss = model_output.new_empty((model_output.shape[0],), dtype=opmath_dtype(model_output.dtype))
    grad = torch.empty_like(model_output) if grad_scale != 0 else model_output.new_empty((0,))
    return loss, grad


def _fake_bwd(grad_loss, model_output, x0, noise, t, table, prediction_type, snr_gamma):
    return torch.empty_like(model_output)


def _setup_context(ctx, inputs, output):
    model_output, x0, noise, t, table, prediction_type, snr_gamma, grad_scale = inputs
    ctx.save_for_backward(model_output, x0, noise, t, table)
    ctx.prediction_type, ctx.snr_gamma, ctx.grad_scale = prediction_type, snr_gamma, grad_scale
    # The second output (the gradient buffer) gets no gradient: do not materialize zeros for it.
    ctx.set_materialize_grads(False)
    # detach(): keeping the op's own output on ctx would make a reference cycle.
    ctx.precomputed = output[1].detach() if grad_scale != 0 else None


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, _grad_of_grad_output):
        if grad_loss is None:  # grads not materialized: nothing flows from the loss
            return (None,) * 8
        model_output, x0, noise, t, table = ctx.saved_tensors
        # The forward's gradient is handed out once; a second backward (retain_graph)
        # recomputes it with the backward kernel.
        grad_m, ctx.precomputed = ctx.precomputed, None
        if grad_m is not None:
            grad_m, = rescale_precomputed((grad_m,), grad_loss, ctx.grad_scale)
        else:
            grad_m = bwd_op(grad_loss.contiguous(), model_output, x0, noise, t, table, ctx.prediction_type,
                            ctx.snr_gamma)
        # target = c_noise * noise + c_x0 * x0 and dL/dtarget = -dL/dm:
        # epsilon (c_noise, c_x0) = (1, 0); sample (0, 1); v (sqrt(ab), -sqrt(1 - ab)).
        grad_x0 = grad_noise = None
        shape = (-1,) + (1,) * (model_output.dim() - 1)
        pred = ctx.prediction_type
        if ctx.needs_input_grad[1]:
            grad_x0 = (torch.zeros_like(x0) if pred == 0 else -grad_m if pred == 1
                       else grad_m * table[t, 3].view(shape).to(grad_m.dtype))
        if ctx.needs_input_grad[2]:
            grad_noise = (-grad_m if pred == 0 else torch.zeros_like(noise) if pred == 1
                          else -grad_m * table[t, 2].view(shape).to(grad_m.dtype))
        return (grad_m if ctx.needs_input_grad[0] else None), grad_x0, grad_noise, None, None, None, None, None

    return backward


def _triton_fwd(model_output, x0, noise, t, table, prediction_type, snr_gamma, grad_scale):
    from ..kernels import diffusion_loss as k

    return k.diffusion_loss_fwd(model_output, x0, noise, t, table, prediction_type, snr_gamma, grad_scale)


def _triton_bwd(grad_loss, model_output, x0, noise, t, table, prediction_type, snr_gamma):
    from ..kernels import diffusion_loss as k

    return k.diffusion_loss_bwd(grad_loss, model_output, x0, noise, t, table, prediction_type, snr_gamma)


register("diffusion_loss", "_diffusion_loss_bwd", _fake, _fake_bwd, _setup_context, _make_backward,
         _triton_fwd, _triton_bwd)
