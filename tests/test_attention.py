"""fastdiff.attention (cpu backend; triton interpreted on the small cases) against
fastdiff.reference.attention in float64 and against torch's scaled_dot_product_attention,
forward and dq / dk / dv; the eager error rule for fp16 / bf16; bad input."""
import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import reference
from utils import REDUCED_DTYPES, assert_close, assert_within_eager_error, fused_backends_here

BACKENDS = fused_backends_here("attention")
CPU = ["cpu"] if "cpu" in BACKENDS else []

# (B, H, Nq, Nk, D): U-Net head dims, Nq != Nk, odd lengths.
SMALL = [
    (2, 3, 37, 37, 32),   # self-attention, odd length
    (1, 2, 33, 77, 40),   # cross-attention to 77 text tokens, SD's head dim
    (2, 1, 17, 9, 80),
    (1, 2, 5, 11, 160),
    (1, 1, 3, 4, 1),      # head dim 1
    (2, 2, 1, 13, 17),    # one query, odd head dim
    (1, 1, 7, 1, 8),      # one key
]
# Past the CPU kernel's tiles (forward 64 x 1024, backward 128 x 256): online rescaling across key blocks.
LARGE = [
    (1, 2, 130, 1100, 16),
    (2, 1, 200, 520, 64),
]


def _qkv(b, h, nq, nk, d, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64) * scale
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64) * scale
    v = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _run(fn, q, k, v, grad_out):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def _truth(q, k, v, grad_out, scale=None):
    return _run(lambda a, b, c: reference.attention(a, b, c, scale), q.double(), k.double(), v.double(),
                grad_out.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_matches_reference(backend, shape, dtype, tol):
    q, k, v = _qkv(*shape, dtype=dtype)
    grad_out = torch.randn_like(q)
    got = _run(lambda a, b, c: fastdiff.attention(a, b, c, backend=backend), q, k, v, grad_out)
    want = _truth(q, k, v, grad_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype
        assert_close(g, w, tol, tol, f"{backend} {shape} {dtype} {name}")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("shape", LARGE)
def test_many_key_blocks(backend, shape):
    q, k, v = _qkv(*shape, dtype=torch.float32, seed=3, scale=2.0)  # peaked rows: the running max moves
    grad_out = torch.randn_like(q)
    got = _run(lambda a, b, c: fastdiff.attention(a, b, c, backend=backend), q, k, v, grad_out)
    want = _truth(q, k, v, grad_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, 5e-5, 5e-5, f"{shape} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_sdpa_and_lse(backend):
    q, k, v = _qkv(2, 2, 19, 23, 40, dtype=torch.float32, seed=1)
    grad_out = torch.randn_like(q)
    scale = 0.37
    got = _run(lambda a, b, c: fastdiff.attention(a, b, c, scale, backend=backend), q, k, v, grad_out)
    want = _run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=scale), q, k, v, grad_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, 2e-5, 2e-5, f"vs sdpa {name}")
    ns = torch.ops.fastdiff_triton if backend == "triton" else torch.ops.fastdiff
    _, lse = ns.attention(q, k, v, scale)
    exact = torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 19)
    assert_close(lse, exact, 1e-5, 1e-5, "lse")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
@pytest.mark.parametrize("shape", [(2, 2, 70, 77, 40), (1, 2, 100, 600, 64)])
def test_reduced_precision_within_eager_error(backend, dtype, shape):
    q, k, v = _qkv(*shape, dtype=dtype, seed=2)
    grad_out = torch.randn_like(q)
    got = _run(lambda a, b, c: fastdiff.attention(a, b, c, backend=backend), q, k, v, grad_out)
    eager = _run(reference.attention, q, k, v, grad_out)
    exact = _truth(q, k, v, grad_out)
    for name, g, e, x in zip(("out", "dq", "dk", "dv"), got, eager, exact):
        assert g.dtype == dtype
        assert_within_eager_error(g, e, x, f"{dtype} {shape} {name}")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
def test_large_logits_stay_finite(backend, dtype):
    # scores around 1e4: exp would overflow without the running max (and fp16 scores near 6e4)
    q, k, v = _qkv(1, 2, 20, 30, 16, dtype=dtype, seed=4, scale=25.0)
    grad_out = torch.randn_like(q)
    got = _run(lambda a, b, c: fastdiff.attention(a, b, c, backend=backend), q, k, v, grad_out)
    exact = _truth(q, k, v, grad_out)
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max() > 1e3
    for name, g, x in zip(("out", "dq", "dk", "dv"), got, exact):
        assert torch.isfinite(g).all(), name
    assert_close(got[0], exact[0], 0.05, 0.05, "out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_qkv_views_and_layouts(backend):
    b, n, h, d = 2, 21, 3, 16
    qkv = torch.randn(b, n, h, 3, d, dtype=torch.float64, requires_grad=True)  # a qkv projection's output
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    out = fastdiff.attention(q, k, v, backend=backend)
    assert out.shape == (b, h, n, d)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) memory: the projection's input as is
    grad_out = torch.randn(b, h, d, n, dtype=torch.float64).transpose(2, 3)  # head dim not contiguous
    out.backward(grad_out)
    ref = qkv.detach().clone().requires_grad_(True)
    rq, rk, rv = (ref[:, :, :, i].transpose(1, 2) for i in range(3))
    want = reference.attention(rq, rk, rv)
    want.backward(grad_out)
    assert_close(out, want, 1e-10, 1e-10, "out")
    assert_close(qkv.grad, ref.grad, 1e-10, 1e-10, "d qkv")


