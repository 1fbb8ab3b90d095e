"""Noise schedules: betas and every quantity the DDPM/DDIM math derives from them.

Everything is computed in float64 on the host (as improved-diffusion does); the
kernels read a float64 table of shape (T, 4) on the device:
[alpha_bar, 1 - alpha_bar, sqrt(alpha_bar), sqrt(1 - alpha_bar)]
(csrc/include/fastdiff/schedule_math.h, TableColumn).
"""
from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """A diffusion noise schedule of ``num_timesteps`` steps.

    Attributes (float64 tensors of shape (T,), on ``self.device``): ``betas``,
    ``alphas_cumprod``, ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``, ``posterior_variance``,
    ``posterior_log_variance_clipped``, ``posterior_mean_coef1``,
    ``posterior_mean_coef2``.
    """

    def __init__(self, betas, alphas_cumprod=None):
        betas = torch.as_tensor(betas).detach()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not betas.is_floating_point():
            raise TypeError(f"betas must be floating point, got {betas.dtype}")
        betas = betas.to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(betas).all():
            bad = int(torch.nonzero(~torch.isfinite(betas))[0])
            raise ValueError(f"betas[{bad}] = {betas[bad].item()} is not finite")
        if (betas <= 0).any() or (betas > 1).any():
            bad = int(torch.nonzero((betas <= 0) | (betas > 1))[0])
            raise ValueError(f"betas must lie in (0, 1], got betas[{bad}] = {betas[bad].item()}")
        if alphas_cumprod is None:
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        else:
            alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
            if alphas_cumprod.shape != betas.shape:
                raise ValueError(
                    f"alphas_cumprod shape {tuple(alphas_cumprod.shape)} != betas shape {tuple(betas.shape)}")
        if not torch.isfinite(alphas_cumprod).all() or (alphas_cumprod <= 0).any() or (alphas_cumprod >= 1).any():
            raise ValueError("alphas_cumprod must lie in (0, 1) (finite, no terminal alpha_bar of 0)")
        self._device = torch.device("cpu")
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        ac = alphas_cumprod
        self.alphas_cumprod_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        prev = self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - prev) / (1.0 - ac)
        # log of the posterior variance with its t = 0 entry (zero) replaced by t = 1's.
        pv = self.posterior_variance
        clipped = torch.cat([pv[1:2], pv[1:]]) if len(pv) > 1 else pv.clamp_min(1e-20)
        self.posterior_log_variance_clipped = clipped.log()
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - ac)
        self._tables = {}

    # -- constructors (diffusers' beta_schedule names) ---------------------------------
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """diffusers' "linear": betas = linspace(beta_start, beta_end, T) in float32."""
        _check_timesteps_arg(num_timesteps)
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32))

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """diffusers' "scaled_linear" (Stable Diffusion): linspace of sqrt(beta), squared."""
        _check_timesteps_arg(num_timesteps)
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Improved DDPM's cosine schedule (diffusers' "squaredcos_cap_v2")."""
        _check_timesteps_arg(num_timesteps)

        def alpha_bar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                 for i in range(num_timesteps)]
        return cls(torch.tensor(betas, dtype=torch.float32))

    @classmethod
    def from_betas(cls, betas):
        return cls(betas)

    @classmethod
    def from_diffusers(cls, scheduler):
        """Takes a diffusers scheduler's betas and alphas_cumprod as they are."""
        if not hasattr(scheduler, "betas") or not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"scheduler must be a diffusers scheduler with betas and alphas_cumprod, got "
                            f"{type(scheduler).__name__}")
        return cls(scheduler.betas, alphas_cumprod=scheduler.alphas_cumprod)

    # -- device / kernel table -------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> "NoiseSchedule":
        """A copy whose tensors (and kernel tables) live on ``device``."""
        out = object.__new__(NoiseSchedule)
        out.__dict__.update({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})
        out._device = torch.device(device)
        out._tables = {}
        return out

    def table(self, device, dtype=torch.float64) -> torch.Tensor:
        """The kernels' (T, 4) table on ``device`` (cached). The kernels take it in float64 and
        derive each sample's coefficients in float64 before the element math."""
        def build():
            ac = self.alphas_cumprod.cpu()
            return torch.stack([ac, 1.0 - ac, ac.sqrt(), (1.0 - ac).sqrt()], dim=1)

        return self._cached("schedule", device, dtype, build)

    def posterior_table(self, device, dtype=torch.float64) -> torch.Tensor:
        """vb_loss's (T, 4) table of the true posterior q(x_{t-1} | x_t, x_0) on ``device``
        (cached): [posterior_mean_coef1, posterior_mean_coef2, posterior_log_variance_clipped,
        its exp] (csrc/include/fastdiff/vlb_math.h, PosteriorColumn)."""
        def build():
            lv = self.posterior_log_variance_clipped.cpu()
            return torch.stack([self.posterior_mean_coef1.cpu(), self.posterior_mean_coef2.cpu(), lv, lv.exp()],
                               dim=1)

        return self._cached("posterior", device, dtype, build)

    def _cached(self, name, device, dtype, build) -> torch.Tensor:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (name, device, dtype)
        tab = self._tables.get(key)
        if tab is None:
            tab = build().to(dtype).contiguous().to(device)
            self._tables[key] = tab
        return tab

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar / (1 - alpha_bar) at timesteps t (float64)."""
        ac = self.alphas_cumprod.to(t.device)[t]
        return ac / (1.0 - ac)

    def __repr__(self):
        return (f"NoiseSchedule(num_timesteps={self.num_timesteps}, beta[0]={self.betas[0].item():.3g}, "
                f"beta[-1]={self.betas[-1].item():.3g}, device={self.device})")


def _check_timesteps_arg(num_timesteps):
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
