"""Benchmark case of fastdiff.attention: softmax(q k^T / sqrt(D)) v, forward and dq / dk / dv.

Sizes are B x H x Nq x Nk x D. Providers beside reference / compile / fastdiff's backends:
``sdpa`` (torch's scaled_dot_product_attention) and, on CUDA when installed, ``xformers``.

One definition for ``fastdiff bench`` (fastdiff/benchmark.py) and for pytest-benchmark:
``pytest benchmarks/bench_attention.py --benchmark-only``.
"""
import torch

import fastdiff
from fastdiff import reference
from fastdiff.benchmark import OpCase, pytest_params, pytest_run

OP = "attention"
SIZES = (
    (8, 4, 4096, 4096, 64),   # ADM 64x64: 4 heads of 64 channels
    (2, 8, 4096, 4096, 40),   # SD 64x64 latents, first level: 8 heads of 40
    (2, 8, 4096, 77, 80),     # SD cross-attention to 77 text tokens, second level
)


def setup(shape, device, dtype):
    if len(shape) != 5:
        raise ValueError(f"attention sizes are B x H x Nq x Nk x D, got {shape}")
    b, h, nq, nk, d = shape
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)
            for name, n in (("q", nq), ("k", nk), ("v", nk))}


def call(fn, inp, **kw):
    return fn(inp["q"], inp["k"], inp["v"], **kw)


def nbytes(mode, shape, dtype):
    b, h, nq, nk, d = shape
    q_side, kv_side = b * h * nq * d, b * h * nk * d
    tensors = {"fwd": 2 * q_side + 2 * kv_side,         # read q, k, v; write out
               "bwd": 4 * q_side + 4 * kv_side,         # read q, k, v, out, grad_out; write dq, dk, dv
               "full": 6 * q_side + 6 * kv_side}
    return tensors[mode] * torch.empty((), dtype=dtype).element_size()


CASE = OpCase(
    op=OP,
    config="scale=1/sqrt(D);non-causal",
    setup=setup,
    call=call,
    reference=reference.attention,
    api=fastdiff.attention,
    grad_inputs=("q", "k", "v"),
    moved={},
    bytes_doc={
        "fwd": "read q, k, v; write out (no N x N tensor: a perfect kernel moves only these)",
        "bwd": "read q, k, v, out, grad_out; write dq, dk, dv",
        "full": "fwd + bwd",
    },
    sizes=SIZES,
    bytes_fn=nbytes,
)

try:
    import pytest
except ImportError:  # the installed package runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize(*pytest_params(CASE))
    def test_attention(benchmark, provider, mode, size):
        pytest_run(benchmark, CASE, provider, mode, size)
