"""q_sample: forward noising, every backend runnable here vs reference.py and diffusers."""
import pytest
import torch
from diffusers import DDPMScheduler

import fastdiff
from fastdiff import reference
from utils import REDUCED_DTYPES, assert_close, assert_within_eager_error, fused_backends_here

BACKENDS = fused_backends_here("q_sample")
SHAPES = [
    (3, 4, 5, 7),   # odd tail, NCHW
    (2, 3, 33),     # 1-D signal
    (1, 4, 8, 8),   # batch of one
    (2, 4, 3, 4, 5),  # video-like 3-D
]
LARGE = (3, 4, 130, 130)  # several CPU chunks per sample


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    noise = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    return x0, noise, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES + [LARGE])
def test_forward_backward_matches_reference_fp64(backend, shape):
    if backend == "triton" and shape == LARGE:
        pytest.skip("interpreted Triton: small shapes only")
    s = fastdiff.NoiseSchedule.cosine(1000)
    x0, noise, t = _inputs(shape)
    x0.requires_grad_(True)
    noise.requires_grad_(True)
    out = fastdiff.q_sample(x0, t, noise, s, backend=backend)
    ref = reference.q_sample(x0, t, noise, s)
    assert_close(out, ref, 1e-12, 1e-10, "q_sample fwd")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x0, noise), g)
    want = torch.autograd.grad(ref, (x0, noise), g)
    for a, b, name in zip(got, want, ("grad x0", "grad noise")):
        assert_close(a, b, 1e-12, 1e-10, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", REDUCED_DTYPES + (torch.float32,))
def test_reduced_precision(backend, dtype):
    s = fastdiff.NoiseSchedule.linear()
    x0, noise, t = _inputs((4, 4, 6, 6))
    exact = reference.q_sample(x0, t, noise, s)
    out = fastdiff.q_sample(x0.to(dtype), t, noise.to(dtype), s, backend=backend)
    assert out.dtype == dtype
    eager = reference.q_sample(x0.to(dtype), t, noise.to(dtype), s)
    assert_within_eager_error(out, eager, exact, f"q_sample {dtype}", floor=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_diffusers_add_noise(backend):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    s = fastdiff.NoiseSchedule.from_diffusers(sched)
    x0, noise, t = _inputs((4, 4, 8, 8), torch.float32)
    want = sched.add_noise(x0, noise, t)
    got = fastdiff.q_sample(x0, t, noise, s, backend=backend)
    assert_close(got, want, 1e-6, 1e-6, "vs DDPMScheduler.add_noise")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_give_same_numbers(backend):
    s = fastdiff.NoiseSchedule.linear()
    x0, noise, t = _inputs((2, 4, 6, 5), torch.float32)
    want = fastdiff.q_sample(x0, t, noise, s, backend=backend)
    cl = fastdiff.q_sample(x0.to(memory_format=torch.channels_last), t,
                           noise.to(memory_format=torch.channels_last), s, backend=backend)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, want)
    # mixed layouts and a non-contiguous (strided) view
    mixed = fastdiff.q_sample(x0, t, noise.to(memory_format=torch.channels_last), s, backend=backend)
    assert torch.equal(mixed, want)
    big = torch.randn(2, 4, 6, 10)
    view = big[..., ::2]
    assert_close(fastdiff.q_sample(view, t, noise, s, backend=backend),
                 reference.q_sample(view, t, noise, s), 1e-6, 1e-6, "strided view")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_channel_mixed_memory_formats(backend):
    """(B, 1, H, W) contiguous and channels_last differ only in a size-1 dim's stride."""
    s = fastdiff.NoiseSchedule.linear()
    x0, noise, t = _inputs((2, 1, 5, 6), torch.float32)
    got = fastdiff.q_sample(x0.to(memory_format=torch.channels_last), t, noise, s, backend=backend)
    assert torch.equal(got, fastdiff.q_sample(x0, t, noise, s, backend=backend))
    m = torch.randn_like(x0).to(memory_format=torch.channels_last).requires_grad_(True)
    loss = fastdiff.diffusion_loss(m, x0, noise, t, s, backend=backend)
    (g,) = torch.autograd.grad(loss, m)
    want = fastdiff.diffusion_loss(m, x0, noise, t, s, backend="reference")
    assert_close(loss, want, 1e-6, 1e-6, "loss")
    assert_close(g, torch.autograd.grad(want, m)[0], 1e-6, 1e-6, "grad")


def test_gradcheck_cpu():
    s = fastdiff.NoiseSchedule.linear(50)
    x0, noise, t = _inputs((2, 3, 4, 5))
    t = t % 50
    x0.requires_grad_(True)
    noise.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fastdiff.q_sample(a, t, b, s, backend="cpu"), (x0, noise))


