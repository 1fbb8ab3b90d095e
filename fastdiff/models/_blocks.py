"""The layers a model's ``fused`` flag switches between, built in one place."""
from __future__ import annotations

from .. import nn as fnn
from .. import reference


class BlockFactory:
    """GroupNorm + SiLU and attention blocks, eager (reference.py) or fused (fastdiff.nn);
    both flavours have the same parameters and state_dict keys."""

    def __init__(self, fused: bool, norm_groups: int, num_head_channels: int = -1, backend=None):
        self.fused, self.norm_groups, self.backend = fused, norm_groups, backend
        self.num_head_channels = num_head_channels  # -1: one head

    def norm_act(self, channels):
        if self.fused:
            return fnn.GroupNormSiLU(self.norm_groups, channels, backend=self.backend)
        return reference.GroupNormAct(self.norm_groups, channels)

    def attention(self, channels):
        if self.fused:
            return fnn.AttentionBlock(channels, num_head_channels=self.num_head_channels,
                                      norm_groups=self.norm_groups, backend=self.backend)
        return reference.AttentionBlock(channels, num_head_channels=self.num_head_channels,
                                        norm_groups=self.norm_groups)
