"""Benchmark case of fastdiff.group_norm_silu: GroupNorm(32) + SiLU with affine parameters, as in
every ResNet block of a diffusion U-Net and of the SD VAE (``--channels-last`` for NHWC).

One definition for ``fastdiff bench`` (fastdiff/benchmark.py) and for pytest-benchmark:
``pytest benchmarks/bench_group_norm_silu.py --benchmark-only``.
"""
import math

import torch

import fastdiff
from fastdiff import reference
from fastdiff.benchmark import OpCase, pytest_params, pytest_run

OP = "group_norm_silu"
GROUPS = 32
SIZES = (
    (2, 320, 64, 64),     # SD-UNet, first level
    (2, 1280, 16, 16),    # SD-UNet, deepest level
    (1, 128, 256, 256),   # SD-VAE decoder, last level: 4 channels x 65536 per group
    (1, 512, 64, 64),     # SD-VAE decoder, first level
    (128, 128, 32, 32),   # DDPM CIFAR-10
)


def setup(shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    channels = shape[1]
    return {
        "x": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "weight": (1 + 0.1 * torch.randn(channels, generator=g)).to(device=device, dtype=dtype),
        "bias": (0.1 * torch.randn(channels, generator=g)).to(device=device, dtype=dtype),
    }


def call(fn, inp, **kw):
    # 32 groups, or the largest count dividing C (the generic sizes of --sizes small have C = 4)
    return fn(inp["x"], math.gcd(GROUPS, inp["x"].shape[1]), inp["weight"], inp["bias"], 1e-5, "silu", **kw)


CASE = OpCase(
    op=OP,
    config=f"num_groups=gcd({GROUPS},C);eps=1e-5;activation=silu",
    setup=setup,
    call=call,
    reference=reference.group_norm_silu,
    api=fastdiff.group_norm_silu,
    grad_inputs=("x", "weight", "bias"),
    # N = numel(x); statistics (N x G) and parameters (C) are not counted.
    moved={"fwd": 2, "bwd": 3, "full": 5},
    bytes_doc={
        "fwd": "read x; write y = 2N",
        "bwd": "read x, grad_y; write grad_x = 3N",
        "full": "fwd + bwd = 5N",
    },
    sizes=SIZES,
)

try:
    import pytest
except ImportError:  # the installed package runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize(*pytest_params(CASE))
    def test_group_norm_silu(benchmark, provider, mode, size):
        pytest_run(benchmark, CASE, provider, mode, size)
