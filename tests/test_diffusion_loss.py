"""diffusion_loss: fused target + MSE (+ min-SNR-gamma), vs reference.py and diffusers' recipe."""
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

import fastdiff
from fastdiff import reference
from utils import REDUCED_DTYPES, assert_close, assert_within_eager_error, fused_backends_here

BACKENDS = fused_backends_here("diffusion_loss")
PRED = ("epsilon", "sample", "v_prediction")
SHAPES = [
    (3, 4, 5, 7),     # odd tail
    (2, 3, 33),       # 1-D
    (1, 4, 8, 8),     # batch of one
]
LARGE = (3, 4, 130, 130)  # several CPU chunks per sample: two-stage reduction


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, x0, noise = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    return m, x0, noise, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES + [LARGE])
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_matches_reference_fp64(backend, shape, prediction_type, snr_gamma):
    if backend == "triton" and shape == LARGE:
        pytest.skip("interpreted Triton: small shapes only")
    s = fastdiff.NoiseSchedule.linear()
    m, x0, noise, t = _inputs(shape)
    for v in (m, x0, noise):
        v.requires_grad_(True)
    got = fastdiff.diffusion_loss(m, x0, noise, t, s, prediction_type, snr_gamma, "none", backend=backend)
    want = reference.diffusion_loss(m, x0, noise, t, s, prediction_type, snr_gamma, "none")
    assert_close(got, want, 1e-12, 1e-10, "per-sample loss")
    g = torch.randn_like(got)
    kw = dict(allow_unused=True, materialize_grads=True)  # the epsilon target does not use x0, etc.
    for a, b, name in zip(torch.autograd.grad(got, (m, x0, noise), g, **kw),
                          torch.autograd.grad(want, (m, x0, noise), g, **kw), ("d model_output", "d x0", "d noise")):
        assert_close(a, b, 1e-12, 1e-10, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", PRED)
def test_mean_reduction_and_backward(backend, prediction_type):
    s = fastdiff.NoiseSchedule.cosine(1000)
    m, x0, noise, t = _inputs((4, 3, 6, 6))
    m.requires_grad_(True)
    got = fastdiff.diffusion_loss(m, x0, noise, t, s, prediction_type, 5.0, backend=backend)
    want = reference.diffusion_loss(m, x0, noise, t, s, prediction_type, 5.0)
    assert got.dim() == 0
    assert_close(got, want, 1e-12, 1e-10, "mean loss")
    (ga,), (gb,) = torch.autograd.grad(got, m), torch.autograd.grad(want, m)
    assert_close(ga, gb, 1e-12, 1e-10, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_matches_diffusers_training_recipe(backend, prediction_type, snr_gamma):
    """The loss of diffusers' train_text_to_image.py (target, compute_snr, min-SNR weights)."""
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    s = fastdiff.NoiseSchedule.from_diffusers(sched)
    m, x0, noise, t = _inputs((4, 4, 8, 8), torch.float32)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = sched.get_velocity(x0, noise, t)
    else:
        target = x0
    if snr_gamma is None:
        want = torch.nn.functional.mse_loss(m.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(sched, t)
        w = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        if prediction_type == "epsilon":
            w = w / snr
        elif prediction_type == "v_prediction":
            w = w / (snr + 1)
        loss = torch.nn.functional.mse_loss(m.float(), target.float(), reduction="none")
        want = (loss.mean(dim=list(range(1, loss.dim()))) * w).mean()
    got = fastdiff.diffusion_loss(m, x0, noise, t, s, prediction_type, snr_gamma, backend=backend)
    assert_close(got, want, 1e-6, 1e-5, "vs diffusers recipe")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
def test_reduced_precision(backend, dtype):
    s = fastdiff.NoiseSchedule.linear()
    m, x0, noise, t = _inputs((4, 4, 8, 8))
    m.requires_grad_(True)
    exact = reference.diffusion_loss(m, x0, noise, t, s, "v_prediction", 5.0, "none")
    (gexact,) = torch.autograd.grad(exact.sum(), m)
    md = m.detach().to(dtype).requires_grad_(True)
    args = (x0.to(dtype), noise.to(dtype), t, s, "v_prediction", 5.0, "none")
    got = fastdiff.diffusion_loss(md, *args, backend=backend)
    assert got.dtype == dtype
    eager = reference.diffusion_loss(md, *args)
    assert_within_eager_error(got, eager, exact, f"loss {dtype}", floor=1e-6)
    (g_got,), (g_eager,) = torch.autograd.grad(got.sum(), md), torch.autograd.grad(eager.sum(), md)
    assert_within_eager_error(g_got, g_eager, gexact, f"grad {dtype}", floor=1e-6)


def test_mixed_dtypes_promote():
    """Autocast pattern: a bf16 model output against fp32 data and noise."""
    s = fastdiff.NoiseSchedule.linear()
    m, x0, noise, t = _inputs((2, 4, 8, 8), torch.float32)
    got = fastdiff.diffusion_loss(m.bfloat16(), x0, noise, t, s)
    want = reference.diffusion_loss(m.bfloat16().float(), x0, noise, t, s)
    assert got.dtype == torch.bfloat16
    assert_close(got, want.bfloat16(), 1e-2, 1e-2, "promoted")


def test_deterministic_and_layout_invariant():
    s = fastdiff.NoiseSchedule.linear()
    m, x0, noise, t = _inputs((3, 4, 130, 130), torch.float32)
    a = fastdiff.diffusion_loss(m, x0, noise, t, s, "v_prediction", 5.0, "none", backend="cpu")
    b = fastdiff.diffusion_loss(m, x0, noise, t, s, "v_prediction", 5.0, "none", backend="cpu")
    assert torch.equal(a, b)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c = fastdiff.diffusion_loss(m, x0, noise, t, s, "v_prediction", 5.0, "none", backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, c), "loss must not depend on the thread count"


def test_gradcheck_cpu():
    s = fastdiff.NoiseSchedule.linear(100)
    m, x0, noise, t = _inputs((2, 3, 4, 5))
    t = t % 100
    for v in (m, x0, noise):
        v.requires_grad_(True)
    for pred in PRED:
        assert torch.autograd.gradcheck(
            lambda a, b, c: fastdiff.diffusion_loss(a, b, c, t, s, pred, 5.0, "none", backend="cpu"),
            (m, x0, noise))


@pytest.mark.parametrize("bad, exc, match", [
    (dict(prediction_type="eps"), ValueError, "prediction_type must be one of"),
    (dict(reduction="sum"), ValueError, "reduction must be one of"),
    (dict(snr_gamma=0.0), ValueError, "snr_gamma must be a positive number"),
    (dict(snr_gamma="5"), ValueError, "snr_gamma"),
    (dict(x0=torch.randn(2, 4, 8, 7)), ValueError, "x0 shape"),
    (dict(t=torch.tensor([3])), ValueError, r"t must have shape \(2,\)"),
    (dict(t=torch.tensor([3, 1000])), ValueError, "t contains 1000"),
    (dict(noise=torch.randint(0, 2, (2, 4, 8, 8))), TypeError, "noise must be float"),
])
def test_bad_input(bad, exc, match):
    m, x0, noise, t = _inputs((2, 4, 8, 8), torch.float32)
    args = dict(model_output=m, x0=x0, noise=noise, t=t, schedule=fastdiff.NoiseSchedule.linear())
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastdiff.diffusion_loss(**args)


def test_empty_batch():
    s = fastdiff.NoiseSchedule.linear()
    e = torch.randn(0, 4, 8, 8)
    t = torch.zeros(0, dtype=torch.long)
    assert fastdiff.diffusion_loss(e, e, e, t, s, reduction="none").shape == (0,)
    with pytest.raises(ValueError, match="empty batch"):
        fastdiff.diffusion_loss(e, e, e, t, s)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("prediction_type", PRED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends(backend, prediction_type, dtype):
    s = fastdiff.NoiseSchedule.linear().to("cuda")
    m, x0, noise, t = (v.cuda() for v in _inputs((16, 4, 64, 63)))
    m.requires_grad_(True)
    exact = reference.diffusion_loss(m, x0, noise, t, s, prediction_type, 5.0, "none")
    (gexact,) = torch.autograd.grad(exact.sum(), m)
    md = m.detach().to(dtype).requires_grad_(True)
    args = (x0.to(dtype), noise.to(dtype), t, s, prediction_type, 5.0, "none")
    got = fastdiff.diffusion_loss(md, *args, backend=backend)
    eager = reference.diffusion_loss(md, *args)
    assert_within_eager_error(got, eager, exact, "loss", floor=1e-6)
    (g_got,), (g_eager,) = torch.autograd.grad(got.sum(), md), torch.autograd.grad(eager.sum(), md)
    assert_within_eager_error(g_got, g_eager, gexact, "grad", floor=1e-6)
    again = fastdiff.diffusion_loss(md, *args, backend=backend)
    assert torch.equal(got, again), "deterministic"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction, upstream", [("mean", None), ("none", "sum"), ("none", "mean"), ("none", "randn")])
def test_gradient_from_the_forward_pass(backend, reduction, upstream):
    """The forward writes d loss / d model_output; the backward hands it out (rescaled when the
    upstream gradient is not the one it was scaled for) and recomputes on a second backward."""
    s = fastdiff.NoiseSchedule.linear()
    m, x0, noise, t = _inputs((3, 4, 5, 7))
    m.requires_grad_(True)

    def upstream_of(loss):
        if upstream is None:
            return loss
        if upstream == "randn":
            return (loss * torch.randn(loss.shape, generator=torch.Generator().manual_seed(1),
                                       dtype=loss.dtype)).sum()
        return getattr(loss, upstream)()

    want = upstream_of(reference.diffusion_loss(m, x0, noise, t, s, "v_prediction", 5.0, reduction))
    (g_want,) = torch.autograd.grad(want, m)
    got = upstream_of(fastdiff.diffusion_loss(m, x0, noise, t, s, "v_prediction", 5.0, reduction,
                                              backend=backend))
    (g1,) = torch.autograd.grad(got, m, retain_graph=True)
    (g2,) = torch.autograd.grad(got, m)  # second backward: the recompute kernel
    assert_close(g1, g_want, 1e-12, 1e-10, "gradient from the forward")
    assert_close(g2, g_want, 1e-12, 1e-10, "recomputed gradient")
