"""Benchmark case of fastdiff.ddpm_step: epsilon prediction, fixed_small variance, clip_sample=True,
per-sample t > 0 (so noise is added), noise given.

One definition for ``fastdiff bench`` (fastdiff/benchmark.py) and for pytest-benchmark:
``pytest benchmarks/bench_ddpm_step.py --benchmark-only``.
"""
import torch

import fastdiff
from fastdiff import reference
from fastdiff.benchmark import OpCase, pytest_params, pytest_run

OP = "ddpm_step"
SCHEDULE = fastdiff.NoiseSchedule.scaled_linear(1000)
SETTINGS = dict(prediction_type="epsilon", variance_type="fixed_small", clip_sample=True)


def setup(shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "model_output": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "sample": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "noise": torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        "t": torch.randint(1, SCHEDULE.num_timesteps, (shape[0],), generator=g).to(device),
        "schedule": SCHEDULE.to(device),
    }


def call(fn, inp, **kw):
    # t_prev defaults to t - 1 in both the reference and the op.
    return fn(inp["model_output"], inp["t"], inp["sample"], inp["schedule"], noise=inp["noise"], **SETTINGS, **kw)


CASE = OpCase(
    op=OP,
    config="prediction_type=epsilon;variance_type=fixed_small;clip_sample=True;noise=given;t>0;"
           "schedule=scaled_linear",
    setup=setup,
    call=call,
    reference=reference.ddpm_step,
    api=fastdiff.ddpm_step,
    grad_inputs=("model_output", "sample"),
    # N = numel(sample). With clip_sample the backward needs x0_hat's clamp mask, so it reads
    # model_output and sample again.
    moved={"fwd": 4, "bwd": 5, "full": 9},
    bytes_doc={
        "fwd": "read model_output, sample, noise; write prev_sample = 4N",
        "bwd": "read grad_out, model_output, sample (clip mask); write grad_model_output, grad_sample = 5N",
        "full": "fwd + bwd = 9N",
    },
)

try:
    import pytest
except ImportError:  # the installed package runs without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize(*pytest_params(CASE))
    def test_ddpm_step(benchmark, provider, mode, size):
        pytest_run(benchmark, CASE, provider, mode, size)
