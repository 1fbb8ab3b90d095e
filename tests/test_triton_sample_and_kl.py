"""fastdiff.kernels.sample_and_kl (Triton) against the C++ CPU op
(torch.ops.fastdiff.sample_and_kl / _sample_and_kl_bwd) and an independent
float64 formula, forward and backward.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors; the
variable is set here, before triton is first imported (conftest.py does the
same).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

import fastdiff  # noqa: E402,F401  (registers torch.ops.fastdiff and its CPU kernels)
from fastdiff.kernels import sample_and_kl as K  # noqa: E402

from utils import assert_close, assert_within_eager_error  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
SHAPES = [(3, 4, 5, 7), (2, 3, 33), (1, 4, 8, 8), (2, 3, 1000)]  # last: n = 3000 > BLOCK, tail
TIGHT = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-10)}


def _inputs(shape, dtype, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    lv = 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    gz = torch.randn(shape, generator=g, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gkl = torch.randn(shape[0], generator=g, dtype=torch.float64).to(acc)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = [x.to(dtype).to(memory_format=fmt) for x in (mu, lv, eps, gz)]
    return [x.to(DEVICE) for x in out] + [gkl.to(DEVICE)]


def _formula(mu, lv, eps, gz, gkl, dtype):
    """z, kl, d mu, d lv in `dtype` (float64: the reference; a reduced dtype:
    eager PyTorch, kl summed in fp32). gz / eps None: g_z = 0."""
    mu, lv = mu.to(dtype), lv.to(dtype)
    std = torch.exp(lv / 2)
    z = mu + std * eps.to(dtype) if eps is not None else None
    kl_el = (mu * mu + std * std - 1 - lv) / 2
    kl = kl_el.to(torch.float64 if dtype == torch.float64 else torch.float32)
    kl = kl.flatten(1).sum(1)
    g = gkl.to(dtype).view(-1, *([1] * (mu.dim() - 1)))
    gz_eps = gz.to(dtype) * eps.to(dtype) * std if gz is not None and eps is not None else 0
    gzv = gz.to(dtype) if gz is not None and eps is not None else 0
    d_mu = gzv + g * mu
    d_lv = (gz_eps + g * (std * std - 1)) / 2
    return z, kl, d_mu, d_lv


def _kl_tol(mu, lv, dtype):
    """Absolute tolerance on kl: the sum of |terms| times a few ulps of A."""
    mu, lv = mu.double(), lv.double()
    mag = ((mu * mu + torch.exp(lv) + 1 + lv.abs()) / 2).flatten(1).sum(1)
    ulp = 1e-14 if dtype == torch.float64 else 1e-6
    return (mag * ulp * 8).max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_noise", [True, False])
def test_fwd(shape, dtype, with_noise):
    mu, lv, eps, _, _ = _inputs(shape, dtype)
    noise = eps if with_noise else None
    z, kl = K.sample_and_kl_fwd(mu, lv, noise)
    cz, ckl = torch.ops.fastdiff.sample_and_kl(mu.cpu(), lv.cpu(), None if noise is None else eps.cpu())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert kl.dtype == acc and kl.shape == (shape[0],)
    assert z.dtype == dtype and z.shape == cz.shape
    if not with_noise:
        assert z.shape == (0,)
    rz, rkl, _, _ = _formula(mu.cpu().double(), lv.cpu().double(), eps.cpu().double() if with_noise else None,
                             None, torch.zeros(shape[0], dtype=torch.float64), torch.float64)
    ktol = _kl_tol(mu, lv, dtype)
    assert_close(kl.cpu(), ckl, ktol, 0, "kl vs CPU op")
    if dtype in TIGHT:
        assert_close(kl.cpu(), rkl, ktol, 0, "kl vs float64")
        if with_noise:
            atol, rtol = TIGHT[dtype]
            assert_close(z.cpu(), cz, atol, rtol, "z vs CPU op")
            assert_close(z.cpu(), rz, atol, rtol, "z vs float64")
    else:
        ez, ekl, _, _ = _formula(mu.cpu(), lv.cpu(), eps.cpu() if with_noise else None, None,
                                 torch.zeros(shape[0]), dtype)
        assert_within_eager_error(kl.cpu(), ekl, rkl, "kl", floor=ktol)
        if with_noise:
            assert_within_eager_error(z.cpu(), ez, rz, "z")
            # same fp32 math and rounding as the CPU op: within one ulp of T
            assert_close(z.cpu(), cz, 0, 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                         "z vs CPU op")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["grad_z", "no_grad_z", "no_noise"])
def test_bwd(shape, dtype, case):
    mu, lv, eps, gz, gkl = _inputs(shape, dtype, seed=1)
    noise = None if case == "no_noise" else eps
    grad_z = gz if case == "grad_z" else None
    gm, gl = K.sample_and_kl_bwd(grad_z, gkl, mu, lv, noise)
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    cgm, cgl = torch.ops.fastdiff._sample_and_kl_bwd(cpu(grad_z), gkl.cpu(), mu.cpu(), lv.cpu(),
                                                     cpu(noise))
    assert gm.dtype == dtype and gl.dtype == dtype and gm.shape == mu.shape
    d = lambda x: None if x is None else x.cpu().double()  # noqa: E731
    _, _, rgm, rgl = _formula(d(mu), d(lv), d(noise), d(grad_z), gkl.cpu().double(), torch.float64)
    if dtype in TIGHT:
        atol, rtol = TIGHT[dtype]
        for got, ref, c, name in ((gm, rgm, cgm, "d mean"), (gl, rgl, cgl, "d logvar")):
            assert_close(got.cpu(), c, atol, rtol, f"{name} vs CPU op")
            assert_close(got.cpu(), ref, atol, rtol, f"{name} vs float64")
    else:
        _, _, egm, egl = _formula(mu.cpu(), lv.cpu(), cpu(noise), cpu(grad_z), gkl.cpu(), dtype)
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        for got, ref, e, c, name in ((gm, rgm, egm, cgm, "d mean"), (gl, rgl, egl, cgl, "d logvar")):
            assert_within_eager_error(got.cpu(), e, ref, name)
            assert_close(got.cpu(), c, 1e-6, ulp, f"{name} vs CPU op")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last(dtype):
    shape = (2, 3, 5, 7)
    mu, lv, eps, gz, gkl = _inputs(shape, dtype, seed=2, channels_last=True)
    z, kl = K.sample_and_kl_fwd(mu, lv, eps)
    assert z.stride() == mu.stride()
    cz, ckl = torch.ops.fastdiff.sample_and_kl(mu.cpu(), lv.cpu(), eps.cpu())
    assert_close(z.cpu(), cz, 1e-6, 1e-5 if dtype == torch.float32 else 2 ** -7, "z")
    assert_close(kl.cpu(), ckl, _kl_tol(mu, lv, dtype), 0, "kl")
    # the contiguous result, permuted: same elements
    zc, klc = K.sample_and_kl_fwd(mu.contiguous(), lv.contiguous(), eps.contiguous())
    assert torch.equal(zc, z.contiguous())
    assert_close(klc.cpu(), kl.cpu(), _kl_tol(mu, lv, dtype), 0, "kl layouts")
    gm, gl = K.sample_and_kl_bwd(gz, gkl, mu, lv, eps)
    assert gm.stride() == mu.stride() and gl.stride() == mu.stride()
    cgm, cgl = torch.ops.fastdiff._sample_and_kl_bwd(gz.cpu(), gkl.cpu(), mu.cpu(), lv.cpu(), eps.cpu())
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-6, 2 ** -7)
    assert_close(gm.cpu(), cgm, *tol, "d mean")
    assert_close(gl.cpu(), cgl, *tol, "d logvar")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kl_deterministic(dtype):
    mu, lv, eps, _, _ = _inputs((2, 3, 1000), dtype, seed=3)
    z1, kl1 = K.sample_and_kl_fwd(mu, lv, eps)
    z2, kl2 = K.sample_and_kl_fwd(mu, lv, eps)
    _, kl3 = K.sample_and_kl_fwd(mu, lv, None)
    assert torch.equal(kl1, kl2) and torch.equal(z1, z2)
    assert torch.equal(kl1, kl3)  # the KL does not depend on whether z is sampled


def test_multi_step_reduce_and_batch_slices(monkeypatch):
    """Small BLOCK / REDUCE_BLOCK: many partials, several stage-2 steps, a tail,
    and the batch launched in slices (as for B > 65535)."""
    monkeypatch.setattr(K, "BLOCK", 32)
    monkeypatch.setattr(K, "REDUCE_BLOCK", 2)
    monkeypatch.setattr(K, "BWD_BLOCK", 64)
    monkeypatch.setattr(K, "batch_slices",
                        lambda b: [slice(i, min(i + 2, b)) for i in range(0, b, 2)])
    shape = (5, 333)
    mu, lv, eps, gz, gkl = _inputs(shape, torch.float64, seed=4)
    z, kl = K.sample_and_kl_fwd(mu, lv, eps)
    rz, rkl, rgm, rgl = _formula(mu.cpu(), lv.cpu(), eps.cpu(), gz.cpu(), gkl.cpu(), torch.float64)
    assert_close(z.cpu(), rz, 1e-12, 1e-10, "z")
    assert_close(kl.cpu(), rkl, _kl_tol(mu, lv, torch.float64), 0, "kl")
    gm, gl = K.sample_and_kl_bwd(gz, gkl, mu, lv, eps)
    assert_close(gm.cpu(), rgm, 1e-12, 1e-10, "d mean")
    assert_close(gl.cpu(), rgl, 1e-12, 1e-10, "d logvar")


def test_empty():
    mu = torch.zeros((0, 3, 4), device=DEVICE)
    z, kl = K.sample_and_kl_fwd(mu, mu, mu)
    cz, ckl = torch.ops.fastdiff.sample_and_kl(mu.cpu(), mu.cpu(), mu.cpu())
    assert z.shape == cz.shape and kl.shape == ckl.shape == (0,)
    gm, gl = K.sample_and_kl_bwd(None, torch.zeros(0, device=DEVICE), mu, mu, None)
    assert gm.shape == mu.shape and gl.shape == mu.shape
    # n == 0 (the C++ op rejects this shape): kl is the empty sum, 0.
    mu = torch.zeros((2, 0), device=DEVICE)
    z, kl = K.sample_and_kl_fwd(mu, mu, None)
    assert z.shape == (0,) and torch.equal(kl.cpu(), torch.zeros(2))


def test_contract_errors():
    mu, lv, eps, gz, gkl = _inputs((2, 3, 4), torch.float32)
    with pytest.raises(ValueError):
        K.sample_and_kl_bwd(gz, gkl, mu, lv, None)  # grad_z without noise
    with pytest.raises(ValueError):
        K.sample_and_kl_bwd(None, gkl.double(), mu, lv, eps)  # grad_kl not A
    with pytest.raises(ValueError):
        K.sample_and_kl_fwd(mu, lv.double(), eps)
    with pytest.raises(TypeError):
        K.sample_and_kl_fwd(mu.int(), lv.int(), None)