def test_scalar_and_python_int_t():
    s = fastdiff.NoiseSchedule.linear()
    x0, noise, _ = _inputs((3, 2, 4, 4))
    a = fastdiff.q_sample(x0, 10, noise, s)
    b = fastdiff.q_sample(x0, torch.tensor(10), noise, s)
    c = fastdiff.q_sample(x0, torch.full((3,), 10, dtype=torch.int32), noise, s)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_empty_batch():
    s = fastdiff.NoiseSchedule.linear()
    x0 = torch.randn(0, 4, 8, 8)
    out = fastdiff.q_sample(x0, torch.zeros(0, dtype=torch.long), torch.randn_like(x0), s)
    assert out.shape == (0, 4, 8, 8)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(t=torch.tensor([0, 1000, 3])), ValueError, "t contains 1000"),
    (dict(t=torch.tensor([-1, 0, 3])), ValueError, "t contains -1"),
    (dict(t=torch.tensor([0, 1])), ValueError, r"t must have shape \(3,\)"),
    (dict(t=torch.tensor([0.5, 1.0, 2.0])), TypeError, "integer tensor"),
    (dict(t=5000), ValueError, "t = 5000"),
    (dict(x0=torch.randint(0, 5, (3, 4, 8, 8))), TypeError, "x0 must be float"),
    (dict(noise=torch.randn(3, 4, 8, 9)), ValueError, "noise shape"),
    (dict(noise=torch.randn(3, 4, 8, 8, dtype=torch.float64)), TypeError, "noise dtype"),
    (dict(schedule="linear"), TypeError, "schedule must be a fastdiff.NoiseSchedule"),
    (dict(x0=[1.0, 2.0]), TypeError, "x0 must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])  # the cpu kernel checks t's range itself
def test_bad_input(bad, exc, match, backend):
    args = dict(x0=torch.randn(3, 4, 8, 8), t=torch.tensor([0, 1, 2]), noise=torch.randn(3, 4, 8, 8),
                schedule=fastdiff.NoiseSchedule.linear())
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastdiff.q_sample(args["x0"], args["t"], args["noise"], args["schedule"], backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends(backend, dtype):
    s = fastdiff.NoiseSchedule.linear().to("cuda")
    x0, noise, t = (v.cuda() for v in _inputs((8, 4, 33, 31)))
    exact = reference.q_sample(x0, t, noise, s)
    x0r = x0.to(dtype).requires_grad_(True)
    nr = noise.to(dtype).requires_grad_(True)
    out = fastdiff.q_sample(x0r, t, nr, s, backend=backend)
    eager = reference.q_sample(x0.to(dtype), t, noise.to(dtype), s)
    assert_within_eager_error(out, eager, exact, f"{backend} {dtype}", floor=1e-6)
    g = torch.randn_like(out)
    gx, gn = torch.autograd.grad(out, (x0r, nr), g)
    sa = s.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    assert_close(gx, (g.double() * sa).to(dtype), 1e-2, 1e-2, "grad x0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    """The backward op has no autograd (fastdiff/ops/_common.py first_order_only): a gradient
    taken with create_graph=True that a second derivative would flow through raises; one whose
    upstream gradient is a constant (the second derivative is zero anyway) does not."""
    s = fastdiff.NoiseSchedule.linear(1000)
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    noise, t = torch.randn(2, 3, 4, 4), torch.tensor([1, 500])
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(fastdiff.q_sample(x0, t, noise, s, backend=backend).square().sum(), x0, create_graph=True)
    (g,) = torch.autograd.grad(fastdiff.q_sample(x0, t, noise, s, backend=backend).sum(), x0, create_graph=True)
    assert_close(g, s.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1).expand_as(x0).to(g.dtype), 1e-6, 1e-6, "d x_t / d x0")
