"""Benchmark case of fastdiff.sample_and_kl: z = mean + exp(logvar / 2) noise and the
per-sample KL to N(0, I), the VAE posterior's hot path (SD-VAE latents: 4 channels).

One definition for ``fastdiff bench`` (fastdiff/benchmark.py) and for pytest-benchmark:
``pytest benchmarks/bench_sample_and_kl.py --benchmark-only``.
"""
import torch

import fastdiff
from fastdiff import reference
from fastdiff.benchmark import OpCase, pytest_params, pytest_run

OP = "sample_and_kl"


def setup(shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "mean": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "logvar": (torch.randn(shape, generator=g) - 1).to(device=device, dtype=dtype),
        "noise": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
    }


def call(fn, inp, **kw):
    return fn(inp["mean"], inp["logvar"], inp["noise"], **kw)


CASE = OpCase(
    op=OP,
    config="reduction=sum_per_sample",
    setup=setup,
    call=call,
    reference=reference.sample_and_kl,
    api=fastdiff.sample_and_kl,
    grad_inputs=("mean", "logvar"),
    # N = numel(mean); the per-sample KL sums are negligible.
    moved={"fwd": 4, "bwd": 6, "full": 10},
    bytes_doc={
        "fwd": "read mean, logvar, noise; write z = 4N",
        "bwd": "read grad_z, mean, logvar, noise; write grad_mean, grad_logvar = 6N",
        "full": "fwd + bwd = 10N",
    },
)

try:
    import pytest
except ImportError:  # the installed package runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize(*pytest_params(CASE))
    def test_sample_and_kl(benchmark, provider, mode, size):
        pytest_run(benchmark, CASE, provider, mode, size)
