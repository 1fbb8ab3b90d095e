"""GaussianDiffusion: a model's training loss and sampling loops on fastdiff's fused ops."""
from __future__ import annotations

import torch

from . import reference
from .ops._common import check_choice, check_schedule, randn_like_diffusers
from .ops.ddim_step import ddim_step
from .ops.ddpm_step import ddpm_step
from .ops.diffusion_loss import diffusion_loss
from .ops.q_sample import q_sample
from .ops.vb_loss import learned_range, vb_loss

LOSSES = ("simple", "hybrid")
SAMPLERS = ("ddpm", "ddim")
# Variance types a model trained here can have: fixed (the model predicts C channels) or
# learned_range (2C channels: the prediction | v in [-1, 1], improved DDPM).
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


class GaussianDiffusion:
    """A denoising model ``model(x_t, t, **model_kwargs)`` under a NoiseSchedule.

    ``training_loss(x0)`` draws t ~ U{0..T-1} and noise, noises x0 (fused q_sample), runs the
    model and returns the fused diffusion loss (MSE to the prediction type's target); with
    ``loss="hybrid"`` (requires variance_type="learned_range") improved DDPM's hybrid loss
    L_simple + 0.001 * T * L_vlb_t, the VLB term on the variance only (the mean is detached).
    ``sample(shape, steps, sampler)`` runs the DDPM or DDIM reverse process from N(0, I) with
    the fused steps, timesteps spaced as diffusers' "leading" spacing (T // steps apart).
    """

    def __init__(self, model, schedule, prediction_type="epsilon", variance_type="fixed_small", loss="simple", *,
                 backend=None):
        check_schedule(schedule)
        check_choice(prediction_type, "prediction_type", reference.PREDICTION_TYPES)
        check_choice(variance_type, "variance_type", VARIANCE_TYPES)
        check_choice(loss, "loss", LOSSES)
        if loss == "hybrid" and variance_type != "learned_range":
            raise ValueError(f"loss='hybrid' needs variance_type='learned_range', got {variance_type!r}")
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.variance_type = variance_type
        self.loss_type = loss
        self.backend = backend

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def _prediction(self, output, channels):
        """The prediction channels of a model output (the first C of 2C for learned variance)."""
        want = 2 * channels if self.variance_type == "learned_range" else channels
        if output.shape[1] != want:
            raise ValueError(f"the model output has {output.shape[1]} channels; variance_type="
                             f"{self.variance_type!r} with {channels} data channels needs {want}")
        return output[:, :channels] if self.variance_type == "learned_range" else output

    def training_loss(self, x0, *, generator=None, model_kwargs=None, t=None, noise=None):
        """The mean training loss over the batch x0 (B, C, ...), a scalar. ``t`` (B,) and ``noise``
        (x0's shape) are drawn from ``generator`` unless given (data-parallel training draws them
        for the global batch and hands each rank its share). A channels_last x0 reaches the model
        as a channels_last x_t."""
        if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or x0.shape[0] == 0:
            raise ValueError(f"x0 must be a non-empty batch (B, C, ...), got "
                             f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
        b, device = x0.shape[0], x0.device
        rand_device = generator.device if generator is not None else device
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=rand_device).to(device)
        if noise is None:
            noise = randn_like_diffusers(x0.shape, generator, device, x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        if x0.dim() == 4 and not x0.is_contiguous() and x0.is_contiguous(memory_format=torch.channels_last):
            # x_t follows the noise's layout: a channels_last batch stays channels_last into the model
            noise = noise.contiguous(memory_format=torch.channels_last)
        x_t = q_sample(x0, t, noise, self.schedule, backend=self.backend)
        output = self.model(x_t, t, **(model_kwargs or {}))
        loss = diffusion_loss(self._prediction(output, x0.shape[1]), x0, noise, t, self.schedule,
                              self.prediction_type, reduction="mean", backend=self.backend)
        if self.loss_type == "hybrid":
            mean, log_variance = learned_range(output, x_t, t, self.schedule, self.prediction_type,
                                               backend=self.backend)
            vlb = vb_loss(mean, log_variance, x0, x_t, t, self.schedule, reduction="mean", backend=self.backend)
            loss = loss + (self.num_timesteps / 1000.0) * vlb.to(loss.dtype)
        return loss

    def timesteps(self, steps):
        """The sampling timesteps, descending: diffusers' "leading" spacing, T // steps apart."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be an int in [1, {self.num_timesteps}], got {steps!r}")
        ratio = self.num_timesteps // steps
        return [i * ratio for i in reversed(range(steps))], ratio

    @torch.no_grad()
    def sample(self, shape, steps=None, sampler="ddpm", eta=0.0, *, generator=None, device=None,
               dtype=torch.float32, clip_sample=True, progress=True, model_kwargs=None, noise=None):
        """Samples of ``shape`` (B, C, ...) from N(0, I) (or from ``noise``) by ``steps`` reverse
        steps (default: all T for ddpm, 50 for ddim); random draws as diffusers' pipelines make
        them (the initial noise, then each DDPM step's noise) from ``generator``."""
        check_choice(sampler, "sampler", SAMPLERS)
        steps = (self.num_timesteps if sampler == "ddpm" else min(50, self.num_timesteps)) if steps is None else steps
        ts, ratio = self.timesteps(steps)
        if device is None:
            device = noise.device if noise is not None else next(
                (p.device for p in getattr(self.model, "parameters", lambda: iter(()))()), torch.device("cpu"))
        x = randn_like_diffusers(tuple(shape), generator, device, dtype) if noise is None else noise.to(device, dtype)
        from tqdm.auto import tqdm

        for t in tqdm(ts, desc=f"{sampler} sampling", disable=not progress, leave=False):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.int64, device=device)
            output = self.model(x, t_batch, **(model_kwargs or {}))
            if sampler == "ddpm":
                x = ddpm_step(output if self.variance_type == "learned_range" else self._prediction(output, x.shape[1]),
                              t, x, self.schedule, generator=generator, prediction_type=self.prediction_type,
                              variance_type=self.variance_type, clip_sample=clip_sample, t_prev=t - ratio,
                              backend=self.backend)
            else:
                x = ddim_step(self._prediction(output, x.shape[1]), t, t - ratio, x, self.schedule, eta=eta,
                              generator=generator, prediction_type=self.prediction_type, clip_sample=clip_sample,
                              backend=self.backend)
        return x
