"""fastdiff.sample_and_kl / reparameterize / gaussian_kl: the VAE posterior's sample and its
KL to N(0, I), fused into one pass forward and one pass backward."""
from __future__ import annotations

import torch

from .. import reference
from .._backend import select
from ._common import check_choice, check_tensor, match_layout, op_namespace, opmath_dtype, register, same_layout

REDUCTIONS = reference.KL_REDUCTIONS


def _check(mean, logvar, noise):
    check_tensor(mean, "mean")
    check_tensor(logvar, "logvar", like=mean, like_name="mean")
    if noise is not None:
        check_tensor(noise, "noise", like=mean, like_name="mean")


def _reduce(kl_per_sample, reduction, mean):
    kl = kl_per_sample.to(mean.dtype) if reduction == "sum_per_sample" else kl_per_sample
    if reduction == "sum":
        kl = kl.sum().to(mean.dtype)
    elif reduction == "mean":
        kl = (kl.sum() / mean.numel()).to(mean.dtype)
    return kl


def _fused(mean, logvar, noise, reduction, backend):
    """(z or None, kl reduced) through the fused op; "none" (an elementwise KL) is eager."""
    _check(mean, logvar, noise)
    check_choice(reduction, "reduction", REDUCTIONS)
    name = select("sample_and_kl", mean.device, backend)
    if name == "reference" or reduction == "none":
        z = None if noise is None else reference.reparameterize(mean, logvar, noise)
        return z, reference.gaussian_kl(mean, logvar, reduction)
    mean, logvar, noise = same_layout(mean, logvar, noise)
    z, kl = op_namespace(name).sample_and_kl(mean, logvar, noise)
    return (z if noise is not None else None), _reduce(kl, reduction, mean)


def sample_and_kl(mean, logvar, noise, reduction="sum_per_sample", *, backend=None):
    """(z, kl): z = mean + exp(logvar / 2) * noise and KL(N(mean, exp(logvar)) || N(0, I)),
    from ONE pass over mean, logvar and noise (and one pass backward).

    reduction: "sum_per_sample" (B,) = diffusers' DiagonalGaussianDistribution.kl(); "sum";
    "mean" (over all elements); "none" (elementwise; computed eagerly: an elementwise output
    has nothing to fuse). Differentiable in mean, logvar (and noise). fp16/bf16 in and out,
    fp32 inside; the per-sample sums are deterministic (fixed split, fixed-order second stage).
    """
    if noise is None:
        raise TypeError("noise must be a torch.Tensor (use fastdiff.gaussian_kl for the KL alone)")
    return _fused(mean, logvar, noise, reduction, backend)


def reparameterize(mean, logvar, noise, *, backend=None):
    """z = mean + exp(logvar / 2) * noise (the fused kernel; its KL sums are a by-product)."""
    if noise is None:
        raise TypeError("noise must be a torch.Tensor")
    return _fused(mean, logvar, noise, "sum_per_sample", backend)[0]


def gaussian_kl(mean, logvar, reduction="sum_per_sample", *, backend=None):
    """KL(N(mean, exp(logvar)) || N(0, I)); reductions as in sample_and_kl."""
    return _fused(mean, logvar, None, reduction, backend)[1]


def _fake(mean, logvar, noise):
    z = torch.empty_like(mean) if noise is not None else mean.new_empty((0,))
    return z, mean.new_empty((mean.shape[0],), dtype=opmath_dtype(mean.dtype))


def _fake_bwd(grad_z, grad_kl, mean, logvar, noise):
    return torch.empty_like(mean), torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    mean, logvar, noise = inputs
    ctx.save_for_backward(mean, logvar, noise)
    ctx.set_materialize_grads(False)  # a missing grad of z or kl means zero: no zero tensors


def _make_backward(bwd_op):
    def backward(ctx, grad_z, grad_kl):
        mean, logvar, noise = ctx.saved_tensors
        if grad_z is None and grad_kl is None:
            return None, None, None
        if grad_kl is None:
            grad_kl = mean.new_zeros((mean.shape[0],), dtype=opmath_dtype(mean.dtype))
        if grad_z is not None and noise is not None:
            grad_z = match_layout(grad_z, mean)
        else:
            grad_z = None
        grad_mean, grad_logvar = bwd_op(grad_z, grad_kl.contiguous(), mean, logvar, noise)
        grad_noise = None
        if ctx.needs_input_grad[2] and grad_z is not None:
            acc = opmath_dtype(mean.dtype)  # d z / d noise = std, in fp32 as the kernels
            grad_noise = (grad_z.to(acc) * torch.exp(0.5 * logvar.to(acc))).to(noise.dtype)
        return (grad_mean if ctx.needs_input_grad[0] else None,
                grad_logvar if ctx.needs_input_grad[1] else None, grad_noise)

    return backward


def _triton_fwd(mean, logvar, noise):
    from ..kernels import sample_and_kl as k

    return k.sample_and_kl_fwd(mean, logvar, noise)


def _triton_bwd(grad_z, grad_kl, mean, logvar, noise):
    from ..kernels import sample_and_kl as k

    return k.sample_and_kl_bwd(grad_z, grad_kl, mean, logvar, noise)


register("sample_and_kl", "_sample_and_kl_bwd", _fake, _fake_bwd, _setup_context, _make_backward,
         _triton_fwd, _triton_bwd)
