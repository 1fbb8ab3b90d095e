"""fastdiff.nn.AttentionBlock against the eager fastdiff.reference.AttentionBlock with the
same weights: output and the gradients of x, the context and every parameter."""
import pytest
import torch

import fastdiff
from fastdiff import reference
from utils import assert_close, assert_within_eager_error, fused_backends_here

BACKENDS = fused_backends_here("attention")


def _blocks(channels, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    ref = reference.AttentionBlock(channels, **kw).to(dtype)
    with torch.no_grad():  # ADM zero-initializes proj_out (and GroupNorm starts at 1 / 0): randomize all
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == channels else 0.0))
    fused = fastdiff.nn.AttentionBlock(channels, **kw).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _step(block, x, context, grad_out, **kw):
    x = x.detach().clone().requires_grad_(True)
    ctx = None if context is None else context.detach().clone().requires_grad_(True)
    block.zero_grad()
    out = block(x, ctx, **kw) if ctx is not None else block(x, **kw)
    out.backward(grad_out)
    grads = {"x": x.grad} | ({} if ctx is None else {"context": ctx.grad})
    grads |= {name: p.grad.clone() for name, p in block.named_parameters()}
    return out.detach(), grads


# (channels, spatial, kwargs, context length): heads by count and by channels per head,
# odd spatial sizes, 1-D and 2-D, cross-attention to a context.
CASES = [
    (64, (5, 7), {"num_heads": 2}, None),
    (64, (4, 4), {"num_head_channels": 16}, None),
    (32, (9,), {"norm_groups": 8}, None),
    (64, (3, 5), {"num_head_channels": 32, "context_dim": 24}, 7),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels,spatial,kw,ctx_len", CASES)
def test_matches_eager_block(backend, channels, spatial, kw, ctx_len):
    ref, fused = _blocks(channels, **kw)
    fused.backend = backend
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, channels) + spatial, generator=g, dtype=torch.float64) * 2 + 0.5
    context = None if ctx_len is None else torch.randn(2, ctx_len, kw["context_dim"], generator=g,
                                                       dtype=torch.float64)
    grad_out = torch.randn_like(x)
    out_r, grads_r = _step(ref, x, context, grad_out)
    out_f, grads_f = _step(fused, x, context, grad_out)
    assert_close(out_f, out_r, 1e-10, 1e-10, "out")
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        assert_close(grads_f[name], grads_r[name], 1e-9, 1e-9, f"d {name}")


def test_float32_within_eager_error_and_state_dict():
    ref, fused = _blocks(128, torch.float32, num_head_channels=64)
    assert list(ref.state_dict()) == list(fused.state_dict())
    x = torch.randn(2, 128, 16, 16)
    grad_out = torch.randn_like(x)
    out_r, grads_r = _step(ref, x, None, grad_out)
    out_f, grads_f = _step(fused, x, None, grad_out)
    out_x, grads_x = _step(ref.double(), x.double(), None, grad_out.double())
    assert_within_eager_error(out_f, out_r, out_x, "out")
    for name in grads_r:
        assert_within_eager_error(grads_f[name], grads_r[name], grads_x[name], f"d {name}")


def test_fresh_block_is_identity():
    # proj_out starts at zero (ADM): the fresh block returns x
    block = fastdiff.nn.AttentionBlock(32, norm_groups=8)
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(block(x), x)


def test_bad_input():
    block = fastdiff.nn.AttentionBlock(32, norm_groups=8, context_dim=6)
    with pytest.raises(ValueError, match="context must be given"):
        block(torch.randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match=r"context must have shape \(2, L, 6\)"):
        block(torch.randn(2, 32, 4, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 32, \*spatial\)"):
        block(torch.randn(2, 16, 4, 4), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="num_head_channels = 12 must be positive and divide channels = 32"):
        fastdiff.nn.AttentionBlock(32, num_head_channels=12)
    with pytest.raises(ValueError, match="num_heads = 3"):
        fastdiff.nn.AttentionBlock(32, num_heads=3)
