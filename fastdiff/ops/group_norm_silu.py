"""fastdiff.group_norm_silu: GroupNorm + SiLU in one pass forward (saving only the (N, G)
statistics) and one fused backward, for contiguous and channels-last inputs."""
from __future__ import annotations

import torch

from .. import reference
from .._backend import select
from ._common import FLOAT_DTYPES, check_choice, check_tensor, match_layout, op_namespace, opmath_dtype, register

ACTIVATIONS = reference.ACTIVATIONS


def _native_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: contiguous NC*, or channels-last (4-D / 5-D) as it is."""
    if x.is_contiguous():
        return x
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
            x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return x
    return x.contiguous()


def _check_param(p, name, channels, x):
    if p is None or (isinstance(p, torch.Tensor) and p.dtype in FLOAT_DTYPES and p.shape == (channels,)
                     and p.device == x.device):
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float64/float16/bfloat16, got {p.dtype}")
    if tuple(p.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) for x with {channels} channels, got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")


def _as_param(p, acc):
    # tested before converting: a no-op .to().contiguous() still costs two dispatcher calls
    if p is None or (p.dtype is acc and p.is_contiguous()):
        return p
    return p.to(acc).contiguous()


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu", *, backend=None):
    """``F.silu(F.group_norm(x, num_groups, weight, bias, eps))`` fused (``activation=None``: the
    GroupNorm alone). x: (N, C, *) of any float dtype; statistics and math in fp32 (fp64 for
    fp64), output in x's dtype and memory format (contiguous or channels_last, no permute
    copies). weight / bias: (C,) or None. The forward saves only the per-(sample, group) mean and
    rstd; the backward recomputes the activation and reduces d weight / d bias deterministically.
    """
    check_tensor(x, "x", min_dim=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(f"num_groups = {num_groups} must divide the number of channels C = {channels}")
    _check_param(weight, "weight", channels, x)
    _check_param(bias, "bias", channels, x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    check_choice(activation, "activation", ACTIVATIONS)
    name = select("group_norm_silu", x.device, backend)
    if name == "reference":
        return reference.group_norm_silu(x, num_groups, weight, bias, eps, activation)
    acc = opmath_dtype(x.dtype)  # the kernels take the affine parameters in fp32 (fp64): lossless
    weight = _as_param(weight, acc)
    bias = _as_param(bias, acc)
    y, _, _ = op_namespace(name).group_norm_silu(_native_layout(x), weight, bias, num_groups, float(eps),
                                                 activation == "silu")
    return y


def _fake(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=opmath_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_bwd(grad_y, x, weight, bias, mean, rstd, num_groups, silu):
    acc = opmath_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty((0 if weight is None else x.shape[1],), dtype=acc),
            x.new_empty((0 if bias is None else x.shape[1],), dtype=acc))


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu
    ctx.set_materialize_grads(False)  # mean / rstd get no gradient


def _make_backward(bwd_op):
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if grad_y is None:
            return (None,) * 6
        grad_x, grad_w, grad_b = bwd_op(match_layout(grad_y, x), x, weight, bias, mean, rstd, ctx.num_groups,
                                        ctx.silu)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_w if ctx.needs_input_grad[1] else None,
                grad_b if ctx.needs_input_grad[2] else None, None, None, None)

    return backward


def _triton_fwd(x, weight, bias, num_groups, eps, silu):
    from ..kernels import group_norm_silu as k

    return k.group_norm_silu_fwd(x, weight, bias, num_groups, eps, silu)


def _triton_bwd(grad_y, x, weight, bias, mean, rstd, num_groups, silu):
    from ..kernels import group_norm_silu as k

    return k.group_norm_silu_bwd(grad_y, x, weight, bias, mean, rstd, num_groups, silu)


register("group_norm_silu", "_group_norm_silu_bwd", _fake, _fake_bwd, _setup_context, _make_backward,
         _triton_fwd, _triton_bwd)
