"""Eager PyTorch for every fastdiff op: the test oracle, the benchmark baseline
(what a user writes today, following diffusers and improved-diffusion) and the
`reference` backend.

Conventions: per-sample coefficients are gathered from the schedule by t and
cast to the input dtype before use, as diffusers' add_noise does; autograd
provides the backward.
"""
from __future__ import annotations

import math

import torch

from .schedule import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, ..., 1) to broadcast against ``like``, in like's dtype."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


def _alpha_bar_prev(schedule: NoiseSchedule, t_prev: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    ac = schedule.alphas_cumprod.to(like.device)
    prev = torch.where(t_prev >= 0, ac[t_prev.clamp_min(0)], torch.ones_like(ac[:1]))
    return prev.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0, t, noise, schedule: NoiseSchedule):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (DDPMScheduler.add_noise)."""
    return _gather(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _gather(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def training_target(x0, noise, t, schedule: NoiseSchedule, prediction_type="epsilon"):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":  # DDPMScheduler.get_velocity
        return _gather(schedule.sqrt_alphas_cumprod, t, x0) * noise - _gather(
            schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def min_snr_weights(t, schedule: NoiseSchedule, snr_gamma: float, prediction_type="epsilon"):
    """Min-SNR-gamma loss weights per sample, as diffusers' training examples compute them."""
    snr = schedule.snr(t)
    w = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        w = w / snr
    elif prediction_type == "v_prediction":
        w = w / (snr + 1)
    return w


def diffusion_loss(model_output, x0, noise, t, schedule: NoiseSchedule, prediction_type="epsilon",
                   snr_gamma=None, reduction="mean"):
    """MSE between the model output and the training target (diffusers' train loop)."""
    target = training_target(x0, noise, t, schedule, prediction_type)
    acc = torch.promote_types(model_output.dtype, torch.float32)  # diffusers: .float()
    loss = torch.nn.functional.mse_loss(model_output.to(acc), target.to(acc), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.dim())))
    if snr_gamma is not None:
        loss = loss * min_snr_weights(t, schedule, snr_gamma, prediction_type).to(loss)
    loss = loss.to(model_output.dtype)
    return loss.mean() if reduction == "mean" else loss