@pytest.mark.parametrize("backend", CPU)
def test_autograd_is_the_cpp_node(backend):
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, 6, 9, 8, dtype=torch.float32))
    assert "CppNode" in fastdiff.attention(q, k, v, backend=backend).grad_fn.name()


@pytest.mark.parametrize("backend", CPU)
def test_double_backward_is_refused(backend):
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, 6, 9, 8, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(fastdiff.attention(q, k, v, backend=backend).square().sum(), (q, k, v), create_graph=True)


@pytest.mark.parametrize("backend", CPU)
def test_backward_is_deterministic(backend):
    q, k, v = _qkv(2, 2, 150, 700, 32, dtype=torch.float32, seed=5)
    grad_out = torch.randn_like(q)
    first = _run(lambda a, b, c: fastdiff.attention(a, b, c, backend=backend), q, k, v, grad_out)
    second = _run(lambda a, b, c: fastdiff.attention(a, b, c, backend=backend), q, k, v, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU)
def test_gradcheck(backend):
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, 6, 9, 5, seed=6))
    assert torch.autograd.gradcheck(lambda a, b, c: fastdiff.attention(a, b, c, 0.7, backend=backend), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    q, k, v = _qkv(0, 2, 5, 6, 8, dtype=torch.float32)
    assert fastdiff.attention(q, k, v, backend=backend).shape == (0, 2, 5, 8)
    q2, k2, v2 = (x.requires_grad_(True) for x in _qkv(1, 1, 0, 6, 8, dtype=torch.float32))
    out = fastdiff.attention(q2, k2, v2, backend=backend)
    assert out.shape == (1, 1, 0, 8)
    out.sum().backward()
    assert torch.equal(k2.grad, torch.zeros_like(k2)) and torch.equal(v2.grad, torch.zeros_like(v2))


def test_other_backends_and_auto():
    q, k, v = _qkv(1, 2, 9, 11, 8, dtype=torch.float32)
    want = reference.attention(q, k, v)
    for backend in ("sdpa", "reference", None):
        assert_close(fastdiff.attention(q, k, v, backend=backend), want, 1e-5, 1e-5, str(backend))
    if not torch.cuda.is_available():
        with pytest.raises(fastdiff.BackendError, match="xformers"):
            fastdiff.attention(q, k, v, backend="xformers")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(fastdiff.BackendError, match="sdpa runs only fastdiff.attention"):
        fastdiff.group_norm_silu(x, 3, backend="sdpa")


def test_bad_input():
    q, k, v = _qkv(2, 2, 5, 6, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="head dim D = 300"):
        fastdiff.attention(*(torch.zeros(1, 1, 2, 300) for _ in range(3)))
    with pytest.raises(ValueError, match="k of shape .* in batch B"):
        fastdiff.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="in heads H"):
        fastdiff.attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="v of shape .* in head dim D"):
        fastdiff.attention(q, k, v[..., :4])
    with pytest.raises(ValueError, match="v has 5 tokens but k has 6"):
        fastdiff.attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="at least one token"):
        fastdiff.attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(TypeError, match="k dtype torch.float64 does not match q dtype torch.float32"):
        fastdiff.attention(q, k.double(), v)
    with pytest.raises(TypeError, match="q must be float32"):
        fastdiff.attention(q.int(), k, v)
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        fastdiff.attention(q, k, v.to("meta"))
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, N, D\)"):
        fastdiff.attention(q[0], k, v)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fastdiff.attention(q, k, v, float("nan"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, *REDUCED_DTYPES])
@pytest.mark.parametrize("shape", SMALL + LARGE + [(2, 8, 1024, 77, 80), (1, 4, 1000, 1000, 64), (1, 2, 300, 300, 256)])
def test_gpu_backends(backend, dtype, shape):
    q, k, v = (x.cuda() for x in _qkv(*shape, dtype=dtype, seed=7))
    grad_out = torch.randn_like(q)
    got = _run(lambda a, b, c: fastdiff.attention(a, b, c, backend=backend), q, k, v, grad_out)
    exact = _truth(q, k, v, grad_out)
    if dtype == torch.float32:
        for name, g, x in zip(("out", "dq", "dk", "dv"), got, exact):
            assert_close(g, x, 1e-4, 1e-4, f"{backend} {shape} {name}")
        return
    eager = _run(reference.attention, q, k, v, grad_out)
    for name, g, e, x in zip(("out", "dq", "dk", "dv"), got, eager, exact):
        assert_within_eager_error(g, e, x, f"{backend} {dtype} {shape} {name}", floor=1e-3)
