"""ddim_step: fused DDIM step vs reference.py and diffusers' DDIMScheduler.step."""
import pytest
import torch
from diffusers import DDIMScheduler

import fastdiff
from fastdiff import reference
from utils import REDUCED_DTYPES, assert_close, assert_within_eager_error, fused_backends_here

BACKENDS = fused_backends_here("ddim_step")
PRED = ("epsilon", "sample", "v_prediction")
SHAPES = [
    (3, 4, 5, 7),   # odd tail
    (2, 3, 33),     # 1-D
    (1, 4, 8, 8),   # batch of one
]


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, x, noise = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    t = torch.tensor([999, 500, 20, 7][: shape[0]] + [3] * max(0, shape[0] - 4))
    return m, x, noise, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip, use_clipped", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp64(backend, prediction_type, eta, clip, use_clipped, shape):
    s = fastdiff.NoiseSchedule.scaled_linear()
    m, x, noise, t = _inputs(shape)
    t_prev = t - 20  # the last step reaches t_prev < 0: alpha_bar_prev = 1
    m.requires_grad_(True)
    x.requires_grad_(True)
    kw = dict(prediction_type=prediction_type, clip_sample=clip, use_clipped_model_output=use_clipped)
    got = fastdiff.ddim_step(m, t, t_prev, x, s, eta, noise, backend=backend, **kw)
    want = reference.ddim_step(m, t, t_prev, x, s, eta, noise, **kw)
    assert_close(got, want, 1e-10, 1e-10, "prev_sample")
    g = torch.randn_like(got)
    for a, b, name in zip(torch.autograd.grad(got, (m, x), g), torch.autograd.grad(want, (m, x), g),
                          ("d model_output", "d sample")):
        assert_close(a, b, 1e-9, 1e-9, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip, use_clipped", [(False, False), (True, True)])
def test_matches_diffusers_step(backend, prediction_type, eta, clip, use_clipped):
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip,
                          set_alpha_to_one=True)
    sched.set_timesteps(50)
    s = fastdiff.NoiseSchedule.from_diffusers(sched)
    m, x, noise, _ = _inputs((2, 4, 8, 8), torch.float32)
    for t in (980, 500, 20, 0):
        want = sched.step(m, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise).prev_sample
        got = fastdiff.ddim_step(m, t, t - 20, x, s, eta=eta, noise=noise, prediction_type=prediction_type,
                                 clip_sample=clip, use_clipped_model_output=use_clipped, backend=backend)
        exact = reference.ddim_step(m.double(), torch.tensor([t, t]), torch.tensor([t - 20] * 2), x.double(), s, eta,
                                    noise.double(), prediction_type, clip, 1.0, use_clipped)
        assert_close(got, want, 1e-3, 1e-3, f"vs DDIMScheduler.step t={t}")
        assert_within_eager_error(got, want, exact, f"accuracy vs diffusers t={t}", floor=1e-6)


def test_generator_matches_diffusers():
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(10)
    s = fastdiff.NoiseSchedule.from_diffusers(sched)
    m, x, _, _ = _inputs((2, 4, 8, 8), torch.float32)
    want = sched.step(m, 500, x, eta=1.0, generator=torch.Generator().manual_seed(5)).prev_sample
    got = fastdiff.ddim_step(m, 500, 400, x, s, eta=1.0, generator=torch.Generator().manual_seed(5),
                             clip_sample=True)
    assert_close(got, want, 1e-4, 1e-4, "same generator, same noise")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
def test_reduced_precision(backend, dtype):
    s = fastdiff.NoiseSchedule.linear()
    m, x, noise, t = _inputs((4, 4, 8, 8))
    exact = reference.ddim_step(m, t, t - 20, x, s, 0.5, noise, "v_prediction")
    args = (m.to(dtype), t, t - 20, x.to(dtype), s, 0.5, noise.to(dtype))
    got = fastdiff.ddim_step(*args, prediction_type="v_prediction", backend=backend)
    eager = reference.ddim_step(*args, "v_prediction")
    assert got.dtype == dtype
    assert_within_eager_error(got, eager, exact, f"ddim {dtype}", floor=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend):
    s = fastdiff.NoiseSchedule.linear()
    m, x, noise, t = _inputs((4, 4, 6, 5), torch.float32)
    got = fastdiff.ddim_step(m, t, t - 20, x, s, 0.3, noise, backend=backend)
    cl = [v.to(memory_format=torch.channels_last) for v in (m, x, noise)]
    got_cl = fastdiff.ddim_step(cl[0], t, t - 20, cl[1], s, 0.3, cl[2], backend=backend)
    assert got_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got_cl, got)
    view = torch.randn(4, 4, 6, 10)[..., ::2]
    assert_close(fastdiff.ddim_step(view, t, t - 20, x, s, backend=backend),
                 fastdiff.ddim_step(view.contiguous(), t, t - 20, x, s, backend=backend), 0, 0, "strided view")


def test_gradcheck_cpu():
    s = fastdiff.NoiseSchedule.linear(100)
    m, x, noise, _ = _inputs((3, 2, 3, 4))
    t, t_prev = torch.tensor([99, 50, 5]), torch.tensor([80, 30, -1])
    m.requires_grad_(True)
    x.requires_grad_(True)
    for pred in PRED:
        for use_clipped in (False, True):
            assert torch.autograd.gradcheck(
                lambda a, b: fastdiff.ddim_step(a, t, t_prev, b, s, 0.5, noise, prediction_type=pred,
                                                clip_sample=True, clip_sample_range=3.0,
                                                use_clipped_model_output=use_clipped, backend="cpu"), (m, x))


@pytest.mark.parametrize("bad, exc, match", [
    (dict(eta=-0.1), ValueError, "eta must be a non-negative number"),
    (dict(t_prev=1000), ValueError, "t_prev = 1000"),
    (dict(t=-1), ValueError, "t = -1"),
    (dict(model_output=torch.randn(2, 4, 8, 9)), ValueError, "model_output shape"),
    (dict(model_output=torch.randn(2, 4, 8, 8).cuda() if torch.cuda.is_available() else torch.randn(2, 4, 8, 8,
          dtype=torch.float16)), (TypeError, ValueError), "model_output"),
    (dict(prediction_type="epsilon_"), ValueError, "prediction_type must be one of"),
])
def test_bad_input(bad, exc, match):
    m, x, noise, _ = _inputs((2, 4, 8, 8), torch.float32)
    args = dict(model_output=m, t=500, t_prev=480, sample=x, schedule=fastdiff.NoiseSchedule.linear())
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastdiff.ddim_step(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_backends(backend, prediction_type, dtype):
    s = fastdiff.NoiseSchedule.linear().to("cuda")
    m, x, noise, _ = (v.cuda() for v in _inputs((8, 4, 33, 31)))
    t = torch.randint(20, 1000, (8,), device="cuda")
    exact = reference.ddim_step(m, t, t - 20, x, s, 0.5, noise, prediction_type, True, 1.0, True)
    md, xd = m.to(dtype).requires_grad_(True), x.to(dtype).requires_grad_(True)
    got = fastdiff.ddim_step(md, t, t - 20, xd, s, 0.5, noise.to(dtype), prediction_type=prediction_type,
                             clip_sample=True, use_clipped_model_output=True, backend=backend)
    eager = reference.ddim_step(md, t, t - 20, xd, s, 0.5, noise.to(dtype), prediction_type, True, 1.0, True)
    assert_within_eager_error(got, eager, exact, "ddim", floor=1e-3)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (md, xd), g), torch.autograd.grad(eager, (md, xd), g)):
        assert_close(a, b, 5e-2, 5e-2, "grads")
