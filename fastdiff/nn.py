"""Drop-in modules built on fastdiff's fused ops."""
from __future__ import annotations

import torch

from . import reference
from .ops._common import check_choice, opmath_dtype
from .ops.attention import attention
from .ops.group_norm_silu import ACTIVATIONS, group_norm_silu


class GroupNormSiLU(torch.nn.GroupNorm):
    """``nn.GroupNorm`` followed by SiLU, fused (``activation=None``: the GroupNorm alone).

    A subclass of ``torch.nn.GroupNorm`` with the same parameters and state_dict keys: it loads a
    GroupNorm's weights as they are. ``backend`` picks the kernel as the functional ops do.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation="silu", device=None, dtype=None,
                 backend=None):
        check_choice(activation, "activation", ACTIVATIONS)
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, x):
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                               backend=self.backend)

    def extra_repr(self):
        return super().extra_repr() + f", activation={self.activation!r}"


class AttentionBlock(reference.AttentionBlock):
    """The U-Net self-attention block (DDPM/ADM; optional cross-attention to a context as in
    GLIDE), fused: same constructor, parameters and state_dict as
    ``fastdiff.reference.AttentionBlock`` (subclass; loads its weights as they are).

    - GroupNorm is folded into the qkv projection: norm(x) = s x + t per (sample, channel), so
      qkv = (W diag(s)) x + (W t + b) is one batched matmul reading x itself; no normalized
      copy of x is made or saved.
    - Attention through ``fastdiff.attention`` (no N x N tensor; its (B, N, H, D) output layout
      is the output projection's input as it is).
    - The output projection accumulates into a copy of the residual (x + bias, then
      ``baddbmm_``): the block's output is the only (B, C, N) tensor written after attention.
    """

    def __init__(self, channels, num_heads=None, num_head_channels=-1, norm_groups=32, context_dim=None,
                 backend=None):
        super().__init__(channels, num_heads, num_head_channels, norm_groups, context_dim)
        self.backend = backend

    def _norm_scale_shift(self, x_flat):
        """(s, t) of shape (B, C) with GroupNorm(x) = s x + t; statistics in fp32 (fp64 for fp64)."""
        b, c, _ = x_flat.shape
        g = self.norm.num_groups
        xg = x_flat.reshape(b, g, -1)
        var, mean = torch.var_mean(xg.to(opmath_dtype(xg.dtype)), dim=2, correction=0)
        rstd = torch.rsqrt(var + self.norm.eps).repeat_interleave(c // g, dim=1)
        s = self.norm.weight * rstd
        t = self.norm.bias - mean.repeat_interleave(c // g, dim=1) * s
        return s, t

    def forward(self, x, context=None):
        self.check_context(x, context)
        b, c, *spatial = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        x_flat = x.reshape(b, c, -1)
        n = x_flat.shape[2]
        s, t = self._norm_scale_shift(x_flat)
        w = self.qkv.weight.squeeze(-1)  # (3C, C)
        w_b = w.unsqueeze(0) * s.unsqueeze(1).to(w.dtype)  # (B, 3C, C)
        bias_b = torch.addmm(self.qkv.bias, t.to(w.dtype), w.t())  # (B, 3C)
        qkv = torch.baddbmm(bias_b.unsqueeze(1).to(x.dtype), x_flat.transpose(1, 2), w_b.transpose(1, 2).to(x.dtype))
        qkv = qkv.view(b, n, heads, 3, ch)  # ADM's head order: each head's q, k, v adjacent
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, ch) views
        if context is not None:
            ekv = torch.nn.functional.linear(context, self.encoder_kv.weight.squeeze(-1), self.encoder_kv.bias)
            ekv = ekv.view(b, context.shape[1], heads, 2, ch)
            k = torch.cat([ekv[:, :, :, 0].transpose(1, 2), k], dim=2)
            v = torch.cat([ekv[:, :, :, 1].transpose(1, 2), v], dim=2)
        a = attention(q, k, v, backend=self.backend)
        a = a.transpose(1, 2).reshape(b, n, c)  # a view for the fused backends' layout
        out = x_flat + self.proj_out.bias.unsqueeze(-1).to(x.dtype)
        out.baddbmm_(self.proj_out.weight.squeeze(-1).to(x.dtype).expand(b, c, c), a.transpose(1, 2))
        return out.reshape(b, c, *spatial)
