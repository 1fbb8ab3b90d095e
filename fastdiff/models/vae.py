"""The reference convolutional VAE: the first stage of latent diffusion (AutoencoderKL-like,
smaller), eager (``fused=False``) or on fastdiff's fused ops (``fused=True``) with one set of
parameters and one state_dict.

Encoder: conv_in 3x3 -> per level ``layers_per_block`` ResBlocks and a stride-2 3x3 conv
between levels -> mid (ResBlock, optional AttentionBlock, ResBlock) -> GroupNorm + SiLU ->
conv 3x3 to 2 * latent_channels (mean | logvar). Decoder mirrored: conv_in from the latent ->
mid -> per level (deepest first) ResBlocks and a nearest-2x upsample + 3x3 conv between levels
-> GroupNorm + SiLU -> conv_out 3x3.

What ``fused`` changes, and nothing else:

- norms: ``fastdiff.reference.GroupNormAct`` (eager GroupNorm then SiLU) or
  ``fastdiff.nn.GroupNormSiLU`` (one fused op);
- attention: ``fastdiff.reference.AttentionBlock`` or ``fastdiff.nn.AttentionBlock``;
- the posterior: ``EagerDiagonalGaussian`` (reference.py's eager sample and KL) or
  ``fastdiff.DiagonalGaussian`` (the sample and its KL from one fused pass).

Both draw the posterior's noise as diffusers does, so one generator gives both the same sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..distributions import DiagonalGaussian
from ._blocks import BlockFactory

CONFIGS = {
    # a unit-test / smoke-test model: 2 levels (latent = image / 2), 0.57M parameters
    "tiny": dict(block_channels=(32, 64), layers_per_block=1, norm_groups=8),
    # the constructor's defaults: 3 levels (latent = image / 4), 3.1M parameters
    "small": dict(block_channels=(64, 128, 128), layers_per_block=1, norm_groups=32),
}


class EagerDiagonalGaussian(DiagonalGaussian):
    """``fastdiff.DiagonalGaussian`` with its sample and KL to N(0, I) computed eagerly by
    ``fastdiff.reference`` (diffusers' DiagonalGaussianDistribution as written there: the
    same clamp of logvar, the same noise for the same generator)."""

    def sample(self, generator=None) -> torch.Tensor:
        if self.deterministic:
            return super().sample(generator)
        return reference.reparameterize(self.mean, self.logvar, self._noise(generator))

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        if other is None and not self.deterministic:
            return reference.gaussian_kl(self.mean, self.logvar, "sum_per_sample")
        return super().kl(other)

    def sample_and_kl(self, generator=None, noise=None):
        if self.deterministic:
            return super().sample_and_kl(generator)
        noise = self._noise(generator) if noise is None else noise.to(self.mean.dtype)  # autocast: mean is bf16/fp16
        return reference.sample_and_kl(self.mean, self.logvar, noise, "sum_per_sample")


class ResBlock(torch.nn.Module):
    """GroupNorm + SiLU -> conv 3x3 -> GroupNorm + SiLU -> conv 3x3, plus the input (through a
    1x1 conv when the channel count changes). No dropout, no time embedding."""

    def __init__(self, in_channels, out_channels, parts: BlockFactory):
        super().__init__()
        self.norm1 = parts.norm_act(in_channels)
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = parts.norm_act(out_channels)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (torch.nn.Identity() if in_channels == out_channels
                     else torch.nn.Conv2d(in_channels, out_channels, 1))
        # fused model: the skip is added in place into conv2's output (a conv does not save its
        # output for backward): one fewer (B, C, H, W) tensor written per block
        self.add_in_place = parts.fused

    def forward(self, x):
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        return h.add_(self.skip(x)) if self.add_in_place else self.skip(x) + h


class Downsample(torch.nn.Module):
    """Stride-2 3x3 conv (padding 1): H x W -> H/2 x W/2 for even H, W."""

    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(torch.nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(torch.nn.Module):
    """ResBlock, AttentionBlock (optional), ResBlock at the lowest resolution."""

    def __init__(self, channels, attention: bool, parts: BlockFactory):
        super().__init__()
        self.res1 = ResBlock(channels, channels, parts)
        self.attn = parts.attention(channels) if attention else None
        self.res2 = ResBlock(channels, channels, parts)

    def forward(self, x):
        x = self.res1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x)


class Level(torch.nn.Module):
    """One resolution: ResBlocks, then an optional resampler (``Downsample`` / ``Upsample``)."""

    def __init__(self, in_channels, out_channels, layers, resample, parts: BlockFactory):
        super().__init__()
        self.resnets = torch.nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, parts) for i in range(layers))
        self.resample = resample

    def forward(self, x):
        for block in self.resnets:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(torch.nn.Module):
    def __init__(self, in_channels, latent_channels, block_channels, layers_per_block, mid_attention, parts):
        super().__init__()
        levels = len(block_channels)
        self.conv_in = torch.nn.Conv2d(in_channels, block_channels[0], 3, padding=1)
        self.down = torch.nn.ModuleList()
        prev = block_channels[0]
        for i, ch in enumerate(block_channels):
            self.down.append(Level(prev, ch, layers_per_block, Downsample(ch) if i < levels - 1 else None, parts))
            prev = ch
        self.mid = MidBlock(prev, mid_attention, parts)
        self.norm_out = parts.norm_act(prev)
        self.conv_out = torch.nn.Conv2d(prev, 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(self.norm_out(self.mid(h)))


class Decoder(torch.nn.Module):
    def __init__(self, out_channels, latent_channels, block_channels, layers_per_block, mid_attention, parts):
        super().__init__()
        levels = len(block_channels)
        prev = block_channels[-1]
        self.conv_in = torch.nn.Conv2d(latent_channels, prev, 3, padding=1)
        self.mid = MidBlock(prev, mid_attention, parts)
        self.up = torch.nn.ModuleList()
        for i in reversed(range(levels)):  # deepest level first
            ch = block_channels[i]
            self.up.append(Level(prev, ch, layers_per_block, Upsample(ch) if i > 0 else None, parts))
            prev = ch
        self.norm_out = parts.norm_act(prev)
        self.conv_out = torch.nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(self.norm_out(h))


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class VAE(torch.nn.Module):
    """A convolutional VAE (latent diffusion's first stage, AutoencoderKL-like).

    Images (B, in_channels, H, W) with H and W divisible by 2 ** (len(block_channels) - 1) map
    to latents (B, latent_channels, H / 2 ** (levels - 1), W / 2 ** (levels - 1)).

    fused: False builds the eager model (torch.nn + fastdiff.reference), True the same
    parameters on fastdiff's fused GroupNorm + SiLU, attention block and posterior sample + KL
    (``backend`` is passed to every fused op; None: auto). The two have identical state_dicts.
    num_head_channels: channels per head of the mid attention blocks (None: one head).
    """

    def __init__(self, in_channels=3, latent_channels=4, block_channels=(64, 128, 128), layers_per_block=1,
                 norm_groups=32, mid_attention=True, num_head_channels=None, fused=True, backend=None):
        super().__init__()
        _positive_int(in_channels, "in_channels")
        _positive_int(latent_channels, "latent_channels")
        _positive_int(layers_per_block, "layers_per_block")
        _positive_int(norm_groups, "norm_groups")
        block_channels = tuple(block_channels)
        if not block_channels:
            raise ValueError("block_channels must name at least one level, got ()")
        for ch in block_channels:
            _positive_int(ch, "every entry of block_channels")
            if ch % norm_groups:
                raise ValueError(f"norm_groups = {norm_groups} must divide every entry of block_channels = "
                                 f"{block_channels}")
        if num_head_channels is not None and mid_attention:
            _positive_int(num_head_channels, "num_head_channels")
            if block_channels[-1] % num_head_channels:
                raise ValueError(f"num_head_channels = {num_head_channels} must divide the mid channels "
                                 f"{block_channels[-1]}")
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.block_channels, self.layers_per_block = block_channels, layers_per_block
        self.norm_groups, self.mid_attention, self.num_head_channels = norm_groups, mid_attention, num_head_channels
        self.fused, self.backend = fused, backend
        self.downscale = 2 ** (len(block_channels) - 1)
        parts = BlockFactory(fused, norm_groups, -1 if num_head_channels is None else num_head_channels, backend)
        self.encoder = Encoder(in_channels, latent_channels, block_channels, layers_per_block, mid_attention, parts)
        self.decoder = Decoder(in_channels, latent_channels, block_channels, layers_per_block, mid_attention, parts)

    @classmethod
    def from_config(cls, name, **overrides):
        """A named configuration (``CONFIGS``: "tiny", "small"), with keyword overrides."""
        if name not in CONFIGS:
            raise ValueError(f"unknown VAE config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return cls(**(CONFIGS[name] | overrides))

    def extra_repr(self):
        return (f"block_channels={self.block_channels}, latent_channels={self.latent_channels}, "
                f"fused={self.fused}, backend={self.backend!r}")

    def latent_shape(self, image_shape):
        """(B, latent_channels, H / downscale, W / downscale) for an image shape (B, C, H, W)."""
        b, _, h, w = image_shape
        return (b, self.latent_channels, h // self.downscale, w // self.downscale)

    def _check(self, t, name, channels, divisor):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if (t.dim() != 4 or t.shape[1] != channels or t.shape[2] % divisor or t.shape[3] % divisor
                or t.shape[2] == 0 or t.shape[3] == 0):
            what = f"(B, {channels}, H, W)" + (f" with H and W divisible by {divisor}" if divisor > 1 else "")
            raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")

    def encode(self, x) -> DiagonalGaussian:
        """The posterior q(z | x): ``fastdiff.DiagonalGaussian`` (fused) or
        ``EagerDiagonalGaussian`` (eager), from the encoder's (mean | logvar) channels."""
        self._check(x, "x", self.in_channels, self.downscale)
        parameters = self.encoder(x)
        if self.fused:
            return DiagonalGaussian(parameters, backend=self.backend)
        return EagerDiagonalGaussian(parameters)

    def decode(self, z) -> torch.Tensor:
        self._check(z, "z", self.latent_channels, 1)
        return self.decoder(z)

    def forward(self, x, generator=None, sample_posterior=True):
        """(reconstruction, posterior): decodes a posterior sample (drawn with ``generator``, as
        diffusers draws it) or, with sample_posterior=False, the posterior mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def loss(self, x, beta=1e-6, generator=None, noise=None):
        """The negative ELBO as VAE training uses it: (loss, {"recon": ..., "kl": ...}) with

            recon = mean squared error between decode(z) and x, averaged over ALL elements
                    (F.mse_loss; a Gaussian likelihood of fixed variance, up to scale),
            kl    = KL(q(z|x) || N(0, I)) summed over each sample's latent elements and
                    averaged over the batch (diffusers' posterior.kl().mean()),
            loss  = recon + beta * kl,

        z ~ q(z|x) drawn with ``generator`` (or from ``noise``, the latents' shape). The fused model takes z and the KL from one fused
        pass (``DiagonalGaussian.sample_and_kl``), the eager one from reference.sample_and_kl;
        both draw the same noise from the same generator.
        """
        posterior = self.encode(x)
        z, kl = posterior.sample_and_kl(generator, noise)
        recon = F.mse_loss(self.decode(z), x)
        kl = kl.mean()
        return recon + beta * kl, {"recon": recon, "kl": kl}
