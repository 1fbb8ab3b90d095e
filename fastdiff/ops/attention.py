"""fastdiff.attention: softmax(scale q k^T) v without an Nq x Nk tensor (flash-style forward
saving only the log-sum-exp, backward recomputing the probabilities blockwise; deterministic)."""
from __future__ import annotations

import math

import torch

from .. import reference
from .._backend import select
from ._common import FLOAT_DTYPES, op_namespace, opmath_dtype, register

# Head dims up to this run (csrc/include/fastdiff/attention_math.h, kMaxHeadDim).
MAX_HEAD_DIM = 256


def _check_qkv(q, k, v):
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/float64/float16/bfloat16, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(x.shape)}")
    for x, name in ((k, "k"), (v, "v")):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} dtype {x.dtype} does not match q dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        for dim, what in ((0, "batch B"), (1, "heads H"), (3, "head dim D")):
            if x.shape[dim] != q.shape[dim]:
                raise ValueError(f"{name} of shape {tuple(x.shape)} does not match q of shape {tuple(q.shape)} "
                                 f"in {what}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} tokens but k has {k.shape[2]} (shapes {tuple(v.shape)}, "
                         f"{tuple(k.shape)})")
    if k.shape[2] == 0:
        raise ValueError(f"k and v need at least one token (Nk >= 1), got k of shape {tuple(k.shape)}")
    d = q.shape[3]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D = {d} is outside [1, {MAX_HEAD_DIM}] (MAX_HEAD_DIM)")


def _head_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels' contract: stride 1 along D (any other strides, e.g. views of a qkv buffer)."""
    return x if x.stride(3) == 1 or x.shape[3] == 1 else x.contiguous()


def attention(q, k, v, scale=None, *, backend=None):
    """softmax(scale q k^T) v, non-causal (self- or cross-attention), never storing the
    (Nq, Nk) scores. q: (B, H, Nq, D), k / v: (B, H, Nk, D), D in [1, 256], one float dtype;
    scale defaults to 1 / sqrt(D). Returns (B, H, Nq, D) in q's dtype; the fused backends
    lay it out as (B, Nq, H, D) in memory, so ``out.transpose(1, 2).reshape(B, Nq, H * D)``
    (the output projection's input) is a view.

    backend: "cpu" / "cuda" / "triton" (fastdiff's kernels: fp32 statistics, deterministic
    backward, no atomics), "sdpa" (torch's scaled_dot_product_attention), "xformers"
    (memory_efficient_attention, when installed), "reference" (eager, materialized scores),
    or None / "auto" (fastest usable per device, see README).
    """
    _check_qkv(q, k, v)
    if scale is None:
        scale = q.shape[3] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    scale = float(scale)
    name = select("attention", q.device, backend)
    if name == "reference":
        return reference.attention(q, k, v, scale)
    if name == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    if name == "xformers":
        import xformers.ops as xops  # (B, N, H, D) in and out

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    out, _ = op_namespace(name).attention(_head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v),
                                          scale)
    return out


def _bnhd_like(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, D) tensor stored as (B, N, H, D), the kernels' output layout."""
    b, h, n, d = x.shape
    return x.new_empty((b, n, h, d)).permute(0, 2, 1, 3)


def _fake(q, k, v, scale):
    return _bnhd_like(q), q.new_empty(q.shape[:3], dtype=opmath_dtype(q.dtype))


def _fake_bwd(grad_out, q, k, v, out, lse, scale):
    return _bnhd_like(q), _bnhd_like(k), _bnhd_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # lse gets no gradient


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None
        grad_q, grad_k, grad_v = bwd_op(_head_dim_contiguous(grad_out), q, k, v, out, lse, ctx.scale)
        return (grad_q if ctx.needs_input_grad[0] else None, grad_k if ctx.needs_input_grad[1] else None,
                grad_v if ctx.needs_input_grad[2] else None, None)

    return backward


def _triton_fwd(q, k, v, scale):
    from ..kernels import attention as k_

    return k_.attention_fwd(q, k, v, scale)


def _triton_bwd(grad_out, q, k, v, out, lse, scale):
    from ..kernels import attention as k_

    return k_.attention_bwd(grad_out, q, k, v, out, lse, scale)


register("attention", "_attention_bwd", _fake, _fake_bwd, _setup_context, _make_backward, _triton_fwd, _triton_bwd)
