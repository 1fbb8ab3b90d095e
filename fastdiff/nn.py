"""Drop-in modules built on fastdiff's fused ops."""
from __future__ import annotations

import torch

from .ops.group_norm_silu import ACTIVATIONS, group_norm_silu
from .ops._common import check_choice


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