def predict_x0_eps(model_output, sample, t, schedule: NoiseSchedule, prediction_type):
    """(x0_hat, eps_hat) from the model output, per prediction type."""
    sa = _gather(schedule.sqrt_alphas_cumprod, t, sample)
    s1 = _gather(schedule.sqrt_one_minus_alphas_cumprod, t, sample)
    if prediction_type == "epsilon":
        return (sample - s1 * model_output) / sa, model_output
    if prediction_type == "sample":
        return model_output, (sample - sa * model_output) / s1
    if prediction_type == "v_prediction":
        return sa * sample - s1 * model_output, sa * model_output + s1 * sample
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def ddpm_step(model_output, t, sample, schedule: NoiseSchedule, noise=None, prediction_type="epsilon",
              variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, t_prev=None):
    """DDPMScheduler.step(...).prev_sample with t a (B,) tensor; improved DDPM's std for the
    log/learned variance types (std = exp(0.5 * log-variance))."""
    if variance_type in ("learned", "learned_range"):
        model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
    if t_prev is None:
        t_prev = t - 1
    ab = _gather(schedule.alphas_cumprod, t, sample)
    abp = _alpha_bar_prev(schedule, t_prev, sample)
    x0, _ = predict_x0_eps(model_output, sample, t, schedule, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    alpha_t = ab / abp
    beta_t = 1 - alpha_t
    mean = (abp.sqrt() * beta_t / (1 - ab)) * x0 + (alpha_t.sqrt() * (1 - abp) / (1 - ab)) * sample
    if noise is None:
        return mean
    var = ((1 - abp) / (1 - ab) * beta_t).clamp_min(1e-20)
    if variance_type in ("fixed_small", "fixed_small_log"):
        std = var.sqrt()
    elif variance_type in ("fixed_large", "fixed_large_log"):
        std = beta_t.sqrt()
    elif variance_type == "learned":
        std = torch.exp(0.5 * predicted_variance)
    elif variance_type == "learned_range":
        frac = (predicted_variance + 1) / 2
        std = torch.exp(0.5 * (frac * beta_t.log() + (1 - frac) * var.log()))
    else:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    nonzero = (t > 0).to(sample.dtype).view(-1, *([1] * (sample.dim() - 1)))
    return mean + nonzero * std * noise


def ddim_step(model_output, t, t_prev, sample, schedule: NoiseSchedule, eta=0.0, noise=None,
              prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0,
              use_clipped_model_output=False):
    """DDIMScheduler.step(...).prev_sample with per-sample t / t_prev (t_prev < 0: alpha_bar = 1)."""
    ab = _gather(schedule.alphas_cumprod, t, sample)
    abp = _alpha_bar_prev(schedule, t_prev, sample)
    x0, eps = predict_x0_eps(model_output, sample, t, schedule, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    if use_clipped_model_output:
        eps = (sample - ab.sqrt() * x0) / (1 - ab).sqrt()
    variance = (1 - abp) / (1 - ab) * (1 - ab / abp)
    sigma = eta * variance.clamp_min(0).sqrt()
    out = abp.sqrt() * x0 + (1 - abp - sigma**2).clamp_min(0).sqrt() * eps
    if eta > 0 and noise is not None:
        out = out + sigma * noise
    return out


# -- the Gaussian family -------------------------------------------------------------
KL_REDUCTIONS = ("sum_per_sample", "sum", "mean", "none")


def reparameterize(mean, logvar, noise):
    """z = mean + exp(logvar / 2) * noise (Kingma & Welling 2014)."""
    return mean + torch.exp(0.5 * logvar) * noise


def gaussian_kl(mean, logvar, reduction="sum_per_sample"):
    """KL(N(mean, exp(logvar)) || N(0, I)) = (mean^2 + exp(logvar) - 1 - logvar) / 2 per element;
    "sum_per_sample" sums over all but dim 0 (diffusers' DiagonalGaussianDistribution.kl())."""
    kl = 0.5 * (mean.pow(2) + torch.exp(logvar) - 1.0 - logvar)
    if reduction == "none":
        return kl
    if reduction == "sum_per_sample":  # a (B,) input is its own per-sample sum
        return kl if kl.dim() == 1 else kl.sum(dim=list(range(1, kl.dim())))
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")


def sample_and_kl(mean, logvar, noise, reduction="sum_per_sample"):
    return reparameterize(mean, logvar, noise), gaussian_kl(mean, logvar, reduction)


# -- the diffusion VLB terms (improved DDPM) --------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, with broadcasting
    (improved-diffusion's losses.normal_kl; numbers are taken as tensors like the tensor args)."""
    like = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if like is None:
        raise TypeError("normal_kl: at least one argument must be a torch.Tensor")
    logvar1, logvar2 = (x if isinstance(x, torch.Tensor) else torch.tensor(x).to(like) for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by improved-diffusion."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x's 8-bit bin) under N(means, exp(log_scales)^2) for x in [-1, 1]: bins of width
    2/255, the edge bins open to -inf / inf, probabilities clamped at 1e-12 before logs."""
    if x.shape != means.shape or x.shape != log_scales.shape:
        raise ValueError(f"x, means and log_scales must have one shape, got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(log_scales.shape)}")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def q_posterior_mean_log_variance(x0, x_t, t, schedule: NoiseSchedule):
    """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0) (improved-diffusion's
    q_posterior_mean_variance)."""
    mean = _gather(schedule.posterior_mean_coef1, t, x_t) * x0 + _gather(schedule.posterior_mean_coef2, t, x_t) * x_t
    return mean, _gather(schedule.posterior_log_variance_clipped, t, x_t)


def _mean_flat(x):
    return x.mean(dim=list(range(1, x.dim()))) if x.dim() > 1 else x


def vb_loss(model_mean, model_log_variance, x0, x_t, t, schedule: NoiseSchedule, reduction="none"):
    """Per-sample VLB term in bits per dim (improved-diffusion's _vb_terms_bpd): KL from the true
    posterior to N(model_mean, exp(model_log_variance)) for t > 0, the decoder NLL at t == 0;
    reduction "none" (B,) or "mean"."""
    true_mean, true_log_variance = q_posterior_mean_log_variance(x0, x_t, t, schedule)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    nll = _mean_flat(nll) / math.log(2.0)
    loss = torch.where(t == 0, nll, kl)
    return loss.mean() if reduction == "mean" else loss


def learned_range(model_var_values, t, schedule: NoiseSchedule):
    """Model log-variance from the network's variance channels v in [-1, 1]: an interpolation
    between log(beta_t) and the clipped posterior log-variance (improved DDPM, eq. 15)."""
    min_log = _gather(schedule.posterior_log_variance_clipped, t, model_var_values)
    max_log = _gather(schedule.betas.log(), t, model_var_values)
    frac = (model_var_values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


# -- U-Net blocks --------------------------------------------------------------------------
ACTIVATIONS = ("silu", None)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu"):
    """GroupNorm then SiLU, as every ResNet block of a diffusion U-Net / the SD VAE runs them."""
    y = torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    return torch.nn.functional.silu(y) if activation == "silu" else y


def attention(q, k, v, scale=None):
    """softmax(scale q k^T) v with the (Nq, Nk) scores materialized, as an eager U-Net computes
    it (ADM's QKVAttention: scores in the input dtype, fp16 / bf16 softmax in fp32, cast back).
    q: (B, H, Nq, D), k / v: (B, H, Nk, D); scale defaults to 1 / sqrt(D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale
    if weights.dtype in (torch.float16, torch.bfloat16):
        weights = weights.float()
    weights = torch.softmax(weights, dim=-1).to(q.dtype)
    return torch.matmul(weights, v)


def attention_heads(channels, num_heads=None, num_head_channels=-1):
    """Head count of a U-Net attention block: num_head_channels channels per head when given
    (!= -1), else num_heads heads (1 when None), as ADM's AttentionBlock decides."""
    if num_head_channels != -1:
        if num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(f"num_head_channels = {num_head_channels} must be positive and divide "
                             f"channels = {channels}")
        return channels // num_head_channels
    heads = 1 if num_heads is None else num_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0 or channels % heads:
        raise ValueError(f"num_heads = {num_heads!r} must be a positive int dividing channels = {channels}")
    return heads


class AttentionBlock(torch.nn.Module):
    """The self-attention block of a DDPM/ADM U-Net, eager (improved-diffusion's AttentionBlock
    with its default "legacy" head order: each head's q, k, v channels are adjacent in the
    qkv projection's output). GroupNorm -> 1x1 conv to 3C -> per-head softmax(q k^T / sqrt(d)) v
    -> 1x1 output conv (zero-initialized, as ADM does) -> + x.

    context_dim: the block also attends to a context (B, L, context_dim), projected to keys and
    values by ``encoder_kv`` and put before the image tokens (GLIDE's text-conditioned U-Net).
    """

    def __init__(self, channels, num_heads=None, num_head_channels=-1, norm_groups=32, context_dim=None):
        super().__init__()
        self.channels = channels
        self.num_heads = attention_heads(channels, num_heads, num_head_channels)
        self.norm = torch.nn.GroupNorm(norm_groups, channels)
        self.qkv = torch.nn.Conv1d(channels, 3 * channels, 1)
        self.encoder_kv = None if context_dim is None else torch.nn.Conv1d(context_dim, 2 * channels, 1)
        self.proj_out = torch.nn.Conv1d(channels, channels, 1)
        torch.nn.init.zeros_(self.proj_out.weight)
        torch.nn.init.zeros_(self.proj_out.bias)

    def check_context(self, x, context):
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, *spatial), got {tuple(x.shape)}")
        if (context is None) != (self.encoder_kv is None):
            raise ValueError("context must be given exactly when the block was built with context_dim "
                             f"(context_dim={None if self.encoder_kv is None else self.encoder_kv.in_channels}, "
                             f"context {'missing' if context is None else 'given'})")
        if context is not None and (context.dim() != 3 or context.shape[0] != x.shape[0]
                                    or context.shape[2] != self.encoder_kv.in_channels):
            raise ValueError(f"context must have shape ({x.shape[0]}, L, {self.encoder_kv.in_channels}), "
                             f"got {tuple(context.shape)}")

    def forward(self, x, context=None):
        self.check_context(x, context)
        b, c, *spatial = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        x_flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x_flat)).reshape(b * heads, 3 * ch, -1)
        q, k, v = qkv.split(ch, dim=1)  # (B * heads, ch, N) each
        if context is not None:
            ekv = self.encoder_kv(context.transpose(1, 2)).reshape(b * heads, 2 * ch, -1)
            ek, ev = ekv.split(ch, dim=1)
            k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
        a = attention(q.transpose(1, 2).unsqueeze(1), k.transpose(1, 2).unsqueeze(1),
                      v.transpose(1, 2).unsqueeze(1))  # (B * heads, 1, N, ch)
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, -1)
        return (x_flat + self.proj_out(a)).reshape(b, c, *spatial)


class GroupNormAct(torch.nn.GroupNorm):
    """``nn.GroupNorm`` then SiLU (``activation=None``: the GroupNorm alone), eager: the norm of
    a ResNet block as U-Nets write it, with GroupNorm's own parameters and state_dict keys (so
    ``fastdiff.nn.GroupNormSiLU`` loads it as it is)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation="silu", device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x):
        y = super().forward(x)
        return torch.nn.functional.silu(y) if self.activation == "silu" else y
