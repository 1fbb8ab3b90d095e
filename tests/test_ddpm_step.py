"""ddpm_step: fused DDPM reverse step vs reference.py and diffusers' DDPMScheduler.step."""
import pytest
import torch
from diffusers import DDPMScheduler

import fastdiff
from fastdiff import reference
from utils import REDUCED_DTYPES, assert_close, assert_within_eager_error, fused_backends_here

BACKENDS = fused_backends_here("ddpm_step")
PRED = ("epsilon", "sample", "v_prediction")
VAR = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
SHAPES = [
    (3, 4, 5, 7),   # odd tail
    (2, 3, 33),     # 1-D
    (1, 4, 8, 8),   # batch of one
]
LARGE = (2, 4, 130, 130)  # several CPU chunks per sample


def _inputs(shape, variance_type="fixed_small", dtype=torch.float64, seed=0, t=None):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=g, dtype=dtype)
    mshape = (shape[0], 2 * shape[1]) + shape[2:] if variance_type in ("learned", "learned_range") else shape
    m = torch.randn(mshape, generator=g, dtype=dtype)
    if variance_type in ("learned", "learned_range"):  # plausible (log-)variance channels
        m[:, shape[1]:] = m[:, shape[1]:].tanh() if variance_type == "learned_range" else -m[:, shape[1]:].abs() - 3
    noise = torch.randn(shape, generator=g, dtype=dtype)
    if t is None:
        t = torch.tensor([0, 1, 500, 999][: shape[0]] + [7] * max(0, shape[0] - 4))
    return m, sample, noise, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("variance_type", VAR)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp64(backend, prediction_type, variance_type, clip, shape):
    s = fastdiff.NoiseSchedule.linear()
    m, x, noise, t = _inputs(shape, variance_type)
    m.requires_grad_(True)
    x.requires_grad_(True)
    kw = dict(prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip)
    got = fastdiff.ddpm_step(m, t, x, s, noise=noise, backend=backend, **kw)
    want = reference.ddpm_step(m, t, x, s, noise, prediction_type, variance_type, clip)
    assert_close(got, want, 1e-10, 1e-10, "prev_sample")
    g = torch.randn_like(got)
    for a, b, name in zip(torch.autograd.grad(got, (m, x), g), torch.autograd.grad(want, (m, x), g),
                          ("d model_output", "d sample")):
        assert_close(a, b, 1e-9, 1e-9, name)


