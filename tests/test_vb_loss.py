"""vb_loss / normal_kl / discretized_gaussian_log_likelihood / learned_range vs reference.py
(improved-diffusion's formulas), torch.distributions, and diffusers' DDPMScheduler."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

import fastdiff
from fastdiff import reference
from utils import REDUCED_DTYPES, assert_close, assert_within_eager_error, fused_backends_here

BACKENDS = fused_backends_here("vb_loss")
SCHEDULE = fastdiff.NoiseSchedule.cosine(1000)
SHAPES = [
    (4, 3, 5, 7),   # odd tail
    (4, 2, 33),     # 1-D
]
LARGE = (4, 3, 80, 80)  # several CPU chunks per sample
T = [0, 1, 500, 999]   # the decoder term (t = 0) and KL terms side by side


def _inputs(shape, dtype=torch.float64, seed=0, t=T, spread=0.002):
    """8-bit data in [-1, 1] (every decoder bin, the edge bins included), x_t from it, a model
    mean `spread` away from the true posterior mean and a learned-range log-variance. At t = 0
    the model's std is ~5e-3: a spread beyond ~0.01 puts bins deep in the Gaussian's tail, where
    1 + tanh cancels (in the reference as here) and float64 comparisons lose their digits."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, shape, generator=g).double() / 127.5 - 1
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor(t[: shape[0]] * (shape[0] // len(t[: shape[0]])))
    x_t = reference.q_sample(x0, t, noise, SCHEDULE)
    mean, _ = reference.q_posterior_mean_log_variance(x0, x_t, t, SCHEDULE)
    model_mean = mean + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    model_lv = reference.learned_range(v, t, SCHEDULE)
    return [x.to(dtype) for x in (model_mean, model_lv, x0, x_t)] + [t]


def _grad_close(got, want, what, rel=1e-8):
    """fp64 gradients: the decoder's d/dmean is a difference of two nearly equal densities, so
    rounding shows at ~1e-10 of the largest entry: compare relative to the largest magnitude."""
    scale = want.abs().max().item()
    assert_close(got, want, rel * scale, 0.0, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES + [LARGE])
def test_matches_reference_fp64(backend, shape):
    if backend == "triton" and shape == LARGE:
        pytest.skip("interpreted Triton: small shapes only")
    inputs = _inputs(shape)
    tensors = [x.requires_grad_(True) for x in inputs[:4]]
    got = fastdiff.vb_loss(*inputs, SCHEDULE, backend=backend)
    want = reference.vb_loss(*inputs, SCHEDULE)
    assert_close(got, want, 1e-12, 1e-10, "vb_loss")
    g = torch.randn_like(want)
    for a, b, name in zip(torch.autograd.grad(got, tensors, g), torch.autograd.grad(want, tensors, g),
                          ("d model_mean", "d model_log_variance", "d x0", "d x_t")):
        _grad_close(a, b, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32,) + REDUCED_DTYPES)
def test_low_precision_within_eager_error(backend, dtype):
    exact_in = _inputs((4, 3, 16, 16))
    low = [x.to(dtype) for x in exact_in[:4]]
    exact_t = [x.requires_grad_(True) for x in exact_in[:4]]
    low_f = [x.clone().requires_grad_(True) for x in low]
    low_e = [x.clone().requires_grad_(True) for x in low]
    t = exact_in[4]
    exact = reference.vb_loss(*exact_t, t, SCHEDULE)
    fused = fastdiff.vb_loss(*low_f, t, SCHEDULE, backend=backend)
    eager = reference.vb_loss(*low_e, t, SCHEDULE)
    assert fused.dtype == dtype
    assert_within_eager_error(fused, eager, exact, "loss", floor=1e-6)
    g = torch.ones(4, dtype=torch.float64)
    ge = torch.autograd.grad(exact, exact_t[:2], g)
    gf = torch.autograd.grad(fused, low_f[:2], g.to(dtype))
    gl = torch.autograd.grad(eager, low_e[:2], g.to(dtype))
    for a, b, c, name in zip(gf, gl, ge, ("d model_mean", "d model_log_variance")):
        assert_within_eager_error(a, b, c, name, floor=1e-7)


def test_gradcheck_cpu():
    # Away from the decoder's 1e-12 floor (a kink) and with a wide bin, so finite differences hold.
    inputs = _inputs((2, 2, 3, 3), t=[0, 7])
    inputs[1] = inputs[1].detach() + 4.0
    tensors = [x.detach().requires_grad_(True) for x in inputs[:4]]
    t = inputs[4]
    assert torch.autograd.gradcheck(lambda *a: fastdiff.vb_loss(*a, t, SCHEDULE, backend="cpu"), tensors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_upstream_grads_and_second_backward(backend):
    inputs = _inputs((4, 3, 6, 5))
    m, lv = (x.requires_grad_(True) for x in inputs[:2])
    t = inputs[4]
    loss = fastdiff.vb_loss(*inputs, SCHEDULE, reduction="mean", backend=backend)
    want = reference.vb_loss(*inputs, SCHEDULE).mean()
    assert_close(loss, want, 1e-12, 1e-11, "mean")
    # the forward's gradients handed out (upstream = 1 / B), then recomputed (retain_graph)
    first = torch.autograd.grad(loss, (m, lv), retain_graph=True)
    second = torch.autograd.grad(loss * 3.0, (m, lv))
    ref = torch.autograd.grad(want, (m, lv))
    for a, b, c in zip(first, second, ref):
        _grad_close(a, c, "first backward")
        _grad_close(b, 3.0 * c, "second backward (backward kernel)")
    # a per-sample upstream gradient that is not the forward's scale
    w = torch.tensor([0.5, -2.0, 3.0, 0.0], dtype=torch.float64)
    got = torch.autograd.grad((fastdiff.vb_loss(*inputs[:4], t, SCHEDULE, backend=backend) * w).sum(), (m, lv))
    for a, b in zip(got, torch.autograd.grad((reference.vb_loss(*inputs[:4], t, SCHEDULE) * w).sum(), (m, lv))):
        _grad_close(a, b, "weighted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_data_only(backend):
    """No gradient wanted for the model side: the forward writes none; x0 / x_t still get theirs."""
    m, lv, x0, x_t, t = _inputs((4, 2, 5, 5))
    x0.requires_grad_(True)
    x_t.requires_grad_(True)
    got = torch.autograd.grad(fastdiff.vb_loss(m, lv, x0, x_t, t, SCHEDULE, backend=backend).sum(), (x0, x_t))
    want = torch.autograd.grad(reference.vb_loss(m, lv, x0, x_t, t, SCHEDULE).sum(), (x0, x_t))
    for a, b, name in zip(got, want, ("d x0", "d x_t")):
        _grad_close(a, b, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend):
    m, lv, x0, x_t, t = _inputs((4, 3, 6, 5))
    want = reference.vb_loss(m, lv, x0, x_t, t, SCHEDULE)
    cl = [x.to(memory_format=torch.channels_last) for x in (m, lv, x0, x_t)]
    assert_close(fastdiff.vb_loss(*cl, t, SCHEDULE, backend=backend), want, 1e-12, 1e-11, "channels_last")
    mixed = [cl[0], lv, x0.transpose(2, 3).contiguous().transpose(2, 3), x_t]
    assert_close(fastdiff.vb_loss(*mixed, t, SCHEDULE, backend=backend), want, 1e-12, 1e-11, "mixed layouts")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_empty(backend):
    m, lv, x0, x_t, t = _inputs((4, 3, 40, 40) if backend != "triton" else (4, 3, 9, 9), dtype=torch.float32)
    a = fastdiff.vb_loss(m, lv, x0, x_t, t, SCHEDULE, backend=backend)
    b = fastdiff.vb_loss(m, lv, x0, x_t, t, SCHEDULE, backend=backend)
    assert torch.equal(a, b)
    empty = [x[:0] for x in (m, lv, x0, x_t)]
    out = fastdiff.vb_loss(*empty, t[:0], SCHEDULE, backend=backend)
    assert out.shape == (0,)
    with pytest.raises(ValueError, match="empty batch"):
        fastdiff.vb_loss(*empty, t[:0], SCHEDULE, reduction="mean", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(backend):
    m, lv, x0, x_t, t = _inputs((4, 2, 3, 3))
    m[0, 0, 0, 0] = float("nan")
    lv[2, 1, 1, 1] = float("nan")
    got = fastdiff.vb_loss(m, lv, x0, x_t, t, SCHEDULE, backend=backend)
    want = reference.vb_loss(m, lv, x0, x_t, t, SCHEDULE)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[[0, 2]]).all()


def test_kl_vanishes_at_the_true_posterior():
    m, lv, x0, x_t, t = _inputs((4, 3, 5, 5))
    mean, log_var = reference.q_posterior_mean_log_variance(x0, x_t, t, SCHEDULE)
    out = fastdiff.vb_loss(mean, log_var.expand_as(mean), x0, x_t, t, SCHEDULE, backend="cpu")
    assert (out[t > 0].abs() < 1e-12).all()
    assert (out[t == 0] > 0).all()


@pytest.mark.parametrize("bad, match, exc", [
    (dict(model_mean=torch.zeros(4, 3, 5)), "model_log_variance shape", ValueError),
    (dict(x0=torch.zeros(4, 3, 5, 5, dtype=torch.int64)), "x0 must be float", TypeError),
    (dict(t=torch.tensor([0, 1, 2, 1000])), "t contains 1000", ValueError),
    (dict(t=torch.tensor([0, 1, -1, 3])), "t contains -1", ValueError),
    (dict(t=torch.tensor([0, 1])), r"t must have shape \(4,\)", ValueError),
    (dict(schedule=object()), "schedule must be a fastdiff.NoiseSchedule", TypeError),
    (dict(reduction="sum"), "reduction must be one of", ValueError),
])
@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_bad_input(backend, bad, match, exc):
    m, lv, x0, x_t, t = _inputs((4, 3, 5, 5))
    args = dict(model_mean=m, model_log_variance=lv, x0=x0, x_t=x_t, t=t, schedule=SCHEDULE)
    kwargs = {"reduction": bad["reduction"]} if "reduction" in bad else {}
    args.update({k: v for k, v in bad.items() if k != "reduction"})
    with pytest.raises(exc, match=match):
        fastdiff.vb_loss(**args, **kwargs, backend=backend)


# -- the elementwise pieces ---------------------------------------------------------------
def test_normal_kl_matches_torch_distributions_and_broadcasts():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).unbind(0)
    lv1 = torch.randn(3, 1, generator=g, dtype=torch.float64)  # broadcast over the last dim
    lv2 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp().expand(3, 4)),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert_close(fastdiff.normal_kl(m1, lv1, m2, lv2), want, 1e-12, 1e-12, "normal_kl")
    # numbers are taken as tensors, as improved-diffusion does (KL to N(0, 1))
    assert_close(fastdiff.normal_kl(m1, lv2, 0.0, 0.0),
                 reference.gaussian_kl(m1, lv2, reduction="none"), 1e-12, 1e-12, "normal_kl to N(0, 1)")


def test_discretized_log_likelihood_is_the_bin_probability():
    """Against the exact normal CDF (torch.distributions) over the same 8-bit bins: the tanh
    approximation agrees to ~1e-3 in probability; the edge bins are open."""
    x = torch.tensor([-1.0, -1.0 + 2 / 255, 0.0, 0.2, 1.0], dtype=torch.float64)
    means = torch.tensor([-0.98, -0.99, 0.01, 0.21, 0.97], dtype=torch.float64)
    log_scales = torch.full_like(x, math.log(0.02))
    normal = torch.distributions.Normal(means, log_scales.exp())
    hi = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + 1 / 255))
    lo = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - 1 / 255))
    got = fastdiff.discretized_gaussian_log_likelihood(x, means, log_scales)
    assert_close(got.exp(), hi - lo, 2e-3, 0.0, "bin probabilities")
    assert (got <= 0).all()
    with pytest.raises(ValueError, match="means shape"):
        fastdiff.discretized_gaussian_log_likelihood(x, means[:2], log_scales)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_learned_range_matches_diffusers_ddpm_scheduler(backend):
    """DDPMScheduler._get_variance(t, v, "learned_range") is the same interpolation; at t = 0
    diffusers uses log(1e-20) where improved DDPM (and fastdiff) use the clipped posterior."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    schedule = fastdiff.NoiseSchedule.from_diffusers(sched)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    x_t = torch.randn(3, 2, 4, 4, generator=g)
    eps = torch.randn(3, 2, 4, 4, generator=g)
    for step in (1, 10, 500, 999):
        mean, log_variance = fastdiff.learned_range(torch.cat([eps, v], 1), x_t, step, schedule, backend=backend)
        # diffusers takes beta_t = 1 - ab_t / ab_{t-1} in fp32: ~1e-4 off at small t (cancellation)
        want = sched._get_variance(step, predicted_variance=v)
        assert_close(log_variance, want, 3e-4, 1e-5, f"log-variance, t = {step}")
        # the step's mean: diffusers' step with zero noise (fixed_small adds std * noise)
        sched_mean = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
        prev = sched_mean.step(eps, step, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
        std = sched_mean._get_variance(step) ** 0.5
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
        assert_close(mean, prev - std * noise, 1e-4, 1e-4, f"mean, t = {step}")


def test_hybrid_loss_recipe_matches_improved_diffusion():
    """learned_range's docstring recipe (diffusion_loss + ddpm_step for the mean + vb_loss) equals
    improved-diffusion's hybrid loss: MSE + vb * T / 1000, the mean's gradient stopped in vb."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (4, 3, 8, 8), generator=g).double() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor(T)
    x_t = fastdiff.q_sample(x0, t, noise, SCHEDULE)
    out = torch.randn(4, 6, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)

    eps = out.chunk(2, dim=1)[0]
    mean, log_variance = fastdiff.learned_range(out, x_t, t, SCHEDULE)
    vlb = fastdiff.vb_loss(mean, log_variance, x0, x_t, t, SCHEDULE, reduction="mean")
    got = fastdiff.diffusion_loss(eps, x0, noise, t, SCHEDULE) + 0.001 * SCHEDULE.num_timesteps * vlb

    # improved-diffusion, written out: p_mean_variance on the frozen eps, _vb_terms_bpd
    eps_r, v_r = out.chunk(2, dim=1)
    sa = SCHEDULE.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s1 = SCHEDULE.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    pred_x0 = (x_t - s1 * eps_r.detach()) / sa
    mean_r, _ = reference.q_posterior_mean_log_variance(pred_x0, x_t, t, SCHEDULE)
    vb = reference.vb_loss(mean_r, reference.learned_range(v_r, t, SCHEDULE), x0, x_t, t, SCHEDULE)
    want = ((eps_r - noise) ** 2).mean() + (vb * SCHEDULE.num_timesteps / 1000.0).mean()
    assert_close(got, want, 1e-10, 1e-10, "hybrid loss")
    _grad_close(torch.autograd.grad(got, out)[0], torch.autograd.grad(want, out)[0], "d model_output")
