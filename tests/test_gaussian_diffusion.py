"""fastdiff.GaussianDiffusion: the training loss against the same loss written eagerly with
reference.py (same random draws), and the sampling loops against diffusers' schedulers."""
import pytest
import torch

import fastdiff
from fastdiff import reference
from fastdiff.gaussian_diffusion import GaussianDiffusion
from utils import assert_close


class TinyModel(torch.nn.Module):
    """A conv whose output depends on t (enough to exercise every path)."""

    def __init__(self, channels=3, out_channels=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, out_channels, 3, padding=1)
        self.t_scale = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        return torch.tanh(self.conv(x) + self.t_scale * (t.to(x.dtype) / 1000).view(-1, 1, 1, 1))


def _eager_loss(model, x0, schedule, prediction_type, hybrid, generator):
    """The same training loss in eager PyTorch: the draws in GaussianDiffusion's order."""
    b, c = x0.shape[:2]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = reference.q_sample(x0, t, noise, schedule)
    out = model(x_t, t)
    loss = reference.diffusion_loss(out[:, :c], x0, noise, t, schedule, prediction_type).mean()
    if hybrid:
        x0_hat, _ = reference.predict_x0_eps(out[:, :c].detach(), x_t, t, schedule, prediction_type)
        mean, _ = reference.q_posterior_mean_log_variance(x0_hat, x_t, t, schedule)
        log_variance = reference.learned_range(out[:, c:], t, schedule)
        vlb = reference.vb_loss(mean, log_variance, x0, x_t, t, schedule, reduction="mean")
        loss = loss + schedule.num_timesteps / 1000 * vlb
    return loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("hybrid", [False, True])
def test_training_loss_matches_eager(prediction_type, hybrid):
    torch.manual_seed(0)
    schedule = fastdiff.NoiseSchedule.linear(1000)
    model = TinyModel(3, 6 if hybrid else 3).double()
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    diffusion = GaussianDiffusion(model, schedule, prediction_type, "learned_range" if hybrid else "fixed_small",
                                  "hybrid" if hybrid else "simple")
    got = diffusion.training_loss(x0, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(got, list(model.parameters()))
    want = _eager_loss(model, x0, schedule, prediction_type, hybrid, torch.Generator().manual_seed(5))
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    assert_close(got, want, 1e-10, 1e-10, "loss")
    for g, w in zip(grads, want_grads):
        assert_close(g, w, 1e-10, 1e-9, "grad")


def test_training_loss_keeps_channels_last():
    """A channels_last x0 gives the model a channels_last x_t, and the same loss as contiguous."""
    schedule = fastdiff.NoiseSchedule.linear(1000)
    model = TinyModel().double()
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    diffusion = GaussianDiffusion(model, schedule)
    losses = [diffusion.training_loss(x, generator=torch.Generator().manual_seed(5))
              for x in (x0, x0.to(memory_format=torch.channels_last))]
    assert seen[0].is_contiguous()
    assert seen[1].is_contiguous(memory_format=torch.channels_last) and not seen[1].is_contiguous()
    assert_close(losses[1], losses[0], 1e-12, 1e-12, "loss")


def test_ddim_sampling_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                                        set_alpha_to_one=True)
    model = TinyModel().double()
    diffusion = GaussianDiffusion(model, fastdiff.NoiseSchedule.from_diffusers(scheduler), "epsilon")
    got = diffusion.sample((2, 3, 8, 8), steps=10, sampler="ddim", generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64, progress=False)
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scheduler.set_timesteps(10)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, torch.full((2,), int(t))), t, x, eta=0.0).prev_sample
    assert_close(got, x, 1e-5, 1e-5, "ddim samples")  # diffusers keeps its schedule in fp32


def test_ddpm_sampling_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(2)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    model = TinyModel().double()
    diffusion = GaussianDiffusion(model, fastdiff.NoiseSchedule.from_diffusers(scheduler), "epsilon")
    got = diffusion.sample((2, 3, 8, 8), steps=20, generator=torch.Generator().manual_seed(4), dtype=torch.float64,
                           progress=False)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((2, 3, 8, 8), generator=gen, dtype=torch.float64)
    scheduler.set_timesteps(20)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, torch.full((2,), int(t))), t, x, generator=gen).prev_sample
    assert_close(got, x, 1e-5, 1e-5, "ddpm samples")  # diffusers keeps its schedule in fp32


def test_learned_range_sampling_shape_and_bad_input():
    model = TinyModel(3, 6).double()
    diffusion = GaussianDiffusion(model, fastdiff.NoiseSchedule.linear(100), variance_type="learned_range",
                                  loss="hybrid")
    out = diffusion.sample((1, 3, 8, 8), steps=5, dtype=torch.float64, progress=False)
    assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="loss='hybrid' needs variance_type='learned_range'"):
        GaussianDiffusion(model, fastdiff.NoiseSchedule.linear(100), loss="hybrid")
    with pytest.raises(ValueError, match="steps must be an int in"):
        diffusion.sample((1, 3, 8, 8), steps=0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        diffusion.sample((1, 3, 8, 8), sampler="euler")
    with pytest.raises(ValueError, match="model output has 6 channels"):
        GaussianDiffusion(model, fastdiff.NoiseSchedule.linear(100)).training_loss(torch.zeros(2, 3, 8, 8).double())
    with pytest.raises(TypeError, match="schedule must be a fastdiff.NoiseSchedule"):
        GaussianDiffusion(model, None)
