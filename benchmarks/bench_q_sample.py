"""Benchmark case of fastdiff.q_sample: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, per-sample t.

One definition for ``fastdiff bench`` (fastdiff/benchmark.py) and for pytest-benchmark:
``pytest benchmarks/bench_q_sample.py --benchmark-only``.
"""
import torch

import fastdiff
from fastdiff import reference
from fastdiff.benchmark import OpCase, pytest_params, pytest_run

OP = "q_sample"
SCHEDULE = fastdiff.NoiseSchedule.scaled_linear(1000)


def setup(shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "x0": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "noise": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "t": torch.randint(0, SCHEDULE.num_timesteps, (shape[0],), generator=g).to(device),
        "schedule": SCHEDULE.to(device),
    }


def call(fn, inp, **kw):
    return fn(inp["x0"], inp["t"], inp["noise"], inp["schedule"], **kw)


CASE = OpCase(
    op=OP,
    config="schedule=scaled_linear;T=1000",
    setup=setup,
    call=call,
    reference=reference.q_sample,
    api=fastdiff.q_sample,
    grad_inputs=("x0", "noise"),
    # N = numel(x0); bytes = moved * N * element size.
    moved={"fwd": 3, "bwd": 3, "full": 6},
    bytes_doc={
        "fwd": "read x0, noise; write x_t = 3N",
        "bwd": "read grad_x_t; write grad_x0, grad_noise = 3N",
        "full": "fwd + bwd = 6N",
    },
)

try:
    import pytest
except ImportError:  # the installed package runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize(*pytest_params(CASE))
    def test_q_sample(benchmark, provider, mode, size):
        pytest_run(benchmark, CASE, provider, mode, size)
