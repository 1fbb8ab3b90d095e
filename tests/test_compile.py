"""Every op is a registered custom op: opcheck passes, torch.compile(fullgraph=True) has no break."""
import pytest
import torch

import fastdiff
from utils import fused_backends_here

S = fastdiff.NoiseSchedule.linear()


def _tensors(shape=(2, 3, 4, 5), dtype=torch.float32, learned=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    mshape = (shape[0], 2 * shape[1]) + shape[2:] if learned else shape
    m = torch.randn(mshape, generator=g, dtype=dtype)
    noise = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.tensor([5, 900])
    return m, x, noise, t


def _op_cases():
    tab = S.table("cpu")
    post = S.posterior_table("cpu")
    m, x, noise, t = _tensors()
    w, b = torch.randn(3), torch.randn(3)
    _, mean, rstd = torch.ops.fastdiff.group_norm_silu(x, w, b, 3, 1e-5, True)
    ml, *_ = _tensors(learned=True)
    loss_grad = torch.randn(2)
    q, k, v = (torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(n)) for n in (5, 7, 7))
    out, lse = torch.ops.fastdiff.attention(q, k, v, 0.3)
    return {
        "q_sample": (x, noise, t, tab),
        "_q_sample_bwd": (x, t, tab),
        "diffusion_loss": (m, x, noise, t, tab, 2, 5.0, 0.5),
        "diffusion_loss_nograd": (m, x, noise, t, tab, 2, 5.0, 0.0),
        "_diffusion_loss_bwd": (loss_grad, m, x, noise, t, tab, 2, 5.0),
        "ddpm_step": (ml, x, noise, t, t - 1, tab, 0, 5, True, 1.0),
        "_ddpm_step_bwd": (x, ml, x, noise, t, t - 1, tab, 0, 5, True, 1.0),
        "ddim_step": (m, x, noise, t, t - 20, tab, 2, 0.5, True, 1.0, True),
        "_ddim_step_bwd": (x, m, x, t, t - 20, tab, 2, 0.5, True, 1.0, True),
        "sample_and_kl": (m, x, noise),
        "sample_and_kl_nonoise": (m, x, None),
        "_sample_and_kl_bwd": (x, loss_grad, m, x, noise),
        "_sample_and_kl_bwd_nonoise": (None, loss_grad, m, x, None),
        "vb_loss": (m, x - 5.0, x, noise, t, post, 0.5),
        "vb_loss_nograd": (m, x - 5.0, x, noise, t, post, 0.0),
        "_vb_loss_bwd": (loss_grad, m, x - 5.0, x, noise, t, post),
        "group_norm_silu": (x, w, b, 3, 1e-5, True),
        "group_norm_silu_channels_last": (x.to(memory_format=torch.channels_last), w, None, 1, 1e-5, False),
        "_group_norm_silu_bwd": (m, x, w, b, mean, rstd, 3, True),
        "attention": (q, k, v, 0.3),
        "attention_strided": (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, 0.3),
        "_attention_bwd": (torch.randn_like(q), q, k, v, out, lse, 0.3),
    }


NAMESPACES = ["fastdiff"] + (["fastdiff_triton"] if "triton" in fused_backends_here() else [])


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("name", list(_op_cases()))
def test_opcheck(namespace, name):
    args = list(_op_cases()[name])
    if not name.startswith("_"):  # forward ops: their first two inputs are differentiable
        args[:2] = [a.clone().requires_grad_(True) for a in args[:2]]
    base = name.replace("_nograd", "").replace("_nonoise", "").replace("_channels_last", "").replace("_strided", "")
    op = getattr(getattr(torch.ops, namespace), base).default
    torch.library.opcheck(op, tuple(args))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    m, x, noise, t = _tensors()
    m.requires_grad_(True)

    def train_step(m, x0, noise, t):
        x_t = fastdiff.q_sample(x0, t, noise, S, backend="cpu")
        loss = fastdiff.diffusion_loss(m * x_t, x0, noise, t, S, "v_prediction", 5.0, backend="cpu")
        prev = fastdiff.ddpm_step(m, t, x_t, S, noise=noise, backend="cpu")
        prev = fastdiff.ddim_step(m, t, t - 20, prev, S, eta=0.5, noise=noise, backend="cpu")
        vlb = fastdiff.vb_loss(prev, m - 5.0, x0, x_t, t, S, reduction="mean", backend="cpu")
        h = fastdiff.group_norm_silu(m * x0, 3, backend="cpu")
        tokens = h.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)
        a = fastdiff.attention(tokens, tokens, m.flatten(2).transpose(1, 2).unsqueeze(1), backend="cpu")
        return loss + prev.square().mean() + vlb + h.square().mean() + a.square().mean()

    compiled = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    got = compiled(m, x, noise, t)
    (g_got,) = torch.autograd.grad(got, m)
    want = train_step(m, x, noise, t)
    (g_want,) = torch.autograd.grad(want, m)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_compile_inductor_no_graph_break():
    torch._dynamo.reset()
    m, x, noise, t = _tensors()

    def fn(m, x0, noise, t):
        return fastdiff.diffusion_loss(m, x0, noise, t, S, "epsilon", None, "none", backend="cpu") * 2

    explanation = torch._dynamo.explain(fn)(m, x, noise, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(m, x, noise, t), fn(m, x, noise, t))


def _per_layer_losses():
    """Losses through the per-layer ops (C++ autograd) and their inputs, for batch b."""
    def gn(x, w, b):
        return fastdiff.group_norm_silu(x, 4, w, b, backend="cpu").square().sum()

    def attn(q, k, v):
        return fastdiff.attention(q, k, v, backend="cpu").square().sum()

    return (("group_norm_silu", gn, lambda b: (torch.randn(b, 8, 5, 7), torch.randn(8), torch.randn(8))),
            ("attention", attn, lambda b: tuple(torch.randn(b, 3, 7, 8) for _ in range(3))))


@pytest.mark.parametrize("which", [0, 1], ids=["group_norm_silu", "attention"])
def test_dynamic_batch_compiles_once_with_backward(which):
    """The backward reads no size or stride of the (symbolic) tensors: a dynamic-shape graph
    with gradients serves every batch size without recompiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    _, fn, make = _per_layer_losses()[which]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for b in (2, 3, 5):
        args = tuple(a.requires_grad_(True) for a in make(b))
        got = torch.autograd.grad(compiled(*args), args)
        want = torch.autograd.grad(fn(*args), args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        frames.append(counter.frame_count)
    assert frames[1:] == frames[:1] * 2, f"recompiled for new batch sizes: frames after each call {frames}"


@pytest.mark.parametrize("which", [0, 1], ids=["group_norm_silu", "attention"])
def test_compiled_autograd(which):
    """torch._dynamo's compiled autograd runs the C++ backward nodes eagerly inside its graph
    (a graph break there, correct gradients; it would refuse nodes that mark outputs
    non-differentiable: these do not)."""
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    _, fn, make = _per_layer_losses()[which]
    args = tuple(a.requires_grad_(True) for a in make(2))
    want = torch.autograd.grad(fn(*args), args)
    with compiled_autograd._enable(torch.compile(backend="aot_eager")):
        fn(*args).backward()
    for a, w in zip(args, want):
        torch.testing.assert_close(a.grad, w)
