"""NoiseSchedule vs diffusers' schedules, and its validation."""
import pytest
import torch
from diffusers import DDPMScheduler

import fastdiff
from utils import assert_close


@pytest.mark.parametrize("ctor, diffusers_name", [
    (lambda: fastdiff.NoiseSchedule.linear(1000), "linear"),
    (lambda: fastdiff.NoiseSchedule.scaled_linear(1000), "scaled_linear"),
    (lambda: fastdiff.NoiseSchedule.cosine(1000), "squaredcos_cap_v2"),
])
def test_matches_diffusers_schedules(ctor, diffusers_name):
    kw = dict(beta_start=0.00085, beta_end=0.012) if diffusers_name == "scaled_linear" else {}
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, **kw)
    s = ctor()
    assert_close(s.betas, sched.betas.double(), 0, 0, "betas")  # the same float32 betas
    # float64 cumprod vs diffusers' float32 cumprod
    assert_close(s.alphas_cumprod, sched.alphas_cumprod.double(), 1e-7, 1e-5, "alphas_cumprod")
    for tt in (1, 10, 500, 999):  # diffusers derives it in fp32 (cancellation at small t)
        assert_close(s.posterior_variance[tt:tt + 1], sched._get_variance(tt).double().reshape(1), 1e-9, 1e-3,
                     f"posterior variance t={tt}")


def test_from_diffusers_is_exact():
    sched = DDPMScheduler(num_train_timesteps=1000)
    s = fastdiff.NoiseSchedule.from_diffusers(sched)
    assert torch.equal(s.alphas_cumprod, sched.alphas_cumprod.double())
    tab = s.table("cpu")
    assert tab.dtype == torch.float64 and tab.shape == (1000, 4)
    assert torch.equal(tab[:, 2], sched.alphas_cumprod.double().sqrt())


def test_posterior_quantities_improved_ddpm():
    s = fastdiff.NoiseSchedule.linear(1000)
    b, ac, acp = s.betas, s.alphas_cumprod, s.alphas_cumprod_prev
    assert_close(s.posterior_mean_coef1, b * acp.sqrt() / (1 - ac), 1e-15, 1e-12, "coef1")
    assert_close(s.posterior_log_variance_clipped[0:1], s.posterior_variance[1:2].log(), 1e-15, 1e-12, "clip t=0")
    assert s.posterior_variance[0] == 0


@pytest.mark.parametrize("betas, exc, match", [
    ([0.1, float("nan"), 0.2], ValueError, r"betas\[1\] = nan is not finite"),
    ([0.1, 0.0], ValueError, "betas must lie in"),
    ([0.1, 1.5], ValueError, "betas must lie in"),
    ([], ValueError, "non-empty"),
    (torch.tensor([1, 2]), TypeError, "floating point"),
])
def test_bad_betas(betas, exc, match):
    with pytest.raises(exc, match=match):
        fastdiff.NoiseSchedule.from_betas(betas if isinstance(betas, torch.Tensor) else torch.tensor(betas))


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="num_timesteps"):
        fastdiff.NoiseSchedule.linear(0)
    with pytest.raises(TypeError, match="diffusers scheduler"):
        fastdiff.NoiseSchedule.from_diffusers(object())


def test_to_moves_tables():
    s = fastdiff.NoiseSchedule.linear(10).to("cpu")
    assert s.device == torch.device("cpu") and s.betas.device.type == "cpu"
    assert "num_timesteps=10" in repr(s)
