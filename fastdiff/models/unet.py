"""The DDPM/ADM U-Net (improved-diffusion's ``UNetModel``), eager or fused by a flag.

``UNet(fused=False)`` is the eager model a user has today: torch.nn convolutions and linears,
``fastdiff.reference.GroupNormAct`` (GroupNorm then SiLU) and ``fastdiff.reference.AttentionBlock``.
``UNet(fused=True)`` has the same parameters and state_dict and runs ``fastdiff.nn.GroupNormSiLU``
and ``fastdiff.nn.AttentionBlock`` in their place; everything else is the same torch.nn code.
Weights move between the two with ``load_state_dict`` (or ``UNet.fused_copy``).

Layout (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021, improved-diffusion's
unet.py without scale-shift norm, resblock up/down or fp16 casts):

    emb = Linear(4mc) -> SiLU -> Linear(4mc) of the sinusoidal embedding of t (+ class embedding)
    input conv3x3 -> per level: num_res_blocks x [ResBlock (+ AttentionBlock)] -> stride-2 conv
    middle: ResBlock, AttentionBlock, ResBlock
    per level, mirrored: (num_res_blocks + 1) x [concat skip -> ResBlock (+ AttentionBlock)]
                         -> nearest 2x + conv3x3
    output: GroupNorm + SiLU -> conv3x3 (zero-initialized)

An AttentionBlock follows a ResBlock where the feature map's resolution (image_size divided by
the downsampling factor so far) is in ``attention_resolutions`` (ADM's scripts take the same
resolutions and convert them to factors).

The same network is diffusers' ``UNet2DModel`` with ``flip_sin_to_cos=True, freq_shift=0``,
``(Attn)DownBlock2D`` / ``(Attn)UpBlock2D`` blocks and ``attention_head_dim=num_head_channels``
(its weights under other names; ADM's qkv projection holds each head's q, k, v adjacently):
tests/test_models_unet.py maps the weights and compares the outputs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._blocks import BlockFactory

__all__ = ["CONFIGS", "UNet", "timestep_embedding"]

# Named configurations for ``UNet.from_config``; keyword overrides apply on top.
CONFIGS = {
    # A CPU-sized model for tests and examples: 32x32, two levels, attention at 16x16.
    "tiny": dict(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(16,), num_head_channels=32, norm_groups=8),
    # ADM's ImageNet-64 layout (channel_mult (1, 2, 3, 4), attention at 32, 16 and 8) at width 64.
    "small": dict(image_size=64, model_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                  attention_resolutions=(32, 16, 8), num_head_channels=64),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, dtype=torch.float32):
    """Sinusoidal embedding (B, dim) of timesteps t (B,) (integer or fractional), as ADM's
    ``timestep_embedding``: frequencies exp(-log(max_period) * i / half) for i < half = dim // 2,
    [cos(t f) | sin(t f)], a zero column appended for odd dim. Computed in ``dtype`` (ADM: fp32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """ADM's ResBlock (without scale-shift norm): h = conv1(norm1(x)) + emb_proj(SiLU(emb));
    out = skip(x) + conv2(dropout(norm2(h))), norm = GroupNorm + SiLU, conv2 zero-initialized;
    skip is the identity when the channel count is kept, else a 1x1 conv."""

    def __init__(self, in_channels, emb_channels, out_channels, dropout, blocks: BlockFactory):
        super().__init__()
        self.norm1 = blocks.norm_act(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = blocks.norm_act(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        # fused model: the embedding and the skip are added in place into the conv outputs (no
        # conv saves its output for backward), two fewer (B, C, H, W) tensors written per block
        self.add_in_place = blocks.fused

    def forward(self, x, emb_act):
        """emb_act: SiLU(emb), shared by all blocks of one forward."""
        h = self.conv1(self.norm1(x))
        emb = self.emb_proj(emb_act).to(h.dtype)[:, :, None, None]
        h = h.add_(emb) if self.add_in_place else h + emb
        h = self.conv2(self.dropout(self.norm2(h)))
        return h.add_(self.skip(x)) if self.add_in_place else self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 conv3x3 (ADM's Downsample with conv_resample)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then conv3x3 (ADM's Upsample with conv_resample)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """Layers run in order; ResBlocks also take the timestep embedding (ADM's TimestepEmbedSequential)."""

    def forward(self, x, emb_act):
        for layer in self:
            x = layer(x, emb_act) if isinstance(layer, ResBlock) else layer(x)
        return x


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class UNet(nn.Module):
    """The DDPM/ADM U-Net predicting noise (and, with ``learn_sigma``, the variance channels).

    Args:
        image_size: height = width of the inputs; divisible by 2 ** (len(channel_mult) - 1).
        in_channels: channels of x. out_channels: of the output (default in_channels, doubled
            when learn_sigma: the mean | variance outputs of improved DDPM).
        model_channels: base width; level i has model_channels * channel_mult[i] channels; the
            timestep embedding has 4 * model_channels.
        num_res_blocks: ResBlocks per level on the way down (num_res_blocks + 1 on the way up).
        attention_resolutions: feature-map sizes (e.g. 16 for 16x16) that get an AttentionBlock
            after each ResBlock; the middle block always has one.
        num_head_channels: channels per attention head (-1: one head).
        norm_groups: GroupNorm groups; every channel count must be divisible by it.
        num_classes: class-conditional with an nn.Embedding(num_classes, 4 * model_channels)
            added to the timestep embedding; forward then needs y.
        fused: False: eager (reference.GroupNormAct, reference.AttentionBlock); True: fastdiff's
            fused GroupNormSiLU and AttentionBlock. Same parameters and state_dict either way.
        backend: fastdiff backend of the fused modules (None: auto).
    """

    def __init__(self, image_size=32, in_channels=3, model_channels=64, out_channels=None,
                 channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), num_head_channels=64,
                 norm_groups=32, dropout=0.0, learn_sigma=False, num_classes=None, fused=True, backend=None):
        super().__init__()
        for name, value in (("image_size", image_size), ("in_channels", in_channels),
                            ("model_channels", model_channels), ("num_res_blocks", num_res_blocks),
                            ("norm_groups", norm_groups)):
            _check_positive_int(value, name)
        channel_mult = tuple(channel_mult)
        if not channel_mult:
            raise ValueError("channel_mult must not be empty")
        for m in channel_mult:
            _check_positive_int(m, f"channel_mult entry (channel_mult={channel_mult})")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size = {image_size} must be divisible by 2 ** (len(channel_mult) - 1) = "
                             f"{factor} (channel_mult={channel_mult})")
        for ch in sorted({model_channels * m for m in channel_mult}):
            if ch % norm_groups:
                raise ValueError(f"channel count {ch} (model_channels={model_channels} x channel_mult entry) "
                                 f"is not divisible by norm_groups = {norm_groups}")
        if out_channels is None:
            out_channels = in_channels * (2 if learn_sigma else 1)
        _check_positive_int(out_channels, "out_channels")
        if num_classes is not None:
            _check_positive_int(num_classes, "num_classes")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        attention_resolutions = tuple(int(r) for r in attention_resolutions)

        self.config = dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                           out_channels=out_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                           attention_resolutions=attention_resolutions, num_head_channels=num_head_channels,
                           norm_groups=norm_groups, dropout=dropout, learn_sigma=learn_sigma,
                           num_classes=num_classes)
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        self.fused, self.backend = fused, backend
        blocks = BlockFactory(fused, norm_groups, num_head_channels, backend)

        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_emb = nn.Embedding(num_classes, emb_ch) if num_classes is not None else None

        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        skip_chans = [model_channels]
        ch, res = model_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_ch, model_channels * mult, dropout, blocks)]
                ch = model_channels * mult
                if res in attention_resolutions:
                    layers.append(blocks.attention(ch))
                self.input_blocks.append(EmbedSequential(layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential([Downsample(ch)]))
                skip_chans.append(ch)
                res //= 2

        self.middle_block = EmbedSequential([ResBlock(ch, emb_ch, ch, dropout, blocks), blocks.attention(ch),
                                             ResBlock(ch, emb_ch, ch, dropout, blocks)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_ch, model_channels * mult, dropout, blocks)]
                ch = model_channels * mult
                if res in attention_resolutions:
                    layers.append(blocks.attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.output_blocks.append(EmbedSequential(layers))

        self.out = nn.Sequential(blocks.norm_act(ch), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    @classmethod
    def from_config(cls, name: str, **overrides) -> "UNet":
        """A UNet from a named configuration (``CONFIGS``: "tiny", "small"), keyword overrides on top."""
        if name not in CONFIGS:
            raise ValueError(f"unknown UNet config {name!r}; known configs: {sorted(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})

    def fused_copy(self, fused: bool = True, backend=None) -> "UNet":
        """A new UNet with the same configuration, weights (``load_state_dict``), device, dtype and
        train/eval mode, built eager (``fused=False``) or fused (``fused=True``, ``backend``)."""
        p = next(self.parameters())
        other = UNet(**self.config, fused=fused, backend=backend).to(device=p.device, dtype=p.dtype)
        other.load_state_dict(self.state_dict())
        return other.train(self.training)

    def _check_inputs(self, x, t, y):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        want = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape (B, {want[0]}, {want[1]}, {want[2]}) for this model "
                             f"(image_size={self.image_size}), got shape {tuple(x.shape)}")
        b = x.shape[0]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},) (one timestep per sample) or be a scalar, "
                             f"got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must be an integer or floating tensor, got {t.dtype}")
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y (class labels) was given, but the model was built without num_classes")
        else:
            if y is None:
                raise ValueError(f"y (class labels, shape ({b},)) is required: the model was built with "
                                 f"num_classes={self.num_classes}")
            if not isinstance(y, torch.Tensor) or y.shape != (b,) or y.is_floating_point() or y.dtype == torch.bool:
                raise ValueError(f"y must be an integer tensor of shape ({b},), got "
                                 f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
                                 f"{' ' + str(y.dtype) if isinstance(y, torch.Tensor) else ''}")
        return t.to(x.device)

    def forward(self, x, t, y=None):
        """x (B, in_channels, image_size, image_size), t (B,) timesteps (int or float),
        y (B,) class labels when num_classes is set -> (B, out_channels, image_size, image_size)."""
        t = self._check_inputs(x, t, y)
        w = self.time_embed[0].weight  # the embedding in fp32 (ADM), fp64 for an fp64 model
        t_emb = timestep_embedding(t, self.model_channels, dtype=torch.promote_types(w.dtype, torch.float32))
        emb = self.time_embed(t_emb.to(w.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        emb_act = nn.functional.silu(emb)  # every ResBlock's emb_proj takes SiLU(emb): computed once
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb_act)
            skips.append(h)
        h = self.middle_block(h, emb_act)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb_act)
        return self.out(h)

    def extra_repr(self):
        return f"fused={self.fused}, backend={self.backend!r}"