@pytest.mark.parametrize("variance_type", ("fixed_small", "learned_range"))
def test_large_cpu(variance_type):
    s = fastdiff.NoiseSchedule.cosine(1000)
    m, x, noise, t = _inputs(LARGE, variance_type)
    got = fastdiff.ddpm_step(m, t, x, s, noise=noise, variance_type=variance_type, backend="cpu")
    want = reference.ddpm_step(m, t, x, s, noise, "epsilon", variance_type)
    assert_close(got, want, 1e-10, 1e-10, "prev_sample")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("variance_type", ("fixed_small", "fixed_small_log", "fixed_large", "learned_range"))
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t", [0, 1, 420, 999])
def test_matches_diffusers_step(backend, prediction_type, variance_type, clip, t):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, variance_type=variance_type,
                          clip_sample=clip)
    s = fastdiff.NoiseSchedule.from_diffusers(sched)
    m, x, _, _ = _inputs((2, 4, 8, 8), variance_type, torch.float32)
    want = sched.step(m, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    got = fastdiff.ddpm_step(m, t, x, s, generator=torch.Generator().manual_seed(1), prediction_type=prediction_type,
                             variance_type=variance_type, clip_sample=clip, backend=backend)
    # diffusers computes 1 - alpha_bar etc. in fp32 (cancellation at small t): same numbers
    # to 1e-3, and against the float64 truth fastdiff is at least as accurate as diffusers.
    assert_close(got, want, 1e-3, 1e-3, "vs DDPMScheduler.step")
    # Both are fp32; against the float64 truth fastdiff is at least as accurate as diffusers.
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    exact = reference.ddpm_step(m.double(), torch.tensor([t, t]), x.double(), s, noise.double(), prediction_type,
                                variance_type, clip)
    assert_within_eager_error(got, want, exact, "accuracy vs diffusers", floor=1e-6)


@pytest.mark.parametrize("variance_type", ("fixed_large_log", "learned"))
def test_diffusers_nan_variants_follow_improved_ddpm(variance_type):
    """diffusers 0.42 takes sqrt of a log-variance for these (NaN); fastdiff uses exp(0.5 * logvar)."""
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type)
    s = fastdiff.NoiseSchedule.from_diffusers(sched)
    m, x, noise, _ = _inputs((2, 4, 8, 8), variance_type, torch.float32)
    theirs = sched.step(m, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isnan(theirs).any(), "diffusers fixed this: follow it again"
    ours = fastdiff.ddpm_step(m, 500, x, s, noise=noise, variance_type=variance_type)
    assert torch.isfinite(ours).all()
    mean = fastdiff.ddpm_step(m, 500, x, s, noise=torch.zeros_like(noise), variance_type=variance_type)
    if variance_type == "fixed_large_log":
        std = s.betas[500].sqrt().float()
    else:
        std = torch.exp(0.5 * m[:, 4:])
    assert_close(ours, mean + std * noise, 1e-5, 1e-5, "improved-DDPM std")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_sampling_matches_diffusers(backend):
    sched = DDPMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(50)
    s = fastdiff.NoiseSchedule.from_diffusers(sched)
    m, x, noise, _ = _inputs((2, 4, 8, 8), dtype=torch.float32)
    for t in (980, 500, 20, 0):
        want = sched.step(m, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
        got = fastdiff.ddpm_step(m, t, x, s, generator=torch.Generator().manual_seed(3), t_prev=t - 20,
                                 backend=backend)
        assert_close(got, want, 1e-4, 1e-4, f"strided t={t}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
@pytest.mark.parametrize("variance_type", ("fixed_small", "learned_range"))
def test_reduced_precision(backend, dtype, variance_type):
    s = fastdiff.NoiseSchedule.linear()
    m, x, noise, t = _inputs((4, 4, 8, 8), variance_type)
    t = torch.tensor([1, 50, 300, 900])
    exact = reference.ddpm_step(m, t, x, s, noise, "v_prediction", variance_type, False)
    args = (m.to(dtype), t, x.to(dtype), s, noise.to(dtype))
    got = fastdiff.ddpm_step(*args, prediction_type="v_prediction", variance_type=variance_type, clip_sample=False,
                             backend=backend)
    eager = reference.ddpm_step(*args, "v_prediction", variance_type, False)
    assert got.dtype == dtype
    assert_within_eager_error(got, eager, exact, f"ddpm {dtype}", floor=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_t_and_layouts(backend):
    s = fastdiff.NoiseSchedule.linear()
    m, x, noise, t = _inputs((4, 4, 6, 5), dtype=torch.float32)
    exact = reference.ddpm_step(m.double(), t, x.double(), s, noise.double())
    got = fastdiff.ddpm_step(m, t, x, s, noise=noise, backend=backend)
    assert_within_eager_error(got, reference.ddpm_step(m, t, x, s, noise), exact, "per-sample t", floor=1e-6)
    cl = [v.to(memory_format=torch.channels_last) for v in (m, x, noise)]
    got_cl = fastdiff.ddpm_step(cl[0], t, cl[1], s, noise=cl[2], backend=backend)
    assert got_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got_cl, got)


def test_gradcheck_cpu():
    s = fastdiff.NoiseSchedule.linear(100)
    for variance_type in ("fixed_small", "learned", "learned_range"):
        m, x, noise, _ = _inputs((3, 2, 3, 4), variance_type)
        t = torch.tensor([0, 5, 99])
        m.requires_grad_(True)
        x.requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a, b: fastdiff.ddpm_step(a, t, b, s, noise=noise, prediction_type="v_prediction",
                                            variance_type=variance_type, clip_sample=True, clip_sample_range=2.0,
                                            backend="cpu"), (m, x))


def test_noise_only_where_t_positive():
    s = fastdiff.NoiseSchedule.linear()
    m, x, _, _ = _inputs((2, 4, 8, 8), dtype=torch.float32)
    a = fastdiff.ddpm_step(m, 0, x, s)  # no noise needed, none drawn
    b = fastdiff.ddpm_step(m, 0, x, s, noise=torch.randn_like(x))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(variance_type="learned_range"), ValueError, "needs model_output of shape"),
    (dict(variance_type="fixed"), ValueError, "variance_type must be one of"),
    (dict(prediction_type="x0"), ValueError, "prediction_type must be one of"),
    (dict(t=1000), ValueError, "t = 1000"),
    (dict(t=torch.tensor([1, 2, 3])), ValueError, r"t must have shape \(2,\)"),
    (dict(t_prev=torch.tensor([1, 1000])), ValueError, "t_prev contains 1000"),
    (dict(clip_sample_range=0.0), ValueError, "clip_sample_range"),
    (dict(noise=torch.randn(2, 4, 8, 8, dtype=torch.float64)), TypeError, "noise dtype"),
])
def test_bad_input(bad, exc, match):
    m, x, noise, _ = _inputs((2, 4, 8, 8), dtype=torch.float32)
    args = dict(model_output=m, t=10, sample=x, schedule=fastdiff.NoiseSchedule.linear(), noise=noise)
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastdiff.ddpm_step(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("variance_type", VAR)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends(backend, variance_type, dtype):
    s = fastdiff.NoiseSchedule.linear().to("cuda")
    m, x, noise, _ = (v.cuda() for v in _inputs((8, 4, 33, 31), variance_type)[:3])
    t = torch.randint(0, 1000, (8,), device="cuda")
    exact = reference.ddpm_step(m, t, x, s, noise, "epsilon", variance_type, True)
    md, xd = m.to(dtype).requires_grad_(True), x.to(dtype).requires_grad_(True)
    got = fastdiff.ddpm_step(md, t, xd, s, noise=noise.to(dtype), variance_type=variance_type, backend=backend)
    eager = reference.ddpm_step(md, t, xd, s, noise.to(dtype), "epsilon", variance_type, True)
    assert_within_eager_error(got, eager, exact, "ddpm", floor=1e-3)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (md, xd), g), torch.autograd.grad(eager, (md, xd), g)):
        assert_close(a, b, 5e-2, 5e-2, "grads")
