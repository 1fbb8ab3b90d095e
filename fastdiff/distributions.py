"""fastdiff.DiagonalGaussian: a drop-in for diffusers' DiagonalGaussianDistribution (the
posterior of AutoencoderKL) whose sample and KL run through fastdiff's fused kernels."""
from __future__ import annotations

import torch

from .ops._common import check_tensor, randn_like_diffusers
from .ops.sample_and_kl import gaussian_kl, reparameterize, sample_and_kl

# diffusers clamps the log-variance to this range before use.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from ``parameters`` = cat([mean, logvar], dim=1).

    Same constructor, attributes and methods as diffusers' DiagonalGaussianDistribution:
    ``mean``, ``logvar`` (clamped to [-30, 20]), ``std``, ``var``, ``sample(generator)``,
    ``kl(other=None)``, ``nll(sample, dims)``, ``mode()``; plus ``sample_and_kl(generator)``,
    the VAE training step's pair from one fused pass. ``sample`` and ``kl()`` (to N(0, I)) are
    fused; ``kl(other)`` between two Gaussians and ``nll`` are eager for now.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False, *, backend=None):
        check_tensor(parameters, "parameters", min_dim=2)
        if parameters.shape[1] % 2:
            raise ValueError(f"parameters must have an even number of channels (mean | logvar) in dim 1, "
                             f"got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        self.backend = backend

    @property
    def std(self):
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @property
    def var(self):
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def _noise(self, generator):
        # As diffusers draws it, so the same generator gives the same sample.
        return randn_like_diffusers(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)

    def sample(self, generator=None) -> torch.Tensor:
        if self.deterministic:
            return self.mean + 0 * self._noise(generator)
        return reparameterize(self.mean, self.logvar, self._noise(generator), backend=self.backend)

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """Per-sample KL (sum over all but dim 0; diffusers sums dims [1, 2, 3] of 4-D latents)."""
        if self.deterministic:
            return torch.tensor([0.0])
        if other is None:
            return gaussian_kl(self.mean, self.logvar, "sum_per_sample", backend=self.backend)
        kl = 0.5 * ((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                    - self.logvar + other.logvar)
        return kl.sum(dim=list(range(1, kl.dim())))

    def nll(self, sample: torch.Tensor, dims=(1, 2, 3)) -> torch.Tensor:
        if self.deterministic:
            return torch.tensor([0.0])
        log2pi = torch.log(torch.tensor(2.0 * torch.pi, dtype=torch.float64)).item()
        return 0.5 * torch.sum(log2pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample_and_kl(self, generator=None, noise=None):
        """(z, per-sample KL) from one fused pass over mean, logvar and the noise (drawn from
        ``generator`` unless given)."""
        if self.deterministic:
            return self.sample(generator), self.kl()
        noise = self._noise(generator) if noise is None else noise.to(self.mean.dtype)  # autocast: mean is bf16/fp16
        return sample_and_kl(self.mean, self.logvar, noise, backend=self.backend)
