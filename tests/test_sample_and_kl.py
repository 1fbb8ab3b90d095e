"""sample_and_kl / reparameterize / gaussian_kl vs reference.py and diffusers'
DiagonalGaussianDistribution (the VAE posterior of AutoencoderKL)."""
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

import fastdiff
from fastdiff import reference
from utils import REDUCED_DTYPES, assert_close, assert_within_eager_error, fused_backends_here

BACKENDS = fused_backends_here("sample_and_kl")
SHAPES = [
    (3, 4, 5, 7),     # odd tail
    (2, 3, 33),       # 1-D
    (1, 4, 8, 8),     # batch of one
]
LARGE = (2, 4, 130, 130)  # several CPU chunks per sample


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g, dtype=dtype)
    logvar = torch.randn(shape, generator=g, dtype=dtype) * 2
    noise = torch.randn(shape, generator=g, dtype=dtype)
    return mean, logvar, noise


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES + [LARGE])
def test_matches_reference_fp64(backend, shape):
    if backend == "triton" and shape == LARGE:
        pytest.skip("interpreted Triton: small shapes only")
    mean, logvar, noise = _inputs(shape)
    mean.requires_grad_(True)
    logvar.requires_grad_(True)
    z, kl = fastdiff.sample_and_kl(mean, logvar, noise, backend=backend)
    zr, klr = reference.sample_and_kl(mean, logvar, noise)
    assert_close(z, zr, 1e-12, 1e-10, "z")
    assert_close(kl, klr, 1e-10, 1e-10, "kl")
    gz, gk = torch.randn_like(z), torch.randn_like(kl)
    got = torch.autograd.grad((z * gz).sum() + (kl * gk).sum(), (mean, logvar))
    want = torch.autograd.grad((zr * gz).sum() + (klr * gk).sum(), (mean, logvar))
    for a, b, name in zip(got, want, ("d mean", "d logvar")):
        assert_close(a, b, 1e-10, 1e-10, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum_per_sample", "sum", "mean", "none"])
def test_reductions_and_single_outputs(backend, reduction):
    mean, logvar, noise = _inputs((3, 4, 6, 5))
    mean.requires_grad_(True)
    logvar.requires_grad_(True)
    kl = fastdiff.gaussian_kl(mean, logvar, reduction, backend=backend)
    want = reference.gaussian_kl(mean, logvar, reduction)
    assert_close(kl, want, 1e-10, 1e-10, f"kl {reduction}")
    for a, b in zip(torch.autograd.grad(kl.sum(), (mean, logvar)), torch.autograd.grad(want.sum(), (mean, logvar))):
        assert_close(a, b, 1e-10, 1e-10, "kl grad")
    z = fastdiff.reparameterize(mean, logvar, noise, backend=backend)
    zr = reference.reparameterize(mean, logvar, noise)
    assert_close(z, zr, 1e-12, 1e-10, "reparameterize")
    g = torch.randn_like(z)
    for a, b in zip(torch.autograd.grad(z, (mean, logvar), g), torch.autograd.grad(zr, (mean, logvar), g)):
        assert_close(a, b, 1e-12, 1e-10, "z grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_diffusers_diagonal_gaussian(backend):
    """Same generator, same noise: sample(); and kl() of diffusers' posterior."""
    g = torch.Generator().manual_seed(0)
    params = torch.randn(2, 8, 6, 6, generator=g) * 3  # logvar beyond [-30, 20] is clamped
    params[:, 4:] *= 10
    dist = DiagonalGaussianDistribution(params)
    want_z = dist.sample(generator=torch.Generator().manual_seed(7))
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(7))
    z, kl = fastdiff.sample_and_kl(dist.mean, dist.logvar, noise, backend=backend)
    assert_close(z, want_z, 1e-5, 1e-5, "vs DiagonalGaussianDistribution.sample")
    assert_close(kl, dist.kl(), 1e-3, 1e-5, "vs DiagonalGaussianDistribution.kl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
def test_reduced_precision(backend, dtype):
    mean, logvar, noise = _inputs((4, 4, 8, 8))
    mean.requires_grad_(True)
    z64, kl64 = reference.sample_and_kl(mean, logvar, noise)
    (g64,) = torch.autograd.grad(z64.sum() + kl64.sum(), mean)
    md = mean.detach().to(dtype).requires_grad_(True)
    args = (logvar.to(dtype), noise.to(dtype))
    z, kl = fastdiff.sample_and_kl(md, *args, backend=backend)
    ze, kle = reference.sample_and_kl(md, *args)
    assert z.dtype == kl.dtype == dtype
    assert_within_eager_error(z, ze, z64, f"z {dtype}", floor=1e-3)
    assert_within_eager_error(kl, kle, kl64, f"kl {dtype}", floor=1e-2)
    (g,), (ge,) = torch.autograd.grad(z.sum() + kl.sum(), md), torch.autograd.grad(ze.sum() + kle.sum(), md)
    assert_within_eager_error(g, ge, g64, f"grad {dtype}", floor=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_determinism(backend):
    mean, logvar, noise = _inputs((2, 4, 6, 5), torch.float32)
    z, kl = fastdiff.sample_and_kl(mean, logvar, noise, backend=backend)
    cl = [v.to(memory_format=torch.channels_last) for v in (mean, logvar, noise)]
    z2, kl2 = fastdiff.sample_and_kl(*cl, backend=backend)
    assert z2.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(z2, z)
    assert_close(kl2, kl, 1e-5, 1e-6, "kl, other summation order")
    z3, kl3 = fastdiff.sample_and_kl(mean, logvar, noise, backend=backend)
    assert torch.equal(z3, z) and torch.equal(kl3, kl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_channel_mixed_memory_formats(backend):
    mean, logvar, noise = _inputs((2, 1, 5, 6), torch.float32)
    mean.requires_grad_(True)
    z, kl = fastdiff.sample_and_kl(mean.to(memory_format=torch.channels_last), logvar, noise, backend=backend)
    zr, klr = reference.sample_and_kl(mean, logvar, noise)
    assert_close(z, zr, 1e-6, 1e-6, "z")
    g = torch.randn_like(zr).to(memory_format=torch.channels_last)
    (ga,), (gb,) = torch.autograd.grad(z, mean, g), torch.autograd.grad(zr, mean, g)
    assert_close(ga, gb, 1e-6, 1e-6, "grad")


def test_noise_gradient_and_gradcheck_cpu():
    mean, logvar, noise = _inputs((2, 3, 4, 5))
    for v in (mean, logvar, noise):
        v.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: fastdiff.sample_and_kl(a, b, c, backend="cpu"), (mean, logvar, noise))


@pytest.mark.parametrize("bad, exc, match", [
    (dict(logvar=torch.randn(2, 4, 8, 7)), ValueError, "logvar shape"),
    (dict(noise=torch.randn(2, 4, 8, 8, dtype=torch.float64)), TypeError, "noise dtype"),
    (dict(mean=torch.randint(0, 3, (2, 4, 8, 8))), TypeError, "mean must be float"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(noise=None), TypeError, "noise must be a torch.Tensor"),
])
def test_bad_input(bad, exc, match):
    args = dict(mean=torch.randn(2, 4, 8, 8), logvar=torch.randn(2, 4, 8, 8), noise=torch.randn(2, 4, 8, 8),
                reduction="sum_per_sample")
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastdiff.sample_and_kl(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_backends(backend, dtype):
    mean, logvar, noise = (v.cuda() for v in _inputs((16, 4, 64, 63)))
    mean.requires_grad_(True)
    z64, kl64 = reference.sample_and_kl(mean, logvar, noise)
    (g64,) = torch.autograd.grad(z64.sum() + kl64.sum(), mean)
    md = mean.detach().to(dtype).requires_grad_(True)
    args = (logvar.to(dtype), noise.to(dtype))
    z, kl = fastdiff.sample_and_kl(md, *args, backend=backend)
    ze, kle = reference.sample_and_kl(md, *args)
    assert_within_eager_error(z, ze, z64, "z", floor=1e-3)
    assert_within_eager_error(kl, kle, kl64, "kl", floor=1e-2)
    (g,), (ge,) = torch.autograd.grad(z.sum() + kl.sum(), md), torch.autograd.grad(ze.sum() + kle.sum(), md)
    assert_within_eager_error(g, ge, g64, "grad", floor=1e-3)
    assert torch.equal(kl, fastdiff.sample_and_kl(md, *args, backend=backend)[1]), "deterministic"


@pytest.mark.parametrize("backend", BACKENDS)
def test_diagonal_gaussian_is_a_drop_in(backend):
    g = torch.Generator().manual_seed(3)
    params = torch.randn(2, 8, 6, 5, generator=g) * 4  # some logvar outside [-30, 20]
    params[:, 4:] *= 10
    theirs = DiagonalGaussianDistribution(params)
    ours = fastdiff.DiagonalGaussian(params, backend=backend)
    assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.logvar, theirs.logvar)
    assert torch.equal(ours.mode(), theirs.mode())
    assert_close(ours.std, theirs.std, 0, 0, "std")
    assert_close(ours.sample(torch.Generator().manual_seed(1)), theirs.sample(torch.Generator().manual_seed(1)),
                 1e-5, 1e-5, "sample")
    assert_close(ours.kl(), theirs.kl(), 1e-3, 1e-5, "kl")
    other = torch.randn(2, 8, 6, 5, generator=g)
    assert_close(ours.kl(fastdiff.DiagonalGaussian(other)), theirs.kl(DiagonalGaussianDistribution(other)),
                 1e-3, 1e-5, "kl(other)")
    x = torch.randn(2, 4, 6, 5, generator=g)
    assert_close(ours.nll(x), theirs.nll(x), 1e-3, 1e-5, "nll")
    z, kl = ours.sample_and_kl(torch.Generator().manual_seed(1))
    assert_close(z, theirs.sample(torch.Generator().manual_seed(1)), 1e-5, 1e-5, "sample_and_kl z")
    assert_close(kl, theirs.kl(), 1e-3, 1e-5, "sample_and_kl kl")
    det = fastdiff.DiagonalGaussian(params, deterministic=True)
    assert torch.equal(det.sample(), theirs.mean) and det.kl().item() == 0.0
    z_det, kl_det = det.sample_and_kl()
    assert torch.equal(z_det, theirs.mean) and kl_det.item() == 0.0


def test_diagonal_gaussian_bad_input():
    with pytest.raises(ValueError, match="even number of channels"):
        fastdiff.DiagonalGaussian(torch.randn(2, 7, 4, 4))
    with pytest.raises(TypeError, match="parameters must be float"):
        fastdiff.DiagonalGaussian(torch.zeros(2, 8, 4, 4, dtype=torch.long))
